"""The routing override of the MoE layer: route tokens to given experts, weighted as the router would weight them
(``MoE.forward(..., expert_ids=..., routing_weights=...)``; router replay in :mod:`torch_moe.replay`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .routing import Routing

__all__ = ["override_routing"]


def override_routing(router, routing: Routing, expert_ids: Tensor, routing_weights: Optional[Tensor] = None) -> Routing:
    """``routing`` (the router's own, for T tokens) sent to the experts ``expert_ids`` [T, k'] instead.

    Weights: the router's own for those ids (:meth:`Router.weights_for` on the same logits, so the router gets the
    gradient it would get had it chosen them); for a token whose given ids are exactly the router's choice, the
    router's own weights, so an override by the router's own choice changes nothing, bit for bit. With
    ``routing_weights`` [T, k'] their values are used and the router's own weights carry the gradient to the router
    (``routing_weights + (own - own.detach())``; ``routing_weights`` gets its gradient too when it requires one).
    """
    if not router.token_choice:
        raise ValueError(f"MoE(router={router.name!r}): expert_ids / routing replay needs token-choice routing "
                         "(an expert-choice layer's assignment is its experts' choice of tokens)")
    num_tokens = routing.weights.shape[0]
    if expert_ids.dim() != 2 or expert_ids.shape[0] != num_tokens:
        raise ValueError(f"MoE: the given expert_ids are for {expert_ids.shape[0] if expert_ids.dim() else 0} tokens "
                         f"(shape {tuple(expert_ids.shape)}), this forward has {num_tokens} tokens: replaying a "
                         "routing needs the tokens it was recorded for")
    if expert_ids.shape[1] < 1 or expert_ids.shape[1] > router.num_experts:
        raise ValueError(f"MoE: expert_ids must give between 1 and num_experts={router.num_experts} experts per "
                         f"token, got {expert_ids.shape[1]}")
    expert_ids = expert_ids.to(device=routing.weights.device, dtype=torch.int64)
    own = router.weights_for(routing, expert_ids)
    if routing.expert_ids.shape == expert_ids.shape:
        same = (routing.expert_ids == expert_ids).all(1, keepdim=True)
        own = torch.where(same, routing.weights, own)
    weights = own
    if routing_weights is not None:
        given = routing_weights.to(device=own.device, dtype=own.dtype)
        weights = given + (own - own.detach())
    return routing._replace(expert_ids=expert_ids, weights=weights)
