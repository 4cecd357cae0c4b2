"""torch_moe.balancing.global_batch_balancing: the load-balancing loss with expert fractions counted over every
micro-batch of a step (and a data-parallel group) equals, in value and gradient, the loss of the concatenated
batch; against the layer on the concatenated batch and against a plain-PyTorch reference."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torch_moe
from torch_moe.balancing import global_batch_balancing

D, FF, E, K = 8, 12, 6, 2


class _Block(nn.Module):
    def __init__(self, **moe):
        super().__init__()
        self.norm = nn.LayerNorm(D, dtype=torch.float64)
        self.moe = torch_moe.MoE(D, FF, E, K, dtype=torch.float64, **moe)

    def forward(self, x, mask=None):
        return x + self.moe(self.norm(x), mask)


def _model(**moe):
    torch.manual_seed(0)
    return nn.Sequential(_Block(**moe), _Block(**moe)).train()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, torch_moe.MoE)]


def _micro_batches():
    g = torch.Generator().manual_seed(3)
    # Different sizes: the micro-batches' own fractions differ from the global ones.
    return [torch.randn(2, n, D, dtype=torch.float64, generator=g) * (1 + i) for i, n in enumerate((3, 7, 5, 4))]


def _lb_with_graph(layer):
    return (layer.aux_loss - layer.z_loss_coef * layer.stats.z_loss) / layer.aux_loss_coef


def _balanced_mean(model, batches, group=None):
    """Mean over the micro-batches of the summed (over layers) load-balancing losses, with its graph."""
    with global_batch_balancing(model, group) as balancing:
        with balancing.counting():
            for x in batches:
                model(x)
        losses = []
        for x in batches:
            model(x)
            losses.append(sum(_lb_with_graph(layer) for layer in _layers(model)))
    return torch.stack(losses).mean()


def test_equals_the_concatenated_batch_dropless():
    # Dropless with no padding: each token's routing is independent of the batch, so the concatenated batch
    # (one sequence dim) routes every token as its micro-batch does.
    model = _model(capacity_factor=None, aux_loss_coef=1.0, z_loss_coef=0.0)
    batches = _micro_batches()
    balanced = _balanced_mean(model, batches)
    grads = torch.autograd.grad(balanced, list(model.parameters()), allow_unused=True)

    concatenated = torch.cat([x.reshape(-1, D) for x in batches]).unsqueeze(0)
    model(concatenated)
    whole = sum(_lb_with_graph(layer) for layer in _layers(model))
    expected_grads = torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(balanced, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)

    # Not what the per-micro-batch loss gives (the micro-batches differ).
    per_micro = []
    for x in batches:
        model(x)
        per_micro.append(sum(_lb_with_graph(layer) for layer in _layers(model)))
    assert abs(float(torch.stack(per_micro).mean() - whole)) > 1e-3


@pytest.mark.parametrize("router", ["softmax", "noisy_topk"])
def test_against_the_plain_reference_in_capacity_mode_with_padding(router):
    # Capacity mode: drops depend on the micro-batch, so the reference takes each micro-batch's own routing and
    # computes E * sum_i f_i * P_i over all of their tokens together, f from the assignments before dropping.
    model = _model(capacity_factor=1.0, aux_loss_coef=1.0, z_loss_coef=0.0, router=router)
    batches = _micro_batches()
    masks = [torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(i)) > 0.3 for i, x in enumerate(batches)]
    seen = {id(layer): [] for layer in _layers(model)}

    def hook(layer, routing, valid):
        seen[id(layer)].append((routing.logits, routing.expert_ids, valid))

    handles = [layer.register_routing_hook(hook) for layer in _layers(model)]
    with global_batch_balancing(model) as balancing:
        with balancing.counting():
            for x, mask in zip(batches, masks):
                _masked_forward(model, x, mask)
        for key in seen:
            seen[key].clear()  # the reference takes the training pass's routing
        losses = []
        for x, mask in zip(batches, masks):
            torch.manual_seed(7)  # noisy_topk: the training pass redraws the pre-pass's noise
            _masked_forward(model, x, mask)
            losses.append(sum(_lb_with_graph(layer) for layer in _layers(model)))
    for handle in handles:
        handle.remove()
    balanced = torch.stack(losses).mean()

    def reference(routings):
        logits = torch.cat([r[0] for r in routings])
        ids = torch.cat([r[1] for r in routings])
        valid = torch.cat([r[2] for r in routings])
        counts = torch.zeros(E, dtype=torch.float64)
        for t in range(ids.shape[0]):
            if valid[t]:
                for e in ids[t].tolist():
                    counts[e] += 1
        probs = torch.softmax(logits, -1)[valid]
        return E * ((counts / counts.sum()) * probs.mean(0)).sum()

    if router == "softmax":  # deterministic: the pre-pass counted exactly the training pass's routing
        expected = sum(reference(routings) for routings in seen.values())
        torch.testing.assert_close(balanced, expected, rtol=1e-12, atol=1e-12)
        params = [p for p in model.parameters()]
        got = torch.autograd.grad(balanced, params, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(expected, params, allow_unused=True)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert torch.isfinite(balanced)


def _masked_forward(model, x, mask):
    h = x
    for block in model:
        h = block(h, mask)
    return h


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_gloo_group_equals_no_group():
    batches = _micro_batches()
    model = _model(capacity_factor=1.0, aux_loss_coef=1.0, z_loss_coef=0.0)
    without = _balanced_mean(model, batches)
    grads = torch.autograd.grad(without, list(model.parameters()), allow_unused=True)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        with_group = _balanced_mean(model, batches, group)
        group_grads = torch.autograd.grad(with_group, list(model.parameters()), allow_unused=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(with_group, without)
    for a, b in zip(group_grads, grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_eval_and_removal_give_the_ordinary_loss():
    model = _model(capacity_factor=None)
    x = _micro_batches()[1]
    model(x)
    ordinary = [layer.stats.load_balancing_loss for layer in _layers(model)]
    with global_batch_balancing(model) as balancing:
        with balancing.counting():
            model(_micro_batches()[0])
        model.eval()
        model(x)
        assert all(torch.equal(layer.stats.load_balancing_loss, want) for layer, want in zip(_layers(model), ordinary))
        model.train()
        model(x)
        assert not all(torch.equal(layer.stats.load_balancing_loss, want)
                       for layer, want in zip(_layers(model), ordinary))
    model(x)
    assert all(torch.equal(layer.stats.load_balancing_loss, want) for layer, want in zip(_layers(model), ordinary))
    assert all(layer.load_balancing_override is None for layer in _layers(model))


def test_errors():
    model = _model()
    x = _micro_batches()[0]
    with global_batch_balancing(model) as balancing:
        with pytest.raises(RuntimeError, match="a training forward before the step's counts"):
            model(x)
        with pytest.raises(RuntimeError, match="no MoE forward ran in counting"):
            with balancing.counting():
                pass
        with pytest.raises(ValueError, match="already has a load-balancing override"):
            global_batch_balancing(model).__enter__()
    with pytest.raises(ValueError, match="holds no torch_moe.MoE layer"):
        global_batch_balancing(nn.Linear(2, 2)).__enter__()
    for kwargs, match in (({"router": "hash"}, "needs token-choice routing with logits, got router='hash'"),
                          ({"router": "expert_choice"}, "got router='expert_choice'"),
                          ({"router": "sigmoid"}, "would move the load-adaptive bias")):
        with pytest.raises(ValueError, match=match):
            global_batch_balancing(_model(**kwargs)).__enter__()
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        global_batch_balancing(_model(), group=object()).__enter__()


def test_moe_trainer_counts_over_the_accumulated_step(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import tiny_hf
    from test_hf_integration import TokenDataset
    from transformers import TrainingArguments

    from torch_moe.convert import moefy
    from torch_moe.integrations.hf import MoETrainer

    model = moefy(tiny_hf.make_model("llama", dtype=torch.float32), 4, 2, capacity_factor=None)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, learning_rate=1e-2, report_to="none", save_strategy="no",
                             logging_steps=1, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    data = TokenDataset()
    trainer = MoETrainer(model=model, args=args, train_dataset=data, global_batch_balancing=True)
    trainer.train()
    balancing = trainer.global_batch_balancing
    layers = _layers(model)
    # Every layer counted the 4 micro-batches of the step: all 8 sequences' real tokens, 2 assignments each.
    assert [balancing._microbatches[id(layer)] for layer in layers] == [4] * len(layers)
    real_tokens = int(data.mask.sum())
    assert [int(balancing._counts[id(layer)].sum()) for layer in layers] == [real_tokens * 2] * len(layers)
    assert [int(balancing._tokens[id(layer)]) for layer in layers] == [real_tokens] * len(layers)
    assert any("aux_loss" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="balancing_group needs global_batch_balancing=True"):
        MoETrainer(model=model, args=args, train_dataset=data, balancing_group=object())
