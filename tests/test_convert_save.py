"""Save and reload of moefy-converted Hugging Face models: torch_moe.convert.from_pretrained rebuilds the converted
model from a save_pretrained directory and gives the saved model's outputs exactly, capacity mode included."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_hf
import torch_moe
from torch_moe.convert import CONFIG_KEY, from_pretrained, moefy

transformers = pytest.importorskip("transformers")


def _train_a_little(model, ids, mask):
    """One optimizer step, so the saved experts differ from one another and from any fresh init."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (tiny_hf.lm_loss(model, ids, mask) + torch_moe.aux_loss(model)).backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("family,kwargs", [
    ("llama", dict()),                                                # capacity 1.25: assignments really drop
    ("gpt2", dict(router="sigmoid", bias_update_rate=0.05)),          # tied output head; a state buffer
    ("bert", dict(capacity_factor=0.5, min_capacity=1, drop_policy="probability")),  # an encoder
])
def test_round_trip_gives_the_saved_outputs(tmp_path, family, kwargs):
    model = moefy(tiny_hf.make_model(family, dtype=torch.float32), 4, 2, **kwargs)
    ids = tiny_hf.input_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    model = _train_a_little(model, ids, mask)
    with torch.no_grad():
        expected = tiny_hf.logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert saved["conversions"][0]["num_experts"] == 4 and saved["conversions"][0]["modules"]

    again = from_pretrained(tmp_path, attn_implementation="eager")
    assert type(again) is type(model) and not again.training
    with torch.no_grad():
        got = tiny_hf.logits(again, ids, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    layers = [m for m in again.modules() if isinstance(m, torch_moe.MoE)]
    assert len(layers) == tiny_hf.num_layers(again)
    assert all(layer.capacity_factor == kwargs.get("capacity_factor", 1.25) for layer in layers)
    if family == "gpt2":
        assert again.lm_head.weight is again.transformer.wte.weight


def test_transformers_alone_returns_the_dense_model(tmp_path):
    """What the README warns about: AutoModel*.from_pretrained does not know the conversion."""
    model = moefy(tiny_hf.make_model("llama", dtype=torch.float32), 4, 2, capacity_factor=None)
    model.save_pretrained(tmp_path)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, torch_moe.MoE) for m in dense.modules())


def test_two_conversions_replay_in_order(tmp_path):
    model = tiny_hf.make_model("llama", dtype=torch.float32, layers=2)
    moefy(model, 4, 2, select="model.layers.0.mlp", capacity_factor=None)
    moefy(model, 8, 1, select="model.layers.1.mlp", capacity_factor=2.0, router="expert_choice")
    ids = tiny_hf.input_ids(1, 10)
    with torch.no_grad():
        expected = tiny_hf.logits(model, ids)
    model.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path, attn_implementation="eager")
    layers = [m for m in again.modules() if isinstance(m, torch_moe.MoE)]
    assert [(m.num_experts, m.router_name) for m in layers] == [(4, "softmax"), (8, "expert_choice")]
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(again, ids), expected, rtol=0, atol=0)


def test_errors(tmp_path):
    plain = tiny_hf.make_model("llama", dtype=torch.float32)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds no torch_moe conversion record"):
        from_pretrained(tmp_path / "plain")
    model = moefy(tiny_hf.make_model("llama", dtype=torch.float32), 4, 2)
    model.save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="did not convert the same modules"):
        from_pretrained(tmp_path / "moe", model_class=transformers.LlamaModel)
    with pytest.raises(ValueError, match="cannot be recorded"):
        moefy(tiny_hf.make_model("llama", dtype=torch.float32), 4, 2, expert_parallel_group=object())
