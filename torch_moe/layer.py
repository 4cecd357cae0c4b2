"""The MoE layer: a drop-in replacement for a Transformer FFN, composed from torch_moe.ops.

forward reads flatten -> route -> dispatch (a strategy picked at construction) -> shared experts -> losses -> reshape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor, nn

from . import distributed
from . import losses as moe_losses
from ._checks import flat_tokens, is_finite_number, is_int, is_number
from .dispatch import (DROP_POLICIES, Capacity, CapacityDispatch, DroplessDispatch, ExpertChoiceDispatch,
                       ExpertGroup, ExpertParallelCapacityDispatch, ExpertParallelDroplessDispatch, Load)
from .experts import ACTIVATIONS, EXPERT_TYPES, Experts, NullExperts, _check_swiglu_oss, unwrapped
from .override import override_routing as _override_routing
from .routing import ROUTER_CLASSES, RouterOptions, recomputing, router_class
from .routing import _check_groups as check_groups

__all__ = ["MoE", "MoEStats", "aux_loss", "DROP_POLICIES"]


@dataclass
class MoEStats:
    """What a MoE forward saw. Every field is a detached tensor on the layer's device.

    tokens_per_expert: [E] int64, valid assignments per expert before dropping (``"dselect_k"``: those of nonzero
        weight).
    dropped_fraction: 0-dim, dropped assignments / valid assignments (0 when dropless or no valid token).
    router_entropy: 0-dim, mean over valid tokens of -sum_e p log p.
    load_balancing_loss, z_loss: 0-dim, unweighted.
    unrouted_fraction: 0-dim, fraction of valid tokens that reached no expert (every choice dropped; with expert
        choice, no expert took the token).
    losses: every unweighted aux loss the layer computed, by name (``load_balancing``, ``z``, and ``importance``,
        ``load``, ``sequence_balance`` when their coefficients are set; ``dynamic`` for ``"top_p"``,
        ``mutual_information`` for ``"ds_moe"``,
        ``selector_entropy``, ``selector_reachability`` for ``"dselect_k"``).
    experts_per_token: 0-dim, mean over valid tokens of the FFN experts assigned to a token before dropping: top_k
        for fixed top-k, those of nonzero weight for ``"dselect_k"``, the taken experts for ``"top_p"``, E for
        ``"ds_moe"`` in training, the experts that took
        the token for expert choice, 1 for a gating-dropout forward; null experts (MoE++) are not counted.
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor
    load_balancing_loss: Tensor
    z_loss: Tensor
    unrouted_fraction: Tensor
    losses: dict = field(default_factory=dict)
    experts_per_token: Optional[Tensor] = None

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: ``y[t] = sum over kept j of weight[t, j] * expert_{e(t, j)}(x[t])``.

    Args:
        d_model: model width; d_ff: hidden width of each expert; num_experts: E; top_k: experts per token.
        capacity_factor: slots per expert C = max(min_capacity, ceil(capacity_factor * T * top_k / E));
            ``None`` runs dropless (every assignment is computed).
        drop_policy: ``"position"`` (every token's 1st choice before any 2nd choice, GShard) or
            ``"probability"`` (each expert keeps its C most probable assignments).
        normalize_weights: divide the chosen probabilities by their sum; ``None`` means ``top_k > 1``, and always
            for ``"sigmoid"`` and ``"noisy_topk"``.
        expert: ``"swiglu"``, ``"geglu"``, ``"geglu_tanh"``, ``"swiglu_oss"`` or ``"mlp"`` (with ``activation``
            gelu / gelu_tanh / relu / silu); ``bias`` adds b1 [E, d_ff] and b2 [E, d_model]; ``up_bias`` (gated types)
            adds b3 [E, d_ff] to x·w3 (Llama's ``mlp_bias``). ``swiglu_alpha``, ``swiglu_limit``: ``"swiglu_oss"``
            only, GPT-OSS's clamped SwiGLU (see :class:`~torch_moe.experts.Experts`; default 1.702 and 7.0).
        aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in ``aux_loss``.
        jitter_eps: multiplicative U(1 - eps, 1 + eps) noise on the router input, training only
            (``"sparsemixer"``: the relative threshold of its masks instead, see its class).
        router_bias: a learned bias b [E] on the router logits, x·wᵀ + b (GPT-OSS); ``"softmax"``, ``"sigmoid"``
            and ``"sparsemixer"`` only.
        router: one of :data:`torch_moe.routing.ROUTERS`: ``"softmax"`` (default), ``"noisy_topk"``,
            ``"sparsemixer"``, ``"expert_choice"``, ``"sigmoid"``, ``"hash"``, ``"random"``, ``"top_p"``, ``"ds_moe"``,
            ``"dselect_k"``, ``"hierarchical"``; see :mod:`torch_moe.routing`.
        bias_update_rate: ``"sigmoid"`` only: step of the loss-free balancing bias (default 1e-3; 0 disables).
        n_groups, topk_groups: ``"softmax"`` / ``"sigmoid"``: group-limited routing over n_groups contiguous
            expert groups, tokens choose inside their topk_groups best groups (default: all groups).
            ``"hierarchical"``: the groups of the primary gate and how many of them a token takes (default 1);
            top_k = topk_groups × experts taken per group.
        smooth_step_gamma, selector_entropy_coef: ``"dselect_k"`` only: the smooth-step's width (default 1) and
            the coefficient of the selectors' entropy regulariser in ``aux_loss`` (default 0).
        routed_scaling_factor: ``"softmax"`` / ``"sigmoid"`` / ``"noisy_topk"``: the routing weights (after
            normalisation) times this constant (DeepSeek-V2/V3's ``routed_scaling_factor``; default 1).
        importance_loss_coef, load_loss_coef: Shazeer et al.'s importance loss (any learned token-choice router)
            and load loss (``"noisy_topk"`` only); see :mod:`torch_moe.losses`.
        seq_balance_loss_coef: DeepSeek's sequence-wise balance loss; needs x laid out as [B, S, d_model].
        num_shared_experts: always-on experts (DeepSeekMoE), each the size of a routed expert, summed into the
            output of every valid token; stored as one FFN ``shared_experts`` of width num_shared_experts·d_ff/g.
        expert_granularity: g, fine-grained experts (DeepSeekMoE): E·g experts of width d_ff/g, top_k·g of them
            routed per token, so total and active parameters stay those of (E, d_ff, top_k). ``num_experts`` and
            ``top_k`` of the built layer are the fine-grained counts.
        shared_expert_d_ff: the shared FFN's width when it is not num_shared_experts·d_ff/g (Qwen2-MoE's
            ``shared_expert_intermediate_size``); needs num_shared_experts >= 1.
        shared_expert_gate: scale the shared experts' output per token by sigmoid(x·gᵀ), g [1, d_model] a
            parameter ``shared_expert_gate.weight`` (Qwen2-MoE); needs num_shared_experts >= 1.
        expert_parallel_group: a ``torch.distributed`` process group of W ranks to shard the experts over: group
            rank r holds experts [r·E/W, (r+1)·E/W) as ``experts.*`` of leading size E/W, the router is replicated,
            tokens travel by all-to-all (see :mod:`torch_moe.dispatch`; checkpoints: :mod:`torch_moe.parallel`). Every rank of the group must call forward
            (and backward) the same number of times. ``None``: all experts on this process.
        global_load_balancing: compute the load-balancing loss's expert fractions over the whole group (an
            all-reduce of the counts, Megatron's global-batch balancing); needs ``expert_parallel_group``. Over
            the micro-batches of a gradient-accumulation step (and data-parallel ranks) without expert parallelism:
            :func:`torch_moe.balancing.global_batch_balancing`.
        eval_capacity_factor: the capacity factor of eval-mode forwards (``not self.training``): a number, or
            ``"dropless"`` to compute every assignment at eval; ``None`` (default): as in training. Training is
            untouched; the eval strategy is built once here, beside the training one.
        eval_top_k: experts per token in eval-mode forwards (``None``: ``top_k``); the weights stay normalised as
            resolved for the training ``top_k``. Token-choice routers that pick a top-k only (not ``"hash"``,
            ``"expert_choice"``). Both scale with ``expert_granularity`` like ``top_k``.

    Routing override: ``forward(..., expert_ids=ids [..., k'] int, routing_weights=w [..., k'] | None)`` routes
    every token to the given experts instead of the router's choice (router replay, see
    :mod:`torch_moe.replay`). The router still runs (its noise and jitter are drawn as usual, its losses computed on
    its logits). Without ``routing_weights`` the weights are the router's own for the given ids (its scores of
    those experts, normalised and scaled as it would), so gradients reach the router; where the given ids are
    the router's own choice these are its weights exactly, bit for bit. With ``routing_weights`` their values
    are used, and the gradient still reaches the router as through its own weights of those ids
    (straight-through: ``w + (own - own.detach())``). :meth:`register_routing_hook` lets code outside the layer
    observe or replace the routing of every forward.
        top_p_threshold, dynamic_loss_coef: ``"top_p"`` only (Huang et al. 2024): each token takes the fewest
            experts whose probs sum to at least top_p_threshold (default 0.4), at most top_k; the dynamic (router
            entropy) loss's weight (default 1e-4). See :class:`torch_moe.routing.TopPRouter`.
        mutual_information_loss_coef, sparse_inference_threshold: ``"ds_moe"`` only (Pan et al. 2024, dense
            training / sparse inference): the weight of its mutual-information loss (default 1e-2); at inference keep
            only those of the top_k experts with prob >= this threshold (default None: all top_k). See
            :class:`torch_moe.routing.DSMoERouter`.
        num_zero_experts, num_copy_experts, num_constant_experts: MoE++'s zero-computation experts (Jin et al.
            2024, :class:`torch_moe.experts.NullExperts`): the router scores E + these, ids E.. in that order; a
            token's choices among them cost no FFN row and no capacity slot (they need no capacity: each runs on
            every token without a GEMM). ``top_k`` counts them; ``stats.tokens_per_expert`` and
            ``stats.experts_per_token`` count FFN experts only; the balance losses cover all E + N.
        gating_dropout: Gating Dropout (Liu et al. 2022): with this probability a training forward skips the router
            and sends every token to one local expert with weight 1 (one draw per forward, as in the paper, where
            it skips the all-to-all). Local expert of token t of T on expert-parallel rank r of W: r·E/W +
            ⌊t·(E/W)/T⌋; without expert parallelism (W = 1) the tokens split into E contiguous blocks, block b to
            expert b, as if each expert had its own machine. The aux losses are still those of the router's choice.
        expert_dropout: dropout rate on the experts' hidden activations in training (Fedus et al. 2021's expert
            dropout, a higher rate inside the experts than elsewhere); routed experts only.

    ``forward(x [..., d_model], padding_mask bool [...] | None, *, token_ids int [...] | None) -> [..., d_model]``.
    Padding tokens (mask False) take no slot, output zero and are left out of every loss and statistic.
    ``token_ids`` (the token ids of x, shape x.shape[:-1]) are needed by ``router="hash"`` only. After each forward,
    ``aux_loss`` (0-dim tensor with grad) and ``stats`` (:class:`MoEStats`, tensors only) describe it.

    The dispatch strategy (capacity, expert choice, dropless, or either over an expert-parallel group; see
    :mod:`torch_moe.dispatch`) is chosen here, once: ``capacity_factor``, ``min_capacity`` and ``drop_policy`` are
    read-only afterwards (build a new layer and load the state dict to change them).
    """

    reports_aux_loss = True  # torch_moe.aux_loss(model) sums this layer's aux_loss

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
        up_bias: bool = False,
        swiglu_alpha: Optional[float] = None,
        swiglu_limit: Optional[float] = None,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        jitter_eps: float = 0.0,
        router: str = "softmax",
        bias_update_rate: Optional[float] = None,
        n_groups: Optional[int] = None,
        topk_groups: Optional[int] = None,
        routed_scaling_factor: Optional[float] = None,
        router_bias: bool = False,
        smooth_step_gamma: Optional[float] = None,
        selector_entropy_coef: Optional[float] = None,
        importance_loss_coef: float = 0.0,
        load_loss_coef: float = 0.0,
        seq_balance_loss_coef: float = 0.0,
        num_shared_experts: int = 0,
        expert_granularity: int = 1,
        shared_expert_d_ff: Optional[int] = None,
        shared_expert_gate: bool = False,
        expert_parallel_group=None,
        global_load_balancing: bool = False,
        top_p_threshold: Optional[float] = None,
        dynamic_loss_coef: Optional[float] = None,
        mutual_information_loss_coef: Optional[float] = None,
        sparse_inference_threshold: Optional[float] = None,
        num_zero_experts: int = 0,
        num_copy_experts: int = 0,
        num_constant_experts: int = 0,
        gating_dropout: float = 0.0,
        expert_dropout: float = 0.0,
        eval_capacity_factor=None,
        eval_top_k: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        # The arguments as given (before any expansion), so that tools rebuilding a layer like this one (pruning,
        # merging: torch_moe.surgery) carry every option, including ones added after them.
        init_args = {name: value for name, value in locals().items()
                     if name not in ("self", "__class__", "expert_parallel_group", "device", "dtype")}
        super().__init__()
        self.init_args = init_args
        _validate(d_model, d_ff, num_experts, top_k, capacity_factor, min_capacity, drop_policy, expert,
                  activation, jitter_eps, up_bias, swiglu_alpha, swiglu_limit)
        _validate_fine_grained(d_ff, num_shared_experts, expert_granularity)
        _validate_shared(num_shared_experts, shared_expert_d_ff, shared_expert_gate)
        self.expert_granularity = expert_granularity
        self.num_shared_experts = num_shared_experts
        d_ff, num_experts, top_k = d_ff // expert_granularity, num_experts * expert_granularity, top_k * expert_granularity
        router_type = router_class(router)
        options = RouterOptions(
            normalize_weights=normalize_weights, jitter_eps=jitter_eps, bias_update_rate=bias_update_rate,
            n_groups=n_groups, topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
            router_bias=router_bias or None, top_p_threshold=top_p_threshold, dynamic_loss_coef=dynamic_loss_coef,
            mutual_information_loss_coef=mutual_information_loss_coef,
            sparse_inference_threshold=sparse_inference_threshold, smooth_step_gamma=smooth_step_gamma,
            selector_entropy_coef=selector_entropy_coef)
        num_null = _validate_part2(router_type, num_zero_experts, num_copy_experts, num_constant_experts,
                                   gating_dropout, expert_dropout, global_load_balancing, seq_balance_loss_coef)
        _validate_losses(router_type, aux_loss_coef, z_loss_coef, importance_loss_coef, load_loss_coef, seq_balance_loss_coef,
                         global_load_balancing)
        router_type.check(num_experts + num_null, top_k, options, capacity_factor=capacity_factor,
                          drop_policy=drop_policy, expert_parallel=expert_parallel_group is not None)
        eval_top_k = _validate_eval(router_type, num_experts, expert_granularity, eval_capacity_factor, eval_top_k,
                                    expert_parallel_group, options)
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_name = router
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.seq_balance_loss_coef = seq_balance_loss_coef
        if normalize_weights is None:
            normalize_weights = router_type.default_normalize_weights(top_k)
        self.normalize_weights = bool(normalize_weights)
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.expert_parallel_group = expert_parallel_group
        self.global_load_balancing = bool(global_load_balancing)
        self.expert_parallel_rank, self.expert_parallel_size = distributed.group_rank_and_size(
            expert_parallel_group, num_experts, self.global_load_balancing)
        self._min_capacity, self._drop_policy = min_capacity, drop_policy
        self._capacity = None if capacity_factor is None else Capacity(
            capacity_factor, min_capacity, top_k, num_experts, at_most_tokens=not router_type.token_choice)
        factory = {"device": device, "dtype": dtype}
        if self._capacity is not None:
            self._capacity.check_buffer(d_model, (dtype or torch.get_default_dtype()).itemsize)
        self.gating_dropout, self.expert_dropout = gating_dropout, expert_dropout
        self.router = router_type.build(d_model, num_experts + num_null, top_k,
                                        dataclasses.replace(options, normalize_weights=self.normalize_weights),
                                        self._capacity, **factory)
        self.eval_top_k = eval_top_k
        self.router.eval_top_k = eval_top_k
        experts = {"expert": expert, "activation": activation, "bias": bias, "up_bias": up_bias, **factory}
        if expert == "swiglu_oss":
            experts.update(swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
        routed = {"hidden_dropout": expert_dropout} if expert_dropout else {}
        if expert_parallel_group is None:
            self.experts = Experts(d_model, d_ff, num_experts, **experts, **routed)
        else:
            with distributed.local_expert_rng(self.expert_parallel_rank, device):
                self.experts = Experts(d_model, d_ff, num_experts // self.expert_parallel_size, **experts, **routed)
        self.null_experts = NullExperts(d_model, num_experts, num_zero_experts, num_copy_experts, num_constant_experts,
                                        **factory) if num_null else None
        shared_d_ff = shared_expert_d_ff or num_shared_experts * d_ff
        self.shared_experts = Experts(d_model, shared_d_ff, 1, **experts) if num_shared_experts else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False, **factory) if shared_expert_gate else None
        sparse_capacity = self._capacity
        if router_type.dense_in_training and self._capacity is not None:
            # DS-MoE trains with every expert per token: the training capacity is that of E choices per token, the
            # eval one (built below) that of top_k.
            self._capacity = dataclasses.replace(self._capacity, top_k=num_experts)
        self.dispatcher = self._make_dispatcher(router_type, expert, activation, bias, up_bias)
        # The eval strategy, when eval_capacity_factor or eval_top_k changes it: built once, like the training one.
        self._eval_capacity_factor = eval_capacity_factor
        self.eval_dispatcher = None
        if eval_capacity_factor is not None or eval_top_k is not None or sparse_capacity is not self._capacity:
            capacity = sparse_capacity
            if eval_capacity_factor == "dropless":
                capacity = None
            elif eval_capacity_factor is not None:
                capacity = Capacity(eval_capacity_factor, min_capacity, top_k, num_experts)
            if capacity is not None:  # C = ceil(factor * T * k / E) with the k of eval
                capacity = dataclasses.replace(capacity, top_k=eval_top_k or top_k)
            self.eval_dispatcher = _local_dispatcher(router_type, num_experts, capacity, drop_policy)
        self._routing_hooks: dict = {}
        self._next_hook_id = 0
        self.load_balancing_override = None  # set by torch_moe.balancing.global_batch_balancing
        self.aux_loss: Optional[Tensor] = None
        self.stats: Optional[MoEStats] = None

    def _make_dispatcher(self, router_type, expert: str, activation: str, bias: bool, up_bias: bool):
        """The dispatch strategy of this layer (:mod:`torch_moe.dispatch`), chosen once."""
        if self.expert_parallel_group is not None:
            group = ExpertGroup(self.expert_parallel_group, self.expert_parallel_rank, self.expert_parallel_size, {
                "world_size": self.expert_parallel_size, "num_experts": self.num_experts, "d_model": self.d_model,
                "d_ff": self.d_ff, "top_k": self.top_k, "expert": expert, "activation": activation, "bias": bias,
                "capacity_factor": self.capacity_factor, "min_capacity": self.min_capacity,
                "drop_policy": self.drop_policy, "normalize_weights": self.normalize_weights,
                "global_load_balancing": self.global_load_balancing, "up_bias": up_bias,
                "router_bias": getattr(self.router, "bias", None) is not None,
                "swiglu_alpha": getattr(self.experts, "swiglu_alpha", None),
                "swiglu_limit": getattr(self.experts, "swiglu_limit", None)})
            if self._capacity is None:
                return ExpertParallelDroplessDispatch(self.num_experts, group)
            return ExpertParallelCapacityDispatch(self.num_experts, self._capacity, self.drop_policy, group)
        return _local_dispatcher(router_type, self.num_experts, self._capacity, self.drop_policy)

    def register_routing_hook(self, hook):
        """``hook(layer, routing: Routing, valid [T] | None) -> Routing | None`` runs in every forward after the router
        (and after an ``expert_ids`` override); a returned Routing replaces the routing (e.g.
        :meth:`override_routing`). Returns a handle whose ``remove()`` takes the hook off. This is the one place
        where outside code (:class:`torch_moe.replay.RoutingRecorder`) reaches into the routing."""
        key = self._next_hook_id
        self._next_hook_id += 1
        self._routing_hooks[key] = hook
        return _HookHandle(self._routing_hooks, key)

    def override_routing(self, routing, expert_ids: Tensor, routing_weights: Optional[Tensor] = None):
        """``routing`` with the experts ``expert_ids`` [T, k'] and their weights (see the class docstring)."""
        return _override_routing(self.router, routing, expert_ids, routing_weights)

    def __getstate__(self) -> dict:
        # The last aux_loss keeps its autograd graph for backward; copies (deepcopy, pickling) take it detached.
        state = dict(super().__getstate__())
        if self.aux_loss is not None:
            state["aux_loss"] = self.aux_loss.detach()
        return state

    @property
    def capacity_factor(self) -> Optional[float]:
        return None if self._capacity is None else self._capacity.factor

    @property
    def min_capacity(self) -> int:
        return self._min_capacity

    @property
    def drop_policy(self) -> str:
        return self._drop_policy

    @property
    def dropless(self) -> bool:
        return self._capacity is None

    @property
    def eval_capacity_factor(self):
        """As given: ``None`` (eval as in training), a number, or ``"dropless"``."""
        return self._eval_capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` tokens (padding included, so shapes stay static).

        Expert choice caps it at ``num_tokens``: an expert cannot take a token twice.
        """
        assert self._capacity is not None, "capacity() is undefined in dropless mode"
        return self._capacity(num_tokens)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, *, token_ids: Optional[Tensor] = None,
                expert_ids: Optional[Tensor] = None, routing_weights: Optional[Tensor] = None) -> Tensor:
        tokens, valid = self._flatten(x, padding_mask, token_ids)
        # Padding rows may hold anything (NaN included); zero them for the router and the shared experts so that
        # nothing of theirs reaches an output or a weight gradient (0 * NaN would).
        clean = tokens if valid is None else torch.where(valid.unsqueeze(1), tokens, 0)
        routing = self.router(clean, token_ids=token_ids, valid=valid)
        if expert_ids is not None or routing_weights is not None:
            routing = self.override_routing(routing, *_flat_override(x, expert_ids, routing_weights))
        for hook in list(self._routing_hooks.values()):
            routing = hook(self, routing, valid) or routing
        gate_dropped = self.training and self.gating_dropout > 0 and float(torch.rand(())) < self.gating_dropout
        dispatched = self._ffn_routing(routing, tokens.shape[0], gate_dropped)
        expert_input = tokens.to(unwrapped(self.experts).w1.dtype)
        dispatcher = self.dispatcher if self.training or self.eval_dispatcher is None else self.eval_dispatcher
        y, load = dispatcher(self.experts, expert_input, dispatched, valid)
        if self.null_experts is not None and not gate_dropped:
            y = y + self.null_experts(clean, routing.weights, routing.expert_ids, valid).to(y.dtype)
        if self.shared_experts is not None:
            y = y + self._shared(clean.to(expert_input.dtype), valid)
        router = unwrapped(self.router)  # its hooks, not its forward: a LoRA wrapper need not be active for them
        load = router.count_load(routing, valid, load)
        if self.training and router.adapts_to_load and not recomputing():
            router_load = load.tokens_per_expert
            if self.null_experts is not None or gate_dropped:
                router_load = _assignments_per_expert(routing, valid, router.num_experts)  # the router's choice
            # Under expert parallelism the load is summed over the group, so the replicated state stays identical.
            router.observe_load(self.dispatcher.summed_over_group(router_load), y)
        self._record_losses_and_stats(x, routing, valid, load, dispatched)
        return y.to(x.dtype).reshape(x.shape)

    def _ffn_routing(self, routing, num_tokens: int, gate_dropped: bool):
        """The routing the FFN experts see: the router's, with null-expert choices marked inactive, or in a
        gating-dropout forward (drawn by the caller on the CPU generator: no device sync) every token to its local
        expert."""
        if gate_dropped:
            local = self.num_experts // self.expert_parallel_size
            positions = torch.arange(num_tokens, device=routing.weights.device)
            expert_ids = (self.expert_parallel_rank * local + positions * local // max(num_tokens, 1)).unsqueeze(1)
            return routing._replace(weights=routing.weights.new_ones(num_tokens, 1), expert_ids=expert_ids,
                                    slots=None, active=None)
        if self.null_experts is not None:
            active = routing.expert_ids < self.num_experts
            return routing._replace(active=active if routing.active is None else routing.active & active)
        return routing

    def _shared(self, tokens: Tensor, valid: Optional[Tensor]) -> Tensor:
        """The shared experts' output [T, d] on padding-zeroed tokens, 0 on padding rows."""
        shared = self.shared_experts(tokens.unsqueeze(0)).squeeze(0)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
        return shared if valid is None else torch.where(valid.unsqueeze(1), shared, 0)

    def _flatten(self, x: Tensor, padding_mask: Optional[Tensor],
                 token_ids: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """x [..., d_model] -> (tokens [T, d_model], valid [T] bool or None), after checking the arguments."""
        tokens, valid = flat_tokens("MoE", x, "d_model", self.d_model, padding_mask)
        lead_shape = x.shape[:-1]
        if token_ids is not None and (token_ids.shape != lead_shape or token_ids.is_floating_point()
                                      or token_ids.dtype == torch.bool):
            raise ValueError(f"MoE: token_ids must be an integer tensor of shape {tuple(lead_shape)} (x without its "
                             f"last dim), got {token_ids.dtype} of shape {tuple(token_ids.shape)}")
        if self.seq_balance_loss_coef > 0 and x.dim() != 3:
            raise ValueError(f"MoE: seq_balance_loss_coef > 0 needs x laid out as [B, S, d_model], got x of shape "
                             f"{tuple(x.shape)}")
        return tokens, valid

    def _record_losses_and_stats(self, x: Tensor, routing, valid: Optional[Tensor], load: Load, dispatched) -> None:
        router = unwrapped(self.router)
        load_balancing_loss, z_loss, router_entropy = router.balance_losses(routing, valid)
        if self.load_balancing_override is not None:
            load_balancing_loss = self.load_balancing_override(self, routing, valid, load, load_balancing_loss)
        elif self.global_load_balancing:
            load_balancing_loss = moe_losses.global_load_balancing_loss(
                routing.logits, load.tokens_per_expert, valid, self.top_k, self.expert_parallel_group)
        losses = {"load_balancing": load_balancing_loss, "z": z_loss}
        aux = self.aux_loss_coef * load_balancing_loss + self.z_loss_coef * z_loss
        optional = (("importance", self.importance_loss_coef,
                     lambda: moe_losses.importance_loss(router.gates(routing), valid)),
                    ("load", self.load_loss_coef, lambda: router.load_loss(routing, valid)),
                    ("sequence_balance", self.seq_balance_loss_coef, lambda: _sequence_balance(x, routing, valid)))
        for name, coef, loss in optional:
            if coef > 0:
                losses[name] = loss()
                aux = aux + coef * losses[name]
        for name, (coef, loss) in router.extra_losses(routing, valid).items():
            losses[name] = loss
            aux = aux + coef * loss
        self.aux_loss = aux
        self.stats = MoEStats(
            tokens_per_expert=load.tokens_per_expert.detach(),
            dropped_fraction=load.dropped_fraction.detach(),
            router_entropy=router_entropy.detach(),
            load_balancing_loss=load_balancing_loss.detach(),
            z_loss=z_loss.detach(),
            unrouted_fraction=_unrouted_fraction(load.slots, valid, routing.weights.dtype, x.device).detach(),
            losses={name: value.detach() for name, value in losses.items()},
            experts_per_token=_experts_per_token(dispatched, valid, router.routes_top_k).detach(),
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, min_capacity={self.min_capacity}, "
            f"drop_policy={self.drop_policy!r}, router={self.router_name!r}, aux_loss_coef={self.aux_loss_coef}, "
            f"z_loss_coef={self.z_loss_coef}"
            + (f", num_shared_experts={self.num_shared_experts}" if self.num_shared_experts else "")
            + (f", expert_granularity={self.expert_granularity}" if self.expert_granularity > 1 else "")
            + (f", gating_dropout={self.gating_dropout}" if self.gating_dropout else "")
            + (f", expert_dropout={self.expert_dropout}" if self.expert_dropout else "")
            + (f", expert_parallel=rank {self.expert_parallel_rank} of {self.expert_parallel_size}"
               if self.expert_parallel_group is not None else "")
        )


def _local_dispatcher(router_type, num_experts: int, capacity: Optional[Capacity], drop_policy: str):
    if capacity is None:
        return DroplessDispatch(num_experts)
    strategy = CapacityDispatch if router_type.token_choice else ExpertChoiceDispatch
    return strategy(num_experts, capacity, drop_policy)


class _HookHandle:
    def __init__(self, hooks: dict, key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


def _flat_override(x: Tensor, expert_ids: Optional[Tensor],
                   routing_weights: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The forward's expert_ids / routing_weights [..., k] checked against x [..., d] and flattened to [T, k]."""
    lead_shape = tuple(x.shape[:-1])
    if expert_ids is None:
        raise ValueError("MoE: routing_weights needs expert_ids (the experts the weights belong to)")
    if (expert_ids.dim() != len(lead_shape) + 1 or tuple(expert_ids.shape[:-1]) != lead_shape
            or expert_ids.is_floating_point() or expert_ids.dtype == torch.bool or expert_ids.is_complex()):
        raise ValueError(f"MoE: expert_ids must be an integer tensor of shape {lead_shape + ('k',)} (x's leading "
                         f"dims, then k), got {expert_ids.dtype} of shape {tuple(expert_ids.shape)}")
    flat_ids = expert_ids.reshape(-1, expert_ids.shape[-1])
    flat_weights = None
    if routing_weights is not None:
        if routing_weights.shape != expert_ids.shape or not routing_weights.is_floating_point():
            raise ValueError(f"MoE: routing_weights must be a float tensor of expert_ids' shape "
                             f"{tuple(expert_ids.shape)}, got {routing_weights.dtype} of shape "
                             f"{tuple(routing_weights.shape)}")
        flat_weights = routing_weights.reshape(flat_ids.shape)
    return flat_ids, flat_weights


def _validate_eval(router_type, num_experts, granularity, eval_capacity_factor, eval_top_k,
                   expert_parallel_group, options: RouterOptions) -> Optional[int]:
    """The fine-grained eval top-k (or None), after checking the eval overrides."""
    if eval_capacity_factor is not None and eval_capacity_factor != "dropless":
        if not (is_finite_number(eval_capacity_factor) and eval_capacity_factor > 0):
            raise ValueError(f"MoE: eval_capacity_factor must be a number > 0 and finite, 'dropless' or None (as in "
                             f"training), got {eval_capacity_factor!r}")
    if eval_top_k is not None:
        if not getattr(router_type, "accepts_eval_top_k", False):
            raise ValueError(f"MoE(router={router_type.name!r}): eval_top_k applies to token-choice routers that "
                             f"pick a top-k by score, not to {router_type.name!r} routing")
        if not is_int(eval_top_k) or not 1 <= eval_top_k * granularity <= num_experts:
            raise ValueError(f"MoE: eval_top_k must be an int in [1, num_experts={num_experts // granularity}], "
                             f"got {eval_top_k!r}")
        eval_top_k = eval_top_k * granularity
        if options.n_groups is not None or options.topk_groups is not None:
            try:
                check_groups(num_experts, eval_top_k, options.n_groups, options.topk_groups)
            except ValueError as err:
                raise ValueError(f"MoE: eval_top_k={eval_top_k // granularity} does not fit the groups: {err}") from None
    if (eval_capacity_factor is not None or eval_top_k is not None) and expert_parallel_group is not None:
        raise ValueError("MoE: eval_capacity_factor / eval_top_k are not supported with expert_parallel_group yet")
    if eval_capacity_factor is not None and not router_type.token_choice:
        # The expert-choice router sizes its choice with the layer's capacity rule; one rule per layer for now.
        raise ValueError(f"MoE(router={router_type.name!r}): eval_capacity_factor applies to token-choice routers "
                         f"only, got router={router_type.name!r}")
    return eval_top_k


def _sequence_balance(x: Tensor, routing, valid: Optional[Tensor]) -> Tensor:
    batch, seq = x.shape[0], x.shape[1]
    # Explicit last dims: with no tokens (batch or seq 0) a -1 could not be inferred.
    scores = routing.scores.view(batch, seq, routing.scores.shape[-1])
    expert_ids = routing.expert_ids.view(batch, seq, routing.expert_ids.shape[-1])
    return moe_losses.sequence_balance_loss(scores, expert_ids, None if valid is None else valid.view(batch, seq))


def _validate(d_model, d_ff, num_experts, top_k, capacity_factor, min_capacity, drop_policy, expert, activation,
              jitter_eps, up_bias, swiglu_alpha=None, swiglu_limit=None) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
        if not is_int(value) or value <= 0:
            raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
    if not is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"MoE: top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if capacity_factor is not None and not (is_finite_number(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"MoE: capacity_factor must be > 0 and finite, or None (dropless), got {capacity_factor!r}")
    if not is_int(min_capacity) or min_capacity < 0:
        raise ValueError(f"MoE: min_capacity must be an int >= 0, got {min_capacity!r}")
    if min_capacity * num_experts > 2**63 - 1:  # the [E, C, d] buffer's E * C must fit in int64
        raise ValueError(f"MoE: min_capacity is too large: num_experts * min_capacity = {num_experts} * {min_capacity} "
                         f"overflows int64")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"MoE: drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if expert not in EXPERT_TYPES:
        raise ValueError(f"MoE: expert must be one of {EXPERT_TYPES}, got {expert!r}")
    _check_swiglu_oss(expert, swiglu_alpha, swiglu_limit, "MoE: ")
    if up_bias and expert == "mlp":
        raise ValueError("MoE: up_bias (b3 on x·w3) needs a gated expert type, got expert='mlp'")
    if activation not in ACTIVATIONS:
        raise ValueError(f"MoE: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not (is_number(jitter_eps) and 0.0 <= jitter_eps < 1.0):
        raise ValueError(f"MoE: jitter_eps must be in [0, 1), got {jitter_eps!r}")


def _experts_per_token(routing, valid: Optional[Tensor], routes_top_k: bool = True) -> Tensor:
    """0-dim: mean over valid tokens of the FFN assignments of a token before dropping (0 with no valid token);
    for routers whose routing lists every expert (``routes_top_k`` False: DSelect-k), those of nonzero weight."""
    if routing.slots is not None:  # expert choice: the experts that took the token
        per_token = (routing.slots >= 0).sum(1)
    elif not routes_top_k:
        per_token = (routing.weights != 0).sum(1)
    elif routing.active is not None:
        per_token = routing.active.sum(1)
    else:
        per_token = torch.full(routing.expert_ids.shape[:1], routing.expert_ids.shape[1],
                               device=routing.expert_ids.device)
    dtype = routing.weights.dtype
    if valid is None:
        return per_token.sum().to(dtype) / max(per_token.shape[0], 1)
    return torch.where(valid, per_token, 0).sum().to(dtype) / valid.sum().clamp(min=1).to(dtype)


def _assignments_per_expert(routing, valid: Optional[Tensor], num_experts: int) -> Tensor:
    """[num_experts] int64, the router's valid assignments per expert (null experts included)."""
    counted = torch.ones_like(routing.expert_ids) if valid is None else valid.unsqueeze(1).expand_as(
        routing.expert_ids).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=routing.expert_ids.device).index_add_(
        0, routing.expert_ids.reshape(-1), counted.reshape(-1))


def _validate_part2(router_type, num_zero_experts, num_copy_experts, num_constant_experts, gating_dropout,
                    expert_dropout, global_load_balancing, seq_balance_loss_coef) -> int:
    """Checks the options of routing part 2 (null experts, gating / expert dropout); returns the null experts."""
    for name, value in (("num_zero_experts", num_zero_experts), ("num_copy_experts", num_copy_experts),
                        ("num_constant_experts", num_constant_experts)):
        if not is_int(value) or value < 0:
            raise ValueError(f"MoE: {name} must be an int >= 0, got {value!r}")
    for name, value in (("gating_dropout", gating_dropout), ("expert_dropout", expert_dropout)):
        if not (is_finite_number(value) and 0 <= value <= 1):
            raise ValueError(f"MoE: {name} must be a probability in [0, 1], got {value!r}")
    num_null = num_zero_experts + num_copy_experts + num_constant_experts
    if global_load_balancing and (num_null or router_type.name in ("top_p", "ds_moe")):
        raise ValueError("MoE: global_load_balancing counts top_k FFN assignments per token; it does not support "
                         f"null experts or router={router_type.name!r} (a varying number of experts per token)")
    if num_null and not router_type.token_choice:
        raise ValueError(f"MoE(router={router_type.name!r}): null experts (num_zero_experts, num_copy_experts, "
                         "num_constant_experts) need token-choice routing")
    if router_type.name == "top_p" and is_finite_number(seq_balance_loss_coef) and seq_balance_loss_coef > 0:
        raise ValueError("MoE(router='top_p'): seq_balance_loss_coef counts top_k assignments per token; top-p "
                         "routing takes a varying number (its load-balancing loss counts the taken ones)")
    if gating_dropout > 0 and not router_type.token_choice:
        raise ValueError(f"MoE(router={router_type.name!r}): gating_dropout needs token-choice routing (expert "
                         "choice plans its slots in the router)")
    return num_null


def _unrouted_fraction(slots: Optional[Tensor], valid: Optional[Tensor], dtype, device) -> Tensor:
    """Fraction of valid tokens none of whose assignments got a slot (0 when dropless: slots is None)."""
    if slots is None:
        return torch.zeros((), dtype=dtype, device=device)
    reached = (slots >= 0).any(1)
    if valid is None:
        return (~reached).sum().to(dtype) / max(slots.shape[0], 1)
    return (valid & ~reached).sum().to(dtype) / valid.sum().clamp(min=1).to(dtype)


def _validate_fine_grained(d_ff, num_shared_experts, expert_granularity) -> None:
    if not is_int(expert_granularity) or expert_granularity < 1:
        raise ValueError(f"MoE: expert_granularity must be an int >= 1, got {expert_granularity!r}")
    if d_ff % expert_granularity:
        raise ValueError(f"MoE: expert_granularity={expert_granularity} must divide d_ff={d_ff}")
    if not is_int(num_shared_experts) or num_shared_experts < 0:
        raise ValueError(f"MoE: num_shared_experts must be an int >= 0, got {num_shared_experts!r}")


def _validate_shared(num_shared_experts, shared_expert_d_ff, shared_expert_gate) -> None:
    if shared_expert_d_ff is not None and not (is_int(shared_expert_d_ff) and shared_expert_d_ff > 0):
        raise ValueError(f"MoE: shared_expert_d_ff must be a positive int or None, got {shared_expert_d_ff!r}")
    if (shared_expert_d_ff is not None or shared_expert_gate) and num_shared_experts == 0:
        raise ValueError("MoE: shared_expert_d_ff and shared_expert_gate need num_shared_experts >= 1")


def _validate_losses(router_type, aux_loss_coef, z_loss_coef, importance_loss_coef, load_loss_coef,
                     seq_balance_loss_coef, global_load_balancing) -> None:
    """The aux losses asked for must be ones this router's capabilities allow."""
    name = router_type.name
    for coef_name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                             ("importance_loss_coef", importance_loss_coef), ("load_loss_coef", load_loss_coef),
                             ("seq_balance_loss_coef", seq_balance_loss_coef)):
        if not is_finite_number(value) or value < 0:
            raise ValueError(f"MoE: {coef_name} must be a number >= 0 and finite, got {value!r}")
    if load_loss_coef > 0 and not router_type.has_noise:
        takers = " or ".join(repr(r.name) for r in ROUTER_CLASSES if r.has_noise)
        raise ValueError(f"MoE: load_loss_coef applies to router={takers} only (it needs the noise), got "
                         f"router={name!r}")
    if importance_loss_coef > 0 and not router_type.has_scores:
        raise ValueError(f"MoE(router={name!r}): importance_loss_coef has nothing to train ({name} weights are fixed)")
    token_choice_with_scores = router_type.token_choice and router_type.has_scores
    if seq_balance_loss_coef > 0 and not token_choice_with_scores:
        raise ValueError(f"MoE(router={name!r}): seq_balance_loss_coef needs token-choice routing with scores")
    if seq_balance_loss_coef > 0 and not router_type.routes_top_k:
        raise ValueError(f"MoE(router={name!r}): seq_balance_loss_coef counts each token's k choices, and {name} routes "
                         "every expert (zero weights included); use aux_loss_coef")
    if global_load_balancing and not token_choice_with_scores:
        raise ValueError(f"MoE(router={name!r}): global_load_balancing needs token-choice routing with logits")


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every routed layer in ``model`` (their last forward); 0 if none ran.

    Routed layers are :class:`MoE` and any module whose class sets ``reports_aux_loss = True`` and keeps its last
    forward's loss in ``aux_loss`` (:class:`torch_moe.lora.MoLoRALinear`)."""
    total: Optional[Tensor] = None
    for module in model.modules():
        if getattr(module, "reports_aux_loss", False) and module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total
