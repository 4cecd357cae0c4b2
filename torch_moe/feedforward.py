"""The drop-in FFN wrapper of a converted model (MoEFeedForward), how a model's attention mask and token ids reach
it (and every other :class:`ConvertedLayer`), and the conversion record saved in a Hugging Face config; shared by
moefy, from_hf_moe and molorafy."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .layer import MoE

__all__ = ["ConvertedLayer", "MoEFeedForward", "padding_mask", "CONFIG_KEY", "RECORD_FORMAT", "record_conversion"]

# The key under which conversions are recorded in a Hugging Face model's config (and so in config.json).
CONFIG_KEY = "torch_moe"
RECORD_FORMAT = 1


def record_conversion(model: nn.Module, entry: dict) -> None:
    """Append ``entry`` to the conversions recorded in ``model.config`` (a model without an HF config: nothing)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    previous = getattr(config, CONFIG_KEY, None) or {"format": RECORD_FORMAT, "conversions": []}
    setattr(config, CONFIG_KEY, {**previous, "conversions": [*previous["conversions"], entry]})


class ConvertedLayer(nn.Module):
    """What a conversion puts in a model (a :class:`MoEFeedForward`, a :class:`torch_moe.lora.MoLoRALinear`): a
    layer that routes tokens but is not given the model's attention mask by its caller.

    The forward pre-hook installed on a converted model whose forward takes ``attention_mask`` stores the mask of
    each call (and its ``input_ids``, for hash routing) on every ConvertedLayer inside it; ``padding_mask`` (set by
    the :func:`padding_mask` context manager) takes precedence over it. Conversions do not search inside one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.padding_mask: Optional[Tensor] = None
        # Set by the model's forward pre-hook; kept until the next call of the model so that activation
        # checkpointing recomputes with the mask of its forward.
        self.attention_mask: Optional[Tensor] = None
        self.token_ids: Optional[Tensor] = None

    def stored_padding_mask(self, hidden_states: Tensor) -> Optional[Tensor]:
        """The stored mask fitted to ``hidden_states`` [..., d] as a bool [...] (True = token), or None."""
        mask = self.padding_mask if self.padding_mask is not None else self.attention_mask
        if mask is None:
            return None
        mask = _fit_to_tokens(mask, hidden_states, "padding mask", type(self).__name__)
        return mask if mask.dtype == torch.bool else mask != 0

    def stored_token_ids(self, hidden_states: Tensor) -> Optional[Tensor]:
        """The stored ``input_ids`` fitted to ``hidden_states`` [..., d], or None."""
        return None if self.token_ids is None else _fit_to_tokens(self.token_ids, hidden_states, "input_ids",
                                                                 type(self).__name__)


class MoEFeedForward(ConvertedLayer):
    """A MoE layer in the place of a dense FFN, keeping the FFN's calling convention.

    ``forward(hidden_states [..., d_model]) -> [..., d_model]``: the MoE output, then the FFN's trailing dropout if
    it had one. The padding mask comes from outside, because an FFN is not given the attention mask: the forward
    pre-hook that :func:`moefy` puts on a converted model whose forward takes ``attention_mask`` stores the mask of
    each call on every ``MoEFeedForward`` inside it; ``padding_mask`` (set by the :func:`padding_mask` context
    manager) takes precedence over it. A mask [B, S_total] meets hidden states [B, S] by its last S columns
    (decoding with a KV cache), and hidden states flattened to [B*S, d] (OPT's layers) by the same columns
    flattened; any other shape raises ValueError. The hook also stores the call's ``input_ids``,
    which a MoE with ``router="hash"`` takes as its ``token_ids``.
    """

    def __init__(self, moe: MoE, dropout: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, hidden_states: Tensor) -> Tensor:
        mask = self.stored_padding_mask(hidden_states)
        if getattr(self.moe, "router_name", None) == "hash" and self.token_ids is not None:
            token_ids = self.stored_token_ids(hidden_states)
            return self.dropout(self.moe(hidden_states, padding_mask=mask, token_ids=token_ids))
        return self.dropout(self.moe(hidden_states, padding_mask=mask))


def _fit_to_tokens(values: Tensor, hidden_states: Tensor, what: str, who: str = "MoEFeedForward") -> Tensor:
    """values [..., S_total] -> [..., S], the last S positions (the new ones when decoding with a KV cache)."""
    lead_shape = hidden_states.shape[:-1]
    if values.dim() == len(lead_shape) and values.shape[:-1] == lead_shape[:-1] and values.shape[-1] >= lead_shape[-1]:
        if values.shape[-1] != lead_shape[-1]:
            values = values[..., values.shape[-1] - lead_shape[-1]:]
        return values
    if hidden_states.dim() == 2 and values.dim() == 2:
        # Tokens flattened to [B*S, d] by the layer (OPT): the last S columns of each row, row-major.
        batch, tokens = values.shape[0], hidden_states.shape[0]
        if batch > 0 and tokens % batch == 0 and tokens // batch <= values.shape[1]:
            return values[:, values.shape[1] - tokens // batch:].reshape(tokens)
    raise ValueError(
        f"{who}: the stored {what} of shape {tuple(values.shape)} does not fit hidden states of shape "
        f"{tuple(hidden_states.shape)}: it must be [..., S_total] with the hidden states' leading dims and "
        f"S_total >= S (FFN chunking along the sequence is not supported with a {what})"
    )


def _ffn_modules(model: nn.Module) -> list[ConvertedLayer]:
    return [m for m in model.modules() if isinstance(m, ConvertedLayer)]


@contextmanager
def padding_mask(model: nn.Module, mask: Optional[Tensor]) -> Iterator[None]:
    """Give every converted layer in ``model`` (MoE FFNs, MoLoRA linears) the padding mask ``mask`` ([B, S], True or
    nonzero = real token) for the duration of the block; for models whose forward takes no ``attention_mask``."""
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
    decoder_ffns = set()
    config = getattr(module, "config", None)
    if getattr(config, "is_encoder_decoder", False) and callable(getattr(module, "get_decoder", None)):
        # T5, Whisper: attention_mask / input_ids are the encoder's; the decoder's FFNs get decoder_attention_mask
        # and decoder_input_ids (None when not given: no mask rather than the encoder's).
        decoder_ffns = {id(f) for f in _ffn_modules(module.get_decoder())}
    decoder_mask, decoder_ids = kwargs.get("decoder_attention_mask"), kwargs.get("decoder_input_ids")
    decoder_mask = decoder_mask if isinstance(decoder_mask, Tensor) and decoder_mask.dim() == 2 else None
    decoder_ids = decoder_ids if isinstance(decoder_ids, Tensor) else None
    for ffn in _ffn_modules(module):
        in_decoder = id(ffn) in decoder_ffns
        ffn.attention_mask = decoder_mask if in_decoder else mask
        ffn.token_ids = decoder_ids if in_decoder else token_ids


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
