"""Tests of the structured routers ``"dselect_k"`` (Hazimeh et al. 2021) and ``"hierarchical"`` (Shazeer et al.
2017) against plain-PyTorch float64 references written from the papers' formulas (loops over tokens, selectors,
bits and groups; nothing shared with torch_moe's code)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import torch_moe
from reference_layer import ReferenceMoE, reference_capacity, reference_keep
from torch_moe import routing

D, FF = 8, 16
F64 = torch.float64


def make_layer(router, num_experts, top_k, **kwargs):
    kwargs.setdefault("capacity_factor", None)
    torch.manual_seed(kwargs.pop("seed", 0))
    return torch_moe.MoE(D, FF, num_experts, top_k, router=router, dtype=F64, **kwargs)


def x_of(*shape, seed=0):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def experts_reference(moe):
    """A ReferenceMoE holding leaf copies of moe's expert weights, for its per-expert forward."""
    ref = ReferenceMoE(moe.d_model, moe.d_ff, moe.num_experts, moe.top_k, expert=moe.experts.expert)
    for name in ref.params:
        if name.startswith("experts."):
            ref.params[name] = getattr(moe.experts, name.split(".")[1]).detach().clone().requires_grad_()
    return ref


def leaf_copies(module, names):
    return {name: getattr(module, name).detach().clone().requires_grad_() for name in names}


def mixture(ref, x, ids, weights, keep):
    """y[t] = sum over kept (t, j) of weights[t][j] * expert_{ids[t][j]}(x[t]); x: [T, d]."""
    rows = []
    for t in range(x.shape[0]):
        y_t = torch.zeros(D, dtype=F64)
        for j, e in enumerate(ids[t]):
            if keep[t][j]:
                y_t = y_t + weights[t][j] * ref.expert_forward(e, x[t])
        rows.append(y_t)
    return torch.stack(rows)


def masked_mean(values, valid):
    kept = [v for v, ok in zip(values, valid) if ok]
    return sum(kept) / len(kept) if kept else 0.0


# ================================================================================================ DSelect-k reference


def ref_smooth_step(t, gamma):
    """The paper's smooth-step on a 0-dim tensor (a tensor result, so autograd gives the reference gradient)."""
    if float(t.detach()) <= -gamma / 2:
        return t * 0.0
    if float(t.detach()) >= gamma / 2:
        return t * 0.0 + 1.0
    return -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5


def ref_dselect(x, p, num_experts, k, gamma):
    """Per-example DSelect-k gate -> (q [T][E] tensors, r [T][k][E] tensors), as in Hazimeh et al. 2021:
    r_i[j] = prod_l S(z_il)^{bit_l(j)} (1 - S(z_il))^{1 - bit_l(j)}, bits most significant first,
    q = sum_i softmax(alpha)_i r_i; codes of ids >= E are never formed."""
    m = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
    z = x @ p["code_weight"].t() + p["code_bias"]
    alpha = torch.softmax(x @ p["selector_weight"].t() + p["selector_bias"], dim=-1)
    q_all, r_all = [], []
    for t in range(x.shape[0]):
        r_t = []
        for i in range(k):
            steps = [ref_smooth_step(z[t, i * m + l], gamma) for l in range(m)]
            row = []
            for j in range(num_experts):
                bits = format(j, f"0{m}b") if m else ""
                value = torch.ones((), dtype=F64)
                for l, bit in enumerate(bits):
                    value = value * (steps[l] if bit == "1" else 1 - steps[l])
                row.append(value)
            r_t.append(row)
        q_all.append([sum(alpha[t, i] * r_t[i][j] for i in range(k)) for j in range(num_experts)])
        r_all.append(r_t)
    return q_all, r_all


def sort_desc(q_row):
    """Expert ids by decreasing weight, ties to the lower id."""
    values = [float(v.detach()) for v in q_row]
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


DSELECT_PARAMS = ("code_weight", "code_bias", "selector_weight", "selector_bias")


def spread_codes(moe, scale=0.6, seed=3):
    """Code logits of both kinds: some past ±gamma/2 (exact 0/1 steps), some inside (fractional)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.router.code_weight.copy_(torch.randn(moe.router.code_weight.shape, generator=g, dtype=F64) * scale)
        moe.router.code_bias.copy_(torch.randn(moe.router.code_bias.shape, generator=g, dtype=F64))
        moe.router.selector_weight.copy_(torch.randn(moe.router.selector_weight.shape, generator=g, dtype=F64))


# ================================================================================================ DSelect-k tests


def test_smooth_step_values_and_slopes():
    gamma = 0.8
    t = torch.tensor([-1.0, -0.4, -0.3, -0.1, 0.0, 0.2, 0.4, 0.7], dtype=F64, requires_grad=True)
    s = routing.smooth_step(t, gamma)
    expected = torch.stack([ref_smooth_step(v, gamma) for v in t.detach()])
    assert_close(s, expected, rtol=1e-14, atol=1e-15)
    assert s[0] == 0.0 and s[1] == 0.0 and s[6] == 1.0 and s[7] == 1.0 and s[4] == 0.5
    s.sum().backward()
    slope = -6.0 / gamma**3 * t.detach() ** 2 + 3.0 / (2.0 * gamma)
    inside = t.detach().abs() < gamma / 2
    assert_close(t.grad[inside], slope[inside], rtol=1e-13, atol=1e-14)
    assert torch.equal(t.grad[~inside], torch.zeros_like(t.grad[~inside]))  # flat (and C1 at ±gamma/2)


@pytest.mark.parametrize("num_experts,top_k,gamma", [(4, 1, 1.0), (6, 2, 1.0), (8, 3, 0.5), (5, 2, 2.0)])
def test_dselect_k_routing_matches_reference(num_experts, top_k, gamma):
    moe = make_layer("dselect_k", num_experts, top_k, smooth_step_gamma=gamma)
    spread_codes(moe)
    x = x_of(7)
    out = moe.router(x)
    params = {name: getattr(moe.router, name).detach() for name in DSELECT_PARAMS}
    q, r = ref_dselect(x, params, num_experts, top_k, gamma)
    assert out.weights.shape == out.expert_ids.shape == (7, num_experts)
    for t in range(7):
        order = sort_desc(q[t])
        assert out.expert_ids[t].tolist() == order
        assert_close(out.weights[t], torch.stack([q[t][j] for j in order]), rtol=1e-12, atol=1e-14)
        assert_close(out.scores[t], torch.stack(q[t]), rtol=1e-12, atol=1e-14)
        assert_close(out.extra[0][t], torch.stack([torch.stack(row) for row in r[t]]), rtol=1e-12, atol=1e-14)
    zeros = (out.weights == 0).sum().item()
    assert 0 < zeros < 7 * num_experts  # the test covers both exact zeros and fractional spreads
    if num_experts & (num_experts - 1) == 0:  # power of 2: every selector is a distribution over the experts
        assert_close(out.weights.sum(1), torch.ones(7, dtype=F64), rtol=1e-12, atol=1e-12)


def test_dselect_k_binary_codes_pick_one_expert_per_selector():
    moe = make_layer("dselect_k", 8, 2, smooth_step_gamma=1.0)
    with torch.no_grad():  # per-token code logits fixed at ±gamma: every smooth-step exactly 0 or 1
        moe.router.code_weight.zero_()
        moe.router.code_bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=F64))  # codes 101, 001
    x = x_of(5)
    out = moe.router(x)
    alpha = torch.softmax(x @ moe.router.selector_weight.detach().t() + moe.router.selector_bias.detach(), -1)
    for t in range(5):
        nonzero = {int(e): float(w) for e, w in zip(out.expert_ids[t], out.weights[t].detach()) if w != 0}
        assert nonzero == pytest.approx({5: float(alpha[t, 0]), 1: float(alpha[t, 1])}, rel=1e-12)
    out.weights.sum().backward()  # binary steps are flat: no gradient reaches the codes
    assert torch.equal(moe.router.code_weight.grad, torch.zeros_like(moe.router.code_weight))


@pytest.mark.parametrize("capacity_factor,drop_policy,padded", [(None, "position", False), (None, "position", True),
                                                                (1.0, "position", True), (0.5, "probability", False)])
def test_dselect_k_layer_output_and_gradients_match_reference(capacity_factor, drop_policy, padded):
    E, k, T = 6, 2, 10
    moe = make_layer("dselect_k", E, k, capacity_factor=capacity_factor, drop_policy=drop_policy, min_capacity=1,
                     selector_entropy_coef=0.1, aux_loss_coef=0.05)
    spread_codes(moe)
    x = x_of(T).requires_grad_()
    mask = torch.rand(T, generator=torch.Generator().manual_seed(4)) > 0.3 if padded else None
    y = moe(x, mask)
    valid = [True] * T if mask is None else mask.tolist()

    ref = experts_reference(moe)
    x_ref = x.detach().clone().requires_grad_()
    params = leaf_copies(moe.router, DSELECT_PARAMS)
    router_in = x_ref if mask is None else torch.where(mask.unsqueeze(1), x_ref, 0)
    q, r = ref_dselect(router_in, params, E, k, 1.0)
    ids = [sort_desc(q[t]) for t in range(T)]
    weights = [[q[t][j] for j in ids[t]] for t in range(T)]
    capacity = None if capacity_factor is None else reference_capacity(capacity_factor, 1, T, k, E)
    probs = torch.stack([torch.stack(row) for row in q]).detach()
    qv, rv = probs.tolist(), [[[float(v.detach()) for v in row] for row in r_t] for r_t in r]
    keep = reference_keep(ids, probs, E, capacity, drop_policy, valid)
    expected = mixture(ref, x_ref, ids, weights, keep)
    assert_close(y, expected, rtol=1e-10, atol=1e-12)
    # Statistics count the gate's nonzero weights only, not the zero-weight assignments dispatched alongside.
    chosen = [[valid[t] and qv[t][e] != 0 for e in ids[t]] for t in range(T)]
    assert moe.stats.tokens_per_expert.tolist() == [sum(chosen[t][j] for t in range(T) for j in range(E)
                                                        if ids[t][j] == e) for e in range(E)]
    n_chosen = sum(map(sum, chosen))
    dropped = sum(chosen[t][j] and not keep[t][j] for t in range(T) for j in range(E)) / n_chosen
    assert moe.stats.dropped_fraction.item() == pytest.approx(dropped, abs=1e-12)
    assert (dropped > 0) == (capacity is not None)  # the capacity cases do drop gate choices
    unrouted = sum(valid[t] and not any(chosen[t][j] and keep[t][j] for j in range(E)) for t in range(T))
    assert moe.stats.unrouted_fraction.item() == pytest.approx(unrouted / sum(valid), abs=1e-12)

    # Losses: Switch-style balance on q, the selectors' entropy and the non-power-of-2 reachability penalty.
    importance = [masked_mean([qv[t][e] for t in range(T)], valid) for e in range(E)]
    nonzero = [sum(1 for t in range(T) if valid[t] and qv[t][e] > 0) for e in range(E)]
    balance = E * sum(n / sum(nonzero) * p for n, p in zip(nonzero, importance))
    entropy = [-sum(rv[t][i][j] * math.log(rv[t][i][j] + 1e-6) for i in range(k) for j in range(E))
               for t in range(T)]
    reach = [sum(1.0 / max(sum(rv[t][i]), 1e-6) for i in range(k)) - k for t in range(T)]
    assert set(moe.stats.losses) == {"load_balancing", "z", "selector_entropy", "selector_reachability"}
    assert moe.stats.losses["load_balancing"].item() == pytest.approx(balance, rel=1e-10)
    assert moe.stats.z_loss.item() == 0.0
    assert moe.stats.losses["selector_entropy"].item() == pytest.approx(masked_mean(entropy, valid), rel=1e-10)
    assert moe.stats.losses["selector_reachability"].item() == pytest.approx(masked_mean(reach, valid), rel=1e-10)
    q_entropy = [-sum(v * math.log(v) for v in qv[t] if v > 0) for t in range(T)]
    assert moe.stats.router_entropy.item() == pytest.approx(masked_mean(q_entropy, valid), rel=1e-10)

    # Gradients of output + aux loss, router parameters included, against autograd through the reference.
    upstream = torch.randn(T, D, dtype=F64, generator=torch.Generator().manual_seed(5))
    ((y * upstream).sum() + moe.aux_loss).backward()
    mask_t = torch.tensor(valid)
    n_valid = max(sum(valid), 1)
    tensor_q = torch.stack([torch.stack(row) for row in q])
    tensor_r = torch.stack([torch.stack([torch.stack(row) for row in r_t]) for r_t in r])
    ref_balance = E * (torch.tensor(nonzero, dtype=F64) / sum(nonzero)
                       * torch.where(mask_t[:, None], tensor_q, 0).sum(0) / n_valid).sum()
    ref_entropy = torch.where(mask_t, -(tensor_r * torch.log(tensor_r + 1e-6)).sum((1, 2)), 0).sum() / n_valid
    ref_reach = torch.where(mask_t, (1 / tensor_r.sum(2).clamp(min=1e-6)).sum(1) - k, 0).sum() / n_valid
    ((expected * upstream).sum() + 0.05 * ref_balance + 0.1 * ref_entropy + ref_reach).backward()
    assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    for name in DSELECT_PARAMS:
        assert_close(getattr(moe.router, name).grad, params[name].grad, rtol=1e-9, atol=1e-12)
    assert moe.router.code_weight.grad.abs().sum() > 0 and moe.router.selector_weight.grad.abs().sum() > 0
    assert all(torch.isfinite(getattr(moe.router, name).grad).all() for name in DSELECT_PARAMS)
    assert_close(moe.experts.w1.grad, ref.params["experts.w1"].grad, rtol=1e-9, atol=1e-12)


def test_dselect_k_power_of_2_has_no_reachability_loss_and_entropy_coef_weights_aux():
    moe = make_layer("dselect_k", 4, 2, selector_entropy_coef=0.5, aux_loss_coef=0.0, z_loss_coef=0.0)
    spread_codes(moe)
    moe(x_of(6))
    assert set(moe.stats.losses) == {"load_balancing", "z", "selector_entropy"}
    assert moe.aux_loss.item() == pytest.approx(0.5 * moe.stats.losses["selector_entropy"].item(), rel=1e-12)
    off = make_layer("dselect_k", 4, 2)
    assert off.normalize_weights is False
    off(x_of(6))
    assert set(off.stats.losses) == {"load_balancing", "z"}  # entropy regulariser off by default (authors' code)


def test_dselect_k_gradcheck():
    moe = make_layer("dselect_k", 6, 2, smooth_step_gamma=1.5)
    spread_codes(moe, scale=0.4)
    router = moe.router
    x = x_of(4).requires_grad_()

    def gate(x, code_weight, code_bias, selector_weight, selector_bias):
        for name, value in zip(DSELECT_PARAMS, (code_weight, code_bias, selector_weight, selector_bias)):
            setattr(router, name, value)
        out = router(x)
        return router.gates(out), out.extra[0]

    params = [getattr(router, name).detach().clone().requires_grad_() for name in DSELECT_PARAMS]
    for name in DSELECT_PARAMS:
        delattr(router, name)
    assert torch.autograd.gradcheck(gate, (x, *params), eps=1e-6, atol=1e-7)


# ================================================================================================ hierarchical reference


def ref_hierarchical(x, group_weight, weight, n_groups, topk_groups, top_k, normalize):
    """Shazeer et al. 2017's two-level gate (noiseless) -> (ids [T][k], weights [T][k] tensors, group ids [T][a])."""
    E = weight.shape[0]
    m, b = E // n_groups, top_k // topk_groups
    group_logits, expert_logits = x @ group_weight.t(), x @ weight.t()
    ids, weights, groups = [], [], []
    for t in range(x.shape[0]):
        pg = torch.softmax(group_logits[t], 0)
        chosen = sort_desc(pg)[:topk_groups]
        pw = [pg[g] for g in chosen]
        if normalize and topk_groups > 1:
            pw = [w / sum(pw) for w in pw]
        ids_t, weights_t = [], []
        for g, w_g in zip(chosen, pw):
            pe = torch.softmax(expert_logits[t, g * m:(g + 1) * m], 0)
            inner = sort_desc(pe)[:b]
            sw = [pe[j] for j in inner]
            if normalize and b > 1:
                sw = [w / sum(sw) for w in sw]
            ids_t += [g * m + j for j in inner]
            weights_t += [w_g * w for w in sw]
        ids.append(ids_t)
        weights.append(weights_t)
        groups.append(chosen)
    return ids, weights, groups


def ref_hierarchical_losses(x, group_weight, weight, n_groups, groups, ids, valid):
    """(load_balancing, z, entropy) floats: Switch loss and z-loss of the primary gate plus, per group over the
    tokens routed to it, the secondary gate's (balance: mean over groups; z: mean over routed (token, group))."""
    E = weight.shape[0]
    m, T = E // n_groups, x.shape[0]
    group_logits, expert_logits = (x @ group_weight.t()).tolist(), (x @ weight.t()).tolist()
    softmax = lambda v: [math.exp(u - max(v)) / sum(math.exp(w - max(v)) for w in v) for u in v]  # noqa: E731
    lse = lambda v: max(v) + math.log(sum(math.exp(u - max(v)) for u in v))  # noqa: E731
    tv = [t for t in range(T) if valid[t]]
    a, k = len(groups[0]), len(ids[0])
    f = [sum(g in groups[t] for t in tv) / (len(tv) * a) for g in range(n_groups)]
    P = [sum(softmax(group_logits[t])[g] for t in tv) / len(tv) for g in range(n_groups)]
    balance = n_groups * sum(fi * pi for fi, pi in zip(f, P))
    z = sum(lse(group_logits[t]) ** 2 for t in tv) / len(tv)
    inner_balance, inner_z, pairs = [], 0.0, 0
    for g in range(n_groups):
        routed = [t for t in tv if g in groups[t]]
        if not routed:
            inner_balance.append(0.0)
            continue
        b = k // a
        total = 0.0
        for j in range(m):
            count = sum(ids[t].count(g * m + j) for t in routed)
            p = sum(softmax(expert_logits[t][g * m:(g + 1) * m])[j] for t in routed) / len(routed)
            total += count / (len(routed) * b) * p
        inner_balance.append(m * total)
        inner_z += sum(lse(expert_logits[t][g * m:(g + 1) * m]) ** 2 for t in routed)
        pairs += len(routed)
    entropy = 0.0
    for t in tv:
        pg = softmax(group_logits[t])
        for g in range(n_groups):
            pe = softmax(expert_logits[t][g * m:(g + 1) * m])
            entropy -= sum(pg[g] * p * math.log(pg[g] * p) for p in pe)
    return balance + sum(inner_balance) / n_groups, z + inner_z / pairs, entropy / len(tv)


# ================================================================================================ hierarchical tests


@pytest.mark.parametrize("num_experts,top_k,n_groups,topk_groups,normalize", [
    (8, 2, 4, 2, None), (6, 2, 2, 1, None), (12, 4, 3, 2, False), (12, 4, 3, 2, True), (9, 1, 3, 1, None)])
def test_hierarchical_routing_matches_reference(num_experts, top_k, n_groups, topk_groups, normalize):
    moe = make_layer("hierarchical", num_experts, top_k, n_groups=n_groups, topk_groups=topk_groups,
                     normalize_weights=normalize)
    x = x_of(9)
    out = moe.router(x)
    norm = top_k > 1 if normalize is None else normalize
    ids, weights, _ = ref_hierarchical(x, moe.router.group_weight.detach(), moe.router.weight.detach(), n_groups,
                                       topk_groups, top_k, norm)
    assert out.expert_ids.tolist() == ids
    assert_close(out.weights, torch.stack([torch.stack(w) for w in weights]), rtol=1e-12, atol=1e-14)
    pg = torch.softmax(x @ moe.router.group_weight.detach().t(), -1)
    pe = torch.softmax((x @ moe.router.weight.detach().t()).view(9, n_groups, -1), -1)
    assert_close(out.scores, (pg.unsqueeze(2) * pe).reshape(9, num_experts), rtol=1e-12, atol=1e-14)
    assert_close(torch.softmax(out.logits, -1), out.scores, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("capacity_factor,drop_policy,padded", [(None, "position", False), (None, "position", True),
                                                                (1.0, "position", True), (0.75, "probability", False)])
def test_hierarchical_layer_output_losses_and_gradients_match_reference(capacity_factor, drop_policy, padded):
    E, k, G, a, T = 8, 4, 4, 2, 12
    moe = make_layer("hierarchical", E, k, n_groups=G, topk_groups=a, capacity_factor=capacity_factor,
                     drop_policy=drop_policy, min_capacity=1, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = x_of(T).requires_grad_()
    mask = torch.rand(T, generator=torch.Generator().manual_seed(6)) > 0.3 if padded else None
    y = moe(x, mask)
    valid = [True] * T if mask is None else mask.tolist()

    ref = experts_reference(moe)
    x_ref = x.detach().clone().requires_grad_()
    params = leaf_copies(moe.router, ("group_weight", "weight"))
    router_in = x_ref if mask is None else torch.where(mask.unsqueeze(1), x_ref, 0)
    ids, weights, groups = ref_hierarchical(router_in, params["group_weight"], params["weight"], G, a, k, True)
    capacity = None if capacity_factor is None else reference_capacity(capacity_factor, 1, T, k, E)
    pg = torch.softmax(router_in.detach() @ params["group_weight"].detach().t(), -1)
    pe = torch.softmax((router_in.detach() @ params["weight"].detach().t()).view(T, G, -1), -1)
    keep = reference_keep(ids, (pg.unsqueeze(2) * pe).reshape(T, E), E, capacity, drop_policy, valid)
    expected = mixture(ref, x_ref, ids, weights, keep)
    assert_close(y, expected, rtol=1e-10, atol=1e-12)
    assert moe.stats.tokens_per_expert.tolist() == [sum(ids[t].count(e) for t in range(T) if valid[t])
                                                    for e in range(E)]

    balance, z, entropy = ref_hierarchical_losses(router_in.detach(), params["group_weight"].detach(),
                                                  params["weight"].detach(), G, groups, ids, valid)
    assert moe.stats.load_balancing_loss.item() == pytest.approx(balance, rel=1e-10)
    assert moe.stats.z_loss.item() == pytest.approx(z, rel=1e-10)
    assert moe.stats.router_entropy.item() == pytest.approx(entropy, rel=1e-10)
    assert moe.aux_loss.item() == pytest.approx(0.1 * balance + 0.01 * z, rel=1e-10)

    upstream = torch.randn(T, D, dtype=F64, generator=torch.Generator().manual_seed(7))
    (y * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    for name in ("group_weight", "weight"):
        assert_close(getattr(moe.router, name).grad, params[name].grad, rtol=1e-9, atol=1e-12)
        assert params[name].grad.abs().sum() > 0  # both gates learn from the output


def test_hierarchical_balance_losses_train_both_gates():
    moe = make_layer("hierarchical", 8, 2, n_groups=4, topk_groups=1, aux_loss_coef=1.0, z_loss_coef=0.0)
    x = x_of(10)
    moe(x)
    moe.aux_loss.backward()
    group_weight = moe.router.group_weight.detach().clone().requires_grad_()
    weight = moe.router.weight.detach().clone().requires_grad_()
    out = routing.HierarchicalRouter(D, 8, 2, n_groups=4, topk_groups=1)
    del out.group_weight, out.weight
    out.group_weight, out.weight = group_weight, weight
    routed = out(x)
    out.balance_losses(routed, None).load_balancing_loss.backward()
    assert_close(moe.router.group_weight.grad, group_weight.grad, rtol=1e-12, atol=0)
    assert group_weight.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_hierarchical_gradcheck():
    moe = make_layer("hierarchical", 8, 4, n_groups=4, topk_groups=2)
    router = moe.router
    x = x_of(5).requires_grad_()
    group_weight = router.group_weight.detach().clone().requires_grad_()
    weight = router.weight.detach().clone().requires_grad_()
    del router.group_weight, router.weight

    def gate(x, group_weight, weight):
        router.group_weight, router.weight = group_weight, weight
        out = router(x)
        return out.weights, out.logits, router.balance_losses(out, None).z_loss

    assert torch.autograd.gradcheck(gate, (x, group_weight, weight), eps=1e-6, atol=1e-7)


def test_hierarchical_defaults_and_primary_gate_picks_the_group():
    assert [routing.HierarchicalRouter.default_groups(e) for e in (1, 4, 6, 7, 12, 16, 64)] == [1, 2, 2, 1, 3, 4, 8]
    moe = make_layer("hierarchical", 6, 2)
    assert (moe.router.n_groups, moe.router.topk_groups, moe.router.topk_in_group) == (2, 1, 2)
    # Unlike group-limited softmax (groups ranked by the flat gate's scores), the primary gate alone picks the
    # group: make it prefer group 1 and the secondary gate prefer group 0's experts; group 1 still wins.
    x = x_of(1)
    with torch.no_grad():
        moe.router.group_weight.zero_()
        moe.router.group_weight[1] = x[0]
        moe.router.weight.zero_()
        moe.router.weight[:3] = 10 * x[0]
    assert sorted(moe.router(x).expert_ids[0].tolist()) == [3, 4]


# ================================================================================================ both: bad options


@pytest.mark.parametrize("kwargs,needle", [
    (dict(router="dselect_k", smooth_step_gamma=0.0), "smooth_step_gamma must be a number > 0"),
    (dict(router="dselect_k", smooth_step_gamma=float("nan")), "smooth_step_gamma must be a number > 0"),
    (dict(router="dselect_k", selector_entropy_coef=-1.0), "selector_entropy_coef must be a number >= 0"),
    (dict(router="dselect_k", normalize_weights=True), "normalize_weights must be None"),
    (dict(router="dselect_k", n_groups=2), "n_groups / topk_groups apply to"),
    (dict(router="softmax", smooth_step_gamma=1.0), "smooth_step_gamma applies to router='dselect_k' only"),
    (dict(router="hierarchical", selector_entropy_coef=0.1), "selector_entropy_coef applies to router='dselect_k'"),
    (dict(router="hierarchical", n_groups=3), r"router='hierarchical'\): n_groups must be a positive int dividing"),
    (dict(router="hierarchical", n_groups=2, topk_groups=3), r"topk_groups must be an int in \[1, n_groups=2\]"),
    (dict(router="hierarchical", n_groups=4, topk_groups=2, top_k=3), "top_k=3 must be topk_groups=2 times"),
    (dict(router="hierarchical", n_groups=4, topk_groups=1, top_k=3), "at most the 2 experts of a group"),
    (dict(router="hierarchical", routed_scaling_factor=2.0), "routed_scaling_factor applies to"),
    (dict(router="dselect_k", seq_balance_loss_coef=0.1), "seq_balance_loss_coef counts each token's k choices"),
])
def test_bad_structured_router_options(kwargs, needle):
    base = dict(capacity_factor=1.25)
    base.update(kwargs)
    top_k = base.pop("top_k", 2)
    with pytest.raises(ValueError, match=needle):
        torch_moe.MoE(D, FF, 8, top_k, **base)


def test_dselect_k_refuses_expert_parallelism():
    with pytest.raises(ValueError, match="dselect_k.*does not support expert_parallel_group"):
        routing.DSelectKRouter.check(8, 2, routing.RouterOptions(), capacity_factor=None, drop_policy="position",
                                     expert_parallel=True)


@pytest.mark.parametrize("router,kwargs", [("dselect_k", dict(selector_entropy_coef=0.01)),
                                           ("hierarchical", dict(n_groups=2, topk_groups=2))])
def test_structured_routers_train(router, kwargs):
    torch.manual_seed(0)
    moe = torch_moe.MoE(D, FF, 4, 2, router=router, capacity_factor=None, **kwargs)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(64, D, generator=g), torch.randn(64, D, generator=g)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.mse_loss(moe(x), target) + moe.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in moe.router.parameters())


@pytest.mark.parametrize("router,kwargs,capacity_factor", [("dselect_k", {}, 1.5),
                                                            ("hierarchical", dict(n_groups=2, topk_groups=2), None)])
def test_structured_routers_compile_and_empty_input(router, kwargs, capacity_factor):
    torch.manual_seed(0)
    moe = torch_moe.MoE(D, FF, 4, 2, router=router, capacity_factor=capacity_factor, **kwargs).eval()
    x = torch.randn(2, 6, D)
    eager = moe(x)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    empty = moe(torch.randn(0, D))
    assert empty.shape == (0, D) and moe.aux_loss.item() == 0.0
    assert moe.stats.tokens_per_expert.tolist() == [0] * 4


def test_surgery_refuses_what_the_structured_routers_cannot_support():
    dselect = make_layer("dselect_k", 4, 2)
    with pytest.raises(ValueError, match="router='dselect_k' routes every expert.*criterion='weight'"):
        torch_moe.surgery.expert_importance(dselect, x_of(6), "frequency")
    weight = torch_moe.surgery.expert_importance(dselect, x_of(6), "weight")
    assert_close(weight, dselect.router.gates(dselect.router.eval()(x_of(6))).mean(0), rtol=1e-12, atol=0)
    for moe in (dselect, make_layer("hierarchical", 7, 2)):  # 7 experts: one group, not refused as group-limited
        with pytest.raises(ValueError, match=f"router='{moe.router_name}' is not supported"):
            torch_moe.surgery.prune_experts(moe, keep=[0, 1, 2])
