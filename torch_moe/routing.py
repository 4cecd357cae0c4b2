"""Routers of the MoE layer, each selectable by name in ``MoE(..., router=NAME)``, built on the routing ops.

Token-choice routers (every token picks experts): ``"softmax"`` (:class:`Router`), ``"noisy_topk"``
(:class:`NoisyTopKRouter`), ``"sigmoid"`` (:class:`SigmoidRouter`), ``"hash"`` (:class:`HashRouter`),
``"random"`` (:class:`RandomRouter`), ``"sparsemixer"`` (:class:`SparseMixerRouter`), ``"top_p"``
(:class:`TopPRouter`, a varying number of experts per token), ``"ds_moe"`` (:class:`DSMoERouter`, dense in
training), ``"dselect_k"`` (:class:`DSelectKRouter`), ``"hierarchical"`` (:class:`HierarchicalRouter`).
Expert-choice (every expert picks tokens): ``"expert_choice"``
(:class:`ExpertChoiceRouter`). Soft MoE is a layer of its own: :class:`torch_moe.SoftMoE`.

A router owns its options (:class:`RouterOptions`), their checks (:meth:`Router.check`), how it is built from
them (:meth:`Router.build`), its capabilities (class attributes: ``token_choice``, ``has_scores``, ``has_noise``)
and its typed output (:class:`Routing`); the layer asks it for its share of the aux losses
(:meth:`Router.balance_losses`, :meth:`Router.gates`). Adding a router is adding one class to :data:`ROUTER_CLASSES`.
"""

from __future__ import annotations

import dataclasses
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
    "SparseMixerRouter",
    "TopPRouter",
    "DSMoERouter",
    "DSelectKRouter",
    "HierarchicalRouter",
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
    active: [T, k] bool, False for a slot that takes no FFN row and no capacity slot (top-p's unused slots, null
    experts); ``None``: every slot is an FFN assignment.
    extra: a tuple of the tensors the router's own losses read (DSelect-k, hierarchical).
    """

    logits: Optional[Tensor]
    weights: Tensor
    expert_ids: Tensor
    scores: Optional[Tensor]
    slots: Optional[Tensor] = None
    clean_logits: Optional[Tensor] = None
    noise_std: Optional[Tensor] = None
    active: Optional[Tensor] = None
    extra: Optional[tuple] = None


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
    router_bias: Optional[bool] = None
    top_p_threshold: Optional[float] = None
    dynamic_loss_coef: Optional[float] = None
    mutual_information_loss_coef: Optional[float] = None
    sparse_inference_threshold: Optional[float] = None
    smooth_step_gamma: Optional[float] = None
    selector_entropy_coef: Optional[float] = None


# Options that only some routers take, with the words the error uses when another router is given them.
_RESTRICTED_OPTIONS = {"bias_update_rate": ("bias_update_rate",), "n_groups": ("n_groups", "topk_groups"),
                       "topk_groups": ("n_groups", "topk_groups"), "routed_scaling_factor": ("routed_scaling_factor",),
                       "router_bias": ("router_bias",),
                       "top_p_threshold": ("top_p_threshold",), "dynamic_loss_coef": ("dynamic_loss_coef",),
                       "mutual_information_loss_coef": ("mutual_information_loss_coef",),
                       "sparse_inference_threshold": ("sparse_inference_threshold",),
                       "smooth_step_gamma": ("smooth_step_gamma",), "selector_entropy_coef": ("selector_entropy_coef",)}


def _router_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing a forward."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _router_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x·weightᵀ (+ bias) in the router dtype. Autocast is off for it: F.linear would otherwise run in bf16/fp16 and
    route differently from float32."""
    router_dtype = _router_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x, weight = x.to(router_dtype), weight.to(router_dtype)
        bias = None if bias is None else bias.to(router_dtype)
        if x.device.type == "cpu" and x.dim() == 2 and not torch.compiler.is_compiling():
            # torch's CPU GEMM (MKL) splits its work, and with it its rounding, by the thread count (e.g. the
            # [E, T] x [T, d] weight gradient for 5 to 11 experts at 2 threads). grouped_mm with one group computes
            # the same product on a partition fixed by the shapes, so routing and its gradients do not depend on
            # the number of threads.
            offsets = torch.tensor([0, x.shape[0]], dtype=torch.long)
            logits = ops.grouped_mm(x, weight.t().unsqueeze(0), offsets)
            return logits if bias is None else logits + bias
        return F.linear(x, weight, bias)


class RouterBase(nn.Module):
    """What the layer asks of every router: capabilities, option checks, the load it adapts to and its share of
    the aux losses. Subclasses set ``name`` and override what differs."""

    name = ""
    token_choice = True  # every token picks experts (False: every expert picks tokens)
    has_scores = True  # logits and scores exist (balance losses, z-loss, drop_policy="probability")
    has_noise = False  # Shazeer's load loss applies
    accepts = ("n_groups", "topk_groups", "routed_scaling_factor")  # restricted RouterOptions this router takes
    normalizes_by_default = False  # normalize_weights=None means True for every top_k (else for top_k > 1)
    routes_top_k = True  # expert_ids [T, k] are the token's k choices (False: every expert, zero weights included)
    dense_in_training = False  # training routes every token to all E experts (DS-MoE): capacity for E choices
    accepts_eval_top_k = False  # MoE(eval_top_k=...) may change how many experts it picks in eval mode
    eval_top_k: Optional[int] = None  # set by the layer: top_k of eval-mode forwards (None: top_k)

    @property
    def active_top_k(self) -> int:
        """The experts per token of this forward: ``eval_top_k`` in eval mode when set, else ``top_k``."""
        return self.top_k if self.training or self.eval_top_k is None else self.eval_top_k

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
        if options.router_bias not in (None, True, False):
            raise ValueError(f"MoE: router_bias must be a bool, got {options.router_bias!r}")
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
        """(load-balancing loss, z-loss, router entropy) of this routing, each 0-dim. With ``routing.active`` the
        load-balancing loss counts the active assignments only."""
        if routing.active is None:
            return ops.router_losses(routing.logits, routing.expert_ids, valid)
        _, z_loss, entropy = ops.router_losses(routing.logits, routing.expert_ids[:, :1].contiguous(), valid)
        return ops.RouterLosses(_masked_balance_loss(routing.logits, routing.expert_ids, routing.active, valid),
                                z_loss, entropy)

    def count_load(self, routing: Routing, valid: Optional[Tensor], load):
        """The dispatch's :class:`torch_moe.dispatch.Load` as the statistics should count it; as dispatched here."""
        return load

    def extra_losses(self, routing: Routing, valid: Optional[Tensor]) -> dict[str, tuple[float, Tensor]]:
        """The router's own aux losses, by name: (coefficient, unweighted 0-dim loss); none here."""
        return {}

    def weights_for(self, routing: Routing, expert_ids: Tensor) -> Tensor:
        """[T, k'] the weights this router gives the experts ``expert_ids`` [T, k'] int64 of ``routing``'s tokens,
        computed as its own choice's (router replay, :mod:`torch_moe.replay`); differentiable w.r.t. the logits."""
        raise NotImplementedError(f"router {self.name!r} cannot weight given experts (routing override / replay)")

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
    ``router_bias``: logits = x · weightᵀ + bias (GPT-OSS's router; with ``normalize_weights`` the weights are then
    GPT-OSS's softmax over the k chosen logits, which equals the renormalised top-k of the full softmax).

    Parameters: ``weight`` [E, d_model]; ``bias`` [E] when ``router_bias`` (starts at zero), else ``None``.
    """

    name = "softmax"
    score_func = "softmax"
    accepts = RouterBase.accepts + ("router_bias",)
    accepts_eval_top_k = True

    @classmethod
    def build(cls, d_model: int, num_experts: int, top_k: int, options: RouterOptions, capacity, *, device=None,
              dtype=None, **own_options) -> "Router":
        """The router for these options (checked by :meth:`check`; ``normalize_weights`` resolved).
        ``capacity``: the layer's capacity rule (expert choice), ``None`` in dropless mode. ``own_options``: what a
        subclass adds to the constructor."""
        return cls(d_model, num_experts, top_k, normalize_weights=options.normalize_weights,
                   jitter_eps=options.jitter_eps, n_groups=options.n_groups or 1, topk_groups=options.topk_groups,
                   routed_scaling_factor=options.routed_scaling_factor or 1.0, bias=bool(options.router_bias),
                   device=device, dtype=dtype, **own_options)

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
        bias: bool = False,
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
        self.bias = nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x: Tensor) -> Tensor:
        """x: [T, d_model] -> logits [T, E] in the router dtype (float32, or float64 for float64 input)."""
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return _router_linear(x, self.weight, self.bias)

    def selection_bias(self) -> Optional[Tensor]:
        """[E] added to the scores only to choose experts (loss-free balancing); ``None`` here."""
        return None

    def choose(self, logits: Tensor) -> ops.RouterOutput:
        out = ops.router_topk(logits, self.active_top_k, self.score_func, self.selection_bias(),
                              self.normalize_weights, self.n_groups, self.topk_groups)
        if self.routed_scaling_factor != 1.0:  # DeepSeek-V2/V3: the (normalised) weights times a constant
            out = out._replace(weights=out.weights * self.routed_scaling_factor)
        return out

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        """x: [T, d_model] -> :class:`Routing` with weights / expert_ids [T, k]."""
        logits = self.logits(x)
        out = self.choose(logits)
        return Routing(logits, out.weights, out.expert_ids, out.scores)

    def weights_for(self, routing: Routing, expert_ids: Tensor) -> Tensor:
        scores = (torch.softmax(routing.logits, dim=-1) if self.score_func == "softmax"
                  else torch.sigmoid(routing.logits))
        weights = scores.gather(1, expert_ids)
        if self.normalize_weights:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return weights * self.routed_scaling_factor if self.routed_scaling_factor != 1.0 else weights

    def extra_repr(self) -> str:
        groups = (f", n_groups={self.n_groups}, topk_groups={self.topk_groups}"
                  if self.topk_groups < self.n_groups else "")
        return (
            f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize_weights={self.normalize_weights}, jitter_eps={self.jitter_eps}{groups}"
            + (", bias=True" if self.bias is not None else "")
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
        return moe_losses.load_loss(routing.clean_logits, routing.logits, routing.noise_std, self.active_top_k, valid)

    def weights_for(self, routing: Routing, expert_ids: Tensor) -> Tensor:
        # A softmax over the kept (noisy) logits, as choose() weights its own top k.
        weights = torch.softmax(routing.logits.gather(1, expert_ids), dim=-1)
        return weights * self.routed_scaling_factor if self.routed_scaling_factor != 1.0 else weights


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
    accepts = ("bias_update_rate", "n_groups", "topk_groups", "routed_scaling_factor", "router_bias")

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

    def weights_for(self, routing: Routing, expert_ids: Tensor) -> Tensor:
        return torch.full(expert_ids.shape, 1.0 / expert_ids.shape[1], dtype=routing.weights.dtype,
                          device=routing.weights.device)

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
    accepts_eval_top_k = False

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


def _masked_balance_loss(logits: Tensor, expert_ids: Tensor, active: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Switch's E · Σ_i f_i · P_i when tokens take a varying number of experts: f_i = active assignments to i / all
    active assignments, P_i = mean softmax prob of i, both over the valid tokens (0 with no valid token)."""
    num_experts = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    counted = active if valid is None else active & valid.unsqueeze(1)
    per_expert = probs.new_zeros(num_experts).index_add_(0, expert_ids.reshape(-1),
                                                         counted.reshape(-1).to(probs.dtype))
    fraction = per_expert / per_expert.sum().clamp(min=1)
    if valid is None:
        mean_probs = probs.sum(0) / max(probs.shape[0], 1)
    else:
        mean_probs = (probs * valid.unsqueeze(1)).sum(0) / valid.sum().clamp(min=1)
    return num_experts * (fraction.detach() * mean_probs).sum()


def _token_entropy(logits: Tensor) -> Tensor:
    """[T] −Σ_e p log p of softmax(logits), differentiable (0·log 0 taken as 0 through log_softmax)."""
    return -(torch.softmax(logits, dim=1) * torch.log_softmax(logits, dim=1)).sum(1)


class TopPRouter(Router):
    """Top-p (dynamic) routing (``"top_p"``; Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
    in MoE Models").

    probs = softmax(x·weightᵀ); each token takes the fewest experts, most probable first, whose probs sum to at
    least ``top_p_threshold`` (p), at most ``top_k`` of them: expert j of the sorted list is taken when the probs
    before it sum to less than p, so the first always is (p → 0 is top-1; p = 1 with top_k = E takes all E).
    Shapes stay static, [T, top_k]: the unused slots have weight 0 and ``Routing.active`` False, so they take no
    capacity slot and no FFN row. Weights are the taken probs as in the paper (``normalize_weights=True`` divides
    them by their sum). The paper's dynamic loss, the mean over valid tokens of the router entropy −Σ p log p, is
    the aux loss ``dynamic`` with ``dynamic_loss_coef`` (default 1e-4, the paper's β): it keeps the router from
    spreading probability thinly, which would make every token take top_k experts. The load-balancing loss counts
    each token's active assignments (f_i = active assignments to i / all active assignments).

    The choice reuses the fused top-k op (``top_k`` most probable experts, sorted); the threshold is a cumulative
    sum over those k values.
    Parameters: ``weight`` [E, d_model].
    """

    name = "top_p"
    accepts_eval_top_k = False  # its forward picks self.top_k experts (a cap / its passes), not active_top_k
    accepts = ("top_p_threshold", "dynamic_loss_coef")

    @classmethod
    def default_normalize_weights(cls, top_k: int) -> bool:
        return False

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, **layer) -> None:
        super().check(num_experts, top_k, options, **layer)
        threshold = options.top_p_threshold
        if threshold is not None and not (is_finite_number(threshold) and 0 < threshold <= 1):
            raise ValueError(f"MoE(router='top_p'): top_p_threshold must be a number in (0, 1], got {threshold!r}")
        coef = options.dynamic_loss_coef
        if coef is not None and not (is_finite_number(coef) and coef >= 0):
            raise ValueError(f"MoE(router='top_p'): dynamic_loss_coef must be a number >= 0 and finite, got {coef!r}")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        threshold = 0.4 if options.top_p_threshold is None else options.top_p_threshold
        coef = 1e-4 if options.dynamic_loss_coef is None else options.dynamic_loss_coef
        return cls(d_model, num_experts, top_k, normalize_weights=bool(options.normalize_weights),
                   jitter_eps=options.jitter_eps, top_p_threshold=threshold, dynamic_loss_coef=coef,
                   device=device, dtype=dtype)

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, top_p_threshold: float = 0.4,
                 dynamic_loss_coef: float = 1e-4, normalize_weights: bool = False, **router_options) -> None:
        super().__init__(d_model, num_experts, top_k, normalize_weights=normalize_weights, **router_options)
        self.top_p_threshold = top_p_threshold
        self.dynamic_loss_coef = dynamic_loss_coef

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        logits = self.logits(x)
        out = ops.router_topk(logits, self.top_k, "softmax", None, False)
        probs = out.weights.detach()
        before = probs.cumsum(1) - probs  # the probs of the experts ranked above each slot
        active = before < self.top_p_threshold
        weights = torch.where(active, out.weights, 0)
        if self.normalize_weights:
            weights = weights / weights.sum(1, keepdim=True)
        return Routing(logits, weights, out.expert_ids, out.scores, active=active)

    def extra_losses(self, routing: Routing, valid: Optional[Tensor]) -> dict[str, tuple[float, Tensor]]:
        if self.dynamic_loss_coef == 0:
            return {}
        return {"dynamic": (self.dynamic_loss_coef, _masked_mean(_token_entropy(routing.logits), valid))}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_p_threshold={self.top_p_threshold}"


class DSMoERouter(Router):
    """Dense training, sparse inference (``"ds_moe"``; Pan et al. 2024, "Dense Training, Sparse Inference:
    Rethinking Training of Mixture-of-Experts Language Models").

    probs = softmax(x·weightᵀ). In training every expert is active: y = Σ_e probs[e] · expert_e(x), all E experts
    for every token (Routing of [T, E]). In eval each token takes its ``top_k`` most probable experts, exactly the
    ``"softmax"`` router with the same weight (weights not normalised unless ``normalize_weights=True``, so that
    they keep the scale the experts were trained with). The mutual-information loss of the paper, ``L_MI = −H(p̄) +
    mean_t H(probs_t)`` with p̄ the mean of probs over valid tokens, balances the experts (high H(p̄)) while
    making each token's distribution peaked (low H(probs_t)), so that top-k at inference loses little; it is the aux
    loss ``mutual_information`` with ``mutual_information_loss_coef`` (default 1e-2, an assumption: not the paper's
    stated value). ``sparse_inference_threshold`` τ (the paper's other inference mode): in eval a token keeps, of
    its top_k most probable experts, those with prob >= τ (always its first); the others are inactive slots. Training runs T·E rows; in capacity mode its capacity is that of E experts per token,
    C = ceil(capacity_factor · T), so nothing drops when capacity_factor >= 1, and eval uses the top_k capacity.
    Parameters: ``weight`` [E, d_model].
    """

    name = "ds_moe"
    dense_in_training = True
    accepts = ("mutual_information_loss_coef", "sparse_inference_threshold")

    @classmethod
    def default_normalize_weights(cls, top_k: int) -> bool:
        return False

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, *, capacity_factor: Optional[float],
              drop_policy: str, expert_parallel: bool) -> None:
        super().check(num_experts, top_k, options, capacity_factor=capacity_factor, drop_policy=drop_policy,
                      expert_parallel=expert_parallel)
        coef = options.mutual_information_loss_coef
        if coef is not None and not (is_finite_number(coef) and coef >= 0):
            raise ValueError(f"MoE(router='ds_moe'): mutual_information_loss_coef must be a number >= 0 and finite, "
                             f"got {coef!r}")
        threshold = options.sparse_inference_threshold
        if threshold is not None and not (is_finite_number(threshold) and 0 <= threshold < 1):
            raise ValueError(f"MoE(router='ds_moe'): sparse_inference_threshold must be a number in [0, 1), got "
                             f"{threshold!r}")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        coef = 1e-2 if options.mutual_information_loss_coef is None else options.mutual_information_loss_coef
        return cls(d_model, num_experts, top_k, normalize_weights=bool(options.normalize_weights),
                   jitter_eps=options.jitter_eps, mutual_information_loss_coef=coef,
                   sparse_inference_threshold=options.sparse_inference_threshold, device=device, dtype=dtype)

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, mutual_information_loss_coef: float = 1e-2,
                 sparse_inference_threshold: Optional[float] = None, normalize_weights: bool = False,
                 **router_options) -> None:
        super().__init__(d_model, num_experts, top_k, normalize_weights=normalize_weights, **router_options)
        self.mutual_information_loss_coef = mutual_information_loss_coef
        self.sparse_inference_threshold = sparse_inference_threshold

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        logits = self.logits(x)
        if not self.training:
            out = self.choose(logits)
            if self.sparse_inference_threshold is None:
                return Routing(logits, out.weights, out.expert_ids, out.scores)
            active = out.scores.gather(1, out.expert_ids) >= self.sparse_inference_threshold
            active[:, 0] = True
            weights = torch.where(active, out.weights, 0)
            if self.normalize_weights:  # proportional to the probs: renormalising over the kept ones suffices
                weights = weights / weights.sum(1, keepdim=True)
            return Routing(logits, weights, out.expert_ids, out.scores, active=active)
        else:  # dense: the fused top-k op with k = E gives every prob, sorted, with its expert id
            out = ops.router_topk(logits, self.num_experts, "softmax", None, False)
        return Routing(logits, out.weights, out.expert_ids, out.scores)

    def extra_losses(self, routing: Routing, valid: Optional[Tensor]) -> dict[str, tuple[float, Tensor]]:
        if self.mutual_information_loss_coef == 0:
            return {}
        return {"mutual_information": (self.mutual_information_loss_coef,
                                       mutual_information_loss(routing.logits, valid))}


def mutual_information_loss(logits: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """DS-MoE's L_MI = −H(p̄) + mean_t H(p_t), p_t = softmax(logits[t]), p̄ = mean_t p_t over valid tokens;
    logits: [T, E] -> 0-dim (0 with no valid token)."""
    probs = torch.softmax(logits, dim=1)
    if valid is None:
        mean_probs = probs.sum(0) / max(probs.shape[0], 1)
    else:
        mean_probs = (probs * valid.unsqueeze(1)).sum(0) / valid.sum().clamp(min=1)
    marginal_entropy = -(mean_probs * torch.log(mean_probs.clamp(min=torch.finfo(probs.dtype).tiny))).sum()
    if valid is not None:
        marginal_entropy = torch.where(valid.any(), marginal_entropy, 0)
    return -marginal_entropy + _masked_mean(_token_entropy(logits), valid)


class SparseMixerRouter(Router):
    """SparseMixer routing (``"sparsemixer"``; Liu et al. 2023, "Sparse Backpropagation for MoE Training"; as in
    Phi-3.5-MoE, Abdin et al. 2024 and HF's PhiMoE).

    logits = x·weightᵀ (+ bias) in the router dtype; the k experts are chosen one after the other. Pass i looks at
    the logits not chosen yet, with m their maximum, and keeps only those within reach of it:
    (m − logits) / max(|logits|, m) <= 2·eps (``jitter_eps`` is this eps here: a relative threshold, no input noise).
    gates = softmax over the kept logits (the others −∞). Eval: the expert is the argmax; training: a Gumbel sample
    from gates. The weight is the chosen expert's gate. Weights are not renormalised (``normalize_weights`` must not
    be True). Training uses the paper's Heun (third-order) estimator as Phi-3.5-MoE does: the weight's forward value
    is the gate times 1 when the sample is the argmax (or with probability 1/4), else times 1/3, while its gradient
    is the gate's own. The random draws (per pass: Gumbel noise [T, E], one coin [T, 1]; a second pass redraws its
    coin once more) follow HF's PhiMoE order, so one seed routes a converted PhiMoE exactly as HF does.

    Parameters: ``weight`` [E, d_model]; ``bias`` [E] when ``router_bias``.
    """

    name = "sparsemixer"
    accepts_eval_top_k = False  # its forward picks self.top_k experts (a cap / its passes), not active_top_k
    accepts = ("router_bias",)

    @classmethod
    def default_normalize_weights(cls, top_k: int) -> bool:
        return False

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, **layer) -> None:
        super().check(num_experts, top_k, options, **layer)
        if options.normalize_weights:
            raise ValueError("MoE(router='sparsemixer'): the weights are the chosen experts' masked-softmax gates, "
                             "which are not renormalised; normalize_weights=True is not supported")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "Router":
        return cls(d_model, num_experts, top_k, normalize_weights=False, jitter_eps=options.jitter_eps,
                   bias=bool(options.router_bias), device=device, dtype=dtype)

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        logits = _router_linear(x, self.weight, self.bias)  # no input jitter: jitter_eps is the mask threshold
        weights, expert_ids = _sparsemixer(logits, self.top_k, self.jitter_eps, self.training)
        return Routing(logits, weights, expert_ids, torch.softmax(logits.detach(), dim=-1))


class _ScaleForwardOnly(torch.autograd.Function):
    """gate · scale forward, the gate's gradient unscaled backward (SparseMixer's Heun estimator)."""

    @staticmethod
    def forward(ctx, gate: Tensor, scale: Tensor) -> Tensor:
        return gate * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _sparsemixer(logits: Tensor, top_k: int, eps: float, training: bool) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, k], expert_ids [T, k] int64) of :class:`SparseMixerRouter`."""
    remaining = logits
    weights, expert_ids = [], []
    for i in range(top_k):
        with torch.no_grad():
            best, best_id = remaining.max(dim=-1, keepdim=True)
            out_of_reach = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        kept = remaining.masked_fill(out_of_reach, float("-inf"))
        if training:  # a Gumbel-max sample from softmax(kept)
            chosen = (kept - torch.empty_like(kept).exponential_().log()).max(dim=-1)[1].unsqueeze(-1)
        else:
            chosen = best_id
        gates = torch.softmax(kept, dim=-1)
        weight = gates.gather(-1, chosen)
        if training:
            coin = torch.rand_like(weight)
            if i > 0:
                coin.uniform_()  # HF's PhiMoE draws its later coins twice; so does this, to route as it does
            full = (chosen == gates.max(dim=-1, keepdim=True)[1]) | (coin > 0.75)
            weight = _ScaleForwardOnly.apply(weight, torch.add(0.3333, full, alpha=0.6667).to(gates.dtype))
        weights.append(weight)
        expert_ids.append(chosen)
        remaining = remaining.scatter(-1, chosen, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(expert_ids, dim=-1)


def _masked_mean(per_token: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Mean of per_token [T] over the valid tokens (0 when there is none)."""
    if valid is None:
        return per_token.sum() / max(per_token.shape[0], 1)
    return torch.where(valid, per_token, 0).sum() / valid.sum().clamp(min=1).to(per_token.dtype)


def _jitter(x: Tensor, eps: float, training: bool) -> Tensor:
    if training and eps > 0:
        return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return x


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The smooth-step of Hazimeh et al. 2020/2021: 0 for t <= -gamma/2, 1 for t >= gamma/2, and the cubic
    -2/gamma³·t³ + 3/(2·gamma)·t + 1/2 between (C¹: value and slope match at both ends, so it reaches exact 0/1).
    Elementwise, in ATen ops; :class:`DSelectKRouter` computes the same step inside
    :func:`torch_moe.ops.dselect_k_gate`."""
    cubic = (-2.0 / gamma**3) * t**3 + (1.5 / gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKRouter(RouterBase):
    """DSelect-k (``"dselect_k"``; Hazimeh et al. 2021, "DSelect-k: Differentiable Selection in the Mixture of
    Experts with Applications to Multi-Task Learning"), the per-example gate.

    ``top_k`` = k single-expert selectors, m = ceil(log2 E) bits. Per token, selector i has code logits
    z_i = x·code_weight_iᵀ + code_bias_i [m] and the selector weights are α = softmax(x·selector_weightᵀ +
    selector_bias) [k]. With S the smooth-step of width ``smooth_step_gamma`` (default 1, as the authors' code),
    selector i gives expert j (bits b_1..b_m of j, most significant first) r_i[j] = Π_l (S(z_il) if b_l else
    1 − S(z_il)), and the token's weights are q = Σ_i α_i r_i [E]. Once every S is exactly 0 or 1 a selector
    picks one expert and q has at most k nonzeros; before, a selector spreads over the 2^(#fractional bits)
    experts its binary bits allow. E not a power of 2: the codes of experts ≥ E are unreachable and dropped
    (q then sums to at most 1, not renormalised, as in the paper), and the paper's penalty, mean over tokens of
    Σ_i 1/max(Σ_j r_i[j], 1e-6) − k (0 once the unreachable codes carry no weight; the floor keeps a selector
    stuck wholly on unreachable codes, whose flat steps get no gradient, finite) is added to aux_loss as
    ``selector_reachability`` with coefficient 1.

    So that the output is exactly the paper's mixture y = Σ_j q_j·expert_j(x) at every step, the routing has
    width E: expert_ids [T, E] are all experts sorted by decreasing weight (ties to the lower id), weights
    [T, E] the matching q, zeros included. Dropless mode therefore runs every expert on every token (the cost of
    a dense layer; zero-weight rows add 0 and get zero gradient); capacity mode keeps C = ceil(capacity_factor ·
    T · k / E) assignments per expert as usual, ``"probability"`` giving the slots to the largest weights first
    (zero weights only fill slots left over), ``"position"`` ranking each token's experts by weight (so a zero
    weight of one token can take a slot before a third nonzero weight of another). Statistics
    (``tokens_per_expert``, dropped and unrouted fractions) count the nonzero-weight assignments only.

    Losses: the load-balancing loss is Switch's E·Σ_i f_i·P_i with P_i the mean of q_i and f_i the share of
    nonzero weights on expert i; there are no logits over experts, so the z-loss is 0. The paper's entropy
    regulariser, mean over tokens of −Σ_i Σ_j r_i[j]·log(r_i[j] + 1e-6) (the authors' epsilon), is added to
    aux_loss as ``selector_entropy`` times ``selector_entropy_coef`` (default 0: off, as in the authors' code);
    it pushes the smooth-steps to 0/1, i.e. to k-sparse routing.

    Parameters: ``code_weight`` [k·m, d_model], ``code_bias`` [k·m] (init U(±gamma/100), the authors' init),
    ``selector_weight`` [k, d_model], ``selector_bias`` [k] (init U(±0.05)). The two logit GEMMs run here; the
    per-token gate (steps, products over the bits, mixture) is the C++ op :func:`torch_moe.ops.dselect_k_gate`.
    """

    name = "dselect_k"
    accepts = ("smooth_step_gamma", "selector_entropy_coef")
    routes_top_k = False
    entropy_epsilon = 1e-6
    reachable_floor = 1e-6

    @classmethod
    def default_normalize_weights(cls, top_k: int) -> bool:
        return False  # q is used as the paper defines it, never renormalised

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, *, capacity_factor: Optional[float],
              drop_policy: str, expert_parallel: bool) -> None:
        super().check(num_experts, top_k, options, capacity_factor=capacity_factor, drop_policy=drop_policy,
                      expert_parallel=expert_parallel)
        gamma, coef = options.smooth_step_gamma, options.selector_entropy_coef
        if gamma is not None and not (is_finite_number(gamma) and gamma > 0):
            raise ValueError(f"MoE: smooth_step_gamma must be a number > 0 and finite, got {gamma!r}")
        if coef is not None and not (is_finite_number(coef) and coef >= 0):
            raise ValueError(f"MoE: selector_entropy_coef must be a number >= 0 and finite, got {coef!r}")
        if options.normalize_weights is not None:
            raise ValueError("MoE(router='dselect_k'): the weights are the DSelect-k mixture (they sum to 1 for a "
                             f"power-of-2 num_experts); normalize_weights must be None, got {options.normalize_weights!r}")
        if expert_parallel:
            raise ValueError("MoE(router='dselect_k') does not support expert_parallel_group: it dispatches every "
                             "expert with nonzero weight (up to num_experts per token)")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None, dtype=None) -> "DSelectKRouter":
        gamma = 1.0 if options.smooth_step_gamma is None else float(options.smooth_step_gamma)
        coef = 0.0 if options.selector_entropy_coef is None else float(options.selector_entropy_coef)
        return cls(d_model, num_experts, top_k, gamma=gamma, selector_entropy_coef=coef,
                   jitter_eps=options.jitter_eps, device=device, dtype=dtype)

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, gamma: float = 1.0,
                 selector_entropy_coef: float = 0.0, jitter_eps: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gamma = gamma
        self.selector_entropy_coef = selector_entropy_coef
        self.jitter_eps = jitter_eps
        self.num_bits = (num_experts - 1).bit_length()  # ceil(log2 E); 0 bits for a single expert
        factory = {"device": device, "dtype": dtype}
        self.code_weight = nn.Parameter(torch.empty(top_k * self.num_bits, d_model, **factory))
        self.code_bias = nn.Parameter(torch.empty(top_k * self.num_bits, **factory))
        self.selector_weight = nn.Parameter(torch.empty(top_k, d_model, **factory))
        self.selector_bias = nn.Parameter(torch.empty(top_k, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for tensor in (self.code_weight, self.code_bias):
            nn.init.uniform_(tensor, -self.gamma / 100, self.gamma / 100)
        for tensor in (self.selector_weight, self.selector_bias):
            nn.init.uniform_(tensor, -0.05, 0.05)

    @property
    def power_of_2(self) -> bool:
        return self.num_experts == 1 << self.num_bits

    def per_token_gate(self, x: Tensor) -> ops.DSelectKGate:
        """x: [T, d_model] -> (weights q [T, E], selector outputs r [T, k, E]) in the router dtype: the code and
        selector logits are two GEMMs here, the per-token gate is :func:`torch_moe.ops.dselect_k_gate`."""
        x = _jitter(x, self.jitter_eps, self.training)
        dtype = _router_dtype(x)
        z = _router_linear(x, self.code_weight) + self.code_bias.to(dtype)
        a = _router_linear(x, self.selector_weight) + self.selector_bias.to(dtype)
        return ops.dselect_k_gate(z.view(x.shape[0], self.top_k, self.num_bits), a, self.num_experts, self.gamma)

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        """x: [T, d_model] -> :class:`Routing` with weights / expert_ids [T, E] (all experts, by decreasing q)."""
        q, r = self.per_token_gate(x)
        weights, expert_ids = q.sort(dim=1, descending=True, stable=True)
        return Routing(None, weights, expert_ids, q.detach(), extra=(r,))

    def count_load(self, routing: Routing, valid: Optional[Tensor], load):
        """Statistics count the assignments of nonzero weight only: the zero-weight ones ride along in the
        dispatch (static width E) but are no choice of the gate."""
        chosen = routing.weights.detach() != 0
        if valid is not None:
            chosen = chosen & valid.unsqueeze(1)
        tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=chosen.device).index_add_(
            0, routing.expert_ids.reshape(-1), chosen.reshape(-1).to(torch.int64))
        if load.slots is None:
            return load._replace(tokens_per_expert=tokens_per_expert)
        dtype = routing.weights.dtype
        dropped = (chosen & (load.slots < 0)).sum().to(dtype) / chosen.sum().clamp(min=1).to(dtype)
        return load._replace(tokens_per_expert=tokens_per_expert, dropped_fraction=dropped,
                             slots=torch.where(chosen, load.slots, -1))

    def balance_losses(self, routing: Routing, valid: Optional[Tensor]) -> ops.RouterLosses:
        q = self.gates(routing)
        mask = torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if valid is None else valid
        importance = torch.where(mask[:, None], q, 0).sum(0) / mask.sum().clamp(min=1).to(q.dtype)
        nonzero = ((q.detach() > 0) & mask[:, None]).sum(0).to(q.dtype)
        load_balancing = self.num_experts * (nonzero / nonzero.sum().clamp(min=1) * importance).sum()
        entropy = _masked_mean(-torch.xlogy(q.detach(), q.detach()).sum(1), valid)
        return ops.RouterLosses(load_balancing, q.new_zeros(()), entropy)

    def extra_losses(self, routing: Routing, valid: Optional[Tensor]) -> dict[str, tuple[float, Tensor]]:
        (r,) = routing.extra
        losses = {}
        if self.selector_entropy_coef > 0:
            entropy = -(r * torch.log(r + self.entropy_epsilon)).sum((1, 2))
            losses["selector_entropy"] = (self.selector_entropy_coef, _masked_mean(entropy, valid))
        if not self.power_of_2:
            # A selector whose mass sits wholly on unreachable codes has flat steps: no gradient can bring it back,
            # and 1/0 would make the loss inf and its gradient NaN; the floor keeps it finite (and visible).
            reachability = (1.0 / r.sum(2).clamp(min=self.reachable_floor)).sum(1) - self.top_k
            losses["selector_reachability"] = (1.0, _masked_mean(reachability, valid))
        return losses

    def extra_repr(self) -> str:
        return (f"d_model={self.code_weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"gamma={self.gamma}, selector_entropy_coef={self.selector_entropy_coef}")


class HierarchicalRouter(RouterBase):
    """Hierarchical MoE gating (``"hierarchical"``; Shazeer et al. 2017, "Outrageously Large Neural Networks",
    section "Hierarchical Mixture of Experts" and appendix B).

    The E experts form ``n_groups`` = G contiguous groups of m = E/G. A primary gate (``group_weight`` [G, d])
    gives p = softmax(x·group_weightᵀ) over groups; each token takes its ``topk_groups`` = a best groups. Each
    group g has its own secondary gate (rows g·m..(g+1)·m of ``weight`` [E, d]) giving p_g = softmax over its m
    experts, in which the token takes its b = top_k / a best experts. The weight of expert j of group g is
    p[g]·p_g[j], so top_k = a·b experts per token; with ``normalize_weights`` each level is renormalised over what
    it chose when it chose more than one (a level choosing one entry keeps its probability: renormalised it would be
    1 and its gate would get no gradient from the output). Both levels run :func:`torch_moe.ops.router_topk`
    (ties to the lower id). Unlike the group-limited ``n_groups`` of ``"softmax"`` / ``"sigmoid"`` (one gate,
    groups ranked by its scores), here the groups have a gate of their own. The gates are noiseless, so the balance
    losses are Switch's at both levels (not Shazeer's importance/load, which need the noise): load_balancing = the
    primary gate's G·Σ_g f_g·P_g plus the mean over groups of m·Σ_j f_gj·P_gj, where the group's f and P are taken
    over the tokens routed to it; z-loss = the primary gate's plus the secondary gates' (mean over routed
    (token, group) pairs). ``logits`` in :class:`Routing` are log(p[g]·p_g[j]) [T, E] and ``scores`` their exp.

    Defaults: n_groups = the largest divisor of E that is at most √E, topk_groups = 1 (so b = top_k).
    Parameters: ``group_weight`` [G, d_model], ``weight`` [E, d_model] (no biases).
    """

    name = "hierarchical"
    accepts = ("n_groups", "topk_groups")

    @staticmethod
    def default_groups(num_experts: int) -> int:
        return max(g for g in range(1, math.isqrt(num_experts) + 1) if num_experts % g == 0)

    @classmethod
    def check(cls, num_experts: int, top_k: int, options: RouterOptions, **layer) -> None:
        # The groups mean something else here: the base check of group-limited routing does not apply.
        super().check(num_experts, top_k, dataclasses.replace(options, n_groups=None, topk_groups=None), **layer)
        groups = cls.default_groups(num_experts) if options.n_groups is None else options.n_groups
        if not is_int(groups) or groups < 1 or num_experts % groups:
            raise ValueError(f"MoE(router='hierarchical'): n_groups must be a positive int dividing "
                             f"num_experts={num_experts}, got {options.n_groups!r}")
        chosen = 1 if options.topk_groups is None else options.topk_groups
        if not is_int(chosen) or not 1 <= chosen <= groups:
            raise ValueError(f"MoE(router='hierarchical'): topk_groups must be an int in [1, n_groups={groups}], "
                             f"got {options.topk_groups!r}")
        if top_k % chosen or top_k // chosen > num_experts // groups:
            raise ValueError(f"MoE(router='hierarchical'): top_k={top_k} must be topk_groups={chosen} times the "
                             f"experts chosen per group, at most the {num_experts // groups} experts of a group")

    @classmethod
    def build(cls, d_model, num_experts, top_k, options, capacity, *, device=None,
              dtype=None) -> "HierarchicalRouter":
        groups = cls.default_groups(num_experts) if options.n_groups is None else options.n_groups
        return cls(d_model, num_experts, top_k, n_groups=groups, topk_groups=options.topk_groups or 1,
                   normalize_weights=options.normalize_weights, jitter_eps=options.jitter_eps, device=device,
                   dtype=dtype)

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, n_groups: int, topk_groups: int = 1,
                 normalize_weights: bool = True, jitter_eps: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.group_size = num_experts // n_groups
        self.topk_in_group = top_k // topk_groups
        self.normalize_weights = normalize_weights
        self.jitter_eps = jitter_eps
        self.group_weight = nn.Parameter(torch.empty(n_groups, d_model, device=device, dtype=dtype))
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.group_weight, -bound, bound)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        """x: [T, d_model] -> :class:`Routing` with weights / expert_ids [T, topk_groups · experts per group]."""
        x = _jitter(x, self.jitter_eps, self.training)
        num_tokens, a, b, m = x.shape[0], self.topk_groups, self.topk_in_group, self.group_size
        group_logits = _router_linear(x, self.group_weight)
        expert_logits = _router_linear(x, self.weight).view(num_tokens, self.n_groups, m)
        primary = ops.router_topk(group_logits, a, "softmax", None, self.normalize_weights and a > 1)
        chosen_logits = expert_logits.gather(1, primary.expert_ids.unsqueeze(2).expand(num_tokens, a, m))
        secondary = ops.router_topk(chosen_logits.reshape(num_tokens * a, m), b, "softmax", None,
                                    self.normalize_weights and b > 1)
        expert_ids = primary.expert_ids.unsqueeze(2) * m + secondary.expert_ids.view(num_tokens, a, b)
        weights = primary.weights.unsqueeze(2) * secondary.weights.view(num_tokens, a, b)
        log_probs = F.log_softmax(group_logits, -1).unsqueeze(2) + F.log_softmax(expert_logits, -1)
        log_probs = log_probs.reshape(num_tokens, self.num_experts)
        return Routing(log_probs, weights.reshape(num_tokens, self.top_k), expert_ids.reshape(num_tokens, self.top_k),
                       log_probs.detach().exp(), extra=(group_logits, primary.expert_ids, expert_logits))

    def balance_losses(self, routing: Routing, valid: Optional[Tensor]) -> ops.RouterLosses:
        group_logits, group_ids, expert_logits = routing.extra
        primary_balance, primary_z, _ = ops.router_losses(group_logits, group_ids, valid)
        num_tokens, dtype = group_logits.shape[0], group_logits.dtype
        mask = (torch.ones(num_tokens, dtype=dtype, device=group_logits.device) if valid is None
                else valid.to(dtype))
        routed = group_logits.new_zeros(num_tokens, self.n_groups).scatter(1, group_ids, 1.0) * mask[:, None]
        tokens_per_group = routed.sum(0)
        probs = torch.softmax(expert_logits, -1)
        importance = (routed.unsqueeze(2) * probs).sum(0) / tokens_per_group.clamp(min=1).unsqueeze(1)
        assignments = torch.zeros(self.num_experts, dtype=dtype, device=group_logits.device).index_add(
            0, routing.expert_ids.reshape(-1), mask.repeat_interleave(self.top_k))
        fraction = assignments.view(self.n_groups, self.group_size) / (
            tokens_per_group * self.topk_in_group).clamp(min=1).unsqueeze(1)
        secondary_balance = (self.group_size * (fraction * importance).sum(1)).mean()
        secondary_z = (routed * torch.logsumexp(expert_logits, -1) ** 2).sum() / routed.sum().clamp(min=1)
        entropy = _masked_mean(-torch.xlogy(routing.scores, routing.scores).sum(1), valid)
        return ops.RouterLosses(primary_balance + secondary_balance, primary_z + secondary_z, entropy)

    def extra_repr(self) -> str:
        return (f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"n_groups={self.n_groups}, topk_groups={self.topk_groups}, normalize_weights={self.normalize_weights}")


ROUTER_CLASSES = (Router, NoisyTopKRouter, ExpertChoiceRouter, SigmoidRouter, HashRouter, RandomRouter,
                  SparseMixerRouter)
# Routing, part 2 (issue 22): adaptive and dense-to-sparse routers.
ROUTER_CLASSES += (TopPRouter, DSMoERouter, DSelectKRouter, HierarchicalRouter)
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
