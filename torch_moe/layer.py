"""The MoE layer: a drop-in replacement for a Transformer FFN, composed from torch_moe.ops."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import losses as moe_losses
from . import ops, parallel
from .diagnostics import MoEStats
from .experts import ACTIVATIONS, EXPERT_TYPES, Experts
from .routing import ROUTERS, make_router

__all__ = ["MoE", "aux_loss", "DROP_POLICIES"]

DROP_POLICIES = ("position", "probability")


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: ``y[t] = sum over kept j of weight[t, j] * expert_{e(t, j)}(x[t])``.

    Args:
        d_model: model width; d_ff: hidden width of each expert; num_experts: E; top_k: experts per token.
        capacity_factor: slots per expert C = max(min_capacity, ceil(capacity_factor * T * top_k / E));
            ``None`` runs dropless (every assignment is computed).
        drop_policy: ``"position"`` (every token's 1st choice before any 2nd choice, GShard) or
            ``"probability"`` (each expert keeps its C most probable assignments).
        normalize_weights: divide the chosen probabilities by their sum; ``None`` means ``top_k > 1``.
        expert: ``"swiglu"``, ``"geglu"`` or ``"mlp"`` (with ``activation`` gelu / gelu_tanh / relu / silu); ``bias``
            adds b1 [E, d_ff] and b2 [E, d_model].
        aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in ``aux_loss``.
        jitter_eps: multiplicative U(1 - eps, 1 + eps) noise on the router input, training only.
        router: one of :data:`torch_moe.routing.ROUTERS`: ``"softmax"`` (default), ``"noisy_topk"``,
            ``"expert_choice"``, ``"sigmoid"``, ``"hash"``, ``"random"``; see :mod:`torch_moe.routing`.
        bias_update_rate: ``"sigmoid"`` only: step of the loss-free balancing bias (default 1e-3; 0 disables).
        n_groups, topk_groups: ``"softmax"`` / ``"sigmoid"`` only: group-limited routing over n_groups contiguous
            expert groups, tokens choose inside their topk_groups best groups (default: all groups).
        importance_loss_coef, load_loss_coef: Shazeer et al.'s importance loss (any learned token-choice router)
            and load loss (``"noisy_topk"`` only); see :mod:`torch_moe.losses`.
        seq_balance_loss_coef: DeepSeek's sequence-wise balance loss; needs x laid out as [B, S, d_model].
        num_shared_experts: always-on experts (DeepSeekMoE), each the size of a routed expert, summed into the
            output of every valid token; stored as one FFN ``shared_experts`` of width num_shared_experts·d_ff/g.
        expert_granularity: g, fine-grained experts (DeepSeekMoE): E·g experts of width d_ff/g, top_k·g of them
            routed per token, so total and active parameters stay those of (E, d_ff, top_k). ``num_experts`` and
            ``top_k`` of the built layer are the fine-grained counts.
        expert_parallel_group: a ``torch.distributed`` process group of W ranks to shard the experts over: group
            rank r holds experts [r·E/W, (r+1)·E/W) as ``experts.*`` of leading size E/W, the router is replicated,
            tokens travel by all-to-all (see :mod:`torch_moe.parallel`). Every rank of the group must call forward
            (and backward) the same number of times. ``None``: all experts on this process.
        global_load_balancing: compute the load-balancing loss's expert fractions over the whole group (an
            all-reduce of the counts, Megatron's global-batch balancing); needs ``expert_parallel_group``.

    ``forward(x [..., d_model], padding_mask bool [...] | None, *, token_ids int [...] | None) -> [..., d_model]``.
    Padding tokens (mask False) take no slot, output zero and are left out of every loss and statistic.
    ``token_ids`` (the token ids of x, shape x.shape[:-1]) are needed by ``router="hash"`` only. After each forward,
    ``aux_loss`` (0-dim tensor with grad) and ``stats`` (:class:`MoEStats`, tensors only) describe it.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: Optional[float] = 1.25,
        min_capacity: int = 4,
        drop_policy: str = "position",
        normalize_weights: Optional[bool] = None,
        expert: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        jitter_eps: float = 0.0,
        router: str = "softmax",
        bias_update_rate: Optional[float] = None,
        n_groups: Optional[int] = None,
        topk_groups: Optional[int] = None,
        importance_loss_coef: float = 0.0,
        load_loss_coef: float = 0.0,
        seq_balance_loss_coef: float = 0.0,
        num_shared_experts: int = 0,
        expert_granularity: int = 1,
        expert_parallel_group=None,
        global_load_balancing: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _validate(d_model, d_ff, num_experts, top_k, capacity_factor, min_capacity, drop_policy, expert,
                  activation, jitter_eps)
        _validate_fine_grained(d_ff, num_shared_experts, expert_granularity)
        self.expert_granularity = expert_granularity
        self.num_shared_experts = num_shared_experts
        d_ff, num_experts, top_k = d_ff // expert_granularity, num_experts * expert_granularity, top_k * expert_granularity
        _validate_router(router, num_experts, top_k, capacity_factor, drop_policy, normalize_weights,
                         bias_update_rate, n_groups, topk_groups, importance_loss_coef, load_loss_coef,
                         seq_balance_loss_coef, expert_parallel_group)
        if global_load_balancing and router in ("hash", "expert_choice"):
            raise ValueError(f"MoE(router={router!r}): global_load_balancing needs token-choice routing with logits")
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_name = router
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.seq_balance_loss_coef = seq_balance_loss_coef
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_policy = drop_policy
        if normalize_weights is None:
            normalize_weights = top_k > 1 or router in ("sigmoid", "noisy_topk")
        self.normalize_weights = bool(normalize_weights)
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.expert_parallel_group = expert_parallel_group
        self.global_load_balancing = bool(global_load_balancing)
        self.expert_parallel_rank, self.expert_parallel_size = parallel.group_rank_and_size(
            expert_parallel_group, num_experts, self.global_load_balancing)
        factory = {"device": device, "dtype": dtype}
        self.router = make_router(router, d_model, num_experts, top_k, normalize_weights=self.normalize_weights,
                                  jitter_eps=jitter_eps, bias_update_rate=bias_update_rate, n_groups=n_groups,
                                  topk_groups=topk_groups, **factory)
        if expert_parallel_group is None:
            self.experts = Experts(d_model, d_ff, num_experts, expert=expert, activation=activation, bias=bias,
                                   **factory)
        else:
            with parallel.local_expert_rng(self.expert_parallel_rank, device):
                self.experts = Experts(d_model, d_ff, num_experts // self.expert_parallel_size, expert=expert,
                                       activation=activation, bias=bias, **factory)
        self.shared_experts = (Experts(d_model, num_shared_experts * d_ff, 1, expert=expert, activation=activation,
                                       bias=bias, **factory) if num_shared_experts else None)
        self.aux_loss: Optional[Tensor] = None
        self.stats: Optional[MoEStats] = None

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` tokens (padding included, so shapes stay static).

        Expert choice caps it at ``num_tokens``: an expert cannot take a token twice.
        """
        assert self.capacity_factor is not None, "capacity() is undefined in dropless mode"
        capacity = max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))
        return min(num_tokens, capacity) if self.router_name == "expert_choice" else capacity

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, *, token_ids: Optional[Tensor] = None) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: the last dim of x must be d_model={self.d_model}, got x of shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.d_model)
        valid = None
        if padding_mask is not None:
            if padding_mask.shape != lead_shape or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"MoE: padding_mask must be a bool tensor of shape {tuple(lead_shape)} (x without its last dim), "
                    f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
                )
            valid = padding_mask.reshape(-1)
        if token_ids is not None and (token_ids.shape != lead_shape or token_ids.is_floating_point()
                                      or token_ids.dtype == torch.bool):
            raise ValueError(f"MoE: token_ids must be an integer tensor of shape {tuple(lead_shape)} (x without its "
                             f"last dim), got {token_ids.dtype} of shape {tuple(token_ids.shape)}")
        if self.seq_balance_loss_coef > 0 and x.dim() != 3:
            raise ValueError(f"MoE: seq_balance_loss_coef > 0 needs x laid out as [B, S, d_model], got x of shape "
                             f"{tuple(x.shape)}")

        # Padding rows may hold anything (NaN included); zero them for the router so that nothing of theirs
        # reaches router.weight's gradient (0 * NaN would).
        router_input = tokens if valid is None else torch.where(valid.unsqueeze(1), tokens, 0)
        expert_choice = self.router_name == "expert_choice"
        if expert_choice:
            routing = self.router(router_input, valid=valid, capacity=self.capacity(tokens.shape[0]))
        else:
            routing = self.router(router_input, token_ids=token_ids, valid=valid)
        expert_input = tokens.to(self.experts.w1.dtype)
        slots = None
        if expert_choice:
            capacity = self.capacity(tokens.shape[0])
            slots = routing.extras["slots"]
            buffer = ops.dispatch(expert_input, routing.expert_ids, slots, self.num_experts, capacity)
            y = ops.combine(self.experts(buffer), routing.weights, routing.expert_ids, slots)
            tokens_per_expert = (slots >= 0).sum(0)
            dropped_fraction = torch.zeros((), dtype=routing.weights.dtype, device=x.device)
        elif self.expert_parallel_group is not None:
            y, tokens_per_expert, dropped_fraction, slots = parallel.moe_forward(self, expert_input, routing, valid)
        elif self.dropless:
            row_index, offsets = ops.permute_plan(routing.expert_ids, self.num_experts, valid)
            y = self.experts.forward_dropless(expert_input, routing.weights, row_index, offsets)
            tokens_per_expert = offsets.diff()
            dropped_fraction = torch.zeros((), dtype=routing.weights.dtype, device=x.device)
        else:
            capacity = self.capacity(tokens.shape[0])
            priority = None
            if self.drop_policy == "probability":
                priority = routing.scores.gather(1, routing.expert_ids)
            plan = ops.capacity_plan(routing.expert_ids, self.num_experts, capacity, self.drop_policy, priority, valid)
            slots = plan.slots
            buffer = ops.dispatch(expert_input, routing.expert_ids, slots, self.num_experts, capacity)
            y = ops.combine(self.experts(buffer), routing.weights, routing.expert_ids, slots)
            tokens_per_expert = plan.tokens_per_expert
            assigned = tokens_per_expert.sum()
            dropped = assigned - plan.kept_per_expert.sum()
            dropped_fraction = dropped.to(routing.weights.dtype) / assigned.clamp(min=1).to(routing.weights.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(expert_input.unsqueeze(0)).squeeze(0)
            y = y + (shared if valid is None else shared * valid.unsqueeze(1).to(shared.dtype))
        self.router.observe_load(self._group_load(tokens_per_expert))
        self._record_losses_and_stats(x, routing, valid, tokens_per_expert, dropped_fraction, slots)
        return y.to(x.dtype).reshape(x.shape)

    def _group_load(self, tokens_per_expert: Tensor) -> Tensor:
        """The load the router adapts to: with expert parallelism, summed over the group, so that the replicated
        router state (the sigmoid router's bias) stays identical on every rank."""
        adapts = getattr(self.router, "bias_update_rate", 0) and self.training
        if self.expert_parallel_group is None or not adapts:
            return tokens_per_expert
        return parallel.all_reduce_sum(tokens_per_expert, self.expert_parallel_group)

    def _record_losses_and_stats(self, x: Tensor, routing, valid: Optional[Tensor], tokens_per_expert: Tensor,
                                 dropped_fraction: Tensor, slots: Optional[Tensor]) -> None:
        weights = routing.weights
        zero = weights.new_zeros(())
        expert_choice = self.router_name == "expert_choice"
        if routing.logits is None:  # hash routing: no logits, nothing to balance or to regularise
            load_balancing_loss, z_loss, router_entropy = zero, zero, zero
        else:
            # Expert choice is balanced by construction: only the z-loss and the entropy apply.
            ids = routing.expert_ids[:, :1].contiguous() if expert_choice else routing.expert_ids
            load_balancing_loss, z_loss, router_entropy = ops.router_losses(routing.logits, ids, valid)
            if expert_choice:
                load_balancing_loss = zero
        if self.global_load_balancing:
            load_balancing_loss = parallel.global_load_balancing_loss(routing.logits, tokens_per_expert, valid,
                                                                      self.top_k, self.expert_parallel_group)
        losses = {"load_balancing": load_balancing_loss, "z": z_loss}
        aux = self.aux_loss_coef * load_balancing_loss + self.z_loss_coef * z_loss
        if self.importance_loss_coef > 0:
            gates = weights if expert_choice else weights.new_zeros(weights.shape[0], self.num_experts).scatter_add(
                1, routing.expert_ids, weights)
            losses["importance"] = moe_losses.importance_loss(gates, valid)
            aux = aux + self.importance_loss_coef * losses["importance"]
        if self.load_loss_coef > 0:
            losses["load"] = moe_losses.load_loss(routing.extras["clean_logits"], routing.logits,
                                                  routing.extras["noise_std"], self.top_k, valid)
            aux = aux + self.load_loss_coef * losses["load"]
        if self.seq_balance_loss_coef > 0:
            batch, seq = x.shape[0], x.shape[1]
            losses["sequence_balance"] = moe_losses.sequence_balance_loss(
                routing.scores.view(batch, seq, -1), routing.expert_ids.view(batch, seq, -1),
                None if valid is None else valid.view(batch, seq))
            aux = aux + self.seq_balance_loss_coef * losses["sequence_balance"]
        self.aux_loss = aux
        self.stats = MoEStats(
            tokens_per_expert=tokens_per_expert.detach(),
            dropped_fraction=dropped_fraction.detach(),
            router_entropy=router_entropy.detach(),
            load_balancing_loss=load_balancing_loss.detach(),
            z_loss=z_loss.detach(),
            unrouted_fraction=_unrouted_fraction(slots, valid, weights.dtype, x.device).detach(),
            losses={name: value.detach() for name, value in losses.items()},
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, min_capacity={self.min_capacity}, "
            f"drop_policy={self.drop_policy!r}, router={self.router_name!r}, aux_loss_coef={self.aux_loss_coef}, "
            f"z_loss_coef={self.z_loss_coef}"
            + (f", num_shared_experts={self.num_shared_experts}" if self.num_shared_experts else "")
            + (f", expert_granularity={self.expert_granularity}" if self.expert_granularity > 1 else "")
            + (f", expert_parallel=rank {self.expert_parallel_rank} of {self.expert_parallel_size}"
               if self.expert_parallel_group is not None else "")
        )


def _validate(d_model, d_ff, num_experts, top_k, capacity_factor, min_capacity, drop_policy, expert, activation,
              jitter_eps) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"MoE: top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
        raise ValueError(f"MoE: capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
    if not isinstance(min_capacity, int) or isinstance(min_capacity, bool) or min_capacity < 0:
        raise ValueError(f"MoE: min_capacity must be an int >= 0, got {min_capacity!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"MoE: drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if expert not in EXPERT_TYPES:
        raise ValueError(f"MoE: expert must be one of {EXPERT_TYPES}, got {expert!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"MoE: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= jitter_eps < 1.0:
        raise ValueError(f"MoE: jitter_eps must be in [0, 1), got {jitter_eps!r}")


def _unrouted_fraction(slots: Optional[Tensor], valid: Optional[Tensor], dtype, device) -> Tensor:
    """Fraction of valid tokens none of whose assignments got a slot (0 when dropless: slots is None)."""
    if slots is None:
        return torch.zeros((), dtype=dtype, device=device)
    reached = (slots >= 0).any(1)
    if valid is None:
        return (~reached).sum().to(dtype) / max(slots.shape[0], 1)
    return (valid & ~reached).sum().to(dtype) / valid.sum().clamp(min=1).to(dtype)


def _validate_fine_grained(d_ff, num_shared_experts, expert_granularity) -> None:
    if not isinstance(expert_granularity, int) or isinstance(expert_granularity, bool) or expert_granularity < 1:
        raise ValueError(f"MoE: expert_granularity must be an int >= 1, got {expert_granularity!r}")
    if d_ff % expert_granularity:
        raise ValueError(f"MoE: expert_granularity={expert_granularity} must divide d_ff={d_ff}")
    if not isinstance(num_shared_experts, int) or isinstance(num_shared_experts, bool) or num_shared_experts < 0:
        raise ValueError(f"MoE: num_shared_experts must be an int >= 0, got {num_shared_experts!r}")


def _validate_router(router, num_experts, top_k, capacity_factor, drop_policy, normalize_weights, bias_update_rate,
                     n_groups, topk_groups, importance_loss_coef, load_loss_coef, seq_balance_loss_coef,
                     expert_parallel_group) -> None:
    if router not in ROUTERS:
        raise ValueError(f"MoE: router must be one of {ROUTERS}, got {router!r}")
    for name, value in (("importance_loss_coef", importance_loss_coef), ("load_loss_coef", load_loss_coef),
                        ("seq_balance_loss_coef", seq_balance_loss_coef)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"MoE: {name} must be a number >= 0, got {value!r}")
    if router == "expert_choice":
        if capacity_factor is None:
            raise ValueError("MoE(router='expert_choice'): capacity_factor must be a number (each expert takes "
                             "C = ceil(capacity_factor * top_k * T / E) tokens), got None")
        if expert_parallel_group is not None:
            raise ValueError("MoE(router='expert_choice') does not support expert_parallel_group: an expert chooses "
                             "among all tokens of the batch, which live on other ranks")
    if router == "hash" and drop_policy == "probability":
        raise ValueError("MoE(router='hash'): drop_policy='probability' needs router scores; hash routing has none, "
                         "use drop_policy='position'")
    if router == "noisy_topk" and normalize_weights is False:
        raise ValueError("MoE(router='noisy_topk'): the weights are a softmax over the k kept logits, so they are "
                         "always normalised; normalize_weights=False is not supported")
    if bias_update_rate is not None:
        if router != "sigmoid":
            raise ValueError(f"MoE: bias_update_rate applies to router='sigmoid' only, got router={router!r}")
        if not isinstance(bias_update_rate, (int, float)) or bias_update_rate < 0:
            raise ValueError(f"MoE: bias_update_rate must be a number >= 0, got {bias_update_rate!r}")
    if n_groups is not None or topk_groups is not None:
        if router not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE: n_groups / topk_groups apply to router='softmax' or 'sigmoid' only, got "
                             f"router={router!r}")
        groups = 1 if n_groups is None else n_groups
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or num_experts % groups:
            raise ValueError(f"MoE: n_groups must be a positive int dividing num_experts={num_experts}, got {n_groups!r}")
        chosen = groups if topk_groups is None else topk_groups
        if not isinstance(chosen, int) or isinstance(chosen, bool) or not 1 <= chosen <= groups:
            raise ValueError(f"MoE: topk_groups must be an int in [1, n_groups={groups}], got {topk_groups!r}")
        if top_k > chosen * (num_experts // groups):
            raise ValueError(f"MoE: top_k={top_k} is larger than the {chosen * (num_experts // groups)} experts of "
                             f"the topk_groups={chosen} chosen groups ({num_experts // groups} experts per group)")
    if load_loss_coef > 0 and router != "noisy_topk":
        raise ValueError(f"MoE: load_loss_coef applies to router='noisy_topk' only (it needs the noise), got "
                         f"router={router!r}")
    if importance_loss_coef > 0 and router == "hash":
        raise ValueError("MoE(router='hash'): importance_loss_coef has nothing to train (hash weights are fixed)")
    if seq_balance_loss_coef > 0 and router in ("hash", "expert_choice"):
        raise ValueError(f"MoE(router={router!r}): seq_balance_loss_coef needs token-choice routing with scores")


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every :class:`MoE` layer in ``model`` (their last forward); 0 if none ran."""
    total: Optional[Tensor] = None
    for module in model.modules():
        if isinstance(module, MoE) and module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total
