"""Global-batch load balancing without expert parallelism: the load-balancing loss's expert fractions counted
over every micro-batch of a gradient-accumulation step and over data-parallel ranks (Qiu et al. 2025)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed
from torch import Tensor

from . import distributed
from .layer import MoE

__all__ = ["GlobalBatchBalancing", "global_batch_balancing"]


class GlobalBatchBalancing:
    """Global-batch load balancing without expert parallelism (Qiu et al. 2025, "Demons in the Detail: On
    Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models").

    The Switch loss ``E · Σ_i f_i · P_i`` computed per micro-batch balances each micro-batch, a constraint that
    keeps experts from specialising on a domain; here f_i, the fraction of assignments that went to expert i, is
    counted over every micro-batch of the gradient-accumulation step (and, with ``group``, over its data-parallel
    ranks, one all-reduce per step), while P_i stays the micro-batch's own mean router probability.

    Counting first makes it exact: the counts of the whole step are collected in a no-grad routing pre-pass
    (:meth:`counting`: forward every micro-batch of the step once, the model in training mode), then each
    training forward's load-balancing loss is ``M · W · E · Σ_i f_i · S_i / N``, with S_i its sum of
    probabilities over its valid tokens, N the valid tokens of all M micro-batches and W ranks. So the mean over
    the micro-batches (and ranks) of that loss, its value and its gradient, is the loss of the concatenated global
    batch, and it enters ``MoE.aux_loss`` like the per-micro-batch loss it replaces (average it over the
    micro-batches as the other aux losses). The pre-pass costs one extra no-grad forward per micro-batch; its
    routing is the training pass's when the forward is deterministic (no dropout before a router, no jitter or
    router noise), and for those it counts one draw of the randomness, not the training pass's.

    Eval-mode forwards keep the ordinary per-forward loss. Installed on every :class:`torch_moe.MoE` of ``model``
    until :meth:`remove` (or the end of :func:`global_batch_balancing`'s block). Layers whose router adapts to the
    load (``router="sigmoid"`` with a bias update rate) and layers with ``global_load_balancing=True`` are refused.
    """

    def __init__(self, model, group=None) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        if not self.layers:
            raise ValueError(f"global_batch_balancing: {type(model).__name__} holds no torch_moe.MoE layer")
        for layer in self.layers:
            router = layer.router
            if not (router.token_choice and router.has_scores):
                raise ValueError(f"global_batch_balancing: needs token-choice routing with logits, got "
                                 f"router={layer.router_name!r}")
            if router.adapts_to_load:
                raise ValueError("global_batch_balancing: the counting pre-pass would move the load-adaptive bias of "
                                 "router='sigmoid'; use bias_update_rate=0 or no global-batch balancing")
            if layer.global_load_balancing:
                raise ValueError("global_batch_balancing: a layer already has global_load_balancing=True (expert-"
                                 "parallel balancing); use one or the other")
            if layer.load_balancing_override is not None:
                raise ValueError("global_batch_balancing: a layer already has a load-balancing override installed")
        if group is not None and (not torch.distributed.is_available() or not torch.distributed.is_initialized()):
            raise ValueError("global_batch_balancing: a group was given but torch.distributed is not initialized")
        self.group = group
        self.world_size = 1 if group is None else torch.distributed.get_world_size(group)
        self._counting = False
        self.reset()
        for layer in self.layers:
            layer.load_balancing_override = self._loss

    def reset(self) -> None:
        """Forget the counts (a new step); :meth:`counting` does it on entry."""
        self._counts: dict[int, Tensor] = {}  # id(layer) -> [E] assignments per expert over the step
        self._tokens: dict[int, Tensor] = {}  # id(layer) -> 0-dim valid tokens over the step
        self._microbatches: dict[int, int] = {}
        self._ready = False

    @contextmanager
    def counting(self) -> Iterator["GlobalBatchBalancing"]:
        """The routing pre-pass: forward each micro-batch of the step once inside (gradients are off); at the end
        of the block the counts are summed over ``group``."""
        self.reset()
        self._counting = True
        try:
            with torch.no_grad():
                yield self
        finally:
            self._counting = False
        if not self._counts:
            raise RuntimeError("global_batch_balancing: no MoE forward ran in counting(); forward the micro-batches "
                               "of the step inside it")
        if self.group is not None:
            keys = list(self._counts)
            # One all-reduce for all layers: each layer's [E] counts and its token count, stacked.
            packed = torch.cat([torch.cat([self._counts[key], self._tokens[key].reshape(1)]) for key in keys])
            total = distributed.all_reduce_sum(packed, self.group)
            offset = 0
            for key in keys:
                num_experts = self._counts[key].numel()
                self._counts[key] = total[offset:offset + num_experts]
                self._tokens[key] = total[offset + num_experts]
                offset += num_experts + 1
        self._ready = True

    def _loss(self, layer, routing, valid: Optional[Tensor], load, default: Tensor) -> Tensor:
        key = id(layer)
        if self._counting:
            counts = load.tokens_per_expert.detach().to(torch.int64)
            tokens = (torch.tensor(routing.logits.shape[0], device=counts.device) if valid is None
                      else valid.sum()).to(torch.int64)
            self._counts[key] = counts if key not in self._counts else self._counts[key] + counts
            self._tokens[key] = tokens if key not in self._tokens else self._tokens[key] + tokens
            self._microbatches[key] = self._microbatches.get(key, 0) + 1
            return default
        if not layer.training:
            return default
        if not self._ready or key not in self._counts:
            raise RuntimeError("global_batch_balancing: a training forward before the step's counts: forward every "
                               "micro-batch of the step inside balancing.counting() first")
        probs = torch.softmax(routing.logits, dim=-1)
        if valid is not None:
            probs = torch.where(valid.unsqueeze(1), probs, 0)
        counts = self._counts[key].to(probs.dtype)
        fraction = counts / counts.sum().clamp(min=1)
        scale = routing.logits.shape[1] * self._microbatches[key] * self.world_size
        return scale * (fraction * probs.sum(0)).sum() / self._tokens[key].to(probs.dtype).clamp(min=1)

    def remove(self) -> None:
        """Give every layer back its ordinary load-balancing loss."""
        for layer in self.layers:
            if layer.load_balancing_override == self._loss:
                layer.load_balancing_override = None


@contextmanager
def global_batch_balancing(model, group=None) -> Iterator[GlobalBatchBalancing]:
    """:class:`GlobalBatchBalancing` on ``model`` for the duration of the block::

        with torch_moe.balancing.global_batch_balancing(model, group=dp_group) as balancing:
            for step_batches in loader:                  # the M micro-batches of one optimizer step
                with balancing.counting():
                    for mb in step_batches:
                        model(mb)                        # no-grad routing pre-pass
                for mb in step_batches:
                    loss = task_loss(model(mb)) + torch_moe.aux_loss(model)
                    (loss / len(step_batches)).backward()
                optimizer.step(); optimizer.zero_grad()
    """
    balancing = GlobalBatchBalancing(model, group)
    try:
        yield balancing
    finally:
        balancing.remove()
