"""The pieces from_hf_moe needs for GPT-OSS and PhiMoE, against plain-PyTorch references (float64): the
"swiglu_oss" expert type (clamped SwiGLU with biases), the router bias, and the "sparsemixer" router."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import torch_moe
from torch_moe.experts import Experts
from torch_moe.routing import _sparsemixer

D, FF, E = 8, 12, 6
F64 = torch.float64


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# ----------------------------------------------------------------------------------------------- swiglu_oss


def oss_experts(alpha=1.702, limit=0.6, seed=0):
    torch.manual_seed(seed)
    experts = Experts(D, FF, E, expert="swiglu_oss", bias=True, up_bias=True, swiglu_alpha=alpha, swiglu_limit=limit,
                      dtype=F64)
    return experts


def reference_oss_expert(experts, e: int, x):
    """GPT-OSS's expert e on rows x [N, d], written out: clamp the gate above, the up both ways, then
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = x @ experts.w1[e] + experts.b1[e]
    up = x @ experts.w3[e] + experts.b3[e]
    gate = torch.minimum(gate, torch.full_like(gate, experts.swiglu_limit))
    up = torch.maximum(torch.minimum(up, torch.full_like(up, experts.swiglu_limit)),
                       torch.full_like(up, -experts.swiglu_limit))
    h = (up + 1) * gate / (1 + torch.exp(-experts.swiglu_alpha * gate))
    return h @ experts.w2[e] + experts.b2[e]


def test_swiglu_oss_capacity_path_matches_reference_and_reaches_the_clamp():
    experts = oss_experts()
    buffer = randn(E, 5, D, seed=1, scale=2.0)
    got = experts(buffer)
    expected = torch.stack([reference_oss_expert(experts, e, buffer[e]) for e in range(E)])
    assert_close(got, expected, rtol=1e-12, atol=1e-12)
    gate = torch.einsum("ecd,edf->ecf", buffer, experts.w1) + experts.b1[:, None]
    up = torch.einsum("ecd,edf->ecf", buffer, experts.w3) + experts.b3[:, None]
    assert bool((gate > experts.swiglu_limit).any()) and bool((up.abs() > experts.swiglu_limit).any())


@pytest.mark.parametrize("grad", [True, False])
def test_swiglu_oss_dropless_path_matches_reference(grad):
    """forward_dropless (the gathered grouped GEMMs; without grad the path that fuses the GLU for other types)."""
    experts = oss_experts()
    x = randn(10, D, seed=2, scale=2.0).requires_grad_(grad)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:2] for t in range(10)])
    weights = randn(10, 2, seed=3).abs()
    row_index, offsets = torch_moe.ops.permute_plan(ids, E)
    with torch.set_grad_enabled(grad):
        got = experts.forward_dropless(x, weights, row_index, offsets)
    expected = torch.zeros(10, D, dtype=F64)
    for t in range(10):
        for j in range(2):
            expected[t] += weights[t, j] * reference_oss_expert(experts, int(ids[t, j]), x[t:t + 1].detach())[0]
    assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    if grad:
        got.square().sum().backward()
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in experts.parameters())


def test_swiglu_oss_gradcheck():
    experts = oss_experts(limit=0.8)
    buffer = randn(E, 3, D, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: experts(b), (buffer,))
    assert torch.autograd.gradcheck(lambda w, b: _with(experts, w1=w, b3=b)(buffer.detach()),
                                    (experts.w1.detach().clone().requires_grad_(),
                                     experts.b3.detach().clone().requires_grad_()))


def _with(experts, **values):
    """experts' forward with some parameters replaced by the given tensors (for gradcheck over them)."""
    def forward(buffer):
        saved = {name: getattr(experts, name) for name in values}
        for name, value in values.items():
            del experts._parameters[name]
            setattr(experts, name, value)
        try:
            return experts(buffer)
        finally:
            for name, param in saved.items():
                delattr(experts, name)
                experts.register_parameter(name, param)
    return forward


@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_moe_with_swiglu_oss_and_router_bias_matches_reference(capacity_factor):
    """GPT-OSS's block: logits x·wᵀ + b, the top-k logits' softmax as weights, clamped SwiGLU experts with biases;
    dropless, and in capacity mode (the batched [E, C, d] path) with room for every assignment."""
    torch.manual_seed(0)
    moe = torch_moe.MoE(D, FF, E, 2, capacity_factor=capacity_factor, expert="swiglu_oss", bias=True, up_bias=True,
                        swiglu_limit=0.6, router_bias=True, normalize_weights=True, dtype=F64)
    with torch.no_grad():
        moe.router.bias.copy_(randn(E, seed=5))
    x = randn(12, D, seed=6, scale=2.0)
    y = moe(x)
    logits = x @ moe.router.weight.T + moe.router.bias
    top, ids = logits.topk(2, dim=-1)
    weights = torch.softmax(top, dim=-1)  # GPT-OSS's order: top-k first, softmax over the chosen logits
    expected = torch.stack([sum(weights[t, j] * reference_oss_expert(moe.experts, int(ids[t, j]), x[t:t + 1])[0]
                                for j in range(2)) for t in range(12)])
    assert float(moe.stats.dropped_fraction) == 0
    assert_close(y, expected.detach(), rtol=1e-10, atol=1e-12)
    routing = moe.router(x)
    assert_close(routing.logits, logits.detach())
    assert_close(routing.weights, weights.detach(), rtol=1e-12, atol=1e-14)
    (y.square().sum() + moe.aux_loss).backward()
    assert moe.router.bias.grad is not None and bool(moe.router.bias.grad.abs().sum() > 0)
    assert moe.experts.b3.grad is not None


def test_router_bias_on_the_sigmoid_router_shifts_its_scores():
    torch.manual_seed(0)
    moe = torch_moe.MoE(D, FF, E, 2, capacity_factor=None, router="sigmoid", router_bias=True, dtype=F64)
    with torch.no_grad():
        moe.router.bias.copy_(randn(E, seed=7))
    x = randn(5, D, seed=8)
    assert_close(moe.router(x).scores, torch.sigmoid(x @ moe.router.weight.T + moe.router.bias).detach())
    assert "router.bias" in moe.state_dict()
    assert "router.bias" not in torch_moe.MoE(D, FF, E, 2).state_dict()


# ----------------------------------------------------------------------------------------------- sparsemixer


def reference_sparsemixer_eval(logits, top_k: int, eps: float):
    """Phi-3.5-MoE's eval routing, one token at a time: the best expert not chosen yet; its weight is its softmax
    among the not-yet-chosen experts within relative reach 2·eps of the best ((m − l) / max(|l|, m) <= 2·eps)."""
    weights, ids = [], []
    for row in logits.tolist():
        left = list(range(len(row)))
        token_w, token_ids = [], []
        for _ in range(top_k):
            best = max(row[e] for e in left)
            chosen = min(e for e in left if row[e] == best)
            kept = [e for e in left if best - row[e] == 0 or (best - row[e]) / max(abs(row[e]), best) <= 2 * eps]
            token_w.append(math.exp(row[chosen]) / sum(math.exp(row[e]) for e in kept))
            token_ids.append(chosen)
            left.remove(chosen)
        weights.append(token_w)
        ids.append(token_ids)
    return torch.tensor(weights, dtype=F64), torch.tensor(ids)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2, 0.5])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparsemixer_eval_matches_reference(eps, top_k):
    torch.manual_seed(0)
    moe = torch_moe.MoE(D, FF, E, top_k, capacity_factor=None, router="sparsemixer", jitter_eps=eps, dtype=F64).eval()
    x = randn(40, D, seed=9, scale=3.0)
    routing = moe.router(x)
    weights, ids = reference_sparsemixer_eval(x @ moe.router.weight.T, top_k, eps)
    assert torch.equal(routing.expert_ids, ids)
    assert_close(routing.weights, weights, rtol=1e-12, atol=1e-14)
    if eps == 0.2:
        assert bool(((weights < 1) & (weights > 0.5)).any()) and bool((weights == 1).any()), "both cases met"
    y = moe(x)
    expected = torch.zeros_like(y)
    for t in range(40):
        for j in range(top_k):
            e = int(ids[t, j])
            gate, up = x[t] @ moe.experts.w1[e], x[t] @ moe.experts.w3[e]
            expected[t] += weights[t, j] * ((gate * torch.sigmoid(gate) * up) @ moe.experts.w2[e])
    assert_close(y, expected.detach(), rtol=1e-10, atol=1e-12)


def test_sparsemixer_eval_gradcheck():
    logits = randn(6, E, seed=10, scale=2.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: _sparsemixer(l, 2, 0.3, False)[0], (logits,))


def test_sparsemixer_training_estimator():
    """Training: a Gumbel sample per pass; its weight is the gate times 1 or 1/3 (Heun's third-order rule), with
    the gate's own gradient (not the scaled one)."""
    logits = randn(400, E, seed=11, scale=2.0).requires_grad_()
    torch.manual_seed(0)
    weights, ids = _sparsemixer(logits, 2, 0.5, True)
    assert bool((ids[:, 0] != ids[:, 1]).all())
    eval_ids = _sparsemixer(logits, 2, 0.5, False)[1]
    assert not torch.equal(ids, eval_ids), "training samples, eval takes the argmax"
    # the unscaled gates of the sampled experts, recomputed from the reference masks
    gates = []
    masked = logits
    for j in range(2):
        best = masked.max(dim=-1, keepdim=True)[0]
        reach = ((best - logits) / logits.abs().clamp(min=best)) > 1.0  # 2 * eps
        gate = torch.softmax(masked.masked_fill(reach, float("-inf")), dim=-1).gather(-1, ids[:, j:j + 1])
        gates.append(gate)
        masked = masked.scatter(-1, ids[:, j:j + 1], float("-inf"))
    gates = torch.cat(gates, dim=-1)
    ratio = (weights / gates).detach()
    full, third = torch.isclose(ratio, torch.ones_like(ratio)), torch.isclose(ratio, torch.full_like(ratio, 0.3333))
    assert bool((full | third).all()) and bool(third.any()) and bool(full.any())
    upstream = randn(400, 2, seed=12)
    (grad_weights,) = torch.autograd.grad((weights * upstream).sum(), logits, retain_graph=True)
    (grad_gates,) = torch.autograd.grad((gates * upstream).sum(), logits)
    assert_close(grad_weights, grad_gates, rtol=1e-12, atol=1e-14)


def test_sparsemixer_training_matches_hf_under_one_seed():
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    for eps in (0.01, 0.3):
        logits = randn(64, E, seed=13, scale=2.0).float()
        ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.manual_seed(5)
        w_ours, ids_ours = _sparsemixer(ours, 2, eps, True)
        torch.manual_seed(5)
        w_hf, ids_hf = phimoe.sparsemixer(theirs, eps, True)
        assert torch.equal(ids_ours, ids_hf)
        assert_close(w_ours, w_hf, rtol=1e-6, atol=1e-7)
        upstream = randn(64, 2, seed=14).float()
        (w_ours * upstream).sum().backward()
        (w_hf * upstream).sum().backward()
        assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,needle", [
    (dict(swiglu_alpha=1.0), "swiglu_alpha applies to expert='swiglu_oss' only"),
    (dict(expert="swiglu_oss", swiglu_limit=0.0), "swiglu_limit must be a number > 0"),
    (dict(expert="swiglu_oss", swiglu_alpha=float("nan")), "swiglu_alpha must be a number > 0"),
    (dict(router_bias="yes"), "router_bias must be a bool"),
    (dict(router="hash", router_bias=True), "router_bias applies to router="),
    (dict(router="expert_choice", router_bias=True), "router_bias applies to router="),
    (dict(router="sparsemixer", normalize_weights=True), "normalize_weights=True is not supported"),
    (dict(router="sparsemixer", n_groups=2), "n_groups / topk_groups apply to"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        torch_moe.MoE(D, FF, E, 2, capacity_factor=1.25, **kwargs)


def test_experts_refuse_swiglu_options_for_other_types():
    with pytest.raises(ValueError, match="swiglu_limit applies to expert='swiglu_oss' only"):
        Experts(D, FF, E, expert="geglu", swiglu_limit=3.0)


@pytest.mark.parametrize("kwargs", [dict(router="sparsemixer", jitter_eps=0.2),
                                    dict(expert="swiglu_oss", bias=True, up_bias=True, router_bias=True)])
def test_compile_fullgraph_matches_eager(kwargs):
    torch.manual_seed(0)
    moe = torch_moe.MoE(8, 16, 4, 2, capacity_factor=1.5, **kwargs).eval()
    x = torch.randn(2, 6, 8)
    eager = moe(x)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
