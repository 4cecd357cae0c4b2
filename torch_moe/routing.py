"""Routers of the MoE layer, each selectable by name in ``MoE(..., router=NAME)``, built on the routing ops.

Token-choice routers (every token picks experts): ``"softmax"`` (:class:`Router`), ``"noisy_topk"``
(:class:`NoisyTopKRouter`), ``"sigmoid"`` (:class:`SigmoidRouter`), ``"hash"`` (:class:`HashRouter`),
``"random"`` (:class:`RandomRouter`). Expert-choice (every expert picks tokens): ``"expert_choice"``
(:class:`ExpertChoiceRouter`). Soft MoE is a layer of its own: :class:`torch_moe.SoftMoE`.

A router owns its options (:class:`RouterOptions`), their checks (:meth:`Router.check`), how it is built from
them (:meth:`Router.build`), its capabilities (class attributes: ``token_choice``, ``has_scores``, ``has_noise``)
and its typed output (:class:`Routing`); the layer asks it for its share of the aux losses
(:meth:`Router.balance_losses`, :meth:`Router.gates`). Adding a router is adding one class to :data:`ROUTER_CLASSES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses as moe_losses
from . import ops
from ._checks import is_finite_number, is_int

__all__ = [
    "ROUTERS",
    "ROUTER_CLASSES",
    "RouterOptions",
    "Routing",
    "Router",
    "NoisyTopKRouter",
    "SigmoidRouter",
    "HashRouter",
    "RandomRouter",
    "ExpertChoiceRouter",
    "router_class",
    "SoftMoE",
]

class Routing(NamedTuple):
    """What a router decided for T tokens.

    logits: [T, E] router dtype (float32, float64 for float64 input), the logits the choice was made on; ``None``
        for the hash router. weights: [T, k] (expert choice: [T, E]), differentiable w.r.t. the router's
        parameters. expert_ids: [T, k] int64 (expert choice: ``arange(E)`` expanded to [T, E]). scores: [T, E]
        softmax or sigmoid of the logits, not differentiable (``None`` for hash).
    Router-specific, ``None`` elsewhere: slots [T, E] int64 (expert choice: the slot each expert gave the token,
    -1 for none); clean_logits, noise_std [T, E] (noisy top-k: the logits before the noise and its scale).
    """

    logits: Optional[Tensor]
    weights: Tensor
    expert_ids: Tensor
    scores: Optional[Tensor]
    slots: Optional[Tensor] = None
    clean_logits: Optional[Tensor] = None
    noise_std: Optional[Tensor] = None


@dataclass(frozen=True)
class RouterOptions:
    """The router options of :class:`torch_moe.MoE`, as given (``None``: the router's default). Which router takes
    which is said by its ``accepts``; :meth:`Router.check` validates them."""

    normalize_weights: Optional[bool] = None
    jitter_eps: float = 0.0
    bias_update_rate: Optional[float] = None
    n_groups: Optional[int] = None
    topk_groups: Optional[int] = None
    routed_scaling_factor: Optional[float] = None


# Options that only some routers take, with the words the error uses when another router is given them.
_RESTRICTED_OPTIONS = {"bias_update_rate": ("bias_update_rate",), "n_groups": ("n_groups", "topk_groups"),
                       "topk_groups": ("n_groups", "topk_groups"), "routed_scaling_factor": ("routed_scaling_factor",)}


def _router_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing a forward."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _router_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x·weightᵀ in the router dtype. Autocast is off for it: F.linear would otherwise run in bf16/fp16 and route
    differently from float32."""
    router_dtype = _router_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x, weight = x.to(router_dtype), weight.to(router_dtype)
        if x.device.type == "cpu" and x.dim() == 2 and not torch.compiler.is_compiling():
            # torch's CPU GEMM (MKL) splits its work, and with it its rounding, by the thread count (e.g. the
            # [E, T] x [T, d] weight gradient for 5 to 11 experts at 2 threads). grouped_mm with one group computes
            # the same product on a partition fixed by the shapes, so routing and its gradients do not depend on
            # the number of threads.
            offsets = torch.tensor([0, x.shape[0]], dtype=torch.long)
            return ops.grouped_mm(x, weight.t().unsqueeze(0), offsets)
        return F.linear(x, weight)


class RouterBase(nn.Module):
    """What the layer asks of every router: capabilities, option checks, the load it adapts to and its share of
    the aux losses. Subclasses set ``name`` and override what differs."""

    name = ""
    token_choice = True  # every token picks experts (False: every expert picks tokens)
    has_scores = True  # logits and scores exist (balance losses, z-loss, drop_policy="probability")
    has_noise = False  # Shazeer's load loss applies
    accepts = ("n_groups", "topk_groups", "routed_scaling_factor")  # restricted RouterOptions this router takes
    normalizes_by_default = False  # normalize_weights=None means True for every top_k (else for top_k > 1)

    @classmethod
    def default_normalize_weights(cls, top_k: int) -> bool:
        return top_k > 1 or cls.normalizes_by_default

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, *, capacity_factor: Optional[float],
              drop_policy: str, expert_parallel: bool) -> None:
        """Raises ValueError for options this router does not take or cannot use in this layer."""
        for option, names in _RESTRICTED_OPTIONS.items():
            if getattr(options, option) is not None and option not in cls.accepts:
                takers = " or ".join(repr(r.name) for r in ROUTER_CLASSES if option in r.accepts)
                verb = "applies" if len(names) == 1 else "apply"
                raise ValueError(f"MoE: {' / '.join(names)} {verb} to router={takers} only, got router={cls.name!r}")
        if drop_policy == "probability" and not cls.has_scores:
            raise ValueError(f"MoE(router={cls.name!r}): drop_policy='probability' needs router scores; {cls.name} "
                             "routing has none, use drop_policy='position'")
        if options.n_groups is not None or options.topk_groups is not None:
            _check_groups(num_experts, top_k, options.n_groups, options.topk_groups)
        scale = options.routed_scaling_factor
        if scale is not None and not (is_finite_number(scale) and scale > 0):
            raise ValueError(f"MoE: routed_scaling_factor must be a number > 0 and finite, got {scale!r}")

    @property
    def adapts_to_load(self) -> bool:
        """Whether :meth:`observe_load` changes the router in training (replicated state under expert parallelism)."""
        return False

    def observe_load(self, tokens_per_expert: Tensor, output: Optional[Tensor] = None) -> None:
        """Called by the layer after each training forward (not after a recomputation) with the valid assignments
        per expert [E] and the layer's output; nothing to do here."""

    def balance_losses(self, routing: Routing, valid: Optional[Tensor]) -> ops.RouterLosses:
        """(load-balancing loss, z-loss, router entropy) of this routing, each 0-dim."""
        return ops.router_losses(routing.logits, routing.expert_ids, valid)

    def gates(self, routing: Routing) -> Tensor:
        """[T, E] the weight each token gives each expert (0 where not chosen), for the importance loss."""
        weights = routing.weights
        return weights.new_zeros(weights.shape[0], self.num_experts).scatter_add(1, routing.expert_ids, weights)


class Router(RouterBase):
    """Top-k softmax router (``"softmax"``; Shazeer et al. 2017 without noise, Switch / GShard / Mixtral).

    logits = x · weightᵀ in float32 (float64 for float64 input), probs = softmax(logits); each token takes its
    ``top_k`` most probable experts, ties to the lower id. Weights are the chosen probs, divided by their sum when
    ``normalize_weights``. ``jitter_eps > 0`` multiplies the router's input by U(1 − eps, 1 + eps) in training.
    ``n_groups`` / ``topk_groups``: group-limited routing (DeepSeek-V2/V3, see :func:`torch_moe.ops.router_topk`).

    Parameters: ``weight`` [E, d_model] (no bias).
    """

    name = "softmax"
    score_func = "softmax"

    @classmethod
    def build(cls, d_model: int, num_experts: int, top_k: int, options: RouterOptions, capacity, *, device=None,
              dtype=None, **own_options) -> "Router":
        """The router for these options (checked by :meth:`check`; ``normalize_weights`` resolved).
        ``capacity``: the layer's capacity rule (expert choice), ``None`` in dropless mode. ``own_options``: what a
        subclass adds to the constructor."""
        return cls(d_model, num_experts, top_k, normalize_weights=options.normalize_weights,
                   jitter_eps=options.jitter_eps, n_groups=options.n_groups or 1, topk_groups=options.topk_groups,
                   routed_scaling_factor=options.routed_scaling_factor or 1.0, device=device, dtype=dtype,
                   **own_options)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        normalize_weights: bool,
        jitter_eps: float = 0.0,
        n_groups: int = 1,
        topk_groups: Optional[int] = None,
        routed_scaling_factor: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_weights = normalize_weights
        self.jitter_eps = jitter_eps
        self.n_groups = n_groups
        self.topk_groups = n_groups if topk_groups is None else topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x: Tensor) -> Tensor:
        """x: [T, d_model] -> logits [T, E] in the router dtype (float32, or float64 for float64 input)."""
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return _router_linear(x, self.weight)

    def selection_bias(self) -> Optional[Tensor]:
        """[E] added to the scores only to choose experts (loss-free balancing); ``None`` here."""
        return None

    def choose(self, logits: Tensor) -> ops.RouterOutput:
        out = ops.router_topk(logits, self.top_k, self.score_func, self.selection_bias(), self.normalize_weights,
                              self.n_groups, self.topk_groups)
        if self.routed_scaling_factor != 1.0:  # DeepSeek-V2/V3: the (normalised) weights times a constant
            out = out._replace(weights=out.weights * self.routed_scaling_factor)
        return out

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        """x: [T, d_model] -> :class:`Routing` with weights / expert_ids [T, k]."""
        logits = self.logits(x)
        out = self.choose(logits)
        return Routing(logits, out.weights, out.expert_ids, out.scores)

    def extra_repr(self) -> str:
        groups = (f", n_groups={self.n_groups}, topk_groups={self.topk_groups}"
                  if self.topk_groups < self.n_groups else "")
        return (
            f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize_weights={self.normalize_weights}, jitter_eps={self.jitter_eps}{groups}"
        )


class NoisyTopKRouter(Router):
    """Noisy top-k gating (``"noisy_topk"``; Shazeer et al. 2017, "Outrageously Large Neural Networks").

    H = x·weightᵀ + ε · (softplus(x·noise_weightᵀ) + noise_epsilon), ε ~ N(0, 1) drawn in training only; each token
    keeps its top-k entries of H and its weights are a softmax over those k values (the others are −∞), i.e. the
    renormalised top-k of softmax(H). In eval mode H = x·weightᵀ, so it routes exactly like ``"softmax"`` with
    normalised weights. ``noise_epsilon`` (1e-2, as in the authors' code) keeps the noise scale positive.
    Pair it with the layer's ``importance_loss_coef`` and ``load_loss_coef`` (Shazeer's two balance losses).

    Parameters: ``weight`` and ``noise_weight``, both [E, d_model]; ``noise_weight`` starts at zero, as in the paper.
    """

    name = "noisy_topk"
    has_noise = True
    normalizes_by_default = True
    accepts = ("routed_scaling_factor",)
    noise_epsilon = 1e-2

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, **layer) -> None:
        super().check(num_experts, top_k, options, **layer)
        if options.normalize_weights is False:
            raise ValueError("MoE(router='noisy_topk'): the weights are a softmax over the k kept logits, so they are "
                             "always normalised; normalize_weights=False is not supported")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        return cls(d_model, num_experts, top_k, jitter_eps=options.jitter_eps,
                   routed_scaling_factor=options.routed_scaling_factor or 1.0, device=device, dtype=dtype)

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, jitter_eps: float = 0.0,
                 routed_scaling_factor: float = 1.0, device=None, dtype=None) -> None:
        super().__init__(d_model, num_experts, top_k, normalize_weights=True, jitter_eps=jitter_eps,
                         routed_scaling_factor=routed_scaling_factor, device=device, dtype=dtype)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "noise_weight"):
            nn.init.zeros_(self.noise_weight)

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        clean = self.logits(x)
        noise_std = F.softplus(_router_linear(x, self.noise_weight)) + self.noise_epsilon
        noisy = clean + torch.randn_like(clean) * noise_std if self.training else clean
        out = self.choose(noisy)
        return Routing(noisy, out.weights, out.expert_ids, out.scores, clean_logits=clean, noise_std=noise_std)

    def load_loss(self, routing: Routing, valid: Optional[Tensor]) -> Tensor:
        """Shazeer et al.'s load loss of this routing (:func:`torch_moe.losses.load_loss`)."""
        return moe_losses.load_loss(routing.clean_logits, routing.logits, routing.noise_std, self.top_k, valid)


class SigmoidRouter(Router):
    """Sigmoid routing with auxiliary-loss-free balancing (``"sigmoid"``; DeepSeek-V3, Liu et al. 2024; Wang et al.
    2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").

    scores = sigmoid(x·weightᵀ); the buffer ``expert_bias`` [E] is added to the scores only to choose the top k; the
    weights are the chosen unbiased scores divided by their sum. Training moves the bias against the load seen:
    ``expert_bias[i] += bias_update_rate · sign(mean load − load[i])`` (0 disables). A training forward with a
    graph defers its update to the end of the backward through it (the loads of forwards sharing one backward are
    summed, one update); one without a graph (no_grad) updates at once. So a recomputation under activation
    checkpointing (``torch.utils.checkpoint(use_reentrant=False)``, HF ``gradient_checkpointing_enable``) routes
    with the bias of its original forward and does not count its load again; reentrant checkpointing, whose
    original forward has no graph, raises RuntimeError at the recomputation instead of routing differently.
    A forward with a graph and no backward leaves its update pending until the next eval-mode forward.
    ``n_groups`` / ``topk_groups``: a group's score is the sum of its two highest biased scores and a token chooses
    only inside its ``topk_groups`` best groups (DeepSeek-V3's node-limited routing). With ``top_k=1`` the normalised
    weight is always 1 and the router learns only from aux losses: pass ``normalize_weights=False`` there. With
    expert parallelism the load is summed over the group first (one all-reduce per training forward), so the bias
    stays identical on every rank.

    Parameters: ``weight`` [E, d_model]; buffer ``expert_bias`` [E] float32 (saved in the state dict).
    """

    name = "sigmoid"
    score_func = "sigmoid"
    normalizes_by_default = True
    accepts = ("bias_update_rate", "n_groups", "topk_groups", "routed_scaling_factor")

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, **layer) -> None:
        super().check(num_experts, top_k, options, **layer)
        rate = options.bias_update_rate
        if rate is not None and not (is_finite_number(rate) and rate >= 0):
            raise ValueError(f"MoE: bias_update_rate must be a number >= 0 and finite, got {rate!r}")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        rate = 1e-3 if options.bias_update_rate is None else options.bias_update_rate
        return super().build(d_model, num_experts, top_k, options, capacity, device=device, dtype=dtype,
                             bias_update_rate=rate)

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, normalize_weights: bool = True,
                 bias_update_rate: float = 1e-3, **router_options) -> None:
        """``router_options``: those of :class:`Router` (jitter_eps, n_groups, topk_groups, routed_scaling_factor,
        device, dtype)."""
        super().__init__(d_model, num_experts, top_k, normalize_weights=normalize_weights, **router_options)
        self.bias_update_rate = bias_update_rate
        self._pending_load: Optional[Tensor] = None  # summed loads of training forwards not yet applied
        self._awaited_backwards = 0  # backwards through those forwards that have not ended yet
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=self.weight.device, dtype=torch.float32))

    def selection_bias(self) -> Tensor:
        return self.expert_bias

    @property
    def adapts_to_load(self) -> bool:
        return self.bias_update_rate != 0

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        if recomputing():
            if self.training and self.bias_update_rate != 0 and self._awaited_backwards == 0:
                # The original forward had no graph, so its update is already applied: reentrant checkpointing.
                raise RuntimeError(
                    "MoE(router='sigmoid'): a forward recomputed inside a backward (activation checkpointing with "
                    "use_reentrant=True) cannot route as its original forward did, whose bias update is already "
                    "applied; use torch.utils.checkpoint(..., use_reentrant=False) (HF's default), or "
                    "bias_update_rate=0")
        elif self._pending_load is not None and not self.training:
            self._apply_pending()
        return super().forward(x, token_ids=token_ids, valid=valid)

    @torch.no_grad()
    def observe_load(self, tokens_per_expert: Tensor, output: Optional[Tensor] = None) -> None:
        if not self.training or self.bias_update_rate == 0:
            return
        load = tokens_per_expert.to(self.expert_bias.dtype)
        if output is None or not output.requires_grad:  # no backward will follow: nothing to wait for
            self._update(load)
            return
        self._pending_load = load if self._pending_load is None else self._pending_load + load
        self._awaited_backwards += 1
        output.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: Tensor) -> None:
        # Runs inside the backward; the update waits for its end, after every recomputation of this step.
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._awaited_backwards = max(self._awaited_backwards - 1, 0)
        if self._awaited_backwards == 0:
            self._apply_pending()

    @torch.no_grad()
    def _apply_pending(self) -> None:
        if self._pending_load is None:
            return
        load, self._pending_load, self._awaited_backwards = self._pending_load, None, 0
        self._update(load)

    @torch.no_grad()
    def _update(self, load: Tensor) -> None:
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias_update_rate={self.bias_update_rate}"


class HashRouter(RouterBase):
    """Hash routing (``"hash"``; Roller et al. 2021, "Hash Layers For Large Sparse Models").

    The experts of a token are a fixed function of its token id: ``table[token_id mod num_buckets]``, a frozen random
    table of ``top_k`` distinct experts per bucket (drawn once from ``seed``, saved in the state dict), each with
    weight 1/k. Nothing is learned, so it asks whether learned routing matters at all. Needs
    ``forward(x, token_ids=...)`` with one id per token.

    Buffers: ``table`` [num_buckets, k] int64.
    """

    name = "hash"
    has_scores = False
    accepts = ()

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "HashRouter":
        return cls(num_experts, top_k, device=device)

    def __init__(self, num_experts: int, top_k: int, *, num_buckets: int = 65536, seed: int = 0,
                 device=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_buckets = num_buckets
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for start in range(0, num_buckets, 4096):  # chunks keep the [rows, E] draw small for large E
            n = min(4096, num_buckets - start)
            rows.append(torch.rand(n, num_experts, generator=generator).argsort(dim=1)[:, :top_k])
        self.register_buffer("table", torch.cat(rows).to(device))

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        if token_ids is None:
            raise ValueError("MoE(router='hash'): forward needs token_ids (one integer id per token, the shape of x "
                             "without its last dim), e.g. layer(x, token_ids=input_ids)")
        # In int64: a narrow dtype (int16, uint8) cannot hold num_buckets, and its remainder would divide by zero.
        expert_ids = self.table[token_ids.reshape(-1).to(torch.int64).remainder(self.num_buckets)]
        weights = torch.full(expert_ids.shape, 1.0 / self.top_k, dtype=_router_dtype(x), device=x.device)
        return Routing(None, weights, expert_ids, None)

    def balance_losses(self, routing: Routing, valid: Optional[Tensor]) -> ops.RouterLosses:
        """No logits: nothing to balance or to regularise."""
        zero = routing.weights.new_zeros(())
        return ops.RouterLosses(zero, zero, zero)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, num_buckets={self.num_buckets}"


class RandomRouter(Router):
    """Frozen random router (``"random"``): the softmax top-k router of a fixed random projection that never trains.

    The baseline for learned routing (as in Roller et al. 2021's comparisons): ``weight`` [E, d_model] is a
    buffer drawn at construction like :class:`Router`'s and saved in the state dict, so it gets no gradient.
    """

    name = "random"
    accepts = ()

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        return cls(d_model, num_experts, top_k, normalize_weights=options.normalize_weights, device=device,
                   dtype=dtype)

    def __init__(self, d_model: int, num_experts: int, top_k: int, **kwargs) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        frozen = self.weight.detach()
        del self.weight
        self.register_buffer("weight", frozen)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            super().reset_parameters()


class ExpertChoiceRouter(Router):
    """Expert-choice routing (``"expert_choice"``; Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

    probs = softmax(x·weightᵀ) over experts per token; each expert takes the C tokens of highest probs[:, e]
    (ties to the lower token index) with C = min(T, max(min_capacity, ceil(capacity_factor · top_k · T / E))), and
    y[t] = Σ over the experts that took t of probs[t, e] · expert_e(x[t]). Experts are balanced by construction; a
    token may get several experts or none (``stats.unrouted_fraction``). It looks across the whole batch to choose,
    so it is not causal: at inference a token's output depends on the other tokens of the batch.

    Parameters: ``weight`` [E, d_model].
    """

    name = "expert_choice"
    token_choice = False
    accepts = ()

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, *, capacity_factor: Optional[float],
              drop_policy: str, expert_parallel: bool) -> None:
        super().check(num_experts, top_k, options, capacity_factor=capacity_factor, drop_policy=drop_policy,
                      expert_parallel=expert_parallel)
        if capacity_factor is None:
            raise ValueError("MoE(router='expert_choice'): capacity_factor must be a number (each expert takes "
                             "C = ceil(capacity_factor * top_k * T / E) tokens), got None")
        if expert_parallel:
            raise ValueError("MoE(router='expert_choice') does not support expert_parallel_group: an expert chooses "
                             "among all tokens of the batch, which live on other ranks")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        router = cls(d_model, num_experts, top_k, normalize_weights=False, jitter_eps=options.jitter_eps,
                     device=device, dtype=dtype)
        router.capacity = capacity
        return router

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        logits = self.logits(x)
        chosen = ops.expert_choice(logits, self.capacity(x.shape[0]), valid)
        expert_ids = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], self.num_experts)
        return Routing(logits, chosen.weights, expert_ids, chosen.scores, slots=chosen.slots)

    def balance_losses(self, routing: Routing, valid: Optional[Tensor]) -> ops.RouterLosses:
        """Balanced by construction: only the z-loss and the entropy apply (of each token's first expert)."""
        _, z_loss, entropy = ops.router_losses(routing.logits, routing.expert_ids[:, :1].contiguous(), valid)
        return ops.RouterLosses(routing.weights.new_zeros(()), z_loss, entropy)

    def gates(self, routing: Routing) -> Tensor:
        return routing.weights


ROUTER_CLASSES = (Router, NoisyTopKRouter, ExpertChoiceRouter, SigmoidRouter, HashRouter, RandomRouter)
ROUTERS = tuple(router.name for router in ROUTER_CLASSES)


def router_class(name: str) -> type:
    """The router class called ``name`` in :data:`ROUTERS`; ValueError for any other name."""
    for router in ROUTER_CLASSES:
        if router.name == name:
            return router
    raise ValueError(f"MoE: router must be one of {ROUTERS}, got {name!r}")


def _check_groups(num_experts: int, top_k: int, n_groups: Optional[int], topk_groups: Optional[int]) -> None:
    groups = 1 if n_groups is None else n_groups
    if not is_int(groups) or groups < 1 or num_experts % groups:
        raise ValueError(f"MoE: n_groups must be a positive int dividing num_experts={num_experts}, got {n_groups!r}")
    chosen = groups if topk_groups is None else topk_groups
    if not is_int(chosen) or not 1 <= chosen <= groups:
        raise ValueError(f"MoE: topk_groups must be an int in [1, n_groups={groups}], got {topk_groups!r}")
    if top_k > chosen * (num_experts // groups):
        raise ValueError(f"MoE: top_k={top_k} is larger than the {chosen * (num_experts // groups)} experts of "
                         f"the topk_groups={chosen} chosen groups ({num_experts // groups} experts per group)")


from .soft_moe import SoftMoE  # noqa: E402  (documented with the routers; a layer of its own)
