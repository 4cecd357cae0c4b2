"""Tests of torch_moe.ops.router_topk: reference comparison, opcheck, gradcheck, bad input, tie/NaN/bias semantics."""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from torch_moe import ops

OP = torch.ops.torch_moe.router_topk.default
SCORE_FUNCS = ["softmax", "sigmoid"]


def _check_against_reference(out, logits, k, score_func, selection_bias=None, normalize=True):
    weights, expert_ids, scores = ref.router_topk(logits, k, score_func, selection_bias, normalize)
    rdt = ref.router_dtype(logits.dtype)
    torch.testing.assert_close(out.expert_ids.cpu(), expert_ids, rtol=0, atol=0)
    torch.testing.assert_close(out.weights.cpu().to(torch.float64), weights, **ref.tolerance(rdt))
    torch.testing.assert_close(out.scores.cpu().to(torch.float64), scores, **ref.tolerance(rdt))


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("T,E,k", [(33, 6, 2), (64, 8, 8), (5, 1, 1), (0, 6, 2), (17, 5, 3)])
def test_matches_reference(device, dtype, gen, score_func, normalize, T, E, k):
    logits = ref.separated_logits(T, E, gen).to(dtype).to(device)
    out = ops.router_topk(logits, k, score_func, None, normalize)
    _check_against_reference(out, logits, k, score_func, None, normalize)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("E", [6, 67])
def test_matches_reference_with_ties(device, dtype, gen, score_func, k, E):
    # Integer logits from a small set: many exact ties (equal logits give bitwise equal scores in any precision),
    # while distinct values stay far apart. E = 67 puts tied experts in a vector loop's body and in its tail.
    logits = torch.randint(-2, 3, (48, E), generator=gen).to(dtype).to(device)
    out = ops.router_topk(logits, k, score_func)
    _check_against_reference(out, logits, k, score_func)


def test_output_dtypes_shapes_devices(device, dtype, gen):
    T, E, k = 9, 6, 2
    logits = ref.separated_logits(T, E, gen).to(dtype).to(device)
    out = ops.router_topk(logits, k)
    rdt = ref.router_dtype(dtype)
    assert out.weights.shape == (T, k) and out.weights.dtype == rdt
    assert out.expert_ids.shape == (T, k) and out.expert_ids.dtype == torch.int64
    assert out.scores.shape == (T, E) and out.scores.dtype == rdt
    for t in out:
        assert t.device == logits.device


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_noncontiguous_logits(device, gen, score_func):
    T, E, k = 12, 6, 3
    logits_t = ref.separated_logits(T, E, gen).t().contiguous().to(torch.float32).to(device)
    logits = logits_t.t()  # [T, E] view with strides (1, T)
    assert not logits.is_contiguous()
    out = ops.router_topk(logits, k, score_func)
    _check_against_reference(out, logits, k, score_func)


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_selection_bias_matches_reference(device, gen, score_func):
    T, E, k = 40, 8, 2
    logits = ref.separated_logits(T, E, gen).to(device)
    # Bias values on a coarse grid, large against the score gaps, so biased keys are far from ties.
    bias = (torch.randperm(E, generator=gen).to(torch.float64) * 0.125).to(device)
    out = ops.router_topk(logits, k, score_func, bias)
    _check_against_reference(out, logits, k, score_func, bias)


# ---------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_ties_go_to_lower_expert_id(device, dtype, score_func, normalize):
    T, E, k = 4, 6, 3
    logits = torch.zeros(T, E, dtype=dtype, device=device)
    out = ops.router_topk(logits, k, score_func, None, normalize)
    assert out.expert_ids.cpu().tolist() == [[0, 1, 2]] * T
    if normalize:
        expected = 1.0 / k
    else:
        expected = 1.0 / E if score_func == "softmax" else 0.5
    torch.testing.assert_close(
        out.weights.cpu().to(torch.float64), torch.full((T, k), expected, dtype=torch.float64), rtol=1e-6, atol=1e-7
    )
    # Partial ties: the two equal best experts come in id order, then the best of the rest.
    logits = torch.tensor([[0.0, 2.0, -1.0, 2.0, 1.0, 2.0]], dtype=dtype, device=device)
    out = ops.router_topk(logits, 4, score_func, None, normalize)
    assert out.expert_ids.cpu().tolist() == [[1, 3, 5, 4]]


def test_ties_with_selection_bias_go_to_lower_expert_id(device):
    # Biased keys tie exactly (0.5 + 0.25 == 0.75 + 0): the lower id wins.
    logits = torch.zeros(1, 4, dtype=torch.float32, device=device)  # sigmoid scores 0.5 each
    bias = torch.tensor([0.0, 0.25, 0.0, 0.25], dtype=torch.float32, device=device)
    out = ops.router_topk(logits, 3, "sigmoid", bias, False)
    assert out.expert_ids.cpu().tolist() == [[1, 3, 0]]


def test_nan_sigmoid_scores_rank_last(device, dtype):
    nan = float("nan")
    logits = torch.tensor(
        [[nan, 1.0, -2.0, nan, 0.5, 3.0], [0.0, nan, nan, nan, -1.0, nan], [nan] * 6], dtype=dtype, device=device
    )
    out = ops.router_topk(logits, 3, "sigmoid", None, False)
    ids = out.expert_ids.cpu().tolist()
    assert ids[0] == [5, 1, 4]
    assert ids[1][:2] == [0, 4]
    assert ids[1][2] in (1, 2, 3, 5)
    for row in ids:
        assert all(0 <= e < 6 for e in row) and len(set(row)) == 3
    # The chosen numeric scores are still exact sigmoids.
    torch.testing.assert_close(
        out.weights[0].cpu().to(torch.float64),
        torch.sigmoid(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)),
        **ref.tolerance(torch.float32),
    )


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_non_finite_logits_give_valid_ids(device, dtype, score_func, k):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [
            [nan, 0.0, 1.0, 2.0, 3.0, 4.0],
            [nan] * 6,
            [inf, 0.0, inf, -inf, 1.0, nan],
            [-inf] * 6,
            [0.0, 1.0, 2.0, 3.0, 4.0, nan],
        ],
        dtype=dtype,
        device=device,
    )
    out = ops.router_topk(logits, k, score_func)
    ids = out.expert_ids.cpu()
    assert ids.dtype == torch.int64 and ids.shape == (5, k)
    assert bool(((ids >= 0) & (ids < 6)).all()), ids
    for row in ids.tolist():
        assert len(set(row)) == k, f"an expert was chosen twice: {row}"


def test_softmax_of_non_finite_rows(device):
    # The limits of the softmax: +inf experts share the mass, an all -inf row is uniform, a NaN logit poisons its row.
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[inf, 0.0, inf, -inf, 1.0, 2.0], [-inf] * 6, [0.0, 1.0, nan, 3.0, 4.0, 5.0], [-inf, 0.0, 0.0, -inf, 1.0, 0.0]],
        dtype=torch.float32,
        device=device,
    )
    out = ops.router_topk(logits, 2, "softmax", None, False)
    scores = out.scores.cpu()
    assert scores[0].tolist() == [0.5, 0.0, 0.5, 0.0, 0.0, 0.0]
    assert torch.equal(scores[1], torch.full((6,), 1.0 / 6))
    assert bool(scores[2].isnan().all())
    torch.testing.assert_close(scores[3], torch.tensor([0.0, 1.0, 1.0, 0.0, math.e, 1.0]) / (3 + math.e))
    assert out.expert_ids.cpu().tolist() == [[0, 2], [0, 1], [0, 1], [4, 1]]


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_selection_bias_changes_choice_not_weights(device, score_func, normalize):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, -0.5, 1.5, 0.0]], dtype=torch.float32, device=device)
    plain = ops.router_topk(logits, 2, score_func, None, normalize)
    assert plain.expert_ids.cpu().tolist() == [[0, 1], [2, 0]]
    bias = torch.tensor([0.0, 0.0, -2.0, 2.0], dtype=torch.float32, device=device)
    biased = ops.router_topk(logits, 2, score_func, bias, normalize)
    assert biased.expert_ids.cpu().tolist() == [[3, 0], [3, 0]]
    # The weights are the unbiased scores of the chosen experts (renormalised if asked), not the biased keys.
    scores = ref.router_scores(logits, score_func)
    chosen = scores.gather(1, biased.expert_ids.cpu())
    if normalize:
        chosen = chosen / chosen.sum(dim=1, keepdim=True)
    torch.testing.assert_close(biased.weights.cpu().to(torch.float64), chosen, **ref.tolerance(torch.float32))
    # Scores do not see the bias either.
    torch.testing.assert_close(biased.scores, plain.scores, rtol=0, atol=0)


def test_scores_and_ids_do_not_require_grad(device):
    logits = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    out = ops.router_topk(logits, 2)
    assert out.weights.requires_grad
    assert not out.expert_ids.requires_grad
    assert not out.scores.requires_grad


# ---------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases(dtype, device, gen):
    def logits(T, E):
        return ref.separated_logits(T, E, gen).to(dtype).to(device).requires_grad_()

    cases = [
        ((logits(7, 6), 2), {}),
        ((logits(0, 6), 2), {"score_func": "softmax"}),
        ((logits(5, 6), 6), {"score_func": "sigmoid", "normalize": False}),
        ((logits(4, 6), 1), {"score_func": "softmax", "normalize": False}),
        ((logits(6, 3).detach(), 2), {"score_func": "sigmoid"}),
    ]
    if dtype in (torch.float32, torch.float64):
        bias = torch.linspace(-0.2, 0.3, 8, dtype=dtype, device=device)
        cases.append(((logits(9, 8), 2), {"score_func": "sigmoid", "selection_bias": bias}))
    return cases


def test_opcheck(device, dtype, gen):
    for args, kwargs in _opcheck_cases(dtype, device, gen):
        torch.library.opcheck(OP, args, kwargs)


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("k", [2, 6])
def test_gradcheck(device, gen, score_func, normalize, k):
    logits = torch.randn(7, 6, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.router_topk(x, k, score_func, None, normalize).weights, (logits,))


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
def test_gradcheck_with_selection_bias(device, gen, score_func):
    logits = torch.randn(7, 6, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    bias = torch.tensor([0.3, -0.2, 0.0, 0.45, -0.1, 0.15], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda x: ops.router_topk(x, 3, score_func, bias, True).weights, (logits,))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_logits(device):
    with pytest.raises(RuntimeError, match="logits"):
        ops.router_topk(torch.zeros(4, 6, dtype=torch.int64, device=device), 2)
    with pytest.raises(RuntimeError, match="logits"):
        ops.router_topk(torch.zeros(6, dtype=torch.float32, device=device), 2)
    with pytest.raises(RuntimeError, match="logits"):
        ops.router_topk(torch.zeros(2, 4, 6, dtype=torch.float32, device=device), 2)


@pytest.mark.parametrize("k", [0, -1, 7])
def test_bad_k(device, k):
    logits = torch.zeros(4, 6, dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match=r"'k'"):
        ops.router_topk(logits, k)


def test_bad_score_func(device):
    logits = torch.zeros(4, 6, dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match="score_func"):
        ops.router_topk(logits, 2, "relu")


def test_bad_selection_bias(device):
    logits = torch.zeros(4, 6, dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match="selection_bias"):
        ops.router_topk(logits, 2, "sigmoid", torch.zeros(5, dtype=torch.float32, device=device))
    with pytest.raises(RuntimeError, match="selection_bias"):
        ops.router_topk(logits, 2, "sigmoid", torch.zeros(6, dtype=torch.int64, device=device))


def test_mixed_devices(cuda_device):
    logits = torch.zeros(4, 6, dtype=torch.float32, device=cuda_device)
    with pytest.raises(RuntimeError, match="device"):
        ops.router_topk(logits, 2, "sigmoid", torch.zeros(6, dtype=torch.float32))
