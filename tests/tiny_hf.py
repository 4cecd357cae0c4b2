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


# --------------------------------------------------------------------------------------------------
# one tiny model per architecture that moefy knows (tests/test_convert_architectures.py)

IMAGE, PATCH, MEL_BINS, AUDIO_FRAMES = 8, 4, 8, 16


def _text(transformers, name: str, layers: int):
    """(config class, model class, config kwargs) of a decoder-only or encoder-only text model."""
    t = transformers
    llama_like = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=0, eos_token_id=0)
    bert_like = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                     num_attention_heads=2, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    gemma = dict(llama_like, head_dim=8)
    table = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, llama_like),
        "llama_mlp_bias": (t.LlamaConfig, t.LlamaForCausalLM, dict(llama_like, mlp_bias=True)),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, llama_like),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, llama_like),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(llama_like, head_dim=8)),
        "smollm3": (t.SmolLM3Config, t.SmolLM3ForCausalLM, llama_like),
        "granite": (t.GraniteConfig, t.GraniteForCausalLM, llama_like),
        "olmo2": (t.Olmo2Config, t.Olmo2ForCausalLM, llama_like),
        "stablelm": (t.StableLmConfig, t.StableLmForCausalLM, dict(llama_like, hidden_dropout=0.0)),
        "cohere": (t.CohereConfig, t.CohereForCausalLM, llama_like),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, dict(llama_like, resid_pdrop=0.0, embd_pdrop=0.0)),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, gemma),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, gemma),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, dict(gemma, sliding_window=8)),
        "gpt2": (t.GPT2Config, t.GPT2LMHeadModel,
                 dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=layers, n_head=2, n_positions=64,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
        "bert": (t.BertConfig, t.BertForMaskedLM, bert_like),
        "roberta": (t.RobertaConfig, t.RobertaForMaskedLM, dict(bert_like, pad_token_id=1, max_position_embeddings=70)),
        "gpt_neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM,
                     dict(llama_like, num_key_value_heads=None, hidden_dropout=0.0, attention_dropout=0.0)),
        "falcon": (t.FalconConfig, t.FalconForCausalLM,
                   dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=INTERMEDIATE, num_hidden_layers=layers,
                        num_attention_heads=2, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
                        eos_token_id=0)),
        "bloom": (t.BloomConfig, t.BloomForCausalLM,
                  dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=layers, n_head=2, hidden_dropout=0.0,
                       attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        "phi": (t.PhiConfig, t.PhiForCausalLM, dict(llama_like, num_key_value_heads=None, resid_pdrop=0.0,
                                                    embd_pdrop=0.0, attention_dropout=0.0)),
        "gptj": (t.GPTJConfig, t.GPTJForCausalLM,
                 dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=layers, n_head=2, rotary_dim=4,
                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0)),
        "modernbert": (t.ModernBertConfig, t.ModernBertForMaskedLM,
                       dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0,
                            global_attn_every_n_layers=2, local_attention=8)),
        "distilbert": (t.DistilBertConfig, t.DistilBertForMaskedLM,
                       dict(vocab_size=VOCAB, dim=HIDDEN, hidden_dim=INTERMEDIATE, n_layers=layers, n_heads=2,
                            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0)),
        "opt": (t.OPTConfig, t.OPTForCausalLM,
                dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=layers,
                     num_attention_heads=2, word_embed_proj_dim=HIDDEN, max_position_embeddings=64, dropout=0.0,
                     attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=0)),
    }
    return table[name]


def make_arch(name: str, dtype=torch.float64, seed: int = 0, layers: int = 2):
    """A tiny model of architecture ``name`` (a key of tests/test_convert_architectures.py's table) in eval mode."""
    import transformers as t

    torch.manual_seed(seed)
    if name in ("t5", "t5_gated"):
        config = t.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_ff=INTERMEDIATE, d_kv=8, num_layers=layers,
                            num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                            feed_forward_proj="gated-gelu" if name == "t5_gated" else "relu")
        model = t.T5ForConditionalGeneration(config)
    elif name == "whisper":
        config = t.WhisperConfig(vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=HIDDEN, encoder_layers=layers,
                                 decoder_layers=layers, encoder_attention_heads=2, decoder_attention_heads=2,
                                 encoder_ffn_dim=INTERMEDIATE, decoder_ffn_dim=INTERMEDIATE,
                                 max_source_positions=AUDIO_FRAMES // 2, max_target_positions=32, pad_token_id=0,
                                 bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, suppress_tokens=[],
                                 begin_suppress_tokens=[], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        model = t.WhisperForConditionalGeneration(config)
    elif name == "vit":
        config = t.ViTConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                             num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
        model = t.ViTModel(config, add_pooling_layer=False)
    elif name == "clip":
        text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                    num_attention_heads=2, max_position_embeddings=64, projection_dim=8, pad_token_id=0,
                    bos_token_id=0, eos_token_id=1)
        vision = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, projection_dim=8)
        model = t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    else:
        config_class, model_class, kwargs = _text(t, name, layers)
        model = model_class(config_class(**kwargs))
    model.config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config", "encoder", "decoder"):
        sub_config = getattr(model.config, sub, None)
        if hasattr(sub_config, "_attn_implementation"):
            sub_config._attn_implementation = "eager"
    return model.to(dtype).eval()


def arch_inputs(name: str, batch: int = 2, seq: int = 7, dtype=torch.float64, seed: int = 1) -> dict:
    """Keyword inputs of ``make_arch(name)``'s forward."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g, dtype=dtype)}
    if name == "clip":
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g, dtype=dtype)}
    if name == "whisper":
        return {"input_features": torch.randn(batch, MEL_BINS, AUDIO_FRAMES, generator=g, dtype=dtype),
                "decoder_input_ids": ids}
    if name in ("t5", "t5_gated"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def arch_output(model, name: str, inputs: dict) -> torch.Tensor:
    """The tensor compared before and after conversion: logits, or the last hidden state of an encoder, as one
    flat tensor (CLIP: both embeddings)."""
    out = model(**inputs)
    if name == "vit":
        return out.last_hidden_state
    if name == "clip":
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.logits


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def make_moe_family(name: str, dtype=torch.float32, seed: int = 0, layers: int = 2):
    """A tiny Hugging Face MoE model (its MoE blocks must be left alone by moefy). DeepSeek-V3's first layer is a
    dense MLP (first_k_dense_replace=1); Qwen2-MoE's blocks have a shared expert, DeepSeek-V3's shared experts."""
    import transformers as t

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=0, eos_token_id=0)
    if name == "mixtral":
        model = t.MixtralForCausalLM(t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    elif name == "qwen2_moe":
        model = t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                                       shared_expert_intermediate_size=16, **common))
    elif name == "qwen3_moe":
        model = t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                                       head_dim=8, **common))
    elif name == "olmoe":
        model = t.OlmoeForCausalLM(t.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common))
    elif name == "deepseek_v3":
        config = t.DeepseekV3Config(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                    kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                    v_head_dim=8, **{**common, "num_key_value_heads": 2})
        model = t.DeepseekV3ForCausalLM(config)
    else:
        raise ValueError(name)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()
