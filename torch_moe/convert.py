"""moefy: turn the dense FFNs of an existing model (Hugging Face or plain PyTorch) into MoE layers, in place."""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import MoE

__all__ = ["moefy", "from_pretrained", "MoEFeedForward", "padding_mask", "UPCYCLE_ROUTER_STD", "CONFIG_KEY"]

# The key under which moefy records its conversions in a Hugging Face model's config (and so in config.json).
CONFIG_KEY = "torch_moe"
_RECORD_FORMAT = 1

# Standard deviation of the router weights of an upcycled layer: small, so that the router starts near uniform
# and learns from the data, but not zero, so that tokens do not all pick experts 0..k-1 (ties go to the lower id).
UPCYCLE_ROUTER_STD = 0.02

Select = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]


class MoEFeedForward(nn.Module):
    """A MoE layer in the place of a dense FFN, keeping the FFN's calling convention.

    ``forward(hidden_states [..., d_model]) -> [..., d_model]``: the MoE output, then the FFN's trailing dropout if
    it had one. The padding mask comes from outside, because an FFN is not given the attention mask: the forward
    pre-hook that :func:`moefy` puts on a converted model whose forward takes ``attention_mask`` stores the mask of
    each call on every ``MoEFeedForward`` inside it; ``padding_mask`` (set by the :func:`padding_mask` context
    manager) takes precedence over it. A mask [B, S_total] meets hidden states [B, S] by its last S columns
    (decoding with a KV cache); any other shape raises ValueError. The hook also stores the call's ``input_ids``,
    which a MoE with ``router="hash"`` takes as its ``token_ids``.
    """

    def __init__(self, moe: MoE, dropout: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.padding_mask: Optional[Tensor] = None
        # Set by the model's forward pre-hook; kept until the next call of the model so that activation
        # checkpointing recomputes with the mask of its forward.
        self.attention_mask: Optional[Tensor] = None
        self.token_ids: Optional[Tensor] = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        mask = self.padding_mask if self.padding_mask is not None else self.attention_mask
        if mask is not None:
            mask = _fit_to_tokens(mask, hidden_states, "padding mask")
            mask = mask if mask.dtype == torch.bool else mask != 0
        if getattr(self.moe, "router_name", None) == "hash" and self.token_ids is not None:
            token_ids = _fit_to_tokens(self.token_ids, hidden_states, "input_ids")
            return self.dropout(self.moe(hidden_states, padding_mask=mask, token_ids=token_ids))
        return self.dropout(self.moe(hidden_states, padding_mask=mask))


def _fit_to_tokens(values: Tensor, hidden_states: Tensor, what: str) -> Tensor:
    """values [..., S_total] -> [..., S], the last S positions (the new ones when decoding with a KV cache)."""
    lead_shape = hidden_states.shape[:-1]
    if values.dim() == len(lead_shape) and values.shape[:-1] == lead_shape[:-1] and values.shape[-1] >= lead_shape[-1]:
        if values.shape[-1] != lead_shape[-1]:
            values = values[..., values.shape[-1] - lead_shape[-1]:]
        return values
    raise ValueError(
        f"MoEFeedForward: the stored {what} of shape {tuple(values.shape)} does not fit hidden states of shape "
        f"{tuple(hidden_states.shape)}: it must be [..., S_total] with the hidden states' leading dims and "
        f"S_total >= S (FFN chunking along the sequence is not supported with a {what})"
    )


def _ffn_modules(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@contextmanager
def padding_mask(model: nn.Module, mask: Optional[Tensor]) -> Iterator[None]:
    """Give every converted FFN in ``model`` the padding mask ``mask`` ([B, S], True or nonzero = real token)
    for the duration of the block; for models whose forward takes no ``attention_mask`` argument."""
    ffns = _ffn_modules(model)
    previous = [f.padding_mask for f in ffns]
    for f in ffns:
        f.padding_mask = mask
    try:
        yield
    finally:
        for f, old in zip(ffns, previous):
            f.padding_mask = old


def _attention_mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    position = getattr(module, "_torch_moe_attention_mask_position", None)
    if mask is None and position is not None and len(args) > position:
        mask = args[position]
    if mask is not None and not isinstance(mask, Tensor):
        mask = None
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"torch_moe: the attention_mask given to {type(module).__name__} has shape {tuple(mask.shape)}; the MoE "
            "layers take a 2-D [batch, sequence] mask (1 = token, 0 = padding). Pass a 2-D mask, or call the model "
            "inside torch_moe.convert.padding_mask(model, mask)"
        )
    token_ids = kwargs.get("input_ids")
    ids_position = getattr(module, "_torch_moe_input_ids_position", None)
    if token_ids is None and ids_position is not None and len(args) > ids_position:
        token_ids = args[ids_position]
    if not isinstance(token_ids, Tensor):
        token_ids = None
    for ffn in _ffn_modules(module):
        ffn.attention_mask = mask
        ffn.token_ids = token_ids


def _install_attention_mask_hook(model: nn.Module) -> bool:
    """Install the hook when ``model.forward`` takes ``attention_mask`` (or ``**kwargs``); says whether it is on."""
    if getattr(model, "_torch_moe_attention_mask_hook", False):
        return True
    position, ids_position, accepted = None, None, False
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for i, p in enumerate(params):
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if p.kind == p.VAR_KEYWORD or p.name == "attention_mask":
            accepted = True
        if p.name == "attention_mask" and positional:
            position = i
        if p.name == "input_ids" and positional:
            ids_position = i
    if not accepted:
        return False
    model._torch_moe_input_ids_position = ids_position
    model._torch_moe_attention_mask_position = position
    model._torch_moe_attention_mask_hook = True
    model.register_forward_pre_hook(_attention_mask_pre_hook, with_kwargs=True)
    return True


# --------------------------------------------------------------------------------------------------
# recognising dense FFNs


@dataclass
class _DenseFFN:
    """A dense FFN found in the model, as the matrices of the MoE experts' layout (x · w)."""

    kind: str  # "gated", "gpt2", "bert", "sequential"
    activation: Callable[[Tensor], Tensor]
    w1: Tensor  # [d_model, d_ff]
    w2: Tensor  # [d_ff, d_model]
    w3: Optional[Tensor] = None  # [d_model, d_ff], gated only
    b1: Optional[Tensor] = None  # [d_ff]
    b2: Optional[Tensor] = None  # [d_model]
    dropout: Optional[nn.Module] = None  # applied to the FFN output inside the replacement


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x · weight + bias with weight [in, out]; recognised by shape so that
    # transformers need not be imported.
    return (isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), Tensor)
            and m.weight.dim() == 2 and isinstance(getattr(m, "bias", None), Tensor))


def _match_gated(m: nn.Module) -> Optional[_DenseFFN]:
    """Llama / Mistral / Qwen2: down(act(gate(x)) * up(x))."""
    gate, up, down = (getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(m, "act_fn", None)
    if not (_is_linear(gate) and _is_linear(up) and _is_linear(down) and callable(act)):
        return None
    if up.bias is not None:
        raise ValueError(f"moefy: {type(m).__name__} has a bias on up_proj, which the gated experts cannot hold")
    return _DenseFFN("gated", act, w1=gate.weight.t(), w3=up.weight.t(), w2=down.weight.t(), b1=gate.bias,
                     b2=down.bias)


def _match_gpt2(m: nn.Module) -> Optional[_DenseFFN]:
    """GPT-2: dropout(c_proj(act(c_fc(x)))) with Conv1D (weights already [in, out])."""
    c_fc, c_proj, act = getattr(m, "c_fc", None), getattr(m, "c_proj", None), getattr(m, "act", None)
    if not (_is_conv1d(c_fc) and _is_conv1d(c_proj) and callable(act)):
        return None
    dropout = getattr(m, "dropout", None)
    return _DenseFFN("gpt2", act, w1=c_fc.weight, w2=c_proj.weight, b1=c_fc.bias, b2=c_proj.bias,
                     dropout=dropout if isinstance(dropout, nn.Module) else None)


def _is_bert_intermediate(m) -> bool:
    return isinstance(m, nn.Module) and _is_linear(getattr(m, "dense", None)) and callable(
        getattr(m, "intermediate_act_fn", None))


def _is_bert_output(m) -> bool:
    return (isinstance(m, nn.Module) and _is_linear(getattr(m, "dense", None))
            and isinstance(getattr(m, "LayerNorm", None), nn.Module))


def _match_bert(m: nn.Module) -> Optional[_DenseFFN]:
    """BERT / RoBERTa-style layer: output.LayerNorm(output.dropout(output.dense(act(intermediate.dense(x)))) + x).

    The pair becomes: ``intermediate`` -> the MoE (d_model -> d_model), ``output.dense`` -> Identity, so the
    output's dropout, residual and LayerNorm stay where they were (and keep their state_dict names).
    """
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if not (_is_bert_intermediate(inter) and _is_bert_output(out)):
        return None
    return _DenseFFN("bert", inter.intermediate_act_fn, w1=inter.dense.weight.t(), w2=out.dense.weight.t(),
                     b1=inter.dense.bias, b2=out.dense.bias)


def _match_sequential(m: nn.Module) -> Optional[_DenseFFN]:
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
    return _DenseFFN("sequential", act, w1=first.weight.t(), w2=second.weight.t(), b1=first.bias, b2=second.bias,
                     dropout=rest[0] if rest else None)


_MATCHERS = (_match_gated, _match_gpt2, _match_bert, _match_sequential)
_LOOKED_FOR = (
    "Llama/Mistral/Qwen2-style MLPs (gate_proj, up_proj, down_proj, act_fn), GPT-2 MLPs (c_fc, c_proj as Conv1D, "
    "act), BERT-style layers (intermediate.dense + intermediate_act_fn, output.dense + output.LayerNorm), and "
    "with select, nn.Sequential(Linear, activation, [Dropout], Linear, [Dropout])"
)


def _match(m: nn.Module) -> Optional[_DenseFFN]:
    for matcher in _MATCHERS:
        found = matcher(m)
        if found is not None:
            return found
    return None


def _activation_name(act: Callable[[Tensor], Tensor], gated: bool) -> str:
    """Identify an activation by its values (works for torch, Hugging Face and user activations alike)."""
    probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    candidates = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
        "relu": F.relu,
    }
    allowed = "silu (SwiGLU) or exact gelu (GeGLU)" if gated else "gelu (exact), gelu_tanh (gelu_new), relu or silu"
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
                if gated and name not in ("silu", "gelu"):
                    break
                return name
    raise ValueError(f"moefy: the FFN's activation {act!r} is not one the MoE experts have: expected {allowed}")


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


def _find(model: nn.Module, select) -> tuple[list[tuple[str, nn.Module, _DenseFFN]], list[str]]:
    """Top-down walk; a converted module is not searched further. Returns the FFNs found and the names that
    ``select`` matched without being an FFN (for the error message when nothing is found)."""
    found: list[tuple[str, nn.Module, _DenseFFN]] = []
    selected_other: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if isinstance(module, (MoE, MoEFeedForward)):
            return
        chosen = select is None or select(name, module)
        if chosen:
            dense = _match(module)
            if dense is not None and (select is not None or dense.kind != "sequential"):
                found.append((name, module, dense))
                return
            if select is not None:
                selected_other.append(name)
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found, selected_other


def moefy(
    model: nn.Module,
    num_experts: int,
    top_k: int = 2,
    *,
    upcycle: bool = False,
    select: Optional[Select] = None,
    upcycle_noise: float = 0.0,
    **moe_kwargs,
) -> nn.Module:
    """Replace the dense FFNs of ``model`` by :class:`~torch_moe.MoE` layers, in place; returns ``model``.

    Recognised without configuration: Hugging Face Llama / Mistral / Qwen2-style MLPs (``gate_proj``, ``up_proj``,
    ``down_proj``, ``act_fn``: SwiGLU or GeGLU experts), GPT-2 MLPs (``Conv1D`` ``c_fc`` / ``c_proj``; ``gelu_new``
    becomes ``activation="gelu_tanh"``; the MLP's dropout is kept) and BERT-style layers (``intermediate`` +
    ``output``: ``intermediate`` becomes the MoE and ``output.dense`` an Identity, so the output's dropout, residual
    and LayerNorm still apply). ``select`` restricts conversion to the modules whose dotted name matches a glob
    pattern (``"layers.*.mlp"``; an ``re.Pattern`` must match the whole name) or for which ``select(name, module)``
    is true; selected modules may also be ``nn.Sequential(Linear, act, [Dropout], Linear, [Dropout])``.
    The activation is identified by its values (silu, exact gelu, tanh gelu, relu); others raise ValueError.

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
    Raises ValueError when no FFN is found, naming what was looked for.

    Saving: on a Hugging Face model (one with a ``config``), the conversion is recorded in ``model.config`` under
    ``"torch_moe"`` (the converted module names, ``num_experts``, ``top_k`` and the MoE arguments), so that
    ``save_pretrained`` writes it to config.json and :func:`from_pretrained` rebuilds the converted model.
    ``AutoModel*.from_pretrained`` alone does not know it and returns the dense model with fresh MLPs.
    """
    for arg, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"moefy: {arg} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"moefy: top_k must be <= num_experts={num_experts}, got {top_k}")
    if not (isinstance(upcycle_noise, (int, float)) and upcycle_noise >= 0):
        raise ValueError(f"moefy: upcycle_noise must be a float >= 0, got {upcycle_noise!r}")
    if upcycle_noise > 0 and not upcycle:
        raise ValueError("moefy: upcycle_noise is only used with upcycle=True")
    for arg in ("device", "dtype"):
        if arg in moe_kwargs:
            raise ValueError(f"moefy: {arg} is taken from the dense FFN being replaced; do not pass it")
    if upcycle:
        for arg, neutral in (("num_shared_experts", 0), ("expert_granularity", 1)):
            if moe_kwargs.get(arg, neutral) != neutral:
                raise ValueError(f"moefy: upcycle=True copies the dense FFN into each routed expert and does not "
                                 f"support {arg}={moe_kwargs[arg]!r}")
        moe_kwargs.setdefault("capacity_factor", None)
        moe_kwargs.setdefault("normalize_weights", True)

    targets, selected_other = _find(model, _selector(select))
    if not targets:
        if select is None:
            raise ValueError(f"moefy: found no FFN to convert in {type(model).__name__}; it looks for {_LOOKED_FOR}. "
                             "Pass select= to name the FFN modules of other models")
        matched = (f"select matched {selected_other[:5]}{' ...' if len(selected_other) > 5 else ''}, none of them"
                   if selected_other else "select matched no module; it is tried on dotted names such as "
                   f"{[n for n, _ in model.named_modules() if n][:3]}, and")
        raise ValueError(f"moefy: found no FFN to convert in {type(model).__name__}: {matched} an FFN moefy "
                         f"recognises; it looks for {_LOOKED_FOR}")

    record = _conversion_record(model, targets, num_experts, top_k, moe_kwargs)
    generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63)) if upcycle else None
    for name, module, dense in targets:
        moe = _build_moe(name, dense, num_experts, top_k, upcycle, upcycle_noise, moe_kwargs, generator)
        if dense.kind == "bert":
            module.intermediate = MoEFeedForward(moe)
            module.output.dense = nn.Identity()
        else:
            _replace(model, name, MoEFeedForward(moe, dense.dropout))
    _install_attention_mask_hook(model)
    if record is not None:
        config = model.config
        previous = getattr(config, CONFIG_KEY, None) or {"format": _RECORD_FORMAT, "conversions": []}
        setattr(config, CONFIG_KEY, {**previous, "conversions": [*previous["conversions"], record]})
    return model


def _conversion_record(model: nn.Module, targets, num_experts: int, top_k: int, moe_kwargs: dict) -> Optional[dict]:
    """What :func:`from_pretrained` needs to redo this conversion on a fresh model; None for a model without an HF
    config. Refuses arguments config.json cannot hold rather than saving a model that would not reload."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    for key, value in moe_kwargs.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"moefy: {key}={value!r} cannot be recorded in {type(model).__name__}.config (config.json "
                             "holds numbers, strings and None); build the MoE layers by hand for this model")
    return {"modules": [name for name, _, _ in targets], "num_experts": num_experts, "top_k": top_k,
            "moe_kwargs": dict(moe_kwargs)}


def from_pretrained(path, model_class=None, *, dtype: Optional[torch.dtype] = None,
                    attn_implementation: Optional[str] = None) -> nn.Module:
    """Rebuild a model converted by :func:`moefy` and saved with ``save_pretrained(path)``, with its weights.

    Reads config.json, builds ``model_class`` (default: the class named in ``config.architectures``) from it,
    replays the recorded conversions (same modules, experts, top-k and MoE arguments, capacity included), then loads
    the saved weights (safetensors, sharded or not, or pytorch_model.bin) strictly: every parameter and buffer must
    be in the files except those tied to one that is (a tied output head). ``dtype``: default the saved weights'.
    Returns the model in eval mode, as transformers does. ``AutoModel*.from_pretrained(path)`` would instead return
    the dense model with freshly initialised MLPs.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
        raise ValueError(f"torch_moe.convert.from_pretrained: {path} holds no torch_moe conversion record (config "
                         f"key {CONFIG_KEY!r}, format {_RECORD_FORMAT}); was it saved after moefy? For an unconverted "
                         "model use transformers' from_pretrained")
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
    setattr(model.config, CONFIG_KEY, None)  # moefy records each replayed conversion again
    mismatch = (f"torch_moe.convert.from_pretrained: replaying the conversions of {path} on a fresh "
                f"{model_class.__name__} did not convert the same modules; was model_class the saved one?")
    for conversion in record["conversions"]:
        modules = set(conversion["modules"])
        try:
            moefy(model, conversion["num_experts"], conversion["top_k"], select=lambda name, _: name in modules,
                  **conversion["moe_kwargs"])
        except ValueError as err:
            raise ValueError(f"{mismatch} ({err})") from None
    if getattr(model.config, CONFIG_KEY) != record:
        raise ValueError(mismatch)
    _load_strict(model, state, path)
    return model.eval()


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


def _build_moe(name: str, dense: _DenseFFN, num_experts: int, top_k: int, upcycle: bool, upcycle_noise: float,
               moe_kwargs: dict, generator: Optional[torch.Generator]) -> MoE:
    d_model, d_ff = dense.w1.shape
    gated = dense.kind == "gated"
    act_name = _activation_name(dense.activation, gated)
    derived = {
        "d_ff": d_ff,
        "expert": ({"silu": "swiglu", "gelu": "geglu"}[act_name]) if gated else "mlp",
        "bias": dense.b1 is not None or dense.b2 is not None,
    }
    if not gated:
        derived["activation"] = act_name
    kwargs = dict(moe_kwargs)
    for key, value in derived.items():
        if key in kwargs and kwargs[key] != value and upcycle:
            raise ValueError(f"moefy: upcycle=True copies the dense FFN {name!r}, whose {key} is {value!r}; "
                             f"{key}={kwargs[key]!r} cannot hold it")
        kwargs.setdefault(key, value)
    d_ff = kwargs.pop("d_ff")
    moe = MoE(d_model, d_ff, num_experts, top_k, device=dense.w1.device, dtype=dense.w1.dtype, **kwargs)
    if upcycle:
        _upcycle_(moe, dense, upcycle_noise, generator)
    return moe


@torch.no_grad()
def _upcycle_(moe: MoE, dense: _DenseFFN, noise: float, generator: torch.Generator) -> None:
    experts = moe.experts
    pairs = [(experts.w1, dense.w1), (experts.w2, dense.w2), (experts.w3, dense.w3), (experts.b1, dense.b1),
             (experts.b2, dense.b2)]
    for target, source in pairs:
        if target is None:
            continue
        if source is None:  # e.g. a Linear without bias beside one with: that bias is zero
            target.zero_()
            continue
        target.copy_(source.detach().unsqueeze(0).expand_as(target))
        if noise > 0:
            jitter = torch.randn(target.shape, generator=generator, dtype=torch.float32)
            target.mul_((1.0 + noise * jitter).to(device=target.device, dtype=target.dtype))
    weight = getattr(moe.router, "weight", None)
    if not isinstance(weight, Tensor):  # a router without parameters (hash) has nothing to initialise
        return
    weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float32).mul_(UPCYCLE_ROUTER_STD)
                 .to(device=weight.device, dtype=weight.dtype))
