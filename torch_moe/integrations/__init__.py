"""Adapters to other ecosystems; each submodule imports its ecosystem lazily (``torch_moe`` never needs them)."""
