"""Tiny Hugging Face models built from configs in-process (no downloads), shared by the conversion tests."""

from __future__ import annotations

import torch

VOCAB = 48
HIDDEN, INTERMEDIATE = 16, 32
FAMILIES = ("llama", "qwen2", "gpt2", "bert")


def make_model(family: str, dtype=torch.float64, seed: int = 0, layers: int = 2, **config_overrides):
    """A tiny model of ``family`` in eval mode with float ``dtype``; attention in eager mode, no dropout.

    Every model's forward takes ``input_ids``, ``attention_mask`` and ``labels`` and returns ``logits``.
    """
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                  num_attention_heads=2, max_position_embeddings=64)
    if family == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=1, **common, **config_overrides)
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=1, **common, **config_overrides)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=layers,
                                         n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0, **config_overrides)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(**{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **common,
                                            **config_overrides})
        model = transformers.BertForMaskedLM(config)
    else:
        raise ValueError(family)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def input_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, mask=None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def lm_loss(model, ids, mask=None) -> torch.Tensor:
    """Cross-entropy of predicting ``ids`` (shifted for causal models, in place for BERT's MLM head)."""
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss
