"""Tests of torch_moe.diagnostics beyond MoEStats: load statistics, expert similarity, expert-label mutual
information, the routing recorder and MoETracker, against hand-computed values and plain-Python references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import torch_moe
from torch_moe import diagnostics as diag


def hand_routed_layer(**kwargs):
    """d_model 2, 4 experts, top-1, dropless; router logits 10·x·e so x = ±unit vectors pick known experts."""
    layer = torch_moe.MoE(2, 3, 4, top_k=1, capacity_factor=None, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]]))
    return layer


class Stack(nn.Module):
    def __init__(self, num_layers=2, d_model=6, num_experts=4, top_k=2, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            torch_moe.MoE(d_model, 8, num_experts, top_k, dtype=torch.float64, **kwargs) for _ in range(num_layers))

    def forward(self, x, padding_mask=None):
        for layer in self.layers:
            x = x + layer(x, padding_mask=padding_mask)
        return x


# --------------------------------------------------------------------------------------------------
# load statistics


def test_load_balance_hand_computed():
    even = diag.load_balance(torch.tensor([2, 2, 2, 2]))
    assert even["load_cv"].item() == 0.0 and even["load_max_over_mean"].item() == 1.0
    skewed = diag.load_balance(torch.tensor([4, 0, 0, 0]))
    # mean 1, population std sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3)
    assert_close(skewed["load_cv"], torch.tensor(math.sqrt(3.0)))
    assert_close(skewed["load_max_over_mean"], torch.tensor(4.0))
    empty = diag.load_balance(torch.zeros(3, dtype=torch.int64))
    assert empty["load_cv"].item() == 0.0 and empty["load_max_over_mean"].item() == 0.0
    batched = diag.load_balance(torch.tensor([[2, 2], [3, 1]]))
    assert_close(batched["load_cv"], torch.tensor([0.0, 0.5]))


def test_layer_statistics_hand_routed():
    layer = hand_routed_layer()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, False])
    layer(x, padding_mask=mask)
    stats = diag.layer_statistics(layer)
    assert torch.equal(stats["tokens_per_expert"], torch.tensor([2, 1, 1, 0]))
    assert_close(stats["load_fraction"], torch.tensor([0.5, 0.25, 0.25, 0.0]))
    assert_close(stats["load_cv"], torch.tensor(math.sqrt(0.5), dtype=torch.float32))
    assert_close(stats["load_max_over_mean"], torch.tensor(2.0))
    assert stats["dropped_fraction"].item() == 0.0
    for key in ("router_entropy", "load_balancing_loss", "z_loss"):
        assert torch.equal(stats[key], getattr(layer.stats, key))


def test_layer_statistics_before_forward():
    with pytest.raises(ValueError, match="has no stats yet; run a forward first"):
        diag.layer_statistics(hand_routed_layer())


def test_model_statistics_by_name():
    model = Stack()
    model(torch.randn(3, 4, 6, dtype=torch.float64))
    stats = diag.model_statistics(model)
    assert list(stats) == ["layers.0", "layers.1"]
    assert int(stats["layers.1"]["tokens_per_expert"].sum()) == 12 * 2


# --------------------------------------------------------------------------------------------------
# expert similarity


def test_weight_similarity_hand_computed():
    layer = torch_moe.MoE(1, 1, 3, top_k=1, expert="mlp", dtype=torch.float64)
    with torch.no_grad():
        layer.experts.w1.copy_(torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1))
        layer.experts.w2.copy_(torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1))
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, s], [0.0, 1.0, s], [s, s, 1.0]], dtype=torch.float64)
    assert_close(diag.expert_weight_similarity(layer), expected)


def test_output_similarity_against_loops():
    torch.manual_seed(0)
    layer = torch_moe.MoE(5, 7, 3, top_k=2, dtype=torch.float64)
    probe = torch.randn(2, 4, 5, dtype=torch.float64)
    got = diag.expert_output_similarity(layer, probe)
    ex = layer.experts
    outputs = []
    with torch.no_grad():
        for e in range(3):
            rows = [((F.silu(t @ ex.w1[e]) * (t @ ex.w3[e])) @ ex.w2[e]) for t in probe.reshape(-1, 5)]
            outputs.append(torch.cat(rows))
    expected = torch.tensor([[float(F.cosine_similarity(a, b, dim=0)) for b in outputs] for a in outputs],
                            dtype=torch.float64)
    assert_close(got, expected)


def test_similarity_summary_hand_computed():
    sim = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.995], [0.2, 0.995, 1.0]])
    summary = diag.similarity_summary(sim, threshold=0.99)
    assert_close(summary["mean"], torch.tensor((0.5 + 0.2 + 0.995) / 3))
    assert_close(summary["max"], torch.tensor(0.995))
    assert summary["similar_pairs"].item() == 1 and not summary["collapsed"].item()
    assert diag.similarity_summary(torch.ones(4, 4))["collapsed"].item()
    assert not diag.similarity_summary(torch.ones(1, 1))["collapsed"].item()


def test_collapsed_layers_flags_identical_experts():
    model = Stack()
    assert diag.collapsed_layers(model) == []
    with torch.no_grad():
        for p in model.layers[1].experts.parameters():
            p.copy_(p[:1].expand_as(p))
    assert diag.collapsed_layers(model) == ["layers.1"]
    assert diag.collapsed_layers(model, probe=torch.randn(5, 6, dtype=torch.float64)) == ["layers.1"]


# --------------------------------------------------------------------------------------------------
# expert-label mutual information


def reference_mutual_information(expert_ids, labels, valid):
    counts: dict[tuple[int, int], float] = {}
    for t in range(expert_ids.shape[0]):
        if labels[t] < 0 or (valid is not None and not valid[t]):
            continue
        for e in expert_ids[t].tolist():
            counts[(e, int(labels[t]))] = counts.get((e, int(labels[t])), 0.0) + 1.0
    total = sum(counts.values())
    p_e: dict[int, float] = {}
    p_l: dict[int, float] = {}
    for (e, lab), c in counts.items():
        p_e[e] = p_e.get(e, 0.0) + c / total
        p_l[lab] = p_l.get(lab, 0.0) + c / total
    return sum(c / total * math.log((c / total) / (p_e[e] * p_l[lab])) for (e, lab), c in counts.items())


def test_mutual_information_hand_computed():
    labels = torch.tensor([0, 0, 1, 1])
    determined = diag.expert_label_mutual_information(torch.tensor([[0], [0], [1], [1]]), labels, 2, 2)
    assert_close(determined, torch.tensor(math.log(2.0), dtype=torch.float64))
    independent = diag.expert_label_mutual_information(torch.tensor([[0], [1], [0], [1]]), labels, 2, 2)
    assert_close(independent, torch.tensor(0.0, dtype=torch.float64))
    # Ignored labels (-100) and padding leave the determined case determined.
    mi = diag.expert_label_mutual_information(torch.tensor([[0], [0], [1], [1], [1], [0]]),
                                              torch.tensor([0, 0, 1, 1, 0, -100]), 2, 2,
                                              valid=torch.tensor([True, True, True, True, False, True]))
    assert_close(mi, torch.tensor(math.log(2.0), dtype=torch.float64))
    nothing = diag.expert_label_mutual_information(torch.zeros(3, 2, dtype=torch.int64),
                                                   torch.full((3,), -100), 4, 3)
    assert nothing.item() == 0.0


def test_mutual_information_against_reference():
    gen = torch.Generator().manual_seed(0)
    expert_ids = torch.randint(0, 5, (60, 2), generator=gen)
    labels = torch.randint(-1, 3, (60,), generator=gen)
    valid = torch.rand(60, generator=gen) > 0.2
    got = diag.expert_label_mutual_information(expert_ids, labels, 5, 3, valid=valid)
    assert_close(got.item(), reference_mutual_information(expert_ids, labels, valid), rtol=1e-12, atol=1e-12)


def test_mutual_information_bad_shapes():
    with pytest.raises(ValueError, match=r"expert_ids must be \[T, k\] and labels \[T\]"):
        diag.expert_label_mutual_information(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64),
                                             2, 2)


# --------------------------------------------------------------------------------------------------
# routing recorder and tracker


def test_routing_recorder_sees_the_layers_assignments():
    model = Stack()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with diag.RoutingRecorder(model) as recorder:
        model(x, padding_mask=mask)
        for name, layer in zip(("layers.0", "layers.1"), model.layers):
            expert_ids, valid, _ = recorder.assignments[name]
            assert expert_ids.shape == (10, 2)
            counts = torch.bincount(expert_ids[valid].reshape(-1), minlength=4)
            assert torch.equal(counts, layer.stats.tokens_per_expert)
        # The first layer's choice on real tokens is the top-2 of its router logits.
        valid = mask.reshape(-1)
        logits = x.reshape(-1, 6)[valid] @ model.layers[0].router.weight.t()
        recorded = recorder.assignments["layers.0"][0][valid]
        assert torch.equal(recorded.sort(1).values, logits.topk(2).indices.sort(1).values)
    assert not model.layers[0].router._forward_hooks


def test_tracker_records_without_host_sync(monkeypatch):
    model = Stack()
    tracker = diag.MoETracker(model, num_labels=3)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in MoETracker.step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    for step in range(3):
        model(x + step)
        tracker.step(step=10 * step, labels=labels)
    monkeypatch.undo()
    assert tracker.steps == [0, 10, 20]
    assert tracker.records[0]["layers.0"]["router_entropy"].device == x.device


def test_tracker_history_and_summary():
    model = Stack()
    tracker = diag.MoETracker(model, num_labels=2)
    entropies, mis = [], []
    for step in range(3):
        x = torch.randn(2, 4, 6, dtype=torch.float64)
        labels = torch.tensor([[0, 0, 1, 1], [1, 1, 0, -100]])
        model(x)
        entropies.append(float(model.layers[1].stats.router_entropy))
        expert_ids = tracker.recorder.assignments["layers.1"][0]
        mis.append(float(diag.expert_label_mutual_information(expert_ids, labels.reshape(-1), 4, 2)))
        tracker.step(labels=labels)
    assert tracker.history("tokens_per_expert").shape == (3, 2, 4)
    assert tracker.history("router_entropy").shape == (3, 2)
    summary = tracker.summary()
    assert_close(summary["layers.1"]["router_entropy"], entropies[-1])
    assert_close(summary["layers.1"]["mean_router_entropy"], sum(entropies) / 3)
    assert_close(summary["layers.1"]["expert_label_mi"], mis[-1])
    assert_close(summary["layers.1"]["mean_expert_label_mi"], sum(mis) / 3)
    with pytest.raises(ValueError, match="no statistic 'nope' was recorded"):
        tracker.history("nope")
    tracker.close()


def test_tracker_plots_png_files(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    model = Stack(capacity_factor=0.5, min_capacity=1)
    tracker = diag.MoETracker(model, num_labels=2, probe=torch.randn(4, 6, dtype=torch.float64))
    for step in range(4):
        model(torch.randn(3, 4, 6, dtype=torch.float64))
        tracker.step(labels=torch.randint(0, 2, (3, 4)))
    assert tracker.history("dropped_fraction").max() > 0  # the drop-rate curve is not flat zero
    paths = tracker.plot(tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == ["drop_rate.png", "entropy.png", "expert_label_mi.png", "similarity.png", "utilisation.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, path
    assert matplotlib.get_backend() == backend


def test_tracker_errors():
    with pytest.raises(ValueError, match="has no MoE layer"):
        diag.MoETracker(nn.Linear(2, 2))
    tracker = diag.MoETracker(Stack())
    with pytest.raises(ValueError, match="nothing recorded yet"):
        tracker.history("router_entropy")
    with pytest.raises(ValueError, match=r"labels need MoETracker\(model, num_labels=...\)"):
        tracker.step(labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        diag.MoETracker(Stack(), num_labels=0)
