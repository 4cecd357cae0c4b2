"""Tests of torch_moe.ops.capacity_plan: reference comparison, opcheck, bad input, drop-policy and padding semantics."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from torch_moe import ops

OP = torch.ops.torch_moe.capacity_plan.default

# (T, E, k, capacity): drops, no drops, k = E, T = 0, capacity 0, capacity above T*k, E = 1.
SHAPES = [(32, 6, 2, 4), (64, 8, 2, 16), (20, 6, 6, 7), (0, 6, 2, 3), (16, 4, 1, 0), (10, 3, 2, 100), (9, 1, 1, 5)]


def _valid_mask(T, gen, device, masked):
    if not masked:
        return None
    mask = torch.rand(T, generator=gen) < 0.7
    if T > 1:
        mask[0], mask[-1] = False, True  # a padding token and a real one whatever the draw
    return mask.to(device)


def _check(out, expected):
    slots, tokens_per_expert, kept_per_expert = expected
    for got, want, name in zip(out, (slots, tokens_per_expert, kept_per_expert), out._fields):
        assert got.dtype == torch.int64, name
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,C", SHAPES)
def test_position_matches_reference(device, gen, T, E, k, C, masked):
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    valid = _valid_mask(T, gen, device, masked)
    out = ops.capacity_plan(ids, E, C, "position", None, valid)
    _check(out, ref.capacity_plan(ids, E, C, "position", None, valid))


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,C", SHAPES)
def test_probability_matches_reference(device, dtype, gen, T, E, k, C, masked):
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    # Low-precision priorities round onto few values, so ties (to the lower token index) are exercised too.
    priority = torch.rand(T, k, generator=gen, dtype=torch.float64).to(dtype).to(device)
    valid = _valid_mask(T, gen, device, masked)
    out = ops.capacity_plan(ids, E, C, "probability", priority, valid)
    _check(out, ref.capacity_plan(ids, E, C, "probability", priority, valid))


def test_priority_ignored_by_position_policy(device, gen):
    ids = ref.distinct_expert_ids(24, 6, 2, gen).to(device)
    priority = torch.rand(24, 2, generator=gen).to(device)
    with_priority = ops.capacity_plan(ids, 6, 3, "position", priority)
    without = ops.capacity_plan(ids, 6, 3, "position")
    for a, b in zip(with_priority, without):
        assert torch.equal(a, b)


def test_skewed_routing_and_router_weights_as_priority(device, gen):
    # The usual pipeline: router weights are the priority; most tokens pick expert 0 first.
    T, E, k, C = 48, 6, 2, 5
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    logits[:, 0] += 3.0
    routed = ops.router_topk(logits.to(torch.float32).to(device), k)
    for policy in ("position", "probability"):
        out = ops.capacity_plan(routed.expert_ids, E, C, policy, routed.weights)
        _check(out, ref.capacity_plan(routed.expert_ids.cpu(), E, C, policy, routed.weights.cpu()))
        assert int(out.kept_per_expert[0]) == C and int(out.tokens_per_expert[0]) > C


def test_noncontiguous_inputs(device, gen):
    T, E, k, C = 30, 6, 3, 6
    ids = ref.distinct_expert_ids(T, E, k, gen).t().contiguous().t().to(device)
    priority = torch.rand(k, T, generator=gen).to(device).t()
    assert not ids.is_contiguous() and not priority.is_contiguous()
    for policy in ("position", "probability"):
        out = ops.capacity_plan(ids, E, C, policy, priority)
        _check(out, ref.capacity_plan(ids.cpu(), E, C, policy, priority.cpu()))


# ---------------------------------------------------------------------------------------------- semantics


def test_position_fills_first_choices_before_second(device):
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]], device=device)
    out = ops.capacity_plan(ids, 2, 3)
    # Choice 0 of every token first (t0->e0 s0, t1->e1 s0, t2->e0 s1, t3->e1 s1), then choice 1 in token order.
    assert out.slots.cpu().tolist() == [[0, 2], [0, 2], [1, -1], [1, -1]]
    assert out.tokens_per_expert.cpu().tolist() == [4, 4]
    assert out.kept_per_expert.cpu().tolist() == [3, 3]
    # With room for two, every 2nd choice is dropped, even token 0's, which comes before token 3 in token order.
    out = ops.capacity_plan(ids, 2, 2)
    assert out.slots.cpu().tolist() == [[0, -1], [0, -1], [1, -1], [1, -1]]
    assert out.kept_per_expert.cpu().tolist() == [2, 2]


def test_probability_keeps_highest_priority_ties_to_lower_token(device, dtype):
    ids = torch.zeros(5, 1, dtype=torch.int64, device=device)
    priority = torch.tensor([[0.125], [0.875], [0.5], [0.875], [0.25]], dtype=dtype, device=device)
    out = ops.capacity_plan(ids, 1, 2, "probability", priority)
    # Tokens 1 and 3 tie at the top: token 1 gets slot 0.
    assert out.slots.cpu().tolist() == [[-1], [0], [-1], [1], [-1]]
    assert out.tokens_per_expert.cpu().tolist() == [5]
    assert out.kept_per_expert.cpu().tolist() == [2]
    # A tie at the capacity boundary: of tokens 0, 2 and 3 (all 0.5) only token 0 fits.
    priority = torch.tensor([[0.5], [0.75], [0.5], [0.5], [0.25]], dtype=dtype, device=device)
    out = ops.capacity_plan(ids, 1, 2, "probability", priority)
    assert out.slots.cpu().tolist() == [[1], [0], [-1], [-1], [-1]]


def test_probability_ranks_across_choices(device):
    # A 2nd choice with a high priority beats a 1st choice with a low one (unlike "position").
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]], device=device)
    priority = torch.tensor([[0.25, 0.5], [0.75, 0.875], [0.125, 0.0625]], device=device)
    out = ops.capacity_plan(ids, 2, 1, "probability", priority)
    assert out.slots.cpu().tolist() == [[-1, -1], [0, 0], [-1, -1]]
    assert out.tokens_per_expert.cpu().tolist() == [3, 3]
    assert out.kept_per_expert.cpu().tolist() == [1, 1]


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_padding_tokens_take_no_slot_and_are_not_counted(device, policy):
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]], device=device)
    priority = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], device=device)
    valid = torch.tensor([False, True, False, True], device=device)
    out = ops.capacity_plan(ids, 3, 4, policy, priority, valid)
    # Position: t1 c0 -> e0 s0, t3 c0 -> e2 s0, t1 c1 -> e2 s1, t3 c1 -> e1 s0; probability ranks e2's t3 (0.6)
    # above t1 (0.2): the same slots.
    assert out.slots.cpu().tolist() == [[-1, -1], [0, 1], [-1, -1], [0, 0]]
    assert out.tokens_per_expert.cpu().tolist() == [1, 1, 2]
    assert out.kept_per_expert.cpu().tolist() == [1, 1, 2]
    # Everything masked: nothing counted, nothing kept.
    out = ops.capacity_plan(ids, 3, 4, policy, priority, torch.zeros(4, dtype=torch.bool, device=device))
    assert (out.slots == -1).all()
    assert out.tokens_per_expert.cpu().tolist() == [0, 0, 0]
    assert out.kept_per_expert.cpu().tolist() == [0, 0, 0]


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_kept_slots_fill_each_expert_from_zero(device, gen, policy):
    T, E, k, C = 40, 6, 3, 9
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    priority = torch.rand(T, k, generator=gen).to(device)
    slots, tokens_per_expert, kept_per_expert = ops.capacity_plan(ids, E, C, policy, priority)
    assert torch.equal(kept_per_expert, tokens_per_expert.clamp(max=C))
    assert int(tokens_per_expert.sum()) == T * k
    for e in range(E):
        taken = sorted(slots[(ids == e) & (slots >= 0)].cpu().tolist())
        assert taken == list(range(int(kept_per_expert[e])))


# ---------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases(device, dtype, gen):
    def ids(T, E, k):
        return ref.distinct_expert_ids(T, E, k, gen).to(device)

    def prio(T, k, grad=False):
        return torch.rand(T, k, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_(grad)

    mask = torch.tensor([True, False, True, True, False, True, True, True], device=device)
    return [
        ((ids(32, 6, 2), 6, 4), {}),  # drops
        ((ids(0, 6, 2), 6, 4), {"drop_policy": "position"}),
        ((ids(12, 6, 6), 6, 7), {"drop_policy": "probability", "priority": prio(12, 6)}),  # k = E
        ((ids(8, 6, 2), 6, 2), {"drop_policy": "probability", "priority": prio(8, 2, grad=True), "valid_mask": mask}),
        ((ids(8, 5, 2), 5, 0), {"valid_mask": mask}),
        ((ids(0, 6, 2), 6, 4), {"drop_policy": "probability", "priority": prio(0, 2)}),
    ]


def test_opcheck(device, dtype, gen):
    for args, kwargs in _opcheck_cases(device, dtype, gen):
        torch.library.opcheck(OP, args, kwargs)


# ---------------------------------------------------------------------------------------------- bad input


def _ids(device, T=6, k=2):
    return torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]], device=device)[:T, :k]


def test_bad_expert_ids(device):
    ids = _ids(device)
    with pytest.raises(RuntimeError, match=r"expert_ids.*int64|int64.*expert_ids"):
        ops.capacity_plan(ids.to(torch.int32), 4, 2)
    with pytest.raises(RuntimeError, match="expert_ids"):
        ops.capacity_plan(ids.reshape(-1), 4, 2)


@pytest.mark.parametrize("bad_id", [4, -1, 100])
@pytest.mark.parametrize("policy", ["position", "probability"])
def test_expert_ids_out_of_range(device, bad_id, policy):
    ids = _ids(device).clone()
    ids[3, 1] = bad_id
    priority = torch.rand(6, 2, device=device)
    with pytest.raises(RuntimeError, match=r"expert_ids.*\[0, "):
        ops.capacity_plan(ids, 4, 2, policy, priority)


def test_bad_drop_policy(device):
    with pytest.raises(RuntimeError, match="drop_policy"):
        ops.capacity_plan(_ids(device), 4, 2, "random")


def test_probability_needs_priority(device):
    with pytest.raises(RuntimeError, match="priority"):
        ops.capacity_plan(_ids(device), 4, 2, "probability")


def test_bad_priority(device):
    ids = _ids(device)
    with pytest.raises(RuntimeError, match="priority"):
        ops.capacity_plan(ids, 4, 2, "probability", torch.rand(6, 3, device=device))
    with pytest.raises(RuntimeError, match="priority"):
        ops.capacity_plan(ids, 4, 2, "probability", torch.rand(5, 2, device=device))
    with pytest.raises(RuntimeError, match="priority"):
        ops.capacity_plan(ids, 4, 2, "probability", torch.ones(6, 2, dtype=torch.int64, device=device))


def test_bad_valid_mask(device):
    ids = _ids(device)
    with pytest.raises(RuntimeError, match="valid_mask"):
        ops.capacity_plan(ids, 4, 2, valid_mask=torch.ones(5, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="valid_mask"):
        ops.capacity_plan(ids, 4, 2, valid_mask=torch.ones(6, dtype=torch.int64, device=device))


def test_bad_capacity_and_num_experts(device):
    ids = _ids(device)
    with pytest.raises(RuntimeError, match="capacity"):
        ops.capacity_plan(ids, 4, -1)
    with pytest.raises(RuntimeError, match="num_experts"):
        ops.capacity_plan(ids, 0, 2)


def test_mixed_devices(cuda_device):
    ids = _ids(cuda_device)
    with pytest.raises(RuntimeError, match="device"):
        ops.capacity_plan(ids, 4, 2, "probability", torch.rand(6, 2))
    with pytest.raises(RuntimeError, match="device"):
        ops.capacity_plan(ids, 4, 2, valid_mask=torch.ones(6, dtype=torch.bool))
