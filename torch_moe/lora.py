"""Mixture of LoRA experts (MoLoRA, Zadouri et al. 2023; LoRAMoE, Dou et al. 2024): a frozen dense nn.Linear plus E
routed low-rank experts (MoLoRALinear), and molorafy, which puts them on the linears of a dense model."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from ._checks import flat_tokens, is_finite_number, is_int
from .dispatch import Load
from .convert import _find, _selector, register_replay
from .feedforward import ConvertedLayer, _install_attention_mask_hook, record_conversion
from .layer import MoEStats, _unrouted_fraction
from .routing import RouterOptions, recomputing, router_class

__all__ = ["MoLoRALinear", "molorafy", "lora_parameters"]


class MoLoRALinear(ConvertedLayer):
    """A frozen ``nn.Linear`` plus a mixture of E low-rank (LoRA) experts chosen per token by a router.

    ``y[t] = base(x[t]) + scaling * sum over the k chosen experts e of w[t, e] * (x[t] · A_e) · B_e`` with
    ``A_e`` [d_in, r], ``B_e`` [r, d_out], ``scaling = alpha / r`` (LoRA's), ``w`` the router's weights.

    Args:
        base: the dense ``nn.Linear(d_in, d_out)``; kept as the child ``base``, frozen (requires_grad False) and
            never written to, so ``base.weight`` and ``base.bias`` stay bit-identical.
        num_experts: E; top_k: experts per token; rank: r; alpha: LoRA's alpha (default r, i.e. scaling 1).
        router: a token-choice router of :mod:`torch_moe.routing` (``"softmax"`` default, ``"sigmoid"``,
            ``"noisy_topk"``, ``"random"``, ``"hash"``); expert choice is refused (it is not causal and may skip
            tokens). ``normalize_weights``: as in :class:`torch_moe.MoE` (default ``top_k > 1``).
        aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in ``aux_loss``,
            which :func:`torch_moe.aux_loss` sums with those of the MoE layers.

    Parameters (the only trainable ones): ``lora_A`` [E, d_in, r] (uniform in ±1/sqrt(d_in), as LoRA's A),
    ``lora_B`` [E, r, d_out] (zero, so a fresh layer computes exactly ``base(x)``), the router's.

    ``forward(x [..., d_in], padding_mask bool [...] | None, *, token_ids int [...] | None) -> [..., d_out]``.
    Padding tokens (mask False) get ``base(x)`` only and are left out of the losses and statistics; inside a
    converted Hugging Face model the mask comes from the model's ``attention_mask`` (:class:`ConvertedLayer`).
    The experts run dropless as two grouped GEMMs over the token rows sorted by expert
    (:func:`torch_moe.ops.gather_grouped_mm`, :func:`torch_moe.ops.grouped_mm_unpermute`). After each forward,
    ``aux_loss`` (0-dim, with grad) and ``stats`` (:class:`torch_moe.MoEStats`) describe it.
    """

    reports_aux_loss = True

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int = 2, rank: int = 8,
                 alpha: Optional[float] = None, *, router: str = "softmax", normalize_weights: Optional[bool] = None,
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3) -> None:
        super().__init__()
        _validate(base, num_experts, top_k, rank, alpha, aux_loss_coef, z_loss_coef)
        router_type = router_class(router)
        if not router_type.token_choice:
            raise ValueError(f"MoLoRALinear: router must be a token-choice router, got router={router!r} (expert "
                             "choice is not causal and may leave tokens without an expert)")
        if normalize_weights is None:
            normalize_weights = router_type.default_normalize_weights(top_k)
        options = RouterOptions(normalize_weights=bool(normalize_weights))
        router_type.check(num_experts, top_k, options, capacity_factor=None, drop_policy="position",
                          expert_parallel=False)
        self.base = base.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.router_name = router
        self.normalize_weights = bool(normalize_weights)
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.router = router_type.build(d_in, num_experts, top_k, options, None, **factory)
        self.lora_A = nn.Parameter(torch.empty(num_experts, d_in, rank, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, d_out, **factory))
        self.reset_lora_parameters()
        self.aux_loss: Optional[Tensor] = None
        self.stats: Optional[MoEStats] = None

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A_e uniform in ±1/sqrt(d_in) (LoRA's kaiming-uniform with a=sqrt(5)), B_e zero: the layer equals base."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def __getstate__(self) -> dict:
        # The last aux_loss keeps its autograd graph for backward; copies (deepcopy, pickling) take it detached.
        state = dict(super().__getstate__())
        if self.aux_loss is not None:
            state["aux_loss"] = self.aux_loss.detach()
        return state

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, *,
                token_ids: Optional[Tensor] = None) -> Tensor:
        if padding_mask is None:
            padding_mask = self.stored_padding_mask(x)
        if token_ids is None and self.router_name == "hash":
            token_ids = self.stored_token_ids(x)
        tokens, valid = self._flatten(x, padding_mask, token_ids)
        y = self.base(x)
        # Padding rows may hold anything (NaN included); the router sees zeros there, and the experts never read
        # them (their row_index is -1), so nothing of theirs reaches an output or a gradient of the adapters.
        clean = tokens if valid is None else torch.where(valid.unsqueeze(1), tokens, 0)
        routing = self.router(clean, token_ids=None if token_ids is None else token_ids.reshape(-1), valid=valid)
        row_index, offsets = ops.permute_plan(routing.expert_ids, self.num_experts, valid)
        low_rank = ops.gather_grouped_mm(tokens.to(self.lora_A.dtype), self.lora_A, offsets, row_index)  # [T*k, r]
        delta = ops.grouped_mm_unpermute(low_rank, self.lora_B, offsets, routing.weights * self.scaling, row_index)
        load = Load(offsets.diff(), routing.weights.new_zeros(()), None)
        if self.training and self.router.adapts_to_load and not recomputing():
            self.router.observe_load(load.tokens_per_expert, delta)
        self._record_losses_and_stats(routing, valid, load)
        return y + delta.to(y.dtype).reshape(y.shape)

    def _flatten(self, x: Tensor, padding_mask: Optional[Tensor],
                 token_ids: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """x [..., d_in] -> (tokens [T, d_in], valid [T] bool or None), after checking the arguments."""
        tokens, valid = flat_tokens("MoLoRALinear", x, "in_features", self.in_features, padding_mask)
        lead_shape = x.shape[:-1]
        if self.router_name == "hash" and (token_ids is None or token_ids.shape != lead_shape
                                           or token_ids.is_floating_point() or token_ids.dtype == torch.bool):
            got = None if token_ids is None else f"{token_ids.dtype} of shape {tuple(token_ids.shape)}"
            raise ValueError(f"MoLoRALinear(router='hash'): token_ids must be an integer tensor of shape "
                             f"{tuple(lead_shape)} (x without its last dim), got {got}")
        return tokens, valid

    def _record_losses_and_stats(self, routing, valid: Optional[Tensor], load: Load) -> None:
        load_balancing_loss, z_loss, router_entropy = self.router.balance_losses(routing, valid)
        self.aux_loss = self.aux_loss_coef * load_balancing_loss + self.z_loss_coef * z_loss
        self.stats = MoEStats(
            tokens_per_expert=load.tokens_per_expert.detach(),
            dropped_fraction=load.dropped_fraction.detach(),
            router_entropy=router_entropy.detach(),
            load_balancing_loss=load_balancing_loss.detach(),
            z_loss=z_loss.detach(),
            unrouted_fraction=_unrouted_fraction(None, valid, routing.weights.dtype, routing.weights.device),
            losses={"load_balancing": load_balancing_loss.detach(), "z": z_loss.detach()},
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, rank={self.rank}, alpha={self.alpha}, router={self.router_name!r}")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every :class:`MoLoRALinear` in ``model``: A, B and the router's."""
    return [p for m in model.modules() if isinstance(m, MoLoRALinear)
            for p in (m.lora_A, m.lora_B, *m.router.parameters()) if p.requires_grad]


def _validate(base, num_experts, top_k, rank, alpha, aux_loss_coef, z_loss_coef) -> None:
    if not isinstance(base, nn.Linear):
        raise ValueError(f"MoLoRALinear: base must be an nn.Linear, got {type(base).__name__}")
    for name, value in (("num_experts", num_experts), ("rank", rank)):
        if not is_int(value) or value < 1:
            raise ValueError(f"MoLoRALinear: {name} must be a positive int, got {value!r}")
    if not is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"MoLoRALinear: top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if alpha is not None and not (is_finite_number(alpha) and alpha > 0):
        raise ValueError(f"MoLoRALinear: alpha must be a number > 0 and finite (or None for alpha = rank), "
                         f"got {alpha!r}")
    for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if not is_finite_number(value) or value < 0:
            raise ValueError(f"MoLoRALinear: {name} must be a number >= 0 and finite, got {value!r}")


# --------------------------------------------------------------------------------------------------
# molorafy


def _ffn_linears(model: nn.Module, dense) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules (name relative to ``model``) whose weights a matched DenseFFN reads: a DenseFFN holds
    views of them (transposed, or slices of a fused projection), so they share storage."""
    storages = {t.untyped_storage().data_ptr() for t in (dense.w1, dense.w2, dense.w3) if t is not None}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.untyped_storage().data_ptr() in storages]


def _targets(model: nn.Module, target) -> list[tuple[str, nn.Linear]]:
    selector = _selector(target)
    ffns, selected_other, _ = _find(model, selector)
    found: dict[str, nn.Linear] = {}
    for name, module, dense in ffns:
        for child_name, linear in _ffn_linears(module, dense):
            found[f"{name}.{child_name}" if name and child_name else name or child_name] = linear
    for name in selected_other:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            found[name] = module
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(found.items(), key=lambda item: order[item[0]])


def molorafy(model: nn.Module, num_experts: int, top_k: int = 2, rank: int = 8, alpha: Optional[float] = None, *,
             target=None, freeze_base: bool = True, **lora_kwargs) -> nn.Module:
    """Put a mixture of LoRA experts (:class:`MoLoRALinear`) on linears of ``model``, in place; returns ``model``.

    ``target`` picks the linears: None (default) takes every ``nn.Linear`` of the dense FFNs that
    :func:`torch_moe.moefy` recognises (Llama's gate/up/down projections, BERT's intermediate and output dense,
    ...; GPT-2's Conv1D MLPs are not nn.Linear and are refused); a glob pattern (``"*.q_proj"``), an
    ``re.Pattern`` (whole name) or a predicate ``(name, module) -> bool`` takes the selected ``nn.Linear`` modules
    and the linears of the selected dense FFNs. Existing MoE blocks and converted layers are left alone.

    ``freeze_base=True`` (default) sets requires_grad False on every parameter of ``model`` but the routers and
    the A / B of the new layers (parameter-efficient fine-tuning); the base weights are never written to.
    ``lora_kwargs`` go to :class:`MoLoRALinear` (router, normalize_weights, aux_loss_coef, z_loss_coef). With B
    zero-initialised, the converted model computes exactly what the dense one did until training moves B.

    On a Hugging Face model the conversion is recorded in ``model.config`` (key ``"torch_moe"``), so
    ``save_pretrained`` then :func:`torch_moe.convert.from_pretrained` rebuilds it with its weights; a model whose
    forward takes ``attention_mask`` passes it to every MoLoRA layer as its padding mask.
    Raises ValueError when no linear is found.
    """
    for key, value in lora_kwargs.items():
        if key not in ("router", "normalize_weights", "aux_loss_coef", "z_loss_coef"):
            raise ValueError(f"molorafy: unknown argument {key}={value!r}; MoLoRALinear takes router, "
                             "normalize_weights, aux_loss_coef and z_loss_coef")
    if not isinstance(freeze_base, bool):
        raise ValueError(f"molorafy: freeze_base must be a bool, got {freeze_base!r}")
    targets = _targets(model, target)
    if not targets:
        what = "no nn.Linear of a dense FFN it recognises" if target is None else "no nn.Linear (or dense FFN)"
        raise ValueError(f"molorafy: target matched {what} in {type(model).__name__}; pass target= naming "
                         "nn.Linear modules, e.g. target='*.q_proj'")
    if any(name == "" for name, _ in targets):
        raise ValueError("molorafy: the model itself is an nn.Linear; wrap it in MoLoRALinear directly")
    # Every layer is built before any is installed: bad arguments leave the model as it was.
    built = [(name, MoLoRALinear(linear, num_experts, top_k, rank, alpha, **lora_kwargs)) for name, linear in targets]
    if freeze_base:
        model.requires_grad_(False)
    for name, layer in built:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        for p in layer.router.parameters():
            p.requires_grad_(True)
    _install_attention_mask_hook(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        record_conversion(model, {"method": "molorafy", "modules": [name for name, _ in targets],
                                  "num_experts": num_experts, "top_k": top_k, "rank": rank, "alpha": alpha,
                                  "freeze_base": freeze_base, "lora_kwargs": dict(lora_kwargs)})
    return model


def _replay(model: nn.Module, record: dict, modules: set) -> None:
    """Redo a recorded molorafy on a fresh model (torch_moe.convert.from_pretrained)."""
    molorafy(model, record["num_experts"], record["top_k"], record["rank"], record["alpha"],
             target=lambda name, _: name in modules, freeze_base=record["freeze_base"], **record["lora_kwargs"])


register_replay("molorafy", _replay)
