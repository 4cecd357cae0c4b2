"""Tests of the routing-ablation ops: group-limited router_topk, expert_choice and noisy_topk_load against the
float64 references in reference_routing.py, plus opcheck, gradcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import reference as ref
import reference_routing as rr
from torch_moe import ops

ROUTER_TOPK = torch.ops.torch_moe.router_topk.default
EXPERT_CHOICE = torch.ops.torch_moe.expert_choice.default
NOISY_TOPK_LOAD = torch.ops.torch_moe.noisy_topk_load.default


# ------------------------------------------------------------------------------------- group-limited top-k


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n_groups,topk_groups,k", [(4, 2, 3), (4, 1, 2), (8, 3, 4), (2, 2, 4), (16, 4, 4)])
def test_group_limited_matches_reference(device, gen, score_func, n_groups, topk_groups, k):
    logits = torch.randn(40, 16, dtype=torch.float64, generator=gen)
    bias = torch.randn(16, dtype=torch.float64, generator=gen) * 0.1
    out = ops.router_topk(logits.to(device), k, score_func, bias.to(device), True, n_groups, topk_groups)
    weights, ids = rr.group_limited_topk(logits, k, score_func, bias, True, n_groups, topk_groups)
    assert torch.equal(out.expert_ids.cpu(), ids)
    assert_close(out.weights.cpu(), weights, rtol=1e-12, atol=1e-12)


def test_group_limited_really_restricts(device):
    # Group 0 = experts {0, 1} holds the best single expert, group 1 = {2, 3} the best pair: with one group
    # allowed, the token must take both experts of group 1, though expert 0 alone scores highest.
    logits = torch.tensor([[3.0, -5.0, 2.0, 2.0]], device=device)
    unrestricted = ops.router_topk(logits, 2, "sigmoid", None, True, 1, 1)
    grouped = ops.router_topk(logits, 2, "sigmoid", None, True, 2, 1)
    assert unrestricted.expert_ids.tolist() == [[0, 2]]
    assert grouped.expert_ids.tolist() == [[2, 3]]


def test_group_ties_go_to_lower_group(device):
    logits = torch.zeros(3, 8, device=device)
    out = ops.router_topk(logits, 2, "softmax", None, True, 4, 1)
    assert out.expert_ids.tolist() == [[0, 1]] * 3


def test_all_groups_allowed_equals_plain(device, gen):
    logits = torch.randn(30, 12, generator=gen).to(device)
    plain = ops.router_topk(logits, 3, "sigmoid")
    grouped = ops.router_topk(logits, 3, "sigmoid", None, True, 4, 4)
    assert torch.equal(plain.expert_ids, grouped.expert_ids)
    assert torch.equal(plain.weights, grouped.weights)


def test_group_limited_gradcheck(device, gen):
    logits = torch.randn(6, 8, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.router_topk(x, 3, "sigmoid", None, True, 4, 2).weights, (logits,))


def test_group_limited_opcheck(device, gen):
    logits = ref.separated_logits(9, 8, gen).float().to(device).requires_grad_()
    torch.library.opcheck(ROUTER_TOPK, (logits, 3), {"score_func": "sigmoid", "n_groups": 4, "topk_groups": 2})
    torch.library.opcheck(ROUTER_TOPK, (logits[:0], 2), {"n_groups": 2, "topk_groups": 1})


@pytest.mark.parametrize("n_groups,topk_groups,k,needle", [
    (3, 1, 2, "'n_groups'"), (0, 1, 2, "'n_groups'"), (4, 5, 2, "'topk_groups'"), (4, 0, 2, "'topk_groups'"),
    (4, 1, 3, "'k' = 3 is larger than the 2 experts"),
])
def test_group_limited_bad_input(device, n_groups, topk_groups, k, needle):
    with pytest.raises(RuntimeError, match=needle):
        ops.router_topk(torch.zeros(2, 8, device=device), k, "softmax", None, True, n_groups, topk_groups)


# ------------------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize("T,E,C", [(12, 4, 3), (7, 3, 7), (20, 5, 1), (5, 6, 9), (0, 3, 2), (9, 2, 0)])
def test_expert_choice_matches_reference(device, dtype, gen, T, E, C):
    logits = ref.separated_logits(T, E, gen)
    valid = torch.rand(T, generator=gen) > 0.25
    out = ops.expert_choice(logits.to(dtype).to(device), C, valid.to(device))
    weights, slots, token_ids = rr.expert_choice(logits.to(dtype).to(torch.float64), C, valid)
    assert torch.equal(out.slots.cpu(), slots)
    assert torch.equal(out.token_ids.cpu(), token_ids)
    assert out.weights.dtype == ref.router_dtype(dtype)
    assert_close(out.weights.cpu().double(), weights, **ref.tolerance(ref.router_dtype(dtype)))
    assert_close(out.scores.cpu().double(), torch.softmax(logits.to(dtype).double(), -1),
                 **ref.tolerance(ref.router_dtype(dtype)))


def test_expert_choice_ties_go_to_lower_token(device):
    logits = torch.zeros(6, 2, device=device)  # every token scores 0.5 for both experts
    out = ops.expert_choice(logits, 4)
    assert out.token_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert out.slots[4:].eq(-1).all() and out.slots[:4].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]


def test_expert_choice_capacity_and_coverage(device, gen):
    logits = torch.randn(32, 4, generator=gen).to(device)
    out = ops.expert_choice(logits, 5)
    assert out.slots.ge(0).sum(0).tolist() == [5, 5, 5, 5]  # every expert full: balanced by construction
    taken = out.slots.ge(0).sum(1)
    assert taken.sum() == 20 and taken.max() <= 4  # a token may get several experts, or none
    assert (taken == 0).any()


def test_expert_choice_skips_padding(device, gen):
    logits = torch.randn(10, 3, generator=gen).to(device)
    valid = torch.tensor([True, False] * 5, device=device)
    out = ops.expert_choice(logits, 8, valid)
    assert out.slots[~valid].eq(-1).all()
    assert out.token_ids[:, 5:].eq(-1).all()  # only 5 valid tokens: the other slots stay empty
    assert out.weights[~valid].eq(0).all()


def test_expert_choice_gradient_matches_reference(device, gen):
    logits = torch.randn(9, 4, dtype=torch.float64, generator=gen)
    upstream = torch.randn(9, 4, dtype=torch.float64, generator=gen)
    mine = logits.clone().to(device).requires_grad_()
    (ops.expert_choice(mine, 3).weights * upstream.to(device)).sum().backward()
    theirs = logits.clone().requires_grad_()
    (rr.expert_choice(theirs, 3)[0] * upstream).sum().backward()
    assert_close(mine.grad.cpu(), theirs.grad, rtol=1e-10, atol=1e-12)


def test_expert_choice_gradcheck(device, gen):
    logits = torch.randn(8, 3, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    valid = torch.tensor([True] * 6 + [False] * 2, device=device)
    assert torch.autograd.gradcheck(lambda x: ops.expert_choice(x, 3, valid).weights, (logits,))


def test_expert_choice_opcheck(device, dtype, gen):
    def logits(T, E):
        return ref.separated_logits(T, E, gen).to(dtype).to(device).requires_grad_()

    valid = torch.tensor([True, False, True, True, False, True, True], device=device)
    torch.library.opcheck(EXPERT_CHOICE, (logits(7, 3), 2))
    torch.library.opcheck(EXPERT_CHOICE, (logits(7, 3), 9, valid))
    torch.library.opcheck(EXPERT_CHOICE, (logits(0, 4), 2))


def test_expert_choice_bad_input(device):
    with pytest.raises(RuntimeError, match="'logits'"):
        ops.expert_choice(torch.zeros(4, dtype=torch.float32, device=device), 2)
    with pytest.raises(RuntimeError, match="'logits'.*float"):
        ops.expert_choice(torch.zeros(4, 3, dtype=torch.int64, device=device), 2)
    with pytest.raises(RuntimeError, match="'capacity' must be >= 0"):
        ops.expert_choice(torch.zeros(4, 3, device=device), -1)
    with pytest.raises(RuntimeError, match="'valid_mask'"):
        ops.expert_choice(torch.zeros(4, 3, device=device), 2, torch.ones(3, dtype=torch.bool, device=device))


# ------------------------------------------------------------------------------------- noisy top-k load


def _load_inputs(T, E, gen, dtype=torch.float64):
    clean = torch.randn(T, E, dtype=dtype, generator=gen)
    std = torch.rand(T, E, dtype=dtype, generator=gen) + 0.2
    noisy = clean + torch.randn(T, E, dtype=dtype, generator=gen) * std
    return clean, noisy, std


@pytest.mark.parametrize("T,E,k", [(11, 5, 2), (6, 4, 1), (5, 3, 3), (0, 4, 2), (13, 8, 7)])
def test_noisy_topk_load_matches_reference(device, gen, T, E, k):
    clean, noisy, std = _load_inputs(T, E, gen)
    valid = torch.rand(T, generator=gen) > 0.3
    mine = [t.clone().to(device).requires_grad_() for t in (clean, noisy, std)]
    theirs = [t.clone().requires_grad_() for t in (clean, noisy, std)]
    upstream = torch.randn(E, dtype=torch.float64, generator=gen)
    load = ops.noisy_topk_load(*mine, k, valid.to(device))
    expected = rr.noisy_topk_load(*theirs, k, valid)
    assert_close(load.cpu(), expected, rtol=1e-10, atol=1e-12)
    if k == E:  # every expert is always chosen: load = valid tokens, nothing to differentiate
        assert torch.equal(load.cpu(), torch.full((E,), float(valid.sum()), dtype=torch.float64))
        (load * upstream.to(device)).sum().backward()
        assert all(t.grad.eq(0).all() for t in mine)
    elif T:
        (load * upstream.to(device)).sum().backward()
        (expected * upstream).sum().backward()
        for a, b in zip(mine, theirs):
            assert_close(a.grad.cpu(), b.grad, rtol=1e-9, atol=1e-12)


def test_noisy_topk_load_is_the_expected_count_of_selections(device, gen):
    # Monte Carlo check of the meaning: redraw only expert e's noise and count how often e lands in the top k.
    T, E, k = 4, 4, 2
    clean, noisy, std = _load_inputs(T, E, gen)
    load = ops.noisy_topk_load(clean.to(device), noisy.to(device), std.to(device), k).cpu()
    draws = 40000
    counts = torch.zeros(E, dtype=torch.float64)
    for e in range(E):
        redrawn = noisy.unsqueeze(0).repeat(draws, 1, 1)
        redrawn[:, :, e] = clean[:, e] + torch.randn(draws, T, dtype=torch.float64, generator=gen) * std[:, e]
        chosen = redrawn.topk(k, dim=2).indices
        counts[e] = (chosen == e).any(2).double().sum(1).mean()
    assert_close(load, counts, rtol=0, atol=0.03)


def test_noisy_topk_load_gradcheck(device, gen):
    clean, noisy, std = (t.to(device).requires_grad_() for t in _load_inputs(5, 4, gen))
    valid = torch.tensor([True, True, False, True, True], device=device)
    assert torch.autograd.gradcheck(lambda c, h, s: ops.noisy_topk_load(c, h, s, 2, valid), (clean, noisy, std))


def test_noisy_topk_load_opcheck(device, dtype, gen):
    clean, noisy, std = (t.to(dtype).to(device).requires_grad_() for t in _load_inputs(6, 4, gen, torch.float64))
    torch.library.opcheck(NOISY_TOPK_LOAD, (clean, noisy, std, 2))
    valid = torch.tensor([True, False, True, True, True, False], device=device)
    torch.library.opcheck(NOISY_TOPK_LOAD, (clean, noisy, std, 4, valid))


def test_noisy_topk_load_bad_input(device):
    z = torch.zeros(3, 4, device=device)
    with pytest.raises(RuntimeError, match="'k' must be in"):
        ops.noisy_topk_load(z, z, z + 1, 5)
    with pytest.raises(RuntimeError, match="'noise_std'"):
        ops.noisy_topk_load(z, z, torch.ones(3, 5, device=device), 2)
    with pytest.raises(RuntimeError, match="'noisy_logits'"):
        ops.noisy_topk_load(z, torch.zeros(3, 4, dtype=torch.int64, device=device), z + 1, 2)
