"""Auxiliary balance losses of MoE routing, each a function of the router's outputs; the layer weights each by a
coefficient (``aux_loss_coef``, ``z_loss_coef``, ``importance_loss_coef``, ``load_loss_coef``,
``seq_balance_loss_coef``) and sums them into ``MoE.aux_loss``.

Shapes: T tokens, E experts, k choices per token; ``valid_mask`` [T] bool leaves padding tokens out.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed
from torch import Tensor

from . import distributed, ops

__all__ = [
    "load_balancing_loss",
    "z_loss",
    "cv_squared",
    "importance_loss",
    "load_loss",
    "sequence_balance_loss",
    "global_load_balancing_loss",
    "GlobalBatchBalancing",
    "global_batch_balancing",
]


def load_balancing_loss(logits: Tensor, expert_ids: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4).

    ``E · Σ_i f_i · P_i`` with f_i the fraction of the valid assignments (``expert_ids`` [T, k]) that went to expert
    i and P_i the mean over valid tokens of softmax(logits)[:, i]; 1 at perfect balance. Gradient flows to the logits
    through P only.
    """
    return ops.router_losses(logits, expert_ids, valid_mask).load_balancing_loss


def z_loss(logits: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE, eq. 5): mean over valid tokens of logsumexp(logits[t])²."""
    placeholder_ids = torch.zeros((logits.shape[0], 1), dtype=torch.int64, device=logits.device)
    return ops.router_losses(logits, placeholder_ids, valid_mask).z_loss


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(values) / (mean(values)² + eps)`` with the population variance.

    The variance is a plain mean of squared deviations (no square root), so the gradient at perfect balance is
    exactly 0, not NaN. 0 for fewer than two values.
    """
    if values.numel() < 2:
        return values.new_zeros(())
    mean = values.mean()
    return (values - mean).pow(2).mean() / (mean.pow(2) + eps)


def importance_loss(gates: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6, without its coefficient): CV² of the per-expert importance.

    gates: [T, E] the weight each token gives each expert (0 where not chosen). Importance_i = Σ over valid tokens
    of gates[t, i].
    """
    if valid_mask is not None:
        gates = gates * valid_mask.unsqueeze(1).to(gates.dtype)
    return cv_squared(gates.sum(0))


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int,
              valid_mask: Optional[Tensor] = None) -> Tensor:
    """Load loss of noisy top-k gating (Shazeer et al. 2017, appendix A, eq. 10-11, without its coefficient).

    CV² of the smooth load estimate :func:`torch_moe.ops.noisy_topk_load`: for each expert, the sum over valid
    tokens of the probability (over a redraw of its own noise) that it is among the token's top k.
    """
    return cv_squared(ops.noisy_topk_load(clean_logits, noisy_logits, noise_std, k, valid_mask))


def sequence_balance_loss(scores: Tensor, expert_ids: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V2, eq. 12-14; DeepSeek-V3, eq. 17-20, without α).

    scores: [B, S, E] router scores (softmax or sigmoid), expert_ids: [B, S, k], valid_mask: [B, S] bool.
    Per sequence with S_v valid tokens: f_i = E / (k · S_v) · #{valid assignments to i}, P_i = mean over its valid
    tokens of s'[t, i] with s' = scores / Σ_e scores (the normalised affinities); loss = Σ_i f_i · P_i, averaged
    over the sequences that have a valid token. 1 at perfect balance within every sequence. Gradient through P.
    """
    if scores.dim() != 3 or expert_ids.dim() != 3 or scores.shape[:2] != expert_ids.shape[:2]:
        raise ValueError(f"sequence_balance_loss: scores must be [B, S, E] and expert_ids [B, S, k], got "
                         f"{tuple(scores.shape)} and {tuple(expert_ids.shape)}")
    B, S, E = scores.shape
    k = expert_ids.shape[2]
    valid = (torch.ones((B, S), dtype=scores.dtype, device=scores.device) if valid_mask is None
             else valid_mask.to(scores.dtype))
    valid_tokens = valid.sum(1)  # [B]
    counts = torch.zeros((B, E), dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, expert_ids.reshape(B, S * k), valid.unsqueeze(2).expand(B, S, k).reshape(B, S * k))
    fraction = counts * (E / k) / valid_tokens.clamp(min=1).unsqueeze(1)
    normalised = scores / scores.sum(2, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    mean_affinity = (normalised * valid.unsqueeze(2)).sum(1) / valid_tokens.clamp(min=1).unsqueeze(1)
    per_sequence = (fraction * mean_affinity).sum(1)
    has_tokens = (valid_tokens > 0).to(scores.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def global_load_balancing_loss(logits: Tensor, tokens_per_expert: Tensor, valid: Optional[Tensor], top_k: int,
                               group) -> Tensor:
    """Load-balancing loss with f_i counted over the whole group (Megatron's global-batch balancing).

    f_i = (assignments to i on all ranks) / (all assignments), from an all-reduce of ``tokens_per_expert`` (no host
    sync); P_i = (sum of probs[t, i] over this rank's valid tokens) · W / (valid tokens on all ranks). The mean over
    the ranks of the returned loss equals the single-process loss on all ranks' tokens together, and so does its
    gradient up to the factor W (each rank differentiates its own share).
    """
    world_size = torch.distributed.get_world_size(group)
    num_experts = logits.shape[1]
    global_counts = distributed.all_reduce_sum(tokens_per_expert, group)
    probs = torch.softmax(logits, dim=-1)
    if valid is not None:
        probs = torch.where(valid.unsqueeze(1), probs, 0)
    prob_sum = probs.sum(dim=0)
    assignments = global_counts.sum().to(probs.dtype)
    valid_tokens = assignments / top_k
    f = global_counts.to(probs.dtype) / assignments.clamp(min=1)
    return num_experts * world_size * (f * prob_sum).sum() / valid_tokens.clamp(min=1)


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
        from .layer import MoE  # the layer imports this module

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

        with torch_moe.losses.global_batch_balancing(model, group=dp_group) as balancing:
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
