"""Tests of torch_moe.ops.permute and unpermute (dropless): reference, opcheck, gradcheck, bad input, padding."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from torch_moe import ops

PERMUTE = torch.ops.torch_moe.permute.default
UNPERMUTE = torch.ops.torch_moe.unpermute.default

# (T, E, k, d): E not a power of two, k = E, T = 0, one expert, experts left empty (E > T * k).
SHAPES = [(32, 6, 2, 8), (16, 4, 4, 16), (0, 6, 2, 8), (9, 1, 1, 5), (3, 8, 2, 4), (64, 6, 3, 4)]


def _randn(shape, gen, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _valid_mask(T, gen, masked):
    if not masked or T == 0:
        return None
    mask = torch.rand(T, generator=gen) < 0.7
    mask[0] = False
    return mask


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,d", SHAPES)
def test_permute_matches_reference(device, dtype, gen, T, E, k, d, masked):
    ids = ref.distinct_expert_ids(T, E, k, gen)
    valid = _valid_mask(T, gen, masked)
    x = _randn((T, d), gen, dtype, device)
    out = ops.permute(x, ids.to(device), E, None if valid is None else valid.to(device))
    rows, row_index, offsets = ref.permute(x, ids, E, valid)
    assert out.rows.shape == (T * k, d) and out.rows.dtype == dtype and out.rows.device == x.device
    assert out.row_index.dtype == torch.int64 and out.offsets.dtype == torch.int64
    assert torch.equal(out.rows.cpu().to(torch.float64), rows)  # a copy: exact in every dtype
    assert torch.equal(out.row_index.cpu(), row_index)
    assert torch.equal(out.offsets.cpu(), offsets)


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,d", SHAPES)
def test_unpermute_matches_reference(device, dtype, gen, T, E, k, d, masked):
    ids = ref.distinct_expert_ids(T, E, k, gen)
    _, row_index, _ = ref.permute(torch.zeros(T, 1), ids, E, _valid_mask(T, gen, masked))
    rows = _randn((T * k, d), gen, dtype, device)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
    y = ops.unpermute(rows, weights, row_index.to(device))
    assert y.shape == (T, d) and y.dtype == dtype and y.device == rows.device
    torch.testing.assert_close(y.cpu().to(torch.float64), ref.unpermute(rows, weights, row_index), **ref.tolerance(dtype))


def test_unpermute_with_more_rows_than_assignments(device, gen):
    # rows may come from a padded grouped GEMM with extra rows that no token reads.
    T, k, N, d = 5, 2, 16, 3
    row_index = torch.randperm(N, generator=gen)[: T * k].reshape(T, k)
    rows = _randn((N, d), gen, torch.float32, device)
    weights = torch.rand(T, k, generator=gen).to(device)
    y = ops.unpermute(rows, weights, row_index.to(device))
    torch.testing.assert_close(
        y.cpu().double(), ref.unpermute(rows, weights, row_index), **ref.tolerance(torch.float32)
    )


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
def test_round_trip(device, dtype, gen, masked):
    T, E, k, d = 40, 6, 2, 16
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    valid = _valid_mask(T, gen, masked)
    valid = None if valid is None else valid.to(device)
    x = _randn((T, d), gen, dtype, device)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
    out = ops.permute(x, ids, E, valid)
    y = ops.unpermute(out.rows, weights, out.row_index)
    expected = weights.cpu().double().sum(dim=1, keepdim=True) * x.cpu().double()
    if valid is not None:
        expected[~valid.cpu()] = 0.0
    torch.testing.assert_close(y.cpu().double(), expected, **ref.tolerance(dtype))


def test_noncontiguous_inputs(device, gen):
    T, E, k, d = 20, 6, 3, 8
    ids = ref.distinct_expert_ids(T, E, k, gen)
    x = _randn((d, T), gen, torch.float32, device).t()
    ids_nc = ids.t().contiguous().t().to(device)
    assert not x.is_contiguous() and not ids_nc.is_contiguous()
    out = ops.permute(x, ids_nc, E)
    rows, row_index, offsets = ref.permute(x, ids, E)
    assert torch.equal(out.rows.cpu().double(), rows)
    assert torch.equal(out.row_index.cpu(), row_index)
    rows_nc = _randn((d, T * k), gen, torch.float32, device).t()
    weights = torch.rand(k, T, generator=gen).to(device).t()
    row_index_nc = row_index.t().contiguous().t().to(device)
    torch.testing.assert_close(
        ops.unpermute(rows_nc, weights, row_index_nc).cpu().double(),
        ref.unpermute(rows_nc, weights, row_index),
        **ref.tolerance(torch.float32),
    )


# ---------------------------------------------------------------------------------------------- semantics


def test_permute_groups_by_expert_in_token_order_and_pads(device, dtype):
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=dtype, device=device)
    ids = torch.tensor([[1, 0], [0, 2], [1, 2], [2, 0]], device=device)
    valid = torch.tensor([True, True, False, True], device=device)
    out = ops.permute(x, ids, 3, valid)
    # Expert 0: tokens 0, 1, 3; expert 1: token 0 (token 2 is padding); expert 2: tokens 1, 3; two zero rows.
    assert out.offsets.cpu().tolist() == [0, 3, 4, 6]
    assert out.rows.cpu().to(torch.float64).flatten().tolist() == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 0.0, 0.0]
    assert out.row_index.cpu().tolist() == [[3, 0], [1, 4], [-1, -1], [5, 2]]


def test_rows_past_offsets_are_zero(device, dtype, gen):
    T, E, k, d = 24, 6, 2, 4
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    valid = (torch.arange(T) % 3 != 0).to(device)
    x = _randn((T, d), gen, dtype, device) + 10.0  # no row of x is zero
    out = ops.permute(x, ids, E, valid)
    end = int(out.offsets[-1])
    assert end == int(valid.sum()) * k
    assert bool((out.rows[end:] == 0).all())
    assert bool((out.rows[:end] != 0).all())
    assert bool((out.row_index[~valid] == -1).all())
    assert bool((out.row_index[valid] >= 0).all())
    # Every real row is used exactly once.
    assert sorted(out.row_index[valid].flatten().tolist()) == list(range(end))


def test_permute_all_padding(device, dtype):
    x = torch.ones(3, 2, dtype=dtype, device=device)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]], device=device)
    out = ops.permute(x, ids, 4, torch.zeros(3, dtype=torch.bool, device=device))
    assert out.offsets.cpu().tolist() == [0, 0, 0, 0, 0]
    assert bool((out.rows == 0).all()) and out.rows.shape == (6, 2)
    assert bool((out.row_index == -1).all())


def test_unpermute_skips_padding(device, dtype):
    rows = torch.tensor([[1.0], [10.0], [100.0]], dtype=dtype, device=device)
    weights = torch.tensor([[0.5, 2.0], [1.0, 1.0], [3.0, 3.0]], dtype=ref.router_dtype(dtype), device=device)
    row_index = torch.tensor([[1, 0], [2, -1], [-1, -1]], device=device)
    y = ops.unpermute(rows, weights, row_index)
    assert y.cpu().to(torch.float64).flatten().tolist() == [7.0, 100.0, 0.0]


# ---------------------------------------------------------------------------------------------- opcheck


def _cases(device, dtype, gen):
    """(x, ids, E, valid, rows, weights, row_index): E = 6, T = 0, k = E, padding, empty experts."""
    out = []
    for T, E, k, d, masked in [(16, 6, 2, 8, False), (0, 6, 2, 8, False), (6, 6, 6, 4, False), (10, 6, 2, 4, True),
                               (2, 7, 2, 3, False)]:
        ids = ref.distinct_expert_ids(T, E, k, gen)
        valid = _valid_mask(T, gen, masked)
        _, row_index, _ = ref.permute(torch.zeros(T, 1), ids, E, valid)
        x = _randn((T, d), gen, dtype, device).requires_grad_()
        rows = _randn((T * k, d), gen, dtype, device).requires_grad_()
        weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
        valid = None if valid is None else valid.to(device)
        out.append((x, ids.to(device), E, valid, rows, weights.requires_grad_(), row_index.to(device)))
    return out


def test_opcheck_permute(device, dtype, gen):
    for x, ids, E, valid, _, _, _ in _cases(device, dtype, gen):
        torch.library.opcheck(PERMUTE, (x, ids, E), {"valid_mask": valid})


def test_opcheck_unpermute(device, dtype, gen):
    for _, _, _, _, rows, weights, row_index in _cases(device, dtype, gen):
        torch.library.opcheck(UNPERMUTE, (rows, weights, row_index))


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,d", [(10, 4, 2, 3), (5, 6, 6, 2), (6, 3, 1, 4)])
def test_gradcheck_permute(device, gen, T, E, k, d, masked):
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    valid = _valid_mask(T, gen, masked)
    valid = None if valid is None else valid.to(device)
    x = _randn((T, d), gen, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, ids, E, valid).rows, (x,))


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,d", [(10, 4, 2, 3), (5, 6, 6, 2), (6, 3, 1, 4)])
def test_gradcheck_unpermute(device, gen, T, E, k, d, masked):
    ids = ref.distinct_expert_ids(T, E, k, gen)
    _, row_index, _ = ref.permute(torch.zeros(T, 1), ids, E, _valid_mask(T, gen, masked))
    rows = _randn((T * k, d), gen, torch.float64, device).requires_grad_()
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    row_index = row_index.to(device)
    assert torch.autograd.gradcheck(lambda r, w: ops.unpermute(r, w, row_index), (rows, weights))


# ---------------------------------------------------------------------------------------------- bad input


def _good(device):
    x = torch.randn(4, 3, device=device)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], device=device)
    rows = torch.randn(8, 3, device=device)
    weights = torch.rand(4, 2, device=device)
    row_index = torch.tensor([[0, 3], [4, 6], [7, 1], [2, -1]], device=device)
    return x, ids, rows, weights, row_index


def test_good_input_is_accepted(device):
    x, ids, rows, weights, row_index = _good(device)
    ops.permute(x, ids, 3)
    ops.unpermute(rows, weights, row_index)


def test_permute_bad_x(device):
    x, ids, _, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'x'"):
        ops.permute(x.to(torch.int32), ids, 3)
    with pytest.raises(RuntimeError, match="'x'"):
        ops.permute(x.reshape(-1), ids, 3)
    with pytest.raises(RuntimeError, match="'x'|expert_ids"):
        ops.permute(x[:3], ids, 3)


def test_permute_bad_expert_ids(device):
    x, ids, _, _, _ = _good(device)
    with pytest.raises(RuntimeError, match=r"expert_ids.*int64|int64.*expert_ids"):
        ops.permute(x, ids.to(torch.int32), 3)
    for bad in (3, -1):
        bad_ids = ids.clone()
        bad_ids[2, 1] = bad
        with pytest.raises(RuntimeError, match=r"expert_ids.*\[0, "):
            ops.permute(x, bad_ids, 3)


def test_permute_bad_valid_mask(device):
    x, ids, _, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="valid_mask"):
        ops.permute(x, ids, 3, torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="valid_mask"):
        ops.permute(x, ids, 3, torch.ones(4, dtype=torch.float32, device=device))


def test_unpermute_bad_rows_and_weights(device):
    _, _, rows, weights, row_index = _good(device)
    with pytest.raises(RuntimeError, match="'rows'"):
        ops.unpermute(rows.to(torch.int64), weights, row_index)
    with pytest.raises(RuntimeError, match="'rows'"):
        ops.unpermute(rows.reshape(-1), weights, row_index)
    with pytest.raises(RuntimeError, match="'weights'"):
        ops.unpermute(rows, weights[:3], row_index)
    with pytest.raises(RuntimeError, match="'weights'"):
        ops.unpermute(rows, weights.to(torch.int64), row_index)


def test_unpermute_bad_row_index(device):
    _, _, rows, weights, row_index = _good(device)
    with pytest.raises(RuntimeError, match=r"row_index.*int64|int64.*row_index"):
        ops.unpermute(rows, weights, row_index.to(torch.int32))
    for bad in (8, -2):
        bad_index = row_index.clone()
        bad_index[1, 1] = bad
        with pytest.raises(RuntimeError, match="'row_index'"):
            ops.unpermute(rows, weights, bad_index)


def test_mixed_devices(cuda_device):
    x, ids, rows, weights, row_index = _good(cuda_device)
    with pytest.raises(RuntimeError, match="device"):
        ops.permute(x, ids.cpu(), 3)
    with pytest.raises(RuntimeError, match="device"):
        ops.unpermute(rows, weights.cpu(), row_index)
