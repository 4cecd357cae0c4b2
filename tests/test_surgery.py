"""Model surgery: expert importance, pruning (Lu et al. 2024), merging (M-SMoE, Li et al. 2024), against plain
float64 references; drop-upcycling and granular upcycling in moefy."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import torch_moe
from torch_moe.surgery import MergedRouter, expert_importance, linear_assignment, merge_experts, prune_experts

D, FF, E = 8, 12, 5


def _x(T: int = 40, seed: int = 1, positive: bool = False) -> torch.Tensor:
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.abs() + 0.1 if positive else x


def _layer(seed: int = 0, **kwargs) -> torch_moe.MoE:
    torch.manual_seed(seed)
    options = dict(capacity_factor=None)
    options.update(kwargs)
    return torch_moe.MoE(D, FF, E, 2, **options).double().eval()


def _never_chosen(layer: torch_moe.MoE, victim: int) -> None:
    """For positive inputs x (every entry >= 0.1), the victim's logit -10·Σx is below every other expert's
    (>= -Σx, their router entries being in [-1, 1]): it is provably never among the top k < E."""
    with torch.no_grad():
        layer.router.weight.uniform_(-1, 1)
        layer.router.weight[victim] = -10.0


def _ffn(x, w1, w2, w3=None) -> torch.Tensor:
    """One SwiGLU (or silu-free mlp with gelu) expert in float64."""
    h = x @ w1
    h = F.silu(h) * (x @ w3) if w3 is not None else F.gelu(h)
    return h @ w2


# --------------------------------------------------------------------------------------------------
# importance


def test_expert_importance_matches_reference():
    layer = _layer()
    x = _x()
    probs = torch.softmax(x @ layer.router.weight.detach().t(), dim=-1)
    top, ids = probs.topk(2, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    counts = torch.bincount(ids.flatten(), minlength=E).double()
    mean_weight = torch.zeros(E, dtype=torch.float64).index_add_(0, ids.flatten(), weights.flatten()) / x.shape[0]
    torch.testing.assert_close(expert_importance(layer, x), counts / counts.sum())
    torch.testing.assert_close(expert_importance(layer, [x[:15], x[15:]], "weight"), mean_weight)
    assert layer.router.training is False


def test_expert_importance_from_tracker():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch_moe.MoE(D, FF, E, 2, capacity_factor=None)).double()
    tracker = torch_moe.MoETracker(model)
    total = torch.zeros(E, dtype=torch.float64)
    for step in range(3):
        model(_x(seed=step))
        tracker.step()
        total += model[0].stats.tokens_per_expert.double()
    torch.testing.assert_close(expert_importance(tracker, layer_name="0"), total / total.sum())
    with pytest.raises(ValueError, match="layer_name must be one of"):
        expert_importance(tracker, layer_name="1")
    with pytest.raises(ValueError, match="records token counts only"):
        expert_importance(tracker, criterion="weight", layer_name="0")


def test_expert_importance_refuses_bad_input():
    layer = _layer()
    with pytest.raises(ValueError, match="criterion must be one of"):
        expert_importance(layer, _x(), "norm")
    with pytest.raises(ValueError, match="batches .* is needed"):
        expert_importance(layer)
    with pytest.raises(ValueError, match=r"d_model=8"):
        expert_importance(layer, torch.randn(3, 4))
    with pytest.raises(ValueError, match="must be a torch_moe.MoE"):
        expert_importance(torch.nn.Linear(D, D), _x())


# --------------------------------------------------------------------------------------------------
# pruning


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 2.0])
def test_prune_never_chosen_expert_leaves_outputs(router, capacity_factor):
    layer = _layer(router=router, capacity_factor=capacity_factor, min_capacity=1)
    victim = 3
    _never_chosen(layer, victim)
    x = _x(positive=True)
    with torch.no_grad():
        y = layer(x)
    assert int(layer.stats.tokens_per_expert[victim]) == 0
    pruned = prune_experts(layer, drop=[victim])
    assert pruned.num_experts == E - 1 and pruned.top_k == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), y, rtol=1e-12, atol=1e-12)
        if capacity_factor is not None:
            # Every kept expert has the slots it had: the same assignments are dropped.
            assert pruned.capacity(x.shape[0]) == layer.capacity(x.shape[0])
            torch.testing.assert_close(pruned.stats.dropped_fraction, layer.stats.dropped_fraction)
    if capacity_factor == 0.5:
        assert float(layer.stats.dropped_fraction) > 0
        # Keeping the factor instead gives each expert more slots: fewer drops, other outputs.
        wider = prune_experts(layer, drop=[victim], capacity_factor=capacity_factor)
        assert wider.capacity(x.shape[0]) > layer.capacity(x.shape[0])
        with torch.no_grad():
            assert not torch.allclose(wider(x), y)


def test_prune_matches_reference():
    """Dropping experts that are used: the pruned layer is the float64 MoE over the kept experts (softmax over their
    logits only, top-2, normalised)."""
    layer = _layer()
    keep = [4, 0, 2]
    pruned = prune_experts(layer, keep=keep)
    x = _x()
    W = layer.router.weight.detach()[keep]
    probs = torch.softmax(x @ W.t(), dim=-1)
    top, ids = probs.topk(2, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    ex = layer.experts
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            e = keep[int(ids[t, j])]
            expected[t] += weights[t, j] * _ffn(x[t], ex.w1[e], ex.w2[e], ex.w3[e]).detach()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-12, atol=1e-12)


def test_prune_copies_the_rest_of_the_layer():
    layer = _layer(router="sigmoid", bias_update_rate=0.01, num_shared_experts=1, shared_expert_gate=True,
                   expert="mlp", activation="relu", bias=True, aux_loss_coef=0.05)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.arange(E, dtype=torch.float32))
    pruned = prune_experts(layer, keep=torch.tensor([3, 1]))
    assert pruned.router_name == "sigmoid" and pruned.router.bias_update_rate == 0.01 and pruned.aux_loss_coef == 0.05
    assert pruned.experts.expert == "mlp" and pruned.experts.activation == "relu"
    torch.testing.assert_close(pruned.router.expert_bias, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(pruned.router.weight, layer.router.weight[[3, 1]])
    for name in ("w1", "w2", "b1", "b2"):
        torch.testing.assert_close(getattr(pruned.experts, name), getattr(layer.experts, name)[[3, 1]])
    for name, value in layer.shared_experts.state_dict().items():
        torch.testing.assert_close(pruned.shared_experts.state_dict()[name], value)
    torch.testing.assert_close(pruned.shared_expert_gate.weight, layer.shared_expert_gate.weight)


def test_prune_fine_grained_layer():
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, FF, 3, 1, capacity_factor=None, expert_granularity=2).double().eval()
    victim = 5
    _never_chosen(layer, victim)
    x = _x(positive=True)
    pruned = prune_experts(layer, drop=[victim])
    assert (pruned.num_experts, pruned.top_k, pruned.d_ff, pruned.expert_granularity) == (5, 2, FF // 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), layer(x), rtol=1e-12, atol=1e-12)


def test_prune_refuses_bad_input():
    layer = _layer()
    with pytest.raises(ValueError, match="exactly one of keep= and drop="):
        prune_experts(layer)
    with pytest.raises(ValueError, match="exactly one of keep= and drop="):
        prune_experts(layer, keep=[0, 1], drop=[2])
    with pytest.raises(ValueError, match=r"keep holds 5; expert ids are ints in \[0, num_experts=5\)"):
        prune_experts(layer, keep=[0, 5])
    with pytest.raises(ValueError, match="drop repeats an expert id"):
        prune_experts(layer, drop=[1, 1])
    with pytest.raises(ValueError, match=r"top_k=2 experts; keeping 1"):
        prune_experts(layer, keep=[2])
    with pytest.raises(ValueError, match="no expert would be left"):
        prune_experts(layer, drop=range(E))
    with pytest.raises(ValueError, match="capacity_factor must be 'same', a number or None"):
        prune_experts(layer, drop=[0], capacity_factor="half")
    with pytest.raises(ValueError, match="router='hash'"):
        prune_experts(_layer(router="hash"), drop=[0])
    with pytest.raises(ValueError, match="group-limited routing"):
        torch.manual_seed(0)
        prune_experts(torch_moe.MoE(D, FF, 4, 2, n_groups=2, topk_groups=1), drop=[0])
    with pytest.raises(ValueError, match="as .moe"):
        prune_experts(torch_moe.convert.MoEFeedForward(layer), drop=[0])


# --------------------------------------------------------------------------------------------------
# merging


def test_linear_assignment_is_the_best_permutation():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 6):
        score = torch.randn(n, n, generator=gen, dtype=torch.float64)
        best = max(itertools.permutations(range(n)), key=lambda p: float(sum(score[i, p[i]] for i in range(n))))
        assert linear_assignment(score).tolist() == list(best)
    perm = torch.randperm(64, generator=gen)
    assert torch.equal(linear_assignment(torch.eye(64)[perm]), perm)
    with pytest.raises(ValueError, match="square matrix"):
        linear_assignment(torch.zeros(2, 3))


def _copy_expert(layer, source: int, target: int, perm=None) -> None:
    """Expert ``target`` := expert ``source`` with its hidden units permuted by ``perm`` (same function)."""
    ex = layer.experts
    perm = torch.arange(ex.w1.shape[2]) if perm is None else perm
    with torch.no_grad():
        ex.w1[target] = ex.w1[source][:, perm]
        ex.w2[target] = ex.w2[source][perm]
        if ex.w3 is not None:
            ex.w3[target] = ex.w3[source][:, perm]
        if ex.b1 is not None:
            ex.b1[target] = ex.b1[source][perm]
            ex.b2[target] = ex.b2[source]


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("options", [dict(capacity_factor=None), dict(capacity_factor=None, router="sigmoid"),
                                     dict(capacity_factor=None, expert="mlp", bias=True, num_shared_experts=1)])
def test_merging_copies_leaves_outputs(permuted, options):
    """Experts 1 and 4 are copies of 0 and 2 (hidden units permuted when ``permuted``): merging each with its
    original gives the layer's function back, which needs the alignment when the units are permuted."""
    layer = _layer(**options)
    gen = torch.Generator().manual_seed(3)
    for source, target in ((0, 1), (2, 4)):
        _copy_expert(layer, source, target, torch.randperm(FF, generator=gen) if permuted else None)
    x = _x()
    with torch.no_grad():
        y = layer(x)
    frequencies = torch.tensor([1.0, 3.0, 2.0, 1.0, 0.5])
    merged = merge_experts(layer, groups=[[0, 1], [2, 4], [3]], frequencies=frequencies)
    assert merged.num_experts == 3 and isinstance(merged.router, MergedRouter)
    assert merged.router.expert_map.tolist() == [0, 0, 1, 2, 1]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y, rtol=1e-10, atol=1e-12)
    if permuted:
        # The merged experts are the most used member of each group, in its own unit order (1 and 2).
        torch.testing.assert_close(merged.experts.w1[0], layer.experts.w1[1])
        torch.testing.assert_close(merged.experts.w1[1], layer.experts.w1[2])
        assert not torch.allclose(layer.experts.w1[0], layer.experts.w1[1])


def _best_alignment(anchor_feats: torch.Tensor, member_feats: torch.Tensor) -> list[int]:
    n = anchor_feats.shape[0]
    return list(max(itertools.permutations(range(n)),
                    key=lambda p: float(sum(anchor_feats[i] @ member_feats[p[i]] for i in range(n)))))


def test_merge_is_frequency_weighted_average_of_aligned_experts():
    """Against a float64 reference: brute-force alignment over all permutations of d_ff=4 units, then the
    frequency-weighted average."""
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, 4, 4, 2, capacity_factor=None).double()
    frequencies = torch.tensor([3.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    merged = merge_experts(layer, groups=[[0, 1, 2], [3]], frequencies=frequencies)
    ex = layer.experts.state_dict()

    def feats(e):
        return torch.cat([ex["w1"][e].t(), ex["w2"][e], ex["w3"][e].t()], dim=1)

    weights = frequencies[:3] / frequencies[:3].sum()
    expected = {name: torch.zeros_like(ex[name][0]) for name in ("w1", "w2", "w3")}
    for member, weight in zip((0, 1, 2), weights):
        perm = _best_alignment(feats(0), feats(member))  # expert 0 is the group's most used
        expected["w1"] += weight * ex["w1"][member][:, perm]
        expected["w3"] += weight * ex["w3"][member][:, perm]
        expected["w2"] += weight * ex["w2"][member][perm]
    for name, value in expected.items():
        torch.testing.assert_close(getattr(merged.experts, name)[0], value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(getattr(merged.experts, name)[1], ex[name][3])


def test_merge_groups_by_router_logit_similarity():
    """num_groups=2: the two most used experts lead; each other expert joins the leader whose router-logit column
    is closest (cosine), computed here by hand."""
    layer = _layer()
    x = _x(200)
    frequencies = expert_importance(layer, x)
    leaders = sorted(sorted(range(E), key=lambda e: (-float(frequencies[e]), e))[:2])
    columns = (x @ layer.router.weight.detach().t()).t()
    cosine = F.normalize(columns, dim=1) @ F.normalize(columns, dim=1).t()
    expected = [0] * E
    for e in range(E):
        expected[e] = leaders.index(max(leaders, key=lambda lead: float(cosine[e, lead])))
    merged = merge_experts(layer, 2, batches=x)
    assert merged.router.expert_map.tolist() == expected
    by_output = merge_experts(layer, 2, batches=x, similarity="output")
    assert sorted(set(by_output.router.expert_map.tolist())) == [0, 1]


def test_merged_layer_trains_in_capacity_mode():
    layer = _layer(capacity_factor=1.0, min_capacity=1)
    merged = merge_experts(layer, groups=[[0, 1], [2], [3, 4]], frequencies=torch.ones(E)).train()
    x = _x().requires_grad_()
    y = merged(x)
    (y.square().mean() + merged.aux_loss).backward()
    assert merged.stats.tokens_per_expert.shape == (3,)
    assert merged.router.router.weight.grad is not None and merged.router.router.weight.grad.abs().amax() > 0
    assert torch.isfinite(merged.aux_loss) and float(merged.stats.load_balancing_loss) > 0
    # The group scores are the summed member probabilities.
    routing = merged.router(x.detach())
    members = torch.softmax(x.detach() @ layer.router.weight.detach().t(), dim=-1)
    expected = torch.stack([members[:, [0, 1]].sum(1), members[:, 2], members[:, [3, 4]].sum(1)], dim=1)
    torch.testing.assert_close(routing.scores, expected)


def test_merge_refuses_bad_input():
    layer = _layer()
    ones = torch.ones(E)
    with pytest.raises(ValueError, match="exactly one of num_groups= and groups="):
        merge_experts(layer, frequencies=ones)
    with pytest.raises(ValueError, match="must partition the experts"):
        merge_experts(layer, groups=[[0, 1], [2, 3]], frequencies=ones)
    with pytest.raises(ValueError, match="must partition the experts"):
        merge_experts(layer, groups=[[0, 1], [1, 2, 3, 4]], frequencies=ones)
    with pytest.raises(ValueError, match=r"1 groups cannot serve top_k=2"):
        merge_experts(layer, groups=[[0, 1, 2, 3, 4]], frequencies=ones)
    with pytest.raises(ValueError, match=r"num_groups must be an int in \[1, num_experts=5\]"):
        merge_experts(layer, 6, batches=_x())
    with pytest.raises(ValueError, match="similarity must be one of"):
        merge_experts(layer, 2, batches=_x(), similarity="weights")
    with pytest.raises(ValueError, match="need frequencies= or batches="):
        merge_experts(layer, groups=[[0, 1], [2, 3, 4]])
    with pytest.raises(ValueError, match="grouping by similarity needs batches="):
        merge_experts(layer, 2, frequencies=ones)
    with pytest.raises(ValueError, match=r"frequencies must be a tensor \[E=5\]"):
        merge_experts(layer, groups=[[0, 1], [2, 3, 4]], frequencies=torch.ones(4))
    with pytest.raises(ValueError, match="frequencies must be finite and >= 0"):
        merge_experts(layer, groups=[[0, 1], [2, 3, 4]], frequencies=-ones)
    merged = merge_experts(layer, groups=[[0, 1], [2, 3, 4]], frequencies=ones)
    with pytest.raises(ValueError, match="already merged"):
        prune_experts(merged, drop=[0])
    with pytest.raises(ValueError, match="already merged"):
        merge_experts(merged, groups=[[0], [1]], frequencies=torch.ones(2))
    with pytest.raises(ValueError, match="router='expert_choice' is not supported"):
        merge_experts(_layer(router="expert_choice", capacity_factor=1.0), groups=[[0, 1], [2, 3, 4]],
                      frequencies=ones)


# --------------------------------------------------------------------------------------------------
# drop-upcycling and granular upcycling (moefy options)

def _hf(family: str, dtype=torch.float64):
    pytest.importorskip("transformers")
    import tiny_hf

    return tiny_hf, tiny_hf.make_model(family, dtype=dtype)


def _dense_ffn(seed: int = 0, d: int = 32, f: int = 64) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(), torch.nn.Linear(f, d)))


def _upcycled(ratio: float, seed: int = 7, **kwargs):
    model = _dense_ffn()
    dense = {"w1": model[0][0].weight.detach().t().clone(), "b1": model[0][0].bias.detach().clone(),
             "w2": model[0][2].weight.detach().t().clone(), "b2": model[0][2].bias.detach().clone()}
    torch.manual_seed(seed)
    torch_moe.moefy(model, 4, 2, upcycle=True, select="0", drop_upcycling_ratio=ratio, **kwargs)
    return model[0].moe, dense


def test_drop_upcycling_zero_is_plain_upcycling():
    with_ratio, _ = _upcycled(0.0)
    plain_model = _dense_ffn()
    torch.manual_seed(7)
    torch_moe.moefy(plain_model, 4, 2, upcycle=True, select="0")
    for name, value in plain_model[0].moe.state_dict().items():
        assert torch.equal(with_ratio.state_dict()[name], value), name


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_drop_upcycling_redraws_a_subset_per_expert(ratio):
    moe, dense = _upcycled(ratio)
    f = dense["w1"].shape[1]
    subsets = []
    for e in range(4):
        kept_w1 = (moe.experts.w1[e] == dense["w1"]).all(0)  # [d_ff]: unit still the dense one
        kept_w2 = (moe.experts.w2[e] == dense["w2"]).all(1)
        kept_b1 = moe.experts.b1[e] == dense["b1"]
        assert torch.equal(kept_w1, kept_w2) and torch.equal(kept_w1, kept_b1)
        assert int((~kept_w1).sum()) == round(ratio * f)
        subsets.append(frozenset((~kept_w1).nonzero().flatten().tolist()))
    assert len(set(subsets)) == 4, "each expert draws its own subset"
    assert torch.equal(moe.experts.b2, dense["b2"].expand(4, -1))  # b2 is no hidden unit's: untouched


def test_drop_upcycling_one_redraws_everything_with_dense_statistics():
    moe, dense = _upcycled(1.0)
    for name in ("w1", "w2"):
        redrawn = getattr(moe.experts, name).detach()
        source = dense[name]
        if name == "w1":
            assert not (redrawn == source.unsqueeze(0)).all(1).any()  # no column left
        else:
            assert not (redrawn == source.unsqueeze(0)).all(2).any()  # no row left
        # N(mean, std²) of the dense matrix: 4·32·64 draws, the estimates are within a few percent.
        assert abs(float(redrawn.mean() - source.mean())) < 0.1 * float(source.std())
        assert abs(float(redrawn.std() / source.std()) - 1) < 0.05


def test_drop_upcycling_is_seeded():
    a, _ = _upcycled(0.5, seed=3)
    b, _ = _upcycled(0.5, seed=3)
    c, _ = _upcycled(0.5, seed=4)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.experts.w1, c.experts.w1)


@pytest.mark.parametrize("kwargs, match", [
    ({"upcycle": True, "drop_upcycling_ratio": 1.5}, r"drop_upcycling_ratio must be a float in \[0, 1\], got 1.5"),
    ({"upcycle": True, "drop_upcycling_ratio": -0.1}, r"drop_upcycling_ratio must be a float in \[0, 1\]"),
    ({"drop_upcycling_ratio": 0.5}, "drop_upcycling_ratio is only used with upcycle=True"),
    ({"upcycle": True, "expert_granularity": 2, "router": "expert_choice", "capacity_factor": 1.0},
     "router='expert_choice' does not take"),
    ({"upcycle": True, "expert_granularity": 5}, "expert_granularity=5 must divide d_ff=64"),
])
def test_upcycling_options_refuse_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torch_moe.moefy(_dense_ffn(), 4, 2, select="0", **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("granularity", [2, 4])
def test_granular_upcycling_equals_dense(family, granularity):
    tiny_hf, model = _hf(family)
    ids = tiny_hf.input_ids(2, 9)
    with torch.no_grad():
        dense = tiny_hf.logits(model, ids)
    torch_moe.moefy(model, 4, 2, upcycle=True, expert_granularity=granularity)
    moe = next(m for m in model.modules() if isinstance(m, torch_moe.MoE))
    assert (moe.num_experts, moe.top_k, moe.d_ff) == (4 * granularity, 2 * granularity, 32 // granularity)
    rows = moe.router.weight.detach().view(4, granularity, -1)
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # the slices of a copy share its router row
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(model, ids), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family, router", [("llama", "softmax"), ("gpt2", "softmax"), ("llama", "sigmoid")])
def test_granular_upcycling_equals_dense_float32(family, router):
    tiny_hf, model = _hf(family, dtype=torch.float32)
    ids = tiny_hf.input_ids(2, 9)
    with torch.no_grad():
        dense = tiny_hf.logits(model, ids)
    torch_moe.moefy(model, 4, 2, upcycle=True, expert_granularity=2, router=router)
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(model, ids), dense, rtol=1e-6, atol=1e-6)


def test_granular_upcycled_model_saves_and_reloads(tmp_path):
    """The recorded conversion holds the scaled routed_scaling_factor, so from_pretrained (which replays moefy
    without upcycling) rebuilds the same layers: outputs equal exactly."""
    tiny_hf, model = _hf("llama", dtype=torch.float32)
    torch_moe.moefy(model, 4, 2, upcycle=True, expert_granularity=2, drop_upcycling_ratio=0.5)
    ids = tiny_hf.input_ids(2, 9)
    with torch.no_grad():
        expected = tiny_hf.logits(model, ids)
    model.save_pretrained(tmp_path)
    again = torch_moe.convert.from_pretrained(tmp_path, attn_implementation="eager")
    layer = next(m for m in again.modules() if isinstance(m, torch_moe.MoE))
    assert (layer.num_experts, layer.top_k, layer.router.routed_scaling_factor) == (8, 4, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(again, ids), expected, rtol=0, atol=0)
