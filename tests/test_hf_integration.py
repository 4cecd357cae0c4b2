"""Tests of the Hugging Face integration: padding through whole models, generation, MoETrainer, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

pytest.importorskip("transformers")

import torch_moe  # noqa: E402
import tiny_hf  # noqa: E402
from torch_moe.convert import MoEFeedForward, moefy  # noqa: E402
from torch_moe.integrations.hf import MoETrainer, add_aux_loss, route_attention_mask  # noqa: E402

NUM_EXPERTS, TOP_K = 4, 2
STAT_FIELDS = ("tokens_per_expert", "dropped_fraction", "router_entropy", "load_balancing_loss", "z_loss")


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, torch_moe.MoE)]


def snapshot(model):
    return [(layer.aux_loss.detach().clone(), {f: getattr(layer.stats, f).clone() for f in STAT_FIELDS})
            for layer in moe_layers(model)]


# --------------------------------------------------------------------------------------------------
# padding exclusion through a whole model


# capacity_factor E / k makes C = T: nothing is dropped with or without the padding, so the padded run may
# only differ from the unpadded one if padding leaks into routing, losses or statistics.
@pytest.mark.parametrize("capacity_factor", [None, NUM_EXPERTS / TOP_K], ids=["dropless", "capacity"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_padding_is_left_out_of_outputs_losses_and_stats(family, capacity_factor):
    model = moefy(tiny_hf.make_model(family), NUM_EXPERTS, TOP_K, capacity_factor=capacity_factor, min_capacity=1)
    ids = tiny_hf.input_ids(2, 6)
    out = tiny_hf.logits(model, ids, torch.ones_like(ids))
    expected = snapshot(model)

    garbage = tiny_hf.input_ids(2, 3, seed=7)
    padded_ids = torch.cat([ids, garbage], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros_like(garbage)], dim=1)
    padded_out = tiny_hf.logits(model, padded_ids, mask)
    got = snapshot(model)

    assert_close(padded_out[:, :6], out, rtol=1e-12, atol=1e-12)
    assert len(got) == tiny_hf.num_layers(model)
    for (aux, stats), (aux_ref, stats_ref) in zip(got, expected):
        assert_close(aux, aux_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(stats["tokens_per_expert"], stats_ref["tokens_per_expert"])
        assert int(stats["tokens_per_expert"].sum()) == 2 * 6 * TOP_K
        for field in STAT_FIELDS[1:]:
            assert_close(stats[field], stats_ref[field], rtol=1e-12, atol=1e-12)

    # Control: without the mask the appended tokens are routed like any other.
    tiny_hf.logits(model, padded_ids)
    assert int(moe_layers(model)[0].stats.tokens_per_expert.sum()) == 2 * 9 * TOP_K


def test_activation_checkpointing_recomputes_with_the_mask():
    # The stored mask outlives the forward, so the recomputation in backward routes exactly as the forward did.
    def run(checkpointing):
        model = moefy(tiny_hf.make_model("llama"), NUM_EXPERTS, TOP_K, capacity_factor=1.0, min_capacity=1)
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.train()
        ids = tiny_hf.input_ids(2, 8)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        loss = tiny_hf.lm_loss(model, ids, mask) + torch_moe.aux_loss(model)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_attention_mask_given_positionally():
    model = moefy(tiny_hf.make_model("llama"), NUM_EXPERTS, TOP_K)
    ids = tiny_hf.input_ids(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    model(ids, mask)
    assert all(int(layer.stats.tokens_per_expert.sum()) == 7 * TOP_K for layer in moe_layers(model))


def test_greedy_generation_with_left_padding_matches_dense():
    # Decoding with a KV cache: the hidden states hold the new token only, the mask every position so far.
    dense = tiny_hf.make_model("llama", pad_token_id=0)
    upcycled = moefy(tiny_hf.make_model("llama", pad_token_id=0), NUM_EXPERTS, TOP_K, upcycle=True)
    ids = tiny_hf.input_ids(2, 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = dense.generate(ids, **kwargs)
    got = upcycled.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    # The last step routed one new token per sequence.
    assert all(int(layer.stats.tokens_per_expert.sum()) == 2 * TOP_K for layer in moe_layers(upcycled))


def test_mask_that_does_not_fit_raises():
    model = moefy(tiny_hf.make_model("llama"), NUM_EXPERTS, TOP_K)
    ffn = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    ffn.padding_mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"padding mask of shape \(3, 5\) does not fit hidden states of shape"):
        tiny_hf.logits(model, tiny_hf.input_ids(2, 5))
    ffn.padding_mask = None
    with pytest.raises(ValueError, match="take a 2-D"):
        tiny_hf.logits(model, tiny_hf.input_ids(2, 5), torch.ones(2, 1, 5, 5))


def test_route_attention_mask_for_a_converted_submodule():
    model = tiny_hf.make_model("llama")
    moefy(model.model.layers, NUM_EXPERTS, TOP_K)  # a ModuleList takes no attention_mask: no hook there
    ids = tiny_hf.input_ids(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tiny_hf.logits(model, ids, mask)
    assert int(moe_layers(model)[0].stats.tokens_per_expert.sum()) == 10 * TOP_K
    assert route_attention_mask(model) is model
    tiny_hf.logits(model, ids, mask)
    assert int(moe_layers(model)[0].stats.tokens_per_expert.sum()) == 8 * TOP_K
    with pytest.raises(ValueError, match="takes no attention_mask argument"):
        route_attention_mask(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------------------------------
# MoETrainer


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=8):
        self.ids = tiny_hf.input_ids(n, seq, seed=3)
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, -3:] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def make_trainer(tmp_path, model, **args):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (the README's test command installs it)
    from transformers import TrainingArguments

    defaults = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                    report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                    dataloader_num_workers=0)
    defaults.update(args)
    return MoETrainer(model=model, args=TrainingArguments(**defaults), train_dataset=TokenDataset())


def batch():
    data = TokenDataset()
    items = [data[i] for i in range(4)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_trainer_adds_aux_loss(tmp_path):
    model = moefy(tiny_hf.make_model("llama", dtype=torch.float32), NUM_EXPERTS, TOP_K, capacity_factor=None,
                  aux_loss_coef=0.5)
    trainer = make_trainer(tmp_path, model)
    inputs = batch()
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    task = model(**inputs).loss
    aux = torch_moe.aux_loss(model)
    assert aux > 0.1
    assert_close(loss, task + aux)
    # Every layer's padding was left out (the Trainer passes attention_mask by keyword).
    assert all(int(layer.stats.tokens_per_expert.sum()) == int(inputs["attention_mask"].sum()) * TOP_K
               for layer in moe_layers(model))

    # A loss normalised over the accumulated batch: the aux loss is divided by the accumulation steps.
    trainer.current_gradient_accumulation_steps = 4
    num_items = torch.tensor(40)
    loss_scaled = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    task_scaled = model(**inputs, num_items_in_batch=num_items).loss
    assert_close(loss_scaled, task_scaled + torch_moe.aux_loss(model) / 4)

    # Evaluation: the task loss alone.
    model.eval()
    assert_close(trainer.compute_loss(model, dict(inputs)), model(**inputs).loss)


def test_trainer_trains_and_logs_aux_loss(tmp_path):
    model = moefy(tiny_hf.make_model("llama", dtype=torch.float32), NUM_EXPERTS, TOP_K)
    trainer = make_trainer(tmp_path, model, max_steps=4)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(logged) == 4
    assert all(entry["aux_loss"] > 0 for entry in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_add_aux_loss():
    model = moefy(tiny_hf.make_model("gpt2"), NUM_EXPERTS, TOP_K)
    tiny_hf.logits(model, tiny_hf.input_ids(2, 4))
    task = torch.tensor(1.5, dtype=torch.float64)
    assert_close(add_aux_loss(task, model, scale=2.0), task + 2.0 * torch_moe.aux_loss(model))


# --------------------------------------------------------------------------------------------------
# transformers stays optional


def test_torch_moe_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch_moe, torch_moe.convert, torch_moe.diagnostics, torch_moe.integrations\n"
        "try:\n"
        "    import torch_moe.integrations.hf\n"
        "except ImportError as err:\n"
        "    print('refused:', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: torch_moe.integrations.hf needs the transformers package" in result.stdout
