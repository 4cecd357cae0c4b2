"""Conversions: moefy turns the dense FFNs of an existing model (Hugging Face or plain PyTorch) into MoE layers, in
place; from_hf_moe (re-exported) does it for the MoE blocks of Hugging Face MoE models; from_pretrained rebuilds a
saved converted model."""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import is_int
from .feedforward import (CONFIG_KEY, RECORD_FORMAT, MoEFeedForward, _install_attention_mask_hook, padding_mask,
                          record_conversion)
from .integrations.hf_moe import from_hf_moe
from .layer import MoE

__all__ = ["moefy", "from_hf_moe", "from_pretrained", "DenseFFN", "MoEFeedForward", "padding_mask",
           "UPCYCLE_ROUTER_STD", "CONFIG_KEY"]

# Standard deviation of the router weights of an upcycled layer: small, so that the router starts near uniform
# and learns from the data, but not zero, so that tokens do not all pick experts 0..k-1 (ties go to the lower id).
UPCYCLE_ROUTER_STD = 0.02

Select = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]


@dataclass
class DenseFFN:
    """A dense FFN ``act(x·w1 + b1) [* (x·w3 + b3)] · w2 + b2``, as the matrices of the MoE experts' layout (x · w).

    What a matcher (built in, or the ``adapter`` of :func:`moefy`) returns for a module it recognises:

    - ``w1`` [d_model, d_ff], ``w2`` [d_ff, d_model]; ``w3`` [d_model, d_ff] for a gated FFN (its presence makes the
      FFN gated: SwiGLU / GeGLU experts), else None (``"mlp"`` experts).
    - ``b1`` [d_ff], ``b2`` [d_model], ``b3`` [d_ff] (gated only, on x·w3: the experts' ``up_bias``): biases or
      None.
    - ``activation``: a callable (identified by its values: silu, exact gelu, tanh gelu, relu, quick_gelu) or one
      of those names as a str. A gated FFN's activation is the one applied to ``x·w1``.
    - ``dropout``: a module applied to the MoE output (the FFN's trailing dropout), or None.
    - ``install(module, replacement)``: puts the :class:`MoEFeedForward` ``replacement`` (forward
      ``[..., d_model] -> [..., d_model]``) in the model so that it takes the FFN's place; None replaces ``module``
      itself in its parent, which fits a module whose forward is ``hidden_states -> hidden_states``.

    Tensors may be views of the module's parameters: they are copied when upcycling, never kept.
    """

    w1: Tensor
    w2: Tensor
    activation: Union[str, Callable[[Tensor], Tensor]]
    w3: Optional[Tensor] = None
    b1: Optional[Tensor] = None
    b2: Optional[Tensor] = None
    b3: Optional[Tensor] = None
    dropout: Optional[nn.Module] = None
    install: Optional[Callable[[nn.Module, "MoEFeedForward"], None]] = None
    kind: str = "adapter"  # which matcher found it; "sequential" ones are converted only when selected

    @property
    def gated(self) -> bool:
        return self.w3 is not None


_DenseFFN = DenseFFN  # the name before the adapter protocol made it public

# Activation modules of the two linears: names in the order models use them.
_ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "activation", "gelu_impl", "intermediate_act_fn")


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x · weight + bias with weight [in, out]; recognised by shape so that
    # transformers need not be imported.
    return (isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), Tensor)
            and m.weight.dim() == 2 and isinstance(getattr(m, "bias", None), Tensor))


def _pair(up, down) -> bool:
    """up: Linear(d, f) and down: Linear(f, d)."""
    return (_is_linear(up) and _is_linear(down) and up.in_features == down.out_features
            and up.out_features == down.in_features)


def _warn_inner_dropout(m: nn.Module, p: float) -> None:
    if p > 0:
        warnings.warn(f"moefy: the dropout (p={p}) between the two linears of {type(m).__name__} is left out of the "
                      "MoE experts")


def _dropout_p(dropout) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _match_gated(m: nn.Module) -> Optional[DenseFFN]:
    """Llama / Mistral / Qwen2 / Gemma: down(act(gate(x)) * up(x))."""
    gate, up, down = (getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(m, "act_fn", None)
    if not (_is_linear(gate) and _is_linear(up) and _is_linear(down) and callable(act)):
        return None
    return DenseFFN(gate.weight.t(), down.weight.t(), act, w3=up.weight.t(), b1=gate.bias, b2=down.bias, b3=up.bias,
                    kind="gated")


def _match_fused_gated(m: nn.Module) -> Optional[DenseFFN]:
    """One Linear(d, 2f) whose first half is activated and second half multiplies it: Phi-3
    ``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``, and ModernBERT
    ``Wo(drop(act(input) * gate))`` with ``input, gate = Wi(x).chunk(2)``."""
    for fused_name, down_name, act_name in (("gate_up_proj", "down_proj", "activation_fn"), ("Wi", "Wo", "act")):
        fused, down, act = getattr(m, fused_name, None), getattr(m, down_name, None), getattr(m, act_name, None)
        if not (_is_linear(fused) and _is_linear(down) and callable(act)):
            continue
        d_ff = down.in_features
        if fused.out_features != 2 * d_ff or fused.in_features != down.out_features:
            continue
        weight, bias = fused.weight.t(), fused.bias
        _warn_inner_dropout(m, _dropout_p(getattr(m, "drop", None)))
        return DenseFFN(weight[:, :d_ff], down.weight.t(), act, w3=weight[:, d_ff:], b2=down.bias,
                        b1=None if bias is None else bias[:d_ff], b3=None if bias is None else bias[d_ff:],
                        kind="fused_gated")
    return None


def _match_gpt2(m: nn.Module) -> Optional[DenseFFN]:
    """GPT-2: dropout(c_proj(act(c_fc(x)))) with Conv1D (weights already [in, out])."""
    c_fc, c_proj, act = getattr(m, "c_fc", None), getattr(m, "c_proj", None), getattr(m, "act", None)
    if not (_is_conv1d(c_fc) and _is_conv1d(c_proj) and callable(act)):
        return None
    dropout = getattr(m, "dropout", None)
    return DenseFFN(c_fc.weight, c_proj.weight, act, b1=c_fc.bias, b2=c_proj.bias,
                    dropout=dropout if isinstance(dropout, nn.Module) else None, kind="gpt2")


def _install_bert(layer: nn.Module, replacement: "MoEFeedForward") -> None:
    layer.intermediate = replacement
    layer.output.dense = nn.Identity()


def _match_bert(m: nn.Module) -> Optional[DenseFFN]:
    """BERT / RoBERTa / ViT-style layer: ``output(intermediate(x), x)`` with ``intermediate = act(dense(x))`` and
    ``output = [LayerNorm](dropout(dense(h)) + x)``.

    The pair becomes: ``intermediate`` -> the MoE (d_model -> d_model), ``output.dense`` -> Identity, so the
    output's dropout, residual and LayerNorm (BERT; ViT's layer norms sit outside) stay where they were.
    """
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if not (isinstance(inter, nn.Module) and isinstance(out, nn.Module)):
        return None
    act = getattr(inter, "intermediate_act_fn", None)
    if not (callable(act) and _pair(getattr(inter, "dense", None), getattr(out, "dense", None))):
        return None
    return DenseFFN(inter.dense.weight.t(), out.dense.weight.t(), act, b1=inter.dense.bias, b2=out.dense.bias,
                    install=_install_bert, kind="bert")


# Two linears with an activation between them, by the names models give them:
# (up, down, activation attributes, trailing dropout attribute, dropout attribute between the linears).
_LINEAR_PAIRS = (
    ("dense_h_to_4h", "dense_4h_to_h", ("act", "gelu_impl"), None, None),  # GPT-NeoX, Falcon, BLOOM
    ("fc1", "fc2", ("activation_fn", "act"), None, "activation_dropout"),  # Phi-2, CLIP, OPT / Whisper layers
    ("fc_in", "fc_out", ("act",), "dropout", None),                         # GPT-J
    ("lin1", "lin2", ("activation",), "dropout", None),                     # DistilBERT
    ("wi", "wo", ("act",), None, "dropout"),                                # T5 DenseReluDense
)


def _takes_one_tensor(m: nn.Module) -> bool:
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def _inline_installer(up_name: str, down_name: str, act_name: str, inner_dropout: Optional[str]):
    """For two linears used inline in a forward that does more than the FFN (OPT / Whisper layers, BLOOM's MLP):
    ``up`` becomes the MoE, the activation and ``down`` Identities, so ``down(act(up(h)))`` is the MoE of h and the
    rest of the forward (residual, dropout, layer norm, reshapes) runs as before. A float dropout rate between the
    linears (Whisper's ``activation_dropout``) would then fall on the MoE output: it is set to 0, with a warning."""

    def install(module: nn.Module, replacement: "MoEFeedForward") -> None:
        setattr(module, up_name, replacement)
        setattr(module, act_name, nn.Identity())
        setattr(module, down_name, nn.Identity())
        if inner_dropout is not None and isinstance(getattr(module, inner_dropout, None), float):
            setattr(module, inner_dropout, 0.0)

    return install


def _match_linear_pair(m: nn.Module) -> Optional[DenseFFN]:
    """GPT-NeoX / Falcon / BLOOM, Phi-2 / CLIP, GPT-J, DistilBERT, T5 (relu), OPT / Whisper: act(up(x)) -> down.

    A module holding only the two linears, the activation and dropouts, with a one-tensor forward, is replaced
    whole; otherwise the FFN is installed inline (:func:`_inline_installer`).
    """
    for up_name, down_name, act_names, trailing, between in _LINEAR_PAIRS:
        up, down = getattr(m, up_name, None), getattr(m, down_name, None)
        act_name = next((n for n in act_names if callable(getattr(m, n, None))), None)
        if act_name is None or not _pair(up, down):
            continue
        inner = getattr(m, between, None) if between else None
        inner_p = _dropout_p(inner) if isinstance(inner, nn.Module) else float(inner or 0.0)
        own = {up_name, down_name, act_name, trailing, between}
        whole = _takes_one_tensor(m) and all(n in own or isinstance(c, nn.Dropout) for n, c in m.named_children())
        tensor_parallel_slices = getattr(m, "pretraining_tp", 1) > 1 and getattr(m, "slow_but_exact", False)
        if type(m).__name__ == "BloomMLP" and tensor_parallel_slices:
            raise ValueError("moefy: BloomMLP with pretraining_tp > 1 and slow_but_exact=True slices dense_4h_to_h's "
                             "weight in its forward; set config.slow_but_exact=False to convert it")
        _warn_inner_dropout(m, inner_p)
        dropout = getattr(m, trailing, None) if trailing else None
        return DenseFFN(up.weight.t(), down.weight.t(), getattr(m, act_name), b1=up.bias, b2=down.bias,
                        dropout=dropout if whole and isinstance(dropout, nn.Module) else None,
                        install=None if whole else _inline_installer(up_name, down_name, act_name, between),
                        kind="linear_pair")
    return None


def _match_t5_gated(m: nn.Module) -> Optional[DenseFFN]:
    """T5 v1.1 DenseGatedActDense: wo(dropout(act(wi_0(x)) * wi_1(x)))."""
    gate, up, down, act = (getattr(m, n, None) for n in ("wi_0", "wi_1", "wo", "act"))
    if not (_is_linear(gate) and _is_linear(up) and _pair(gate, down) and callable(act)):
        return None
    _warn_inner_dropout(m, _dropout_p(getattr(m, "dropout", None)))
    return DenseFFN(gate.weight.t(), down.weight.t(), act, w3=up.weight.t(), b1=gate.bias, b2=down.bias, b3=up.bias,
                    kind="t5_gated")


def _match_sequential(m: nn.Module) -> Optional[DenseFFN]:
    """nn.Sequential(Linear(d, f), act, [Dropout], Linear(f, d), [Dropout])."""
    if not isinstance(m, nn.Sequential):
        return None
    layers = list(m)
    if len(layers) < 3 or not _is_linear(layers[0]):
        return None
    act = layers[1]
    rest = layers[2:]
    if rest and isinstance(rest[0], nn.Dropout):
        if rest[0].p > 0:
            warnings.warn("moefy: the dropout between the FFN's two linears is left out of the MoE experts")
        rest = rest[1:]
    if not rest or not _is_linear(rest[0]):
        return None
    first, second = layers[0], rest[0]
    rest = rest[1:]
    if len(rest) > 1 or (rest and not isinstance(rest[0], nn.Dropout)):
        return None
    if second.in_features != first.out_features or second.out_features != first.in_features:
        return None
    return DenseFFN(first.weight.t(), second.weight.t(), act, b1=first.bias, b2=second.bias,
                    dropout=rest[0] if rest else None, kind="sequential")


_MATCHERS = (_match_gated, _match_fused_gated, _match_gpt2, _match_bert, _match_t5_gated, _match_linear_pair,
             _match_sequential)
_LOOKED_FOR = (
    "Llama/Mistral/Qwen2/Gemma-style MLPs (gate_proj, up_proj, down_proj, act_fn), fused gated MLPs (Phi-3 "
    "gate_up_proj + down_proj, ModernBERT Wi + Wo), GPT-2 MLPs (c_fc, c_proj as Conv1D, act), BERT/ViT-style layers "
    "(intermediate.dense + intermediate_act_fn, output.dense), two Linears with an activation (dense_h_to_4h / "
    "dense_4h_to_h, fc1 / fc2, fc_in / fc_out, lin1 / lin2, T5 wi / wo and wi_0 / wi_1 / wo), and with select, "
    "nn.Sequential(Linear, activation, [Dropout], Linear, [Dropout]); other FFNs need an adapter="
)


def _match(m: nn.Module) -> Optional[DenseFFN]:
    for matcher in _MATCHERS:
        found = matcher(m)
        if found is not None:
            return found
    return None


def _is_moe_block(m: nn.Module) -> bool:
    """An existing MoE block (Hugging Face Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, Switch, ...): a module with
    an ``experts`` child (a ModuleList of MLPs or transformers' fused experts) beside a router (``gate`` or
    ``router``), or a transformers experts module itself."""
    children = dict(m.named_children())
    if "experts" in children and ("gate" in children or "router" in children):
        return True
    return type(m).__name__.endswith("Experts") and type(m).__module__.startswith("transformers.")


def _quick_gelu(h: Tensor) -> Tensor:
    return h * torch.sigmoid(1.702 * h)


# quick_gelu(z) = silu(1.702 z) / 1.702: a quick_gelu FFN becomes silu experts with the factor folded into w1, b1, w2.
_QUICK_GELU_SCALE = 1.702


def _activation_name(act: Union[str, Callable[[Tensor], Tensor]], gated: bool) -> str:
    """Identify an activation by its values (works for torch, Hugging Face and user activations alike): one of
    silu, gelu, gelu_tanh, relu, quick_gelu. Whether the experts have it is for the caller to say."""
    names = ("silu", "gelu", "gelu_tanh", "relu", "quick_gelu")
    if isinstance(act, str):
        if act not in names:
            raise ValueError(f"moefy: activation {act!r} is not one moefy knows: expected one of {names}")
        return act
    probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    candidates = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
        "relu": F.relu,
        "quick_gelu": _quick_gelu,
    }
    allowed = ("silu (SwiGLU) or exact gelu (GeGLU)" if gated
               else "gelu (exact), gelu_tanh (gelu_new), relu, silu or quick_gelu")
    with torch.no_grad():
        values, tol = None, 1e-9
        for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
            try:  # an activation that refuses float64 is tried in float32
                values, tol = act(probe.to(dtype)), tolerance
                break
            except Exception:
                continue
        if not isinstance(values, Tensor) or values.shape != probe.shape:
            raise ValueError(f"moefy: could not evaluate the FFN's activation {act!r} on a CPU probe; expected {allowed}")
        values = values.double()
        for name, fn in candidates.items():
            if torch.allclose(values, fn(probe), rtol=0, atol=tol):
                return name
    raise ValueError(f"moefy: the FFN's activation {act!r} is not one the MoE experts have: expected {allowed}")


def _expert_layout(name: str, dense: DenseFFN, module: Optional[nn.Module] = None) -> tuple[dict, float]:
    """The MoE arguments (expert, activation, bias) that hold ``dense``, and the factor folded into w1 and b1
    (divided out of w2) for activations the experts have only up to a scale (quick_gelu)."""
    from .experts import EXPERT_TYPES

    what = f"{name!r}" + (f" ({type(module).__name__})" if module is not None else "")
    act_name = _activation_name(dense.activation, dense.gated)
    bias = dense.b1 is not None or dense.b2 is not None
    if dense.gated:
        gated_types = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
        expert = gated_types.get(act_name)
        if expert not in EXPERT_TYPES:
            detail = (" (gelu_pytorch_tanh / gelu_new, as in Gemma and T5 v1.1): the experts have no tanh-gelu "
                      "gated type" if act_name == "gelu_tanh" else "")
            raise ValueError(f"moefy: the gated FFN {what} gates with activation {act_name!r}{detail}; the gated "
                             f"experts have silu (expert='swiglu') and exact gelu (expert='geglu'): expected silu "
                             "(SwiGLU) or exact gelu (GeGLU)")
        return {"expert": expert, "bias": bias, "up_bias": dense.b3 is not None}, 1.0
    if act_name == "quick_gelu":
        return {"expert": "mlp", "activation": "silu", "bias": bias}, _QUICK_GELU_SCALE
    return {"expert": "mlp", "activation": act_name, "bias": bias}, 1.0


# --------------------------------------------------------------------------------------------------
# moefy


def _selector(select: Optional[Select]) -> Optional[Callable[[str, nn.Module], bool]]:
    if select is None:
        return None
    if isinstance(select, str):
        return lambda name, module: fnmatch.fnmatchcase(name, select)
    if isinstance(select, re.Pattern):
        return lambda name, module: select.fullmatch(name) is not None
    if callable(select):
        return select
    raise ValueError(f"moefy: select must be a name pattern (str or re.Pattern) or a predicate (name, module) -> "
                     f"bool, got {type(select).__name__}")


Adapter = Callable[[str, nn.Module], Optional[DenseFFN]]


def _find(model: nn.Module, select, adapter: Optional[Adapter] = None):
    """Top-down walk; a converted module, and an existing MoE block, is not searched further. Returns the FFNs
    found as (name, module, DenseFFN), the names that ``select`` matched without being an FFN (for the error
    message when nothing is found), and the names of the MoE blocks left alone."""
    found: list[tuple[str, nn.Module, DenseFFN]] = []
    selected_other: list[str] = []
    moe_blocks: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if isinstance(module, (MoE, MoEFeedForward)):
            return
        if _is_moe_block(module):
            moe_blocks.append(name)
            return
        chosen = select is None or select(name, module)
        if chosen:
            dense = adapter(name, module) if adapter is not None else None
            if dense is not None and not isinstance(dense, DenseFFN):
                raise ValueError(f"moefy: adapter({name!r}, {type(module).__name__}) returned "
                                 f"{type(dense).__name__}; it must return a torch_moe.convert.DenseFFN or None")
            dense = dense if dense is not None else _match(module)
            if dense is not None and (select is not None or dense.kind != "sequential"):
                found.append((name, module, dense))
                return
            if select is not None:
                selected_other.append(name)
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found, selected_other, moe_blocks


def _names(names: list[str], limit: int = 5) -> str:
    return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


def moefy(
    model: nn.Module,
    num_experts: int,
    top_k: int = 2,
    *,
    upcycle: bool = False,
    select: Optional[Select] = None,
    upcycle_noise: float = 0.0,
    drop_upcycling_ratio: float = 0.0,
    adapter: Optional[Adapter] = None,
    **moe_kwargs,
) -> nn.Module:
    """Replace the dense FFNs of ``model`` by :class:`~torch_moe.MoE` layers, in place; returns ``model``.

    Recognised without configuration (Hugging Face names):

    - gated MLPs ``gate_proj`` / ``up_proj`` / ``down_proj`` / ``act_fn`` (Llama, Mistral, Qwen2/3, SmolLM3,
      Granite, OLMo2, StableLM, Cohere, Gemma), fused ``gate_up_proj`` / ``down_proj`` (Phi-3), ``Wi`` / ``Wo``
      (ModernBERT), ``wi_0`` / ``wi_1`` / ``wo`` (T5 v1.1): SwiGLU or GeGLU experts;
    - GPT-2 MLPs (``Conv1D`` ``c_fc`` / ``c_proj``; the MLP's dropout is kept);
    - BERT / RoBERTa / ViT layers (``intermediate`` + ``output``: ``intermediate`` becomes the MoE and
      ``output.dense`` an Identity, so the output's dropout, residual and LayerNorm still apply);
    - two Linears around an activation: ``dense_h_to_4h`` / ``dense_4h_to_h`` (GPT-NeoX, Falcon, BLOOM), ``fc1`` /
      ``fc2`` (Phi-2, CLIP, and inline in OPT and Whisper layers), ``fc_in`` / ``fc_out`` (GPT-J), ``lin1`` /
      ``lin2`` (DistilBERT), ``wi`` / ``wo`` (T5). A module holding just those (and dropouts), with a one-tensor
      forward, is replaced; where the linears are used inline in a forward that does more (the OPT and Whisper
      layers with their residual and layer norm, BLOOM's MLP with its fused dropout-add), the first linear
      becomes the MoE and the activation and second linear Identities, so the rest of that forward is unchanged.
      A dropout between the two linears (T5, Whisper's ``activation_dropout``, ModernBERT's ``mlp_dropout``) has
      no place in the experts: it is left out, with a warning when its rate is not 0.

    ``select`` restricts conversion to the modules whose dotted name matches a glob pattern (``"layers.*.mlp"``;
    an ``re.Pattern`` must match the whole name) or for which ``select(name, module)`` is true; selected modules
    may also be ``nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])``. The activation is identified by its
    values: silu, exact gelu, tanh gelu, relu, and quick_gelu (CLIP), which becomes silu experts with the factor
    1.702 folded into the weights (quick_gelu(z) = silu(1.702 z) / 1.702). Gated experts are SwiGLU (silu) or
    GeGLU (exact gelu) and hold no bias on the up projection; a tanh-gelu gate (Gemma, T5 v1.1), an up-projection
    bias (Llama with ``mlp_bias=True``) or any other activation raises ValueError naming it.

    ``adapter(name, module) -> DenseFFN | None`` converts FFNs moefy does not know: it is asked first about every
    module that ``select`` chooses (every module when ``select`` is None) and returns None for those that are not
    FFNs, or a :class:`DenseFFN` with the weights in the experts' layout (``w1`` [d_model, d_ff], ``w2`` [d_ff,
    d_model], ``w3`` for a gated FFN, biases), the activation, and, unless replacing ``module`` whole fits its
    callers, ``install(module, replacement)`` to put the MoE in place::

        def adapter(name, module):
            if not isinstance(module, MyFFN):
                return None
            return DenseFFN(w1=module.inp.weight.t(), w2=module.out.weight.t(), activation=module.act,
                            b1=module.inp.bias, b2=module.out.bias)

        moefy(model, 8, 2, upcycle=True, adapter=adapter)

    Existing MoE blocks (a module with ``experts`` beside a ``gate`` or ``router``: Mixtral, Qwen2/3-MoE,
    OLMoE, DeepSeek-V3, ...) and everything inside them (shared experts included) are never converted. When a
    model has MoE blocks and ``select`` is None, moefy raises, naming the blocks and the dense FFNs outside them:
    turning the remaining dense FFNs (DeepSeek-V3's first ``first_k_dense_replace`` layers) into a second kind of
    MoE is for the user to ask, with ``select``; it then converts what was selected and warns that the MoE blocks
    were left alone.

    Each replacement is a :class:`MoEFeedForward` holding ``moe`` (the :class:`MoE`), on the dense FFN's device
    and dtype, with d_ff, expert type, activation and bias taken from it (``moe_kwargs`` go to :class:`MoE` and
    may override them when not upcycling). When ``model.forward`` takes ``attention_mask`` (Hugging Face models),
    a forward pre-hook passes it to every MoE layer as ``padding_mask``, so padding takes no capacity and is left
    out of losses and statistics; for other models use the :func:`padding_mask` context manager.

    ``upcycle=True`` (sparse upcycling, Komatsuzaki et al. 2023): every expert starts as a copy of the dense FFN,
    times ``1 + upcycle_noise * N(0, 1)`` elementwise when ``upcycle_noise > 0``; the router starts at
    N(0, UPCYCLE_ROUTER_STD²). Upcycling defaults to ``capacity_factor=None`` (dropless) and
    ``normalize_weights=True``, which together make the converted model compute exactly what the dense one did
    until training moves the weights (with ``top_k=1`` the normalised weight is 1, so the router then learns from
    the auxiliary losses only; pass ``normalize_weights=False`` to keep Switch-style scaling).
    ``drop_upcycling_ratio=r`` (Drop-Upcycling, Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of
    Experts with Partial Re-initialization"): after the copy, each expert re-initialises its own random subset of
    round(r · d_ff) hidden units (drawn independently per expert): their w1 / w3 columns and w2 rows are drawn from
    N(mean, std²) of the dense w1, w3 and w2 respectively (the paper's statistical re-initialisation), their b1 / b3
    entries from the dense bias's mean and std (0 without one); b2 stays. r = 0 is plain upcycling, r = 1 keeps
    nothing of the dense hidden units. The paper's best setting is r = 0.5. Draws follow ``torch.manual_seed``.
    ``expert_granularity=g`` with upcycling (granular upcycling, as DeepSeekMoE's fine-grained experts from a dense
    FFN): each of the E copies is split into g fine-grained experts holding consecutive d_ff/g slices of the dense
    hidden units (b2 / g each), top_k·g of the E·g are routed, the g slices of a copy share one router row, and
    ``routed_scaling_factor`` is multiplied by g. Why that is exact: the dense FFN is the sum of its g slices; equal
    logits make a token take all g slices of each of its k copies, and normalised weights give each slice
    p_copy / (g Σ p_chosen copies); the factor g restores Σ over slices = the copy's full weight. Needs a router
    with ``routed_scaling_factor`` (softmax, sigmoid, noisy_topk; noisy top-k is exact in eval only).
    Raises ValueError when no FFN is found, naming what was looked for.
    ``adapter`` is a Python callable, which config.json cannot hold: pass the same ``adapter`` to
    :func:`from_pretrained`.

    Saving: on a Hugging Face model (one with a ``config``), the conversion is recorded in ``model.config`` under
    ``"torch_moe"`` (the converted module names, ``num_experts``, ``top_k`` and the MoE arguments), so that
    ``save_pretrained`` writes it to config.json and :func:`from_pretrained` rebuilds the converted model.
    ``AutoModel*.from_pretrained`` alone does not know it and returns the dense model with fresh MLPs.
    """
    for arg, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not is_int(value) or value < 1:
            raise ValueError(f"moefy: {arg} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"moefy: top_k must be <= num_experts={num_experts}, got {top_k}")
    if not (isinstance(upcycle_noise, (int, float)) and upcycle_noise >= 0):
        raise ValueError(f"moefy: upcycle_noise must be a float >= 0, got {upcycle_noise!r}")
    if upcycle_noise > 0 and not upcycle:
        raise ValueError("moefy: upcycle_noise is only used with upcycle=True")
    if not (isinstance(drop_upcycling_ratio, (int, float)) and not isinstance(drop_upcycling_ratio, bool)
            and 0.0 <= drop_upcycling_ratio <= 1.0):
        raise ValueError(f"moefy: drop_upcycling_ratio must be a float in [0, 1], got {drop_upcycling_ratio!r}")
    if drop_upcycling_ratio > 0 and not upcycle:
        raise ValueError("moefy: drop_upcycling_ratio is only used with upcycle=True")
    for arg in ("device", "dtype"):
        if arg in moe_kwargs:
            raise ValueError(f"moefy: {arg} is taken from the dense FFN being replaced; do not pass it")
    if upcycle:
        if moe_kwargs.get("num_shared_experts", 0) != 0:
            raise ValueError(f"moefy: upcycle=True copies the dense FFN into each routed expert and does not "
                             f"support num_shared_experts={moe_kwargs['num_shared_experts']!r}")
        moe_kwargs.setdefault("capacity_factor", None)
        moe_kwargs.setdefault("normalize_weights", True)
        granularity = moe_kwargs.get("expert_granularity", 1)
        if is_int(granularity) and granularity > 1:
            router = moe_kwargs.get("router", "softmax")
            if router not in ("softmax", "sigmoid", "noisy_topk"):
                raise ValueError(f"moefy: granular upcycling (expert_granularity={granularity}) scales the routing "
                                 f"weights by g through routed_scaling_factor, which router={router!r} does not "
                                 "take; use 'softmax', 'sigmoid' or 'noisy_topk'")
            # Recorded with the factor in: a replay by from_pretrained builds the same layer without upcycling.
            moe_kwargs["routed_scaling_factor"] = (moe_kwargs.get("routed_scaling_factor") or 1.0) * granularity

    if adapter is not None and not callable(adapter):
        raise ValueError(f"moefy: adapter must be a callable (name, module) -> DenseFFN | None, got "
                         f"{type(adapter).__name__}")
    targets, selected_other, moe_blocks = _find(model, _selector(select), adapter)
    if moe_blocks and not targets:
        raise ValueError(f"moefy: {type(model).__name__} already is a mixture of experts: its MoE blocks "
                         f"{_names(moe_blocks)} are left alone (moefy does not convert modules inside an existing "
                         "MoE block, shared experts included), and it has no dense FFN outside them"
                         + (" that select matched" if select is not None else ""))
    if moe_blocks and select is None:
        raise ValueError(f"moefy: {type(model).__name__} already has MoE blocks {_names(moe_blocks)}, which moefy "
                         f"leaves alone; it also has dense FFNs outside them, {_names([n for n, _, _ in targets])}. "
                         "Converting those into a second kind of MoE is done only when asked: pass select= naming "
                         "them")
    if moe_blocks:
        warnings.warn(f"moefy: left {len(moe_blocks)} existing MoE block(s) of {type(model).__name__} alone (with "
                      f"their experts and shared experts): {_names(moe_blocks)}")
    if not targets:
        if select is None:
            raise ValueError(f"moefy: found no FFN to convert in {type(model).__name__}; it looks for {_LOOKED_FOR}. "
                             "Pass select= to name the FFN modules of other models")
        matched = (f"select matched {selected_other[:5]}{' ...' if len(selected_other) > 5 else ''}, none of them"
                   if selected_other else "select matched no module; it is tried on dotted names such as "
                   f"{[n for n, _ in model.named_modules() if n][:3]}, and")
        raise ValueError(f"moefy: found no FFN to convert in {type(model).__name__}: {matched} an FFN moefy "
                         f"recognises; it looks for {_LOOKED_FOR}")

    record = _conversion_record(model, targets, num_experts, top_k, moe_kwargs, adapter is not None)
    generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63)) if upcycle else None
    # Every MoE is built before any is installed: an FFN that cannot be converted leaves the model as it was.
    built = [(name, module, dense, _build_moe(name, module, dense, num_experts, top_k, upcycle, upcycle_noise,
                                              moe_kwargs, generator, drop_upcycling_ratio))
             for name, module, dense in targets]
    for name, module, dense, moe in built:
        replacement = MoEFeedForward(moe, dense.dropout)
        if dense.install is None:
            _replace(model, name, replacement)
        else:
            dense.install(module, replacement)
    _install_attention_mask_hook(model)
    if record is not None:
        record_conversion(model, record)
    return model


def _conversion_record(model: nn.Module, targets, num_experts: int, top_k: int, moe_kwargs: dict,
                       adapter: bool = False) -> Optional[dict]:
    """What :func:`from_pretrained` needs to redo this conversion on a fresh model; None for a model without an HF
    config. Refuses arguments config.json cannot hold rather than saving a model that would not reload."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    for key, value in moe_kwargs.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"moefy: {key}={value!r} cannot be recorded in {type(model).__name__}.config (config.json "
                             "holds numbers, strings and None); build the MoE layers by hand for this model")
    record = {"method": "moefy", "modules": [name for name, _, _ in targets], "num_experts": num_experts,
              "top_k": top_k, "moe_kwargs": dict(moe_kwargs)}
    if adapter:  # from_pretrained must be given the adapter again
        record["adapter"] = True
    return record


def from_pretrained(path, model_class=None, *, dtype: Optional[torch.dtype] = None,
                    attn_implementation: Optional[str] = None, adapter: Optional[Adapter] = None) -> nn.Module:
    """Rebuild a model converted by :func:`moefy` or :func:`from_hf_moe` and saved with ``save_pretrained(path)``,
    with its weights.

    Reads config.json, builds ``model_class`` (default: the class named in ``config.architectures``) from it,
    replays the recorded conversions (same modules, experts, top-k and MoE arguments, capacity included), then loads
    the saved weights (safetensors, sharded or not, or pytorch_model.bin) strictly: every parameter and buffer must
    be in the files except those tied to one that is (a tied output head). ``dtype``: default the saved weights'.
    Returns the model in eval mode, as transformers does. ``AutoModel*.from_pretrained(path)`` would instead return
    the dense model with freshly initialised MLPs. A conversion made with an ``adapter`` needs the same ``adapter``.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"torch_moe.convert.from_pretrained: {path} holds no torch_moe conversion record (config "
                         f"key {CONFIG_KEY!r}, format {RECORD_FORMAT}); was it saved after moefy or from_hf_moe? For "
                         "an unconverted model use transformers' from_pretrained")
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if len(names) != 1 or not hasattr(transformers, names[0]):
            raise ValueError(f"torch_moe.convert.from_pretrained: cannot tell the model class from "
                             f"config.architectures={names!r}; pass model_class=")
        model_class = getattr(transformers, names[0])
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    state = _load_saved_state(path)
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = model_class(config).to(dtype)
    setattr(model.config, CONFIG_KEY, None)  # each replayed conversion is recorded again
    mismatch = (f"torch_moe.convert.from_pretrained: replaying the conversions of {path} on a fresh "
                f"{model_class.__name__} did not convert the same modules; was model_class the saved one?")
    for conversion in record["conversions"]:
        modules = set(conversion["modules"])
        if conversion.get("adapter") and adapter is None:
            raise ValueError(f"torch_moe.convert.from_pretrained: {path} was converted with an adapter; pass the "
                             "same adapter= to rebuild it")
        try:
            with warnings.catch_warnings():  # the warnings were given when the model was converted
                warnings.simplefilter("ignore")
                if conversion.get("method", "moefy") == "from_hf_moe":
                    from_hf_moe(model, select=modules, **conversion["overrides"])
                else:
                    moefy(model, conversion["num_experts"], conversion["top_k"],
                          select=lambda name, _: name in modules, adapter=adapter if conversion.get("adapter") else None,
                          **conversion["moe_kwargs"])
        except (ValueError, NotImplementedError) as err:
            raise ValueError(f"{mismatch} ({err})") from None
    if getattr(model.config, CONFIG_KEY) != record:
        raise ValueError(mismatch)
    _load_strict(model, _as_loaded_by_transformers(model, state), path)
    return model.eval()


def _as_loaded_by_transformers(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The saved keys under the names transformers' loader would give them. save_pretrained writes some families
    under legacy names (Mixtral's ``mlp`` as ``block_sparse_moe``), which its loader renames back; the converted
    layers' keys went through the same renaming on the way out."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # a transformers without checkpoint conversion mappings saves under the module names
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return {apply_renamings(key, renamings): value for key, value in state.items()} if renamings else state


def _load_saved_state(path) -> dict[str, Tensor]:
    import json
    import os

    from safetensors.torch import load_file

    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"torch_moe.convert.from_pretrained: no model.safetensors, model.safetensors.index.json "
                            f"or pytorch_model.bin in {path}")


def _load_strict(model: nn.Module, state: dict[str, Tensor], path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    loaded = {id(tensors[key]) for key in state if key in tensors}
    # Non-persistent buffers are never saved; tied parameters are saved once under another name.
    persistent = set(model.state_dict().keys())
    untied = [key for key in missing if key in persistent and id(tensors.get(key)) not in loaded]
    if untied or unexpected:
        raise ValueError(f"torch_moe.convert.from_pretrained: the weights in {path} do not fit the rebuilt model: "
                         f"missing {untied[:8]}, unexpected {unexpected[:8]}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("moefy: the model itself is an FFN; wrap it in a parent module (or call MoE directly)")
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def _build_moe(name: str, module: Optional[nn.Module], dense: DenseFFN, num_experts: int, top_k: int, upcycle: bool,
               upcycle_noise: float, moe_kwargs: dict, generator: Optional[torch.Generator],
               drop_upcycling_ratio: float = 0.0) -> MoE:
    d_model, d_ff = dense.w1.shape
    for label, tensor, shape in (("w2", dense.w2, (d_ff, d_model)), ("w3", dense.w3, (d_model, d_ff)),
                                 ("b1", dense.b1, (d_ff,)), ("b2", dense.b2, (d_model,)), ("b3", dense.b3, (d_ff,))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"moefy: the FFN {name!r} has w1 of shape {tuple(dense.w1.shape)} = [d_model, d_ff], so "
                             f"{label} must have shape {list(shape)}, got {tuple(tensor.shape)}")
    layout, scale = _expert_layout(name, dense, module)
    derived = {"d_ff": d_ff, **layout}
    kwargs = dict(moe_kwargs)
    for key, value in derived.items():
        if key in kwargs and kwargs[key] != value and upcycle:
            raise ValueError(f"moefy: upcycle=True copies the dense FFN {name!r}, whose {key} is {value!r}; "
                             f"{key}={kwargs[key]!r} cannot hold it")
        kwargs.setdefault(key, value)
    d_ff = kwargs.pop("d_ff")
    moe = MoE(d_model, d_ff, num_experts, top_k, device=dense.w1.device, dtype=dense.w1.dtype, **kwargs)
    if upcycle:
        if scale != 1.0:
            with torch.no_grad():
                dense = replace(dense, w1=dense.w1 * scale, w2=dense.w2 / scale,
                                b1=dense.b1 * scale if dense.b1 is not None else None)
        _upcycle_(moe, dense, upcycle_noise, generator)
        if drop_upcycling_ratio > 0:
            _drop_upcycle_(moe, dense, drop_upcycling_ratio, generator)
    return moe


@torch.no_grad()
def _upcycle_(moe: MoE, dense: DenseFFN, noise: float, generator: torch.Generator) -> None:
    """Every expert a copy of ``dense``; with expert_granularity g, copy c is the g fine-grained experts c·g + s
    holding the dense hidden units [s·d_ff/g, (s+1)·d_ff/g) and b2 / g (see :func:`moefy`)."""
    experts = moe.experts
    g = moe.expert_granularity
    copies = moe.num_experts // g

    def sliced(name: str, source: Optional[Tensor]) -> Optional[Tensor]:
        """The dense tensor as the [g, ...] stack of its slices, in the experts' layout."""
        if source is None or g == 1:
            return source if source is None else source.detach().unsqueeze(0)
        source = source.detach()
        if name in ("w1", "w3"):  # [d_model, d_ff] -> [g, d_model, d_ff / g]
            return source.unflatten(1, (g, -1)).transpose(0, 1)
        if name in ("w2", "b1", "b3"):  # [d_ff, ...] -> [g, d_ff / g, ...]
            return source.unflatten(0, (g, -1))
        return (source / g).unsqueeze(0).expand(g, *source.shape)  # b2: added once per slice

    pairs = [("w1", experts.w1, dense.w1), ("w2", experts.w2, dense.w2), ("w3", experts.w3, dense.w3),
             ("b1", experts.b1, dense.b1), ("b2", experts.b2, dense.b2), ("b3", experts.b3, dense.b3)]
    for name, target, source in pairs:
        if target is None:
            continue
        if source is None:  # e.g. a Linear without bias beside one with: that bias is zero
            target.zero_()
            continue
        target.copy_(sliced(name, source).repeat(copies, *([1] * source.dim())))
        if noise > 0:
            jitter = torch.randn(target.shape, generator=generator, dtype=torch.float32)
            target.mul_((1.0 + noise * jitter).to(device=target.device, dtype=target.dtype))
    weight = getattr(moe.router, "weight", None)
    if not isinstance(weight, Tensor):  # a router without parameters (hash) has nothing to initialise
        return
    rows = torch.randn((copies, weight.shape[1]), generator=generator, dtype=torch.float32).mul_(UPCYCLE_ROUTER_STD)
    # The g slices of a copy share its row: equal logits, so a token takes all of them or none.
    weight.copy_(rows.repeat_interleave(g, dim=0).to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def _drop_upcycle_(moe: MoE, dense: DenseFFN, ratio: float, generator: torch.Generator) -> None:
    """Drop-Upcycling's diversity re-initialisation (Nakamura et al. 2025): each expert redraws its own random
    round(ratio · d_ff) hidden units from the dense weights' statistics (see :func:`moefy`)."""
    experts = moe.experts
    num_experts, d_ff = experts.w1.shape[0], experts.w1.shape[2]
    count = round(ratio * d_ff)
    if count == 0:
        return

    def stats(tensor: Optional[Tensor]) -> tuple[float, float]:
        if tensor is None:
            return 0.0, 0.0
        values = tensor.detach().to(torch.float64)
        return float(values.mean()), float(values.std(correction=0))

    statistics = {name: stats(getattr(dense, name)) for name in ("w1", "w2", "w3", "b1", "b3")}
    for e in range(num_experts):
        units = torch.randperm(d_ff, generator=generator)[:count].to(experts.w1.device)
        for name in ("w1", "w3", "w2", "b1", "b3"):
            target = getattr(experts, name)
            if target is None:
                continue
            mean, std = statistics[name]
            if name in ("w1", "w3"):  # columns: [d_model, count]
                shape = (target.shape[1], count)
            elif name == "w2":  # rows: [count, d_model]
                shape = (count, target.shape[2])
            else:
                shape = (count,)
            draw = torch.randn(shape, generator=generator, dtype=torch.float32).double().mul_(std).add_(mean)
            draw = draw.to(device=target.device, dtype=target.dtype)
            if name in ("w1", "w3"):
                target[e][:, units] = draw
            else:
                target[e][units] = draw
