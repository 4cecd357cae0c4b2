"""Tests of torch_moe.ops.dselect_k_gate (DSelect-k's per-token gate): outputs and gradients against a float64
loop reference written from Hazimeh et al. 2021's formulas, E not a power of 2, gamma, exact zeros, opcheck,
gradcheck, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from torch_moe import ops

OP = torch.ops.torch_moe.dselect_k_gate.default
F64 = torch.float64


def bits_of(num_experts):
    return math.ceil(math.log2(num_experts)) if num_experts > 1 else 0


def ref_step(z, gamma):
    """The smooth-step on a 0-dim tensor, by branches (a tensor result, so autograd gives the reference slope)."""
    if float(z.detach()) <= -gamma / 2:
        return z * 0.0
    if float(z.detach()) >= gamma / 2:
        return z * 0.0 + 1.0
    return -2.0 / gamma**3 * z**3 + 3.0 / (2.0 * gamma) * z + 0.5


def ref_gate(code, selector, num_experts, gamma):
    """code: [T, k, m], selector: [T, k] float64 -> (q [T, E], r [T, k, E]) by loops over tokens, selectors,
    experts and bits (bit strings most significant first); codes >= E are never formed."""
    T, k, m = code.shape
    q_rows, r_rows = [], []
    for t in range(T):
        exps = [torch.exp(selector[t, i]) for i in range(k)]
        alpha = [e / sum(exps) for e in exps]
        r_t = []
        for i in range(k):
            steps = [ref_step(code[t, i, l], gamma) for l in range(m)]
            row = []
            for j in range(num_experts):
                value = torch.ones((), dtype=F64)
                for l, bit in enumerate(format(j, f"0{m}b") if m else ""):
                    value = value * (steps[l] if bit == "1" else 1 - steps[l])
                row.append(value)
            r_t.append(torch.stack(row))
        r_t = torch.stack(r_t)
        r_rows.append(r_t)
        q_rows.append(sum(alpha[i] * r_t[i] for i in range(k)))
    return torch.stack(q_rows), torch.stack(r_rows)


def make_inputs(T, k, num_experts, gamma, seed=0, dtype=F64, scale=None):
    """Code logits spread so that some steps are exactly 0/1 (|z| >= gamma/2) and some fractional."""
    g = torch.Generator().manual_seed(seed)
    scale = gamma if scale is None else scale
    code = torch.randn(T, k, bits_of(num_experts), generator=g, dtype=F64) * scale
    selector = torch.randn(T, k, generator=g, dtype=F64)
    return code.to(dtype), selector.to(dtype)


CASES = [(6, 1, 4, 1.0), (7, 2, 6, 1.0), (5, 3, 8, 0.5), (6, 2, 5, 2.0), (4, 2, 3, 0.25), (3, 2, 1, 1.0),
         (5, 2, 2, 1.0), (4, 3, 13, 1.5)]


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("T,k,E,gamma", CASES)
def test_matches_reference(device, T, k, E, gamma):
    code, selector = make_inputs(T, k, E, gamma)
    out = ops.dselect_k_gate(*_to(device, code, selector), E, gamma)
    q, r = ref_gate(code, selector, E, gamma)
    assert out.weights.shape == (T, E) and out.selector_outputs.shape == (T, k, E)
    assert out.weights.dtype == out.selector_outputs.dtype == F64
    assert_close(out.weights.cpu(), q, rtol=1e-13, atol=1e-15)
    assert_close(out.selector_outputs.cpu(), r, rtol=1e-13, atol=1e-15)
    # Exact zeros where a step is exactly 0/1: the op must give them exactly, not approximately.
    assert torch.equal(out.selector_outputs.cpu() == 0, r == 0)
    if E & (E - 1) == 0:  # a power of 2: every selector is a distribution over the experts
        assert_close(out.selector_outputs.sum(2).cpu(), torch.ones(T, k, dtype=F64), rtol=1e-13, atol=1e-13)
    else:  # some mass can sit on the unreachable codes
        assert bool((out.selector_outputs.sum(2) <= 1 + 1e-12).all())


def test_cases_cover_exact_zeros_and_fractional_steps():
    code, _ = make_inputs(7, 2, 6, 1.0)
    assert bool((code.abs() >= 0.5).any()) and bool((code.abs() < 0.5).any())


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_run_in_float32(device, float_dtype):
    code, selector = make_inputs(6, 2, 6, 1.0, dtype=float_dtype)
    out = ops.dselect_k_gate(*_to(device, code, selector), 6, 1.0)
    assert out.weights.dtype == out.selector_outputs.dtype == torch.float32
    q, r = ref_gate(code.double(), selector.double(), 6, 1.0)
    assert_close(out.weights.cpu().double(), q, rtol=1e-5, atol=1e-6)
    assert_close(out.selector_outputs.cpu().double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,k,E,gamma", CASES)
@pytest.mark.parametrize("which", ["weights", "selector_outputs", "both"])
def test_gradients_match_reference(device, T, k, E, gamma, which):
    code, selector = make_inputs(T, k, E, gamma, seed=1)
    g = torch.Generator().manual_seed(2)
    up_q, up_r = torch.randn(T, E, generator=g, dtype=F64), torch.randn(T, k, E, generator=g, dtype=F64)

    def loss(q, r):
        return {"weights": (q * up_q.to(q.device)).sum(), "selector_outputs": (r * up_r.to(r.device)).sum(),
                "both": (q * up_q.to(q.device)).sum() + (r * up_r.to(r.device)).sum()}[which]

    c, s = (t.clone().requires_grad_() for t in _to(device, code, selector))
    loss(*ops.dselect_k_gate(c, s, E, gamma)).backward()
    c_ref, s_ref = code.clone().requires_grad_(), selector.clone().requires_grad_()
    ref_loss = loss(*ref_gate(c_ref, s_ref, E, gamma))
    if ref_loss.requires_grad:  # r of one expert (no bits) is the constant 1
        ref_loss.backward()
    # An input the reference's loss does not reach (no bits for E = 1, r without the selectors) has no .grad there.
    for got, leaf in ((c.grad, c_ref), (s.grad, s_ref)):
        want = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14)
    if which == "selector_outputs":  # r does not depend on the selector logits
        assert torch.equal(s.grad.cpu(), torch.zeros_like(selector))


def test_flat_steps_get_exactly_zero_gradient(device):
    gamma = 0.8
    # Bit values past +-gamma/2 (and exactly on it) are flat: their gradient is exactly 0 even with huge upstream.
    code = torch.tensor([[[-1.0, 0.1, 0.4], [0.4, -0.4, -0.05]]], dtype=F64, device=device, requires_grad=True)
    selector = torch.tensor([[0.3, -0.2]], dtype=F64, device=device, requires_grad=True)
    q, r = ops.dselect_k_gate(code, selector, 8, gamma)
    # Random upstream: with a uniform one the gradient of sum_j r_i[j] = 1 (E a power of 2) would vanish anyway.
    g = torch.Generator().manual_seed(7)
    up_q, up_r = torch.rand(1, 8, generator=g, dtype=F64), torch.rand(1, 2, 8, generator=g, dtype=F64)
    ((q * up_q.to(device) * 1e300).sum() + (r * up_r.to(device) * 1e300).sum()).backward()
    flat = code.detach().abs() >= gamma / 2
    assert torch.equal(code.grad[flat], torch.zeros_like(code.grad[flat]))
    assert bool((code.grad[~flat] != 0).all())


def test_binary_codes_pick_one_expert_per_selector(device):
    # Every step exactly 0/1: selector i is one-hot on its code, q has alpha_i there and exact zeros elsewhere.
    code = torch.tensor([[[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]] * 3, dtype=F64, device=device)  # codes 101, 001
    selector = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0)).to(device)
    q, r = ops.dselect_k_gate(code, selector, 8, 1.0)
    alpha = torch.softmax(selector, -1)
    expected_r = torch.zeros(3, 2, 8, dtype=F64, device=device)
    expected_r[:, 0, 5] = 1.0
    expected_r[:, 1, 1] = 1.0
    assert torch.equal(r, expected_r)
    expected_q = torch.zeros(3, 8, dtype=F64, device=device)
    expected_q[:, 5], expected_q[:, 1] = alpha[:, 0], alpha[:, 1]
    assert_close(q, expected_q, rtol=1e-15, atol=0)
    assert int((q == 0).sum()) == 3 * 6


def test_unreachable_codes_drop_mass():
    # E = 5, m = 3: a selector whose first bit is exactly 1 and second fractional sits on codes 1?? = 4..7, of which
    # only 4 = 100 exists: its reachable mass is (1 - S(z_2)) * (1 - S(z_3)).
    code = torch.tensor([[[1.0, 0.1, -0.2]]], dtype=F64)
    selector = torch.zeros(1, 1, dtype=F64)
    q, r = ops.dselect_k_gate(code, selector, 5, 1.0)
    s2, s3 = ref_step(code[0, 0, 1], 1.0), ref_step(code[0, 0, 2], 1.0)
    assert torch.equal(r[0, 0, :4], torch.zeros(4, dtype=F64))
    assert_close(r[0, 0, 4], (1 - s2) * (1 - s3), rtol=1e-15, atol=0)
    assert float(r.sum()) < 1.0


def test_gamma_changes_the_flat_region():
    z = torch.tensor([[[0.3]]], dtype=F64)
    selector = torch.zeros(1, 1, dtype=F64)
    wide = ops.dselect_k_gate(z, selector, 2, 1.0).selector_outputs
    narrow = ops.dselect_k_gate(z, selector, 2, 0.5).selector_outputs
    assert 0 < float(wide[0, 0, 1]) < 1 and float(narrow[0, 0, 1]) == 1.0
    assert_close(wide[0, 0, 1], ref_step(z[0, 0, 0], 1.0), rtol=1e-15, atol=0)


def test_no_tokens(device):
    code = torch.zeros(0, 2, 3, dtype=F64, device=device, requires_grad=True)
    selector = torch.zeros(0, 2, dtype=F64, device=device, requires_grad=True)
    q, r = ops.dselect_k_gate(code, selector, 6, 1.0)
    assert q.shape == (0, 6) and r.shape == (0, 2, 6)
    (q.sum() + r.sum()).backward()
    assert code.grad.shape == code.shape and selector.grad.shape == selector.shape


# ---------------------------------------------------------------------------------------------- opcheck, gradcheck


def _opcheck_cases(device):
    cases = []
    for T, k, E, gamma in [(6, 2, 6, 1.0), (0, 2, 4, 1.0), (4, 1, 1, 1.0), (5, 3, 8, 0.5)]:
        for dtype in (torch.float32, F64):
            code, selector = _to(device, *make_inputs(T, k, E, gamma, dtype=dtype))
            cases.append((code.requires_grad_(), selector.requires_grad_(), E, gamma))
    return cases


def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(OP, args)  # all four utils (the default)


@pytest.mark.parametrize("T,k,E,gamma", [(4, 2, 6, 1.5), (3, 3, 8, 1.0), (3, 2, 5, 2.0), (2, 1, 2, 0.7)])
def test_gradcheck(device, T, k, E, gamma):
    # Steps inside the cubic and a margin from +-gamma/2, so finite differences do not cross a kink of S'.
    code, selector = make_inputs(T, k, E, gamma, seed=5, scale=gamma / 6)
    code, selector = (t.to(device).requires_grad_() for t in (code, selector))
    assert torch.autograd.gradcheck(lambda c, s: tuple(ops.dselect_k_gate(c, s, E, gamma)), (code, selector))


def test_double_backward_is_refused():
    code, selector = (t.requires_grad_() for t in make_inputs(3, 2, 6, 1.0, scale=0.2))
    q, _ = ops.dselect_k_gate(code, selector, 6, 1.0)
    (grad,) = torch.autograd.grad((q**2).sum(), code, create_graph=True)
    with pytest.raises(RuntimeError, match="_dselect_k_gate_backward"):
        grad.sum().backward()


def test_compile_fullgraph(device):
    code, selector = _to(device, *make_inputs(6, 2, 6, 1.0))

    def fn(c, s):
        q, r = ops.dselect_k_gate(c, s, 6, 1.0)
        return q.sort(dim=1, descending=True).values, (r * torch.log(r + 1e-6)).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    c1, s1 = (t.clone().requires_grad_() for t in (code, selector))
    c2, s2 = (t.clone().requires_grad_() for t in (code, selector))
    got, want = compiled(c1, s1), fn(c2, s2)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=0, atol=0)
    (got[0].sum() + got[1]).backward()
    (want[0].sum() + want[1]).backward()
    assert_close(c1.grad, c2.grad, rtol=0, atol=0)
    assert_close(s1.grad, s2.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- bad input


def _good(device="cpu"):
    return _to(device, *make_inputs(4, 2, 6, 1.0, dtype=torch.float32))


def test_good_input_is_accepted(device):
    ops.dselect_k_gate(*_good(device), 6, 1.0)


def test_bad_code_logits(device):
    code, selector = _good(device)
    with pytest.raises(RuntimeError, match="argument 'code_logits' must be float32"):
        ops.dselect_k_gate(code.to(torch.int64), selector, 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'code_logits' must be a 3-D tensor \[T, k, m\]"):
        ops.dselect_k_gate(code.reshape(4, -1), selector, 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'code_logits' must have size 3 \(code bits ceil\(log2"):
        ops.dselect_k_gate(code[:, :, :2], selector, 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'code_logits' must have size 4 \(code bits"):
        ops.dselect_k_gate(code, selector, 9, 1.0)  # 9 experts need 4 bits
    with pytest.raises(RuntimeError, match=r"argument 'code_logits' must have at least one selector"):
        ops.dselect_k_gate(code[:, :0], selector[:, :0], 6, 1.0)


def test_bad_selector_logits(device):
    code, selector = _good(device)
    with pytest.raises(RuntimeError, match=r"argument 'selector_logits' must be a 2-D tensor \[T, k\]"):
        ops.dselect_k_gate(code, selector.reshape(-1), 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'selector_logits' must have size 4 \(tokens of code_logits\)"):
        ops.dselect_k_gate(code, selector[:3], 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'selector_logits' must have size 2 \(selectors of code_logits\)"):
        ops.dselect_k_gate(code, selector[:, :1], 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'selector_logits' must have the dtype of code_logits "
                                           r"\(float32\), got float64"):
        ops.dselect_k_gate(code, selector.double(), 6, 1.0)


@pytest.mark.parametrize("num_experts", [0, -3])
def test_bad_num_experts(device, num_experts):
    code, selector = _good(device)
    with pytest.raises(RuntimeError, match=rf"argument 'num_experts' must be in \[1, 2\^62\], got {num_experts}"):
        ops.dselect_k_gate(code[:, :, :0], selector, num_experts, 1.0)


@pytest.mark.parametrize("gamma", [0.0, -1.0, math.inf, math.nan])
def test_bad_gamma(device, gamma):
    code, selector = _good(device)
    with pytest.raises(RuntimeError, match="argument 'gamma' must be > 0 and finite"):
        ops.dselect_k_gate(code, selector, 6, gamma)


def test_bad_backward_arguments():
    code, selector = _good()
    backward = torch.ops.torch_moe._dselect_k_gate_backward
    q, r = torch.zeros(4, 6), torch.zeros(4, 2, 6)
    with pytest.raises(RuntimeError, match=r"argument 'grad_weights' must have size 6 \(num_experts\)"):
        backward(q[:, :5], r, code, selector, 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'grad_selector_outputs' must be a 3-D tensor \[T, k, E\]"):
        backward(q, r[:, 0], code, selector, 6, 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'grad_selector_outputs' must have size 2 \(selectors"):
        backward(q, r[:, :1], code, selector, 6, 1.0)


def test_mixed_devices_are_refused(cuda_device):
    code, selector = _good()
    with pytest.raises(RuntimeError, match="selector_logits"):
        ops.dselect_k_gate(code.to(cuda_device), selector, 6, 1.0)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_router_in_layer_compile_fullgraph_matches_eager(capacity_factor):
    import torch_moe

    torch.manual_seed(0)
    moe = torch_moe.MoE(8, 16, 6, 2, router="dselect_k", capacity_factor=capacity_factor, smooth_step_gamma=0.5,
                        selector_entropy_coef=0.1, dtype=F64)
    with torch.no_grad():  # code logits of both kinds, flat and fractional steps
        moe.router.code_weight.normal_(0, 0.5)
    x = torch.randn(10, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    eager = moe(x)
    (eager.sum() + moe.aux_loss).backward()
    eager_grad = moe.router.code_weight.grad.clone()
    moe.zero_grad()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    (compiled.sum() + moe.aux_loss).backward()
    assert_close(compiled, eager, rtol=1e-12, atol=1e-14)
    assert_close(moe.router.code_weight.grad, eager_grad, rtol=1e-12, atol=1e-14)
    assert eager_grad.abs().sum() > 0
