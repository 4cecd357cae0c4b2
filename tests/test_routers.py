"""Tests of the routers selectable in ``torch_moe.MoE(router=...)``, shared and fine-grained experts, and the
layer's loss wiring, against plain-PyTorch references (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import reference_routing as rr
import torch_moe
from reference_layer import ReferenceMoE
from torch_moe import losses, routing

D, FF = 8, 16
F64 = torch.float64
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def layer(router, num_experts=6, top_k=2, device="cpu", **kwargs):
    kwargs.setdefault("capacity_factor", None)
    return torch_moe.MoE(D, FF, num_experts, top_k, router=router, dtype=F64, device=device, **kwargs)


def experts_reference(moe):
    """A ReferenceMoE that holds moe's expert weights, for its per-expert forward."""
    ref = ReferenceMoE(moe.d_model, moe.d_ff, moe.num_experts, moe.top_k, expert=moe.experts.expert)
    for name in ref.params:
        if name.startswith("experts."):
            ref.params[name] = getattr(moe.experts, name.split(".")[1]).detach().cpu().to(F64).clone()
    return ref


def x_of(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g, dtype=F64).to(device)


# ----------------------------------------------------------------------------------------------- registry / docs


def test_every_router_is_selectable_and_documented():
    for name in routing.ROUTERS:
        moe = layer(name, capacity_factor=1.25)
        assert moe.router_name == name
        assert moe.router.__doc__ and ("et al." in moe.router.__doc__ or "DeepSeek" in moe.router.__doc__)
    assert torch_moe.SoftMoE.__doc__ and routing.SoftMoE is torch_moe.SoftMoE


# ----------------------------------------------------------------------------------------------- noisy top-k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_noisy_topk_in_eval_routes_like_normalised_softmax(device, capacity_factor):
    noisy = layer("noisy_topk", top_k=2, capacity_factor=capacity_factor, device=device)
    plain = layer("softmax", top_k=2, capacity_factor=capacity_factor, normalize_weights=True, device=device)
    plain.load_state_dict({k: v for k, v in noisy.state_dict().items() if k != "router.noise_weight"})
    with torch.no_grad():
        noisy.router.noise_weight.normal_()
    noisy.eval(), plain.eval()
    x = x_of(5, 7, device=device)
    assert torch.equal(noisy(x), plain(x))
    assert torch.equal(noisy.stats.tokens_per_expert, plain.stats.tokens_per_expert)


def test_noisy_topk_training_matches_reference():
    moe = layer("noisy_topk", top_k=2)
    with torch.no_grad():
        moe.router.noise_weight.normal_()
    x = x_of(9)
    torch.manual_seed(123)
    out = moe.router(x)
    torch.manual_seed(123)
    eps = torch.randn(9, 6, dtype=F64)
    clean = x @ moe.router.weight.detach().t()
    std = F.softplus(x @ moe.router.noise_weight.detach().t()) + 1e-2
    h = clean + eps * std
    for t in range(9):
        order = sorted(range(6), key=lambda e: (-float(h[t, e]), e))[:2]
        assert out.expert_ids[t].tolist() == order
        kept = h[t, order]
        assert_close(out.weights[t], torch.softmax(kept, 0), rtol=1e-12, atol=1e-12)
    assert_close(out.logits, h, rtol=1e-12, atol=1e-12)


def test_noisy_topk_losses_train_both_router_weights():
    moe = layer("noisy_topk", top_k=2, importance_loss_coef=0.1, load_loss_coef=0.1, aux_loss_coef=0.0,
                z_loss_coef=0.0)
    x = x_of(4, 6)
    moe(x)
    assert set(moe.stats.losses) == {"load_balancing", "z", "importance", "load"}
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.router.noise_weight.grad.abs().sum() > 0  # only the load loss reaches the noise weights


def test_layer_importance_and_load_losses_match_reference():
    moe = layer("noisy_topk", top_k=2, importance_loss_coef=0.25, load_loss_coef=0.5, aux_loss_coef=0.0,
                z_loss_coef=0.0)
    with torch.no_grad():
        moe.router.noise_weight.normal_()
    x = x_of(10)
    mask = torch.tensor([True] * 8 + [False] * 2)
    torch.manual_seed(7)
    moe(x, mask)
    torch.manual_seed(7)
    routed = moe.router(torch.where(mask.unsqueeze(1), x, 0))
    gates = torch.zeros(10, 6, dtype=F64).scatter(1, routed.expert_ids, routed.weights.detach())
    importance = [float(gates[mask][:, e].sum()) for e in range(6)]
    load = rr.noisy_topk_load(routed.clean_logits.detach(), routed.logits.detach(),
                              routed.noise_std.detach(), 2, mask)
    assert moe.stats.losses["importance"].item() == pytest.approx(rr.cv_squared(importance), rel=1e-10)
    assert moe.stats.losses["load"].item() == pytest.approx(rr.cv_squared(load.tolist()), rel=1e-10)
    expected = 0.25 * rr.cv_squared(importance) + 0.5 * rr.cv_squared(load.tolist())
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity_factor,top_k,padded", [(1.0, 2, False), (0.5, 1, True), (2.0, 2, True),
                                                           (8.0, 3, False)])
def test_expert_choice_layer_matches_reference(device, capacity_factor, top_k, padded):
    moe = layer("expert_choice", num_experts=4, top_k=top_k, capacity_factor=capacity_factor, min_capacity=1,
                device=device)
    x = x_of(3, 5, device=device).requires_grad_()
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3 if padded else None
    y = moe(x, None if mask is None else mask.to(device))
    T = 15
    capacity = min(T, max(1, math.ceil(capacity_factor * top_k * T / 4)))
    assert moe.capacity(T) == capacity
    ref = experts_reference(moe)
    x_ref = x.detach().cpu().reshape(T, D).clone().requires_grad_()
    router_w = moe.router.weight.detach().cpu().clone().requires_grad_()
    valid = None if mask is None else mask.reshape(T)
    router_in = x_ref if valid is None else torch.where(valid.unsqueeze(1), x_ref, 0)
    weights, slots, _ = rr.expert_choice(router_in @ router_w.t(), capacity, valid)
    rows = []
    for t in range(T):
        y_t = torch.zeros(D, dtype=F64)
        for e in range(4):
            if slots[t, e] >= 0:
                y_t = y_t + weights[t, e] * ref.expert_forward(e, x_ref[t])
        rows.append(y_t)
    expected = torch.stack(rows)
    assert_close(y.detach().cpu().reshape(T, D), expected, rtol=1e-10, atol=1e-12)
    unrouted = [t for t in range(T) if (valid is None or valid[t]) and not (slots[t] >= 0).any()]
    n_valid = T if valid is None else int(valid.sum())
    assert moe.stats.unrouted_fraction.item() == pytest.approx(len(unrouted) / n_valid)
    assert moe.stats.tokens_per_expert.tolist() == (slots >= 0).sum(0).tolist()
    upstream = torch.randn(T, D, dtype=F64, generator=torch.Generator().manual_seed(2))
    (y.reshape(T, D) * upstream.to(device)).sum().backward()
    (expected * upstream).sum().backward()
    assert_close(x.grad.cpu().reshape(T, D), x_ref.grad, rtol=1e-9, atol=1e-12)
    assert_close(moe.router.weight.grad.cpu(), router_w.grad, rtol=1e-9, atol=1e-12)


def test_expert_choice_capacity_is_capped_at_tokens():
    moe = layer("expert_choice", num_experts=2, top_k=2, capacity_factor=4.0, min_capacity=1)
    assert moe.capacity(6) == 6
    y = moe(x_of(6))
    assert moe.stats.unrouted_fraction.item() == 0.0 and y.shape == (6, D)


# ----------------------------------------------------------------------------------------------- sigmoid


def test_sigmoid_layer_matches_reference():
    moe = layer("sigmoid", num_experts=8, top_k=3, n_groups=4, topk_groups=2)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    moe.eval()  # no bias update during this forward
    x = x_of(12)
    y = moe(x)
    ref = experts_reference(moe)
    logits = x @ moe.router.weight.detach().t()
    weights, ids = rr.group_limited_topk(logits, 3, "sigmoid", moe.router.expert_bias, True, 4, 2)
    expected = torch.stack([sum(weights[t, j] * ref.expert_forward(int(ids[t, j]), x[t]) for j in range(3))
                            for t in range(12)])
    assert_close(y.detach(), expected, rtol=1e-10, atol=1e-12)


def test_sigmoid_bias_update_rule():
    moe = layer("sigmoid", num_experts=4, top_k=1, bias_update_rate=0.05, normalize_weights=False)
    moe.train()
    x = x_of(16)
    moe(x).sum().backward()  # the update lands when the backward through the forward ends
    load = moe.stats.tokens_per_expert.to(torch.float32)
    assert_close(moe.router.expert_bias, 0.05 * torch.sign(load.mean() - load))
    moe.eval()
    before = moe.router.expert_bias.clone()
    moe(x)
    assert torch.equal(moe.router.expert_bias, before)  # no update outside training
    assert "router.expert_bias" in moe.state_dict()


def test_sigmoid_bias_balances_a_skewed_stream_without_aux_loss():
    # Tokens favour experts 3 and 11 of 16: a shared direction in x that their router rows align with.
    torch.manual_seed(0)
    E, k = 16, 2
    moe = torch_moe.MoE(D, FF, E, k, router="sigmoid", bias_update_rate=2e-3, aux_loss_coef=0.0, z_loss_coef=0.0,
                        capacity_factor=None)
    direction = F.normalize(torch.randn(D), dim=0)
    with torch.no_grad():
        moe.router.weight.mul_(0.3)
        moe.router.weight[3] += 1.5 * direction
        moe.router.weight[11] += 1.5 * direction
    moe.train()
    ratios = []
    g = torch.Generator().manual_seed(1)
    for step in range(200):
        x = torch.randn(1024, D, generator=g) + direction
        with torch.no_grad():
            moe(x)
        load = moe.stats.tokens_per_expert.float()
        ratios.append((load.max() / load.mean()).item())
    assert ratios[0] > 3.0  # badly skewed at the start
    assert sum(ratios[-20:]) / 20 < 1.25, ratios[-20:]


# ----------------------------------------------------------------------------------------------- hash / random


def test_hash_router_routes_by_token_id():
    moe = layer("hash", num_experts=8, top_k=2, capacity_factor=None)
    ids = torch.tensor([[5, 9, 5, 70000], [9, 5, 1, 5]])
    x = x_of(2, 4)
    y = moe(x, token_ids=ids)
    routed = moe.router(x.reshape(-1, D), token_ids=ids.reshape(-1))
    flat = ids.reshape(-1).tolist()
    for a in range(8):
        for b in range(8):
            if flat[a] == flat[b]:
                assert routed.expert_ids[a].tolist() == routed.expert_ids[b].tolist()
    assert (routed.expert_ids[:, 0] != routed.expert_ids[:, 1]).all()  # k distinct experts per token
    ref = experts_reference(moe)
    expected = torch.stack([0.5 * sum(ref.expert_forward(int(e), x.reshape(-1, D)[t]) for e in routed.expert_ids[t])
                            for t in range(8)])
    assert_close(y.reshape(8, D).detach(), expected, rtol=1e-10, atol=1e-12)
    assert moe.aux_loss.item() == 0.0


def test_hash_router_is_a_fixed_function_and_roughly_balanced():
    a, b = layer("hash", num_experts=8, top_k=1), layer("hash", num_experts=8, top_k=1)
    assert torch.equal(a.router.table, b.router.table)  # fixed seed: the same function in every process
    counts = torch.bincount(a.router.table[:, 0], minlength=8).float()
    assert counts.max() / counts.mean() < 1.1


def test_hash_router_needs_token_ids():
    moe = layer("hash")
    with pytest.raises(ValueError, match="token_ids"):
        moe(x_of(3))
    with pytest.raises(ValueError, match="token_ids must be an integer tensor of shape"):
        moe(x_of(3), token_ids=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        moe(x_of(3), token_ids=torch.zeros(3))


def test_random_router_never_trains():
    moe = layer("random", top_k=2, capacity_factor=1.0)
    assert "router.weight" not in dict(moe.named_parameters())
    assert "router.weight" in moe.state_dict()
    before = moe.router.weight.clone()
    opt = torch.optim.SGD(moe.parameters(), lr=1.0)
    y = moe(x_of(4, 5))
    (y.pow(2).sum() + moe.aux_loss).backward()
    opt.step()
    assert moe.router.weight.grad is None and not moe.router.weight.requires_grad
    assert torch.equal(moe.router.weight, before)
    assert moe.experts.w1.grad is not None


def test_random_router_routes_like_softmax_with_its_weight():
    frozen = layer("random", top_k=2)
    plain = layer("softmax", top_k=2)
    plain.load_state_dict(frozen.state_dict())
    x = x_of(7)
    assert torch.equal(frozen(x), plain(x))


# ----------------------------------------------------------------------------------------------- shared / fine-grained


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_shared_experts_add_a_dense_ffn(capacity_factor):
    shared = layer("softmax", num_shared_experts=2, capacity_factor=capacity_factor)
    plain = layer("softmax", capacity_factor=capacity_factor)
    plain.load_state_dict({k: v for k, v in shared.state_dict().items() if not k.startswith("shared_experts")})
    assert shared.shared_experts.w1.shape == (1, D, 2 * FF)
    x = x_of(9)
    mask = torch.tensor([True] * 7 + [False] * 2)
    se = shared.shared_experts
    dense = (F.silu(x @ se.w1[0]) * (x @ se.w3[0])) @ se.w2[0]
    assert_close(shared(x, mask), plain(x, mask) + dense * mask.unsqueeze(1), rtol=1e-12, atol=1e-12)
    assert shared(x, mask)[~mask].eq(0).all()


def test_fine_grained_experts_keep_parameter_counts():
    coarse = torch_moe.MoE(D, FF, 4, 2)
    fine = torch_moe.MoE(D, FF, 4, 2, expert_granularity=4)
    assert (fine.num_experts, fine.top_k, fine.d_ff) == (16, 8, FF // 4)
    assert sum(p.numel() for p in fine.experts.parameters()) == sum(p.numel() for p in coarse.experts.parameters())
    assert fine.experts.w1.shape == (16, D, FF // 4)


def test_fine_grained_layer_matches_reference():
    moe = layer("softmax", num_experts=3, top_k=2, expert_granularity=2, capacity_factor=1.0, min_capacity=1)
    ref = ReferenceMoE.from_layer(moe, d_model=D, d_ff=FF // 2, num_experts=6, top_k=4, capacity_factor=1.0,
                                  min_capacity=1)
    x = x_of(11)
    assert_close(moe(x), ref(x), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------- losses in the layer


def test_sequence_balance_loss_in_layer():
    moe = layer("sigmoid", num_experts=6, top_k=2, seq_balance_loss_coef=0.5, aux_loss_coef=0.0, z_loss_coef=0.0)
    moe.eval()
    x = x_of(3, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    moe(x, mask)
    logits = torch.where(mask.unsqueeze(2), x, 0).reshape(15, D) @ moe.router.weight.detach().t()
    _, ids = rr.group_limited_topk(logits, 2, "sigmoid", moe.router.expert_bias, True, 1, 1)
    expected = rr.sequence_balance_loss(torch.sigmoid(logits).view(3, 5, 6), ids.view(3, 5, 2), mask)
    assert moe.stats.losses["sequence_balance"].item() == pytest.approx(expected, rel=1e-10)
    assert moe.aux_loss.item() == pytest.approx(0.5 * expected, rel=1e-10)
    with pytest.raises(ValueError, match=r"\[B, S, d_model\]"):
        moe(x_of(6))


def test_every_router_trains_end_to_end():
    for name in routing.ROUTERS:
        torch.manual_seed(0)
        moe = torch_moe.MoE(D, FF, 4, 2, router=name, capacity_factor=1.5)
        opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, D, generator=g)
        target = torch.randn(64, D, generator=g)
        ids = torch.arange(64) % 13
        first = None
        for _ in range(30):
            y = moe(x, token_ids=ids) if name == "hash" else moe(x)
            loss = F.mse_loss(y, target) + moe.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        assert loss.item() < first, name


@pytest.mark.parametrize("router", ["sigmoid", "expert_choice", "noisy_topk"])
def test_compile_fullgraph_matches_eager(router):
    torch.manual_seed(0)
    moe = torch_moe.MoE(D, FF, 4, 2, router=router, capacity_factor=1.5, n_groups=2 if router == "sigmoid" else None,
                        topk_groups=1 if router == "sigmoid" else None)
    moe.eval()
    x = torch.randn(2, 6, D)
    eager = moe(x)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,needle", [
    (dict(router="nope"), "router must be one of"),
    (dict(router="expert_choice", capacity_factor=None), "capacity_factor must be a number"),
    (dict(router="hash", drop_policy="probability"), "needs router scores"),
    (dict(router="softmax", bias_update_rate=1e-3), "bias_update_rate applies to router='sigmoid'"),
    (dict(router="sigmoid", bias_update_rate=-1.0), "bias_update_rate must be"),
    (dict(router="sigmoid", n_groups=5), "n_groups must be a positive int dividing"),
    (dict(router="sigmoid", n_groups=4, topk_groups=5), r"topk_groups must be an int in \[1, n_groups=4\]"),
    (dict(router="sigmoid", n_groups=4, topk_groups=1, top_k=3), "top_k=3 is larger than the 2 experts"),
    (dict(router="hash", n_groups=2), "n_groups / topk_groups apply to"),
    (dict(router="softmax", load_loss_coef=0.1), "load_loss_coef applies to router='noisy_topk'"),
    (dict(router="noisy_topk", normalize_weights=False), "always normalised"),
    (dict(router="hash", importance_loss_coef=0.1), "nothing to train"),
    (dict(router="expert_choice", seq_balance_loss_coef=0.1), "needs token-choice routing"),
    (dict(importance_loss_coef=-1.0), "importance_loss_coef must be a number >= 0"),
    (dict(expert_granularity=3), "must divide d_ff=16"),
    (dict(expert_granularity=0), "expert_granularity must be an int >= 1"),
    (dict(num_shared_experts=-1), "num_shared_experts must be an int >= 0"),
])
def test_bad_router_arguments(kwargs, needle):
    base = dict(capacity_factor=1.25)
    base.update(kwargs)
    top_k = base.pop("top_k", 2)
    with pytest.raises(ValueError, match=needle):
        torch_moe.MoE(D, FF, 8, top_k, **base)


# ----------------------------------------------------------------------------------------------- losses module


def test_cv_squared_has_no_nan_gradient_at_perfect_balance():
    values = torch.full((8,), 3.0, dtype=F64, requires_grad=True)
    loss = losses.cv_squared(values)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(values.grad).all() and values.grad.eq(0).all()
    zeros = torch.zeros(4, dtype=F64, requires_grad=True)
    losses.cv_squared(zeros).backward()
    assert torch.isfinite(zeros.grad).all()


def test_importance_loss_matches_reference():
    g = torch.Generator().manual_seed(3)
    gates = torch.rand(10, 5, generator=g, dtype=F64)
    mask = torch.rand(10, generator=g) > 0.3
    expected = rr.cv_squared([float(gates[mask][:, e].sum()) for e in range(5)])
    assert losses.importance_loss(gates, mask).item() == pytest.approx(expected, rel=1e-12)
    grad_in = gates.clone().requires_grad_()
    losses.importance_loss(grad_in, mask).backward()
    assert grad_in.grad[~mask].eq(0).all()


def test_sequence_balance_loss_matches_reference_and_is_one_when_balanced():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(2, 6, 4, generator=g, dtype=F64)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(12)]).view(2, 6, 2)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    assert losses.sequence_balance_loss(scores, ids, mask).item() == pytest.approx(
        rr.sequence_balance_loss(scores, ids, mask), rel=1e-12)
    uniform = torch.full((1, 4, 4), 0.25, dtype=F64)
    balanced_ids = torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    assert losses.sequence_balance_loss(uniform, balanced_ids).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[B, S, E\]"):
        losses.sequence_balance_loss(scores[0], ids[0])


def test_switch_and_z_loss_functions_match_formulas():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 4, generator=g, dtype=F64)
    ids = torch.randint(0, 4, (9, 2), generator=g)
    probs = torch.softmax(logits, -1)
    f = torch.bincount(ids.reshape(-1), minlength=4).to(F64) / 18
    assert losses.load_balancing_loss(logits, ids).item() == pytest.approx(4 * (f * probs.mean(0)).sum().item())
    assert losses.z_loss(logits).item() == pytest.approx((torch.logsumexp(logits, -1) ** 2).mean().item())
