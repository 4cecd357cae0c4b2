"""Adapters to other ecosystems; each submodule imports its ecosystem lazily (``torch_moe`` never needs them).

hf: MoETrainer and attention-mask routing for moefy-converted models. hf_experts: the ``"torch_moe"`` experts
implementation of transformers (registered on import).
"""
