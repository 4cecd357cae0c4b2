"""CUDA-only tests: CPU/CUDA agreement of every op, expert-compute paths, bf16/fp16 layers, T·d > 2^31, CUDA-graph
capture of the capacity-mode layer, determinism, no host sync in capacity mode, a second GPU. Skipped without CUDA.

The op suites (test_<op>.py) also run on CUDA through the DEVICES parametrisation (reference, opcheck, gradcheck in
float64, bad input); this file adds what needs the CPU and the GPU side by side, or a GPU only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import reference as ref
import torch_moe
from torch_moe import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

CUDA = "cuda"
LOW_PRECISION = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]
ALL_DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]


def _gen(seed=0x5EED):
    return torch.Generator().manual_seed(seed)


def _both(t):
    """(cpu, cuda) copies of a CPU tensor."""
    return t, t.to(CUDA)


def _leaf(t, device):
    """A fresh leaf on ``device`` that requires grad. ``t.to(device).requires_grad_()`` is not one: on the CPU pass
    ``.to("cpu")`` returns ``t`` itself, which becomes the leaf, and the CUDA pass's ``.to("cuda")`` of it is then a
    non-leaf whose ``.grad`` stays None while its gradient accumulates into the CPU tensor."""
    return t.detach().to(device, copy=True).requires_grad_()


def _close(cuda_value, cpu_value, dtype):
    torch.testing.assert_close(cuda_value.cpu().to(torch.float64), cpu_value.to(torch.float64), **ref.tolerance(dtype))


def _close_scaled(cuda_value, cpu_value, dtype):
    """Agreement within the rounding of ``dtype``: its rtol (tests/reference.py), and as atol that rtol times the
    largest magnitude (a sum of rounded terms errs with the size of its terms, not of the sum)."""
    rtol = ref.tolerance(dtype)["rtol"]
    expected = cpu_value.double()
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(cuda_value.cpu().double(), expected, rtol=rtol, atol=atol)


def _paths(counts, op):
    """{(pass, path): count} of one op from ops.gemm_path_counts()."""
    return {(p, path): n for (o, p, path), n in counts.items() if o == op}


def _expected_path(dtype):
    """torch's grouped GEMM for bf16 on sm90/sm100, else the per-expert loop (TORCH_MOE_GROUPED_MM=loop forces it);
    the CPU kernels' loop when the harness (test_cuda_harness.py) runs these tests CPU against CPU."""
    if CUDA == "cpu":
        return "cpu_loop"
    grouped = dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10)
    return "grouped_mm" if grouped and os.environ.get("TORCH_MOE_GROUPED_MM") != "loop" else "per_expert_loop"


def _equal(cuda_value, cpu_value):
    assert torch.equal(cuda_value.cpu(), cpu_value), (cuda_value.cpu(), cpu_value)


def _gpu_memory_free() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


# ---------------------------------------------------------------------------------------------- router_topk


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,k", [(257, 8, 2), (64, 64, 8), (33, 256, 8), (19, 300, 6), (9, 1024, 16), (5, 1, 1)])
def test_router_topk_agrees(dtype, score_func, T, E, k):
    """Warp path (E <= 256) and block path (E > 256): ids exactly, weights/scores within tolerance, grads too."""
    g = _gen()
    logits = ref.separated_logits(T, E, g).to(dtype)
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.01
    for selection_bias in (None, bias):
        outs = []
        for device in ("cpu", CUDA):
            x = _leaf(logits, device)
            b = None if selection_bias is None else selection_bias.to(device)
            out = ops.router_topk(x, k, score_func, b)
            grad_w = torch.linspace(-1, 1, T * k, dtype=out.weights.dtype).reshape(T, k).to(device)
            (out.weights * grad_w).sum().backward()
            outs.append((out, x.grad))
        (cpu, cpu_grad), (cuda, cuda_grad) = outs
        _equal(cuda.expert_ids, cpu.expert_ids)
        rdt = ref.router_dtype(dtype)
        _close(cuda.weights, cpu.weights, rdt)
        _close(cuda.scores, cpu.scores, rdt)
        _close(cuda_grad, cpu_grad, torch.float32 if dtype != torch.float64 else torch.float64)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,n_groups,topk_groups,k", [(64, 8, 4, 8), (256, 8, 4, 8), (16, 16, 4, 4), (512, 16, 3, 8)])
def test_router_topk_group_limited_agrees(score_func, E, n_groups, topk_groups, k):
    g = _gen(1)
    T = 101
    logits = ref.separated_logits(T, E, g).to(torch.float32)
    bias = torch.randn(E, generator=g) * 0.05
    cpu = ops.router_topk(logits, k, score_func, bias, True, n_groups, topk_groups)
    cuda = ops.router_topk(logits.to(CUDA), k, score_func, bias.to(CUDA), True, n_groups, topk_groups)
    _equal(cuda.expert_ids, cpu.expert_ids)
    _close(cuda.weights, cpu.weights, torch.float32)


def test_router_topk_ties_and_non_finite_agree():
    E = 40
    rows = [
        torch.zeros(E),  # all tied: lowest ids
        torch.full((E,), float("-inf")),
        torch.tensor([float("inf")] * 3 + [0.0] * (E - 3)),
        torch.tensor([float("nan")] + [1.0] * (E - 1)),
        torch.arange(E, dtype=torch.float32).flip(0),
    ]
    logits = torch.stack(rows)
    for score_func in ("softmax", "sigmoid"):
        cpu = ops.router_topk(logits, 4, score_func)
        cuda = ops.router_topk(logits.to(CUDA), 4, score_func)
        _equal(cuda.expert_ids, cpu.expert_ids)
        torch.testing.assert_close(cuda.weights.cpu(), cpu.weights, equal_nan=True)
        assert bool(((cuda.expert_ids >= 0) & (cuda.expert_ids < E)).all())


# ---------------------------------------------------------------------------------------------- capacity plan


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,C", [(1000, 8, 2, 200), (4096, 64, 8, 300), (77, 5, 5, 0), (0, 4, 2, 3), (513, 128, 1, 3)])
def test_capacity_plan_agrees(policy, masked, T, E, k, C):
    g = _gen(2)
    ids = ref.distinct_expert_ids(T, E, k, g)
    # Coarse priorities: many exact ties, which must go to the lower token (then choice) on both devices.
    priority = (torch.rand(T, k, generator=g) * 8).floor() / 8
    valid = (torch.rand(T, generator=g) < 0.8) if masked else None
    cpu = ops.capacity_plan(ids, E, C, policy, priority, valid)
    cuda = ops.capacity_plan(ids.to(CUDA), E, C, policy, priority.to(CUDA), None if valid is None else valid.to(CUDA))
    for a, b in zip(cuda, cpu):
        _equal(a, b)


def test_capacity_plan_priority_nan_and_signed_zero_agree():
    ids = torch.zeros(6, 1, dtype=torch.int64)
    priority = torch.tensor([[0.0], [float("nan")], [-0.0], [1.0], [float("-inf")], [0.0]])
    for C in range(7):
        _equal(ops.capacity_plan(ids.to(CUDA), 1, C, "probability", priority.to(CUDA)).slots,
               ops.capacity_plan(ids, 1, C, "probability", priority).slots)


# ---------------------------------------------------------------------------------------------- row movement


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [8, 13, 64], ids=["d8", "d13_unaligned", "d64"])
def test_dispatch_combine_agree(dtype, d):
    g = _gen(3)
    T, E, k, C = 300, 8, 2, 50
    ids = ref.distinct_expert_ids(T, E, k, g)
    valid = torch.rand(T, generator=g) < 0.9
    plan = ops.capacity_plan(ids, E, C, "position", None, valid)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64).to(ref.router_dtype(dtype))
    grads = {}
    for device in ("cpu", CUDA):
        xd = _leaf(x, device)
        wd = _leaf(weights, device)
        buffer = ops.dispatch(xd, ids.to(device), plan.slots.to(device), E, C)
        y = ops.combine(buffer * 1.5, wd, ids.to(device), plan.slots.to(device))
        y.backward(torch.ones_like(y))
        grads[device] = (buffer.detach(), y.detach(), xd.grad, wd.grad)
    for cuda_value, cpu_value in zip(grads[CUDA], grads["cpu"]):
        _close(cuda_value, cpu_value, dtype)
    _equal(grads[CUDA][0], grads["cpu"][0])  # dispatch is a copy: bit-exact


def test_dispatch_offset_view_input_falls_back_to_scalar_copies():
    """A row start that is not 16-byte aligned (a view at an odd offset) must take the scalar path correctly."""
    g = _gen(4)
    T, E, k, C, d = 64, 4, 2, 40, 16
    ids = ref.distinct_expert_ids(T, E, k, g)
    slots = ops.capacity_plan(ids, E, C).slots
    base = torch.randn(T * d + 1, generator=g)
    x = base[1:].view(T, d)
    xc = base.to(CUDA)[1:].view(T, d)
    assert xc.data_ptr() % 16 != 0
    _equal(ops.dispatch(xc, ids.to(CUDA), slots.to(CUDA), E, C), ops.dispatch(x, ids, slots, E, C))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_permute_unpermute_agree(dtype):
    g = _gen(5)
    T, E, k, d = 500, 16, 4, 24
    ids = ref.distinct_expert_ids(T, 12, k, g)  # experts 12..15 get no token
    valid = torch.rand(T, generator=g) < 0.85
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64).to(ref.router_dtype(dtype))
    res = {}
    for device in ("cpu", CUDA):
        xd = _leaf(x, device)
        wd = _leaf(weights, device)
        rows, row_index, offsets = ops.permute(xd, ids.to(device), E, valid.to(device))
        plan_row_index, plan_offsets = ops.permute_plan(ids.to(device), E, valid.to(device))
        y = ops.unpermute(rows * 2.0, wd, row_index)
        y.backward(torch.ones_like(y))
        res[device] = (rows.detach(), row_index, offsets, plan_row_index, plan_offsets, y.detach(), xd.grad, wd.grad)
    for i, (a, b) in enumerate(zip(res[CUDA], res["cpu"])):
        if i in (1, 2, 3, 4):
            _equal(a, b)
        else:
            _close(a, b, dtype)


def test_combine_deterministic_under_deterministic_algorithms():
    g = _gen(6)
    T, E, k, C, d = 4096, 8, 8, 4096, 256
    ids = ref.distinct_expert_ids(T, E, k, g).to(CUDA)
    slots = ops.capacity_plan(ids, E, C).slots
    buffer = torch.randn(E, C, d, device=CUDA) * 100
    weights = torch.rand(T, k, device=CUDA)
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.combine(buffer, weights, ids, slots)
        for _ in range(3):
            assert torch.equal(ops.combine(buffer, weights, ids, slots), first)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------- grouped_mm family


def _offsets(counts):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int64)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("counts", [[5, 0, 17, 3, 0, 40, 1, 0], [0, 0, 0, 64], [0] * 4], ids=["mixed", "one", "none"])
def test_grouped_mm_agrees_with_zero_token_experts(dtype, counts):
    """bf16 (K, M multiples of 8) takes torch's grouped GEMM on sm90; the others the per-expert loop."""
    g = _gen(7)
    E, K, M = len(counts), 32, 48
    N = sum(counts) + 3  # three padding rows past offsets[E]
    offsets = _offsets(counts)
    a = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(E, K, M, generator=g, dtype=torch.float64).to(dtype)
    res = {}
    for device in ("cpu", CUDA):
        ad, bd = _leaf(a, device), _leaf(b, device)
        ops.reset_gemm_path_counts()
        out = ops.grouped_mm(ad, bd, offsets.to(device))
        out.backward(torch.ones_like(out))
        res[device] = (out.detach(), ad.grad, bd.grad)
    # The CUDA pass's paths, the backward's (run on autograd's device thread) included.
    expected = _expected_path(dtype)
    if sum(counts) > 0:
        assert ops.last_grouped_mm_path() == expected
        assert _paths(ops.gemm_path_counts(), "grouped_mm") == {
            ("forward", expected): 1, ("backward_input", expected): 1, ("backward_weight", expected): 1}
    tol = dtype if dtype != torch.bfloat16 else torch.bfloat16
    for cuda_value, cpu_value in zip(res[CUDA], res["cpu"]):
        torch.testing.assert_close(cuda_value.cpu().double(), cpu_value.double(), rtol=ref.tolerance(tol)["rtol"] * 4,
                                   atol=ref.tolerance(tol)["rtol"] * 4)
    for e, n in enumerate(counts):
        if n == 0:
            assert bool((res[CUDA][2][e] == 0).all()), "a zero-token expert must get a zero weight gradient"
    assert bool((res[CUDA][0][sum(counts):] == 0).all()), "rows past offsets[E] must be zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_dropless_ops_agree(dtype):
    g = _gen(8)
    T, E, k, K, M = 200, 8, 2, 32, 16
    ids = ref.distinct_expert_ids(T, 6, k, g)  # experts 6 and 7 empty
    x = torch.randn(T, K, generator=g).to(dtype)
    b1 = torch.randn(E, K, M, generator=g).to(dtype)
    b2 = torch.randn(E, M, K, generator=g).to(dtype)
    weights = torch.rand(T, k, generator=g)
    res = {}
    for device in ("cpu", CUDA):
        xd, b1d, b2d, wd = (_leaf(t, device) for t in (x, b1, b2, weights))
        row_index, offsets = ops.permute_plan(ids.to(device), E)
        ops.reset_gemm_path_counts()
        h = ops.gather_grouped_mm(xd, b1d, offsets, row_index)
        y = ops.grouped_mm_unpermute(torch.relu(h), b2d, offsets, wd, row_index)
        y.backward(torch.ones_like(y))
        res[device] = (y.detach(), xd.grad, b1d.grad, b2d.grad, wd.grad)
    expected = _expected_path(dtype)
    counts = ops.gemm_path_counts()
    for op in ("gather_grouped_mm", "grouped_mm_unpermute"):
        assert _paths(counts, op) == {("forward", expected): 1, ("backward_input", expected): 1,
                                      ("backward_weight", expected): 1}, counts
    # Gradients in the low dtypes within that dtype's rounding: the weights scale in float32 on both devices.
    for cuda_value, cpu_value in zip(res[CUDA], res["cpu"]):
        if dtype == torch.float32:
            torch.testing.assert_close(cuda_value.cpu(), cpu_value, rtol=1e-4, atol=1e-4)
        else:
            _close_scaled(cuda_value, cpu_value, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gather_grouped_glu_agrees(dtype, activation):
    g = _gen(9)
    T, E, k, K, M = 200, 8, 2, 32, 16
    ids = ref.distinct_expert_ids(T, 6, k, g)  # experts 6 and 7 empty
    x = torch.randn(T, K, generator=g).to(dtype)
    w_gate = torch.randn(E, K, M, generator=g).to(dtype)
    w_up = torch.randn(E, K, M, generator=g).to(dtype)
    upstream = torch.randn(T * k, M, generator=g).to(dtype)
    res = {}
    for device in ("cpu", CUDA):
        xd, wgd, wud = (_leaf(t, device) for t in (x, w_gate, w_up))
        row_index, offsets = ops.permute_plan(ids.to(device), E)
        ops.reset_gemm_path_counts()
        act = ops.gather_grouped_glu(xd, wgd, wud, offsets, row_index, activation)
        act.backward(upstream.to(device))
        res[device] = (act.detach(), xd.grad, wgd.grad, wud.grad)
    expected = _expected_path(dtype)
    assert _paths(ops.gemm_path_counts(), "gather_grouped_glu") == {
        ("forward", expected): 2, ("backward_input", expected): 2, ("backward_weight", expected): 2}
    # grad_x: both projections and a token's rows summed in float32, rounded once, as on the CPU.
    for cuda_value, cpu_value in zip(res[CUDA], res["cpu"]):
        if dtype == torch.float32:
            torch.testing.assert_close(cuda_value.cpu(), cpu_value, rtol=1e-4, atol=1e-4)
        else:
            _close_scaled(cuda_value, cpu_value, dtype)


# ---------------------------------------------------------------------------------------------- router_losses


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("E", [8, 300])
def test_router_losses_agree(dtype, E):
    g = _gen(9)
    T, k = 257, 2
    logits = torch.randn(T, E, generator=g, dtype=torch.float64).to(dtype)
    ids = ref.distinct_expert_ids(T, E, k, g)
    valid = torch.rand(T, generator=g) < 0.7
    res = {}
    for device in ("cpu", CUDA):
        ld = _leaf(logits, device)
        lb, z, h = ops.router_losses(ld, ids.to(device), valid.to(device))
        (lb * 0.7 + z * 0.3).backward()
        res[device] = (lb.detach(), z.detach(), h, ld.grad)
    rdt = ref.router_dtype(dtype)
    for cuda_value, cpu_value in zip(res[CUDA], res["cpu"]):
        _close(cuda_value, cpu_value, rdt if cuda_value.dtype != dtype else dtype)


def test_router_losses_all_padding_is_zero():
    logits = torch.randn(4, 8, device=CUDA, requires_grad=True)
    ids = torch.zeros(4, 2, dtype=torch.int64, device=CUDA)
    out = ops.router_losses(logits, ids, torch.zeros(4, dtype=torch.bool, device=CUDA))
    assert [float(v) for v in out] == [0.0, 0.0, 0.0]
    (out[0] + out[1]).backward()
    assert bool((logits.grad == 0).all())


# ---------------------------------------------------------------------------------------------- layers


def _layer_pair(dtype, **kwargs):
    torch.manual_seed(0)
    cpu = torch_moe.MoE(64, 128, 8, top_k=2, dtype=torch.float32, **kwargs)
    gpu = torch_moe.MoE(64, 128, 8, top_k=2, dtype=torch.float32, **kwargs)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
def test_low_precision_layer_matches_fp32_cpu(dtype, capacity_factor):
    cpu, gpu = _layer_pair(dtype, capacity_factor=capacity_factor)
    x = torch.randn(4, 96, 64, generator=_gen(10))
    y_cpu = cpu(x)
    (y_cpu.float().pow(2).mean() + cpu.aux_loss).backward()
    xg = x.to(CUDA, dtype).requires_grad_()
    y_gpu = gpu(xg)
    (y_gpu.float().pow(2).mean() + gpu.aux_loss).backward()
    assert y_gpu.dtype == dtype and y_gpu.shape == y_cpu.shape
    # Low-precision inputs may flip near-tied routing decisions; compare in aggregate.
    err = (y_gpu.float().cpu() - y_cpu).norm() / y_cpu.norm()
    assert err < 5e-2, err
    assert torch.isfinite(xg.grad).all()
    for name, p in gpu.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    expected_path = "bmm" if capacity_factor is not None else _expected_path(dtype)
    assert gpu.experts.last_path == expected_path


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
def test_fp32_layer_matches_cpu(capacity_factor):
    cpu, gpu = _layer_pair(torch.float32, capacity_factor=capacity_factor)
    x = torch.randn(2, 64, 64, generator=_gen(11))
    mask = torch.rand(2, 64, generator=_gen(12)) < 0.9
    y_cpu = cpu(x, padding_mask=mask)
    y_gpu = gpu(x.to(CUDA), padding_mask=mask.to(CUDA))
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    _equal(gpu.stats.tokens_per_expert, cpu.stats.tokens_per_expert)
    torch.testing.assert_close(gpu.aux_loss.cpu(), cpu.aux_loss, rtol=1e-5, atol=1e-6)


def test_capacity_mode_layer_cuda_graph_capture_matches_eager():
    """The whole capacity-mode forward and backward is captured in one CUDA graph (no host sync anywhere)."""
    torch.manual_seed(0)
    layer = torch_moe.MoE(64, 128, 8, top_k=2, capacity_factor=1.25, device=CUDA)
    static_x = torch.randn(256, 64, device=CUDA, requires_grad=True)

    def step():
        y = layer(static_x)
        loss = y.pow(2).mean() + layer.aux_loss
        grads = torch.autograd.grad(loss, [static_x, *layer.parameters()], allow_unused=True)
        return (y.detach(), *(g for g in grads if g is not None))

    # Warm up on a side stream, as torch.cuda.graphs requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in range(3):
        new_x = torch.randn(256, 64, device=CUDA, generator=torch.Generator(CUDA).manual_seed(seed))
        static_x.data.copy_(new_x)
        graph.replay()
        eager = step()
        for captured, expected in zip(static_out, eager):
            torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-6)


def test_capacity_mode_step_has_no_host_sync():
    """By default (host-side value checks off; slots are range-checked by a device-side assert), a capacity-mode
    step never syncs with the host."""
    code = textwrap.dedent(
        """
        import torch, torch_moe
        layer = torch_moe.MoE(64, 128, 8, top_k=2, capacity_factor=1.25, device="cuda")
        x = torch.randn(256, 64, device="cuda", requires_grad=True)
        layer(x).sum().backward()  # warm-up: lazy init may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        y = layer(x)
        (y.pow(2).mean() + layer.aux_loss).backward()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print("no-sync-ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TORCH_MOE_CUDA_CHECKS"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "no-sync-ok" in proc.stdout, proc.stderr[-4000:]


def test_bad_ids_are_ignored_not_read_when_checks_are_off():
    """Without value checks, out-of-range ids must never read or write out of bounds (compute-sanitizer runs this)."""
    code = textwrap.dedent(
        """
        import torch, torch_moe
        from torch_moe import ops
        ids = torch.tensor([[0, 7], [-3, 1], [2, 99]], device="cuda")
        x = torch.randn(3, 8, device="cuda")
        plan = ops.capacity_plan(ids, 3, 2)
        buf = ops.dispatch(x, ids, plan.slots, 3, 2)
        y = ops.combine(buf, torch.ones(3, 2, device="cuda"), ids, plan.slots)
        rows, row_index, offsets = ops.permute(x, ids, 3)
        torch.cuda.synchronize()
        assert int(plan.tokens_per_expert.sum()) == 3, plan
        assert int(offsets[-1]) == 3, offsets
        print("ignored-ok")
        """
    )
    env = dict(os.environ, TORCH_MOE_CUDA_CHECKS="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ignored-ok" in proc.stdout, proc.stderr[-4000:]


BAD_INDEX_SCRIPTS = {
    "dispatch_slots": (
        """
        ids = torch.tensor([[0, 1], [1, 2], [2, 0]], device="cuda")
        slots = torch.tensor([[0, 0], [1, 2], [0, 1]], device="cuda")  # capacity 2: slot 2 is out of range
        ops.dispatch(torch.randn(3, 8, device="cuda"), ids, slots, 3, 2)
        """,
        "torch_moe.dispatch: argument 'slots' must hold values in [-1, 2), got 2 at flat index 3",
    ),
    "combine_slots": (
        """
        ids = torch.tensor([[0, 1], [1, 2], [2, 0]], device="cuda")
        slots = torch.tensor([[0, 0], [1, -2], [0, 1]], device="cuda")
        ops.combine(torch.randn(3, 2, 8, device="cuda"), torch.ones(3, 2, device="cuda"), ids, slots)
        """,
        "torch_moe.combine: argument 'slots' must hold values in [-1, 2), got -2 at flat index 3",
    ),
    "unpermute_row_index": (
        """
        row_index = torch.tensor([[0, 1], [2, 6]], device="cuda")  # 4 rows
        ops.unpermute(torch.randn(4, 8, device="cuda"), torch.ones(2, 2, device="cuda"), row_index)
        """,
        "torch_moe.unpermute: argument 'row_index' must hold values in [-1, 4), got 6 at flat index 3",
    ),
    "gather_grouped_mm_row_index": (
        """
        row_index = torch.tensor([[0, 1], [2, 4]], device="cuda")  # T * k = 4 rows
        offsets = torch.tensor([0, 2, 4], device="cuda")
        ops.gather_grouped_mm(torch.randn(2, 8, device="cuda"), torch.randn(2, 8, 8, device="cuda"), offsets,
                              row_index)
        """,
        "torch_moe.gather_grouped_mm: argument 'row_index' must hold values in [-1, 4), got 4 at flat index 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INDEX_SCRIPTS))
def test_out_of_range_slots_and_row_indices_are_a_device_side_assert(case):
    """Without host-side checks (the default), slots and row indices out of range stop the kernel with a device-side
    assert that prints the CPU's message: never silently dropped or ignored. In a child process: the assert ends
    the CUDA context."""
    body, message = BAD_INDEX_SCRIPTS[case]
    code = "import torch\nfrom torch_moe import ops\n" + textwrap.dedent(body) + "torch.cuda.synchronize()\nprint('no-assert')\n"
    env = {key: value for key, value in os.environ.items() if key != "TORCH_MOE_CUDA_CHECKS"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no-assert" not in proc.stdout, proc.stdout[-2000:]
    assert "device-side assert" in proc.stderr, proc.stderr[-4000:]
    assert message in proc.stdout + proc.stderr, (proc.stdout[-2000:], proc.stderr[-2000:])


@pytest.mark.parametrize("case", list(BAD_INDEX_SCRIPTS))
def test_host_value_checks_raise_the_cpu_error(case):
    """With the host-side checks asked for, the same bad index is a RuntimeError with the CPU's message."""
    body, message = BAD_INDEX_SCRIPTS[case]
    ops.set_cuda_value_checks(True)
    try:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            exec(textwrap.dedent(body), {"torch": torch, "ops": ops})
    finally:
        ops.set_cuda_value_checks(None)
    # and the CPU gives that message
    cpu_body = textwrap.dedent(body).replace('device="cuda"', 'device="cpu"')
    with pytest.raises(RuntimeError, match=re.escape(message)):
        exec(cpu_body, {"torch": torch, "ops": ops})


def test_fused_ops_refuse_host_tensors_and_short_gradients():
    """row_index, weights, offsets and the backward's gradients on x's device, grad_y of the right shape: a
    RuntimeError naming the argument, never a host pointer in a kernel or a read past the end."""
    g = _gen(13)
    T, E, k, K, M = 16, 4, 2, 8, 8
    ids = ref.distinct_expert_ids(T, E, k, g).to(CUDA)
    row_index, offsets = ops.permute_plan(ids, E)
    x = torch.randn(T, K, device=CUDA)
    b = torch.randn(E, K, M, device=CUDA)
    h = torch.randn(T * k, K, device=CUDA)
    weights = torch.rand(T, k, device=CUDA)
    device_message = "all tensors must be on one device"
    with pytest.raises(RuntimeError, match=f"gather_grouped_mm: {device_message}: 'row_index' is on cpu"):
        ops.gather_grouped_mm(x, b, offsets, row_index.cpu())
    with pytest.raises(RuntimeError, match=f"gather_grouped_mm: {device_message}: 'offsets' is on cpu"):
        ops.gather_grouped_mm(x, b, offsets.cpu(), row_index)
    with pytest.raises(RuntimeError, match=f"grouped_mm_unpermute: {device_message}: 'weights' is on cpu"):
        ops.grouped_mm_unpermute(h, b, offsets, weights.cpu(), row_index)
    with pytest.raises(RuntimeError, match=f"grouped_mm_unpermute: {device_message}: 'row_index' is on cpu"):
        ops.grouped_mm_unpermute(h, b, offsets, weights, row_index.cpu())
    with pytest.raises(RuntimeError, match=f"gather_grouped_glu: {device_message}: 'row_index' is on cpu"):
        ops.gather_grouped_glu(x, b, b.clone(), offsets, row_index.cpu())
    with pytest.raises(RuntimeError, match=f"gather_grouped_glu: {device_message}: 'w_up' is on cpu"):
        ops.gather_grouped_glu(x, b, b.cpu(), offsets, row_index)
    with pytest.raises(RuntimeError, match="_grouped_mm_unpermute_backward: argument 'grad_y' must have size 16 \\(tokens\\)"):
        torch.ops.torch_moe._grouped_mm_unpermute_backward(torch.randn(T - 1, M, device=CUDA), h, b, offsets, weights,
                                                           row_index)
    with pytest.raises(RuntimeError, match="_grouped_mm_unpermute_backward: argument 'grad_y' must have size 8 \\(columns of b\\)"):
        torch.ops.torch_moe._grouped_mm_unpermute_backward(torch.randn(T, M - 1, device=CUDA), h, b, offsets, weights,
                                                           row_index)


# ---------------------------------------------------------------------------------------------- big and multi-GPU


def test_dispatch_combine_beyond_2_pow_31_elements():
    """T·d just over 2^31 bf16 elements: int64 index math in dispatch, combine and their backwards."""
    d = 4096
    T = 2**31 // d + 64
    E, k, C = 8, 1, T // 8 + 64
    need = 2 * (T * d * 2) * 3 + (E * C * d * 2) * 2  # x, y, grads and two buffers, bf16
    if _gpu_memory_free() < need * 1.2:
        pytest.skip(f"needs about {need * 1.2 / 2**30:.0f} GiB of free GPU memory")
    assert T * d > 2**31
    ids = (torch.arange(T, device=CUDA) % E).unsqueeze(1)
    slots = ops.capacity_plan(ids, E, C).slots
    assert bool((slots >= 0).all())
    x = torch.empty(T, d, device=CUDA, dtype=torch.bfloat16)
    # Row t holds t mod 251 in every column: exact in bf16, so every row can be checked.
    x.copy_((torch.arange(T, device=CUDA) % 251).to(torch.bfloat16).unsqueeze(1).expand(T, d))
    buffer = ops.dispatch(x, ids, slots, E, C)
    weights = torch.ones(T, k, device=CUDA)
    y = ops.combine(buffer, weights, ids, slots)
    assert torch.equal(y, x)
    del buffer, y
    tail = slice(T - 128, T)  # rows whose elements sit past 2^31
    grad_x = torch.ops.torch_moe._dispatch_backward(
        ops.dispatch(x, ids, slots, E, C), ids, slots)
    assert torch.equal(grad_x[tail], x[tail])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_matches_first():
    x = torch.randn(64, 32, device="cuda:0")
    for cf in (1.25, None):  # the dispatch strategy is chosen at construction: one pair of layers per mode
        torch.manual_seed(0)
        layer0 = torch_moe.MoE(32, 64, 4, top_k=2, capacity_factor=cf, device="cuda:0")
        layer1 = torch_moe.MoE(32, 64, 4, top_k=2, capacity_factor=cf, device="cuda:1")
        layer1.load_state_dict(layer0.state_dict())
        y0 = layer0(x)
        with torch.cuda.device(0):  # the current device is not the tensors' device: the kernels' guard must switch
            y1 = layer1(x.to("cuda:1"))
        assert y1.device == torch.device("cuda:1")
        torch.testing.assert_close(y1.cpu(), y0.cpu())


# ---------------------------------------------------------------------------------------------- expert_choice and
# noisy_topk_load (CUDA kernels added after the sections above; compile-checked only until a GPU session runs them)


def _bump_logits(T, E, generator):
    """[T, E] float64 logits whose softmax columns are well separated in every dtype: zeros but one bump per row,
    row t bumping expert t mod E by a distinct multiple of 1/32 (exact in bf16 and fp16 for T <= 255), so the
    probability of any expert differs between any two tokens by far more than CPU/GPU rounding."""
    assert T <= 255
    bumps = (torch.randperm(T, generator=generator).to(torch.float64) + 1) / 32
    logits = torch.zeros(T, E, dtype=torch.float64)
    logits[torch.arange(T), torch.arange(T) % E] = bumps
    return logits


def _expert_choice_both(logits, capacity, valid=None, upstream=None):
    """expert_choice on CPU and CUDA with the same inputs -> (cpu, cuda, cpu_grad, cuda_grad)."""
    outs, grads = [], []
    for device in ("cpu", CUDA):
        x = logits.clone().to(device).requires_grad_(upstream is not None)
        out = ops.expert_choice(x, capacity, None if valid is None else valid.to(device))
        if upstream is not None:
            (out.weights * upstream.to(device)).sum().backward()
            grads.append(x.grad)
        outs.append(out)
    return (*outs, *(grads or [None, None]))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,C", [(200, 8, 30), (255, 64, 5), (40, 300, 1), (37, 4, 50), (9, 2, 0), (1, 1, 3)])
def test_expert_choice_agrees(dtype, masked, T, E, C):
    """Warp path and block path (E > 256), capacity above the valid tokens and above T: ids and slots exactly,
    weights, scores and the logits' gradient within tolerance."""
    g = _gen()
    logits = _bump_logits(T, E, g).to(dtype)
    valid = (torch.rand(T, generator=g) > 0.3) if masked else None
    upstream = torch.randn(T, E, generator=g, dtype=torch.float64)
    cpu, cuda, cpu_grad, cuda_grad = _expert_choice_both(logits, C, valid, upstream)
    _equal(cuda.token_ids, cpu.token_ids)
    _equal(cuda.slots, cpu.slots)
    assert cuda.weights.dtype == cpu.weights.dtype == ref.router_dtype(dtype)
    _close(cuda.weights, cpu.weights, ref.router_dtype(dtype))
    _close(cuda.scores, cpu.scores, ref.router_dtype(dtype))
    assert cuda_grad.dtype == dtype
    _close(cuda_grad, cpu_grad, dtype)
    if valid is not None:
        assert bool(cuda.slots[~valid.to(CUDA)].eq(-1).all()) and bool(cuda.weights[~valid.to(CUDA)].eq(0).all())
    taken = min(C, T if valid is None else int(valid.sum()))
    assert cuda.token_ids[:, :taken].ge(0).all() and cuda.token_ids[:, taken:].eq(-1).all()


@pytest.mark.parametrize("T,E,C", [(1000, 64, 40), (4096, 8, 600), (300, 512, 2)])
def test_expert_choice_float64_random_agrees(T, E, C):
    """Unstructured float64 logits at larger sizes (the sort over tokens, many experts)."""
    g = _gen()
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * 2
    valid = torch.rand(T, generator=g) > 0.1
    upstream = torch.randn(T, E, generator=g, dtype=torch.float64)
    cpu, cuda, cpu_grad, cuda_grad = _expert_choice_both(logits, C, valid, upstream)
    _equal(cuda.token_ids, cpu.token_ids)
    _equal(cuda.slots, cpu.slots)
    _close(cuda.weights, cpu.weights, torch.float64)
    _close(cuda_grad, cpu_grad, torch.float64)


def test_expert_choice_ties_padding_and_non_finite_agree():
    """Equal probabilities go to the lower token; padding is never taken even with spare capacity; NaN rows rank
    below every number (still taken when capacity allows, as on the CPU); -inf / +inf rows."""
    E = 3
    rows = [torch.zeros(E)] * 4 + [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([float("nan"), 0.0, 0.0]),
        torch.tensor([float("-inf")] * E),
        torch.tensor([float("inf"), float("inf"), 0.0]),
        torch.tensor([1.0, 0.0, 0.0]),  # a duplicate of row 4: tie, lower token first
        torch.zeros(E),
    ]
    logits = torch.stack(rows)
    T = logits.shape[0]
    valid = torch.ones(T, dtype=torch.bool)
    valid[[1, 9]] = False
    for C in (1, 4, T, T + 5):
        for mask in (None, valid):
            cpu, cuda, _, _ = _expert_choice_both(logits, C, mask)
            _equal(cuda.token_ids, cpu.token_ids)
            _equal(cuda.slots, cpu.slots)
            torch.testing.assert_close(cuda.weights.cpu(), cpu.weights, equal_nan=True)
            torch.testing.assert_close(cuda.scores.cpu(), cpu.scores, equal_nan=True)
    out = ops.expert_choice(torch.zeros(6, 2, device=CUDA), 4)
    assert out.token_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def _noisy_inputs(T, E, generator, dtype):
    clean = torch.randn(T, E, generator=generator, dtype=torch.float64)
    std = torch.rand(T, E, generator=generator, dtype=torch.float64) + 0.2
    noisy = clean + torch.randn(T, E, generator=generator, dtype=torch.float64) * std
    return clean.to(dtype), noisy.to(dtype), std.to(dtype)


def _noisy_load_both(clean, noisy, std, k, valid=None, upstream=None):
    """noisy_topk_load on CPU and CUDA -> (cpu_load, cuda_load, cpu_grads, cuda_grads)."""
    loads, grads = [], []
    for device in ("cpu", CUDA):
        xs = [t.clone().to(device).requires_grad_(upstream is not None) for t in (clean, noisy, std)]
        load = ops.noisy_topk_load(*xs, k, None if valid is None else valid.to(device))
        if upstream is not None:
            (load * upstream.to(device)).sum().backward()
            grads.append([x.grad for x in xs])
        loads.append(load)
    return (*loads, *(grads or [None, None]))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k", [(257, 8, 2), (64, 64, 1), (33, 300, 6), (19, 5, 5), (5, 1, 1), (0, 4, 2)])
def test_noisy_topk_load_agrees(dtype, masked, T, E, k):
    """Warp and block paths, k == E (no threshold): load and the three gradients within tolerance."""
    g = _gen()
    clean, noisy, std = _noisy_inputs(T, E, g, dtype)
    valid = (torch.rand(T, generator=g) > 0.3) if masked else None
    upstream = torch.randn(E, generator=g, dtype=torch.float64)
    cpu, cuda, cpu_grads, cuda_grads = _noisy_load_both(clean, noisy, std, k, valid, upstream if T else None)
    acc = ref.router_dtype(dtype)
    assert cuda.dtype == cpu.dtype == acc
    # Sums over up to T tokens in a different (but fixed) order than the CPU's.
    tol = dict(rtol=1e-4, atol=1e-5) if acc == torch.float32 else ref.tolerance(acc)
    torch.testing.assert_close(cuda.cpu(), cpu, **tol)
    for a, b in zip(cuda_grads or [], cpu_grads or []):
        assert a.dtype == b.dtype == dtype
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(a.cpu(), b, **tol)
        else:
            _close(a, b, dtype)
    if valid is not None and T:
        for grad in cuda_grads:
            assert bool(grad[~valid.to(CUDA)].eq(0).all())
    if k == E:
        assert torch.equal(cuda.cpu(), cpu)  # every term is exactly 1


def test_noisy_topk_load_ties_and_nan_agree():
    """The threshold's ranking: equal noisy logits go to the lower expert id, NaN ranks below every number."""
    E = 6
    noisy = torch.tensor(
        [
            [0.0] * E,
            [1.0, 2.0, 2.0, 2.0, 0.0, -1.0],
            [float("nan"), 1.0, 1.0, float("nan"), 0.5, 0.5],
            [float("nan")] * E,
            [3.0, 3.0, 1.0, 1.0, 1.0, 1.0],
        ],
        dtype=torch.float64,
    )
    T = noisy.shape[0]
    g = _gen()
    clean = torch.randn(T, E, generator=g, dtype=torch.float64)
    std = torch.rand(T, E, generator=g, dtype=torch.float64) + 0.5
    upstream = torch.randn(E, generator=g, dtype=torch.float64)
    for k in range(1, E + 1):
        for dtype in (torch.float64, torch.float32):
            cpu, cuda, cpu_grads, cuda_grads = _noisy_load_both(
                clean.to(dtype), noisy.to(dtype), std.to(dtype), k, None, upstream)
            torch.testing.assert_close(cuda.cpu(), cpu, equal_nan=True, **ref.tolerance(dtype))
            for a, b in zip(cuda_grads, cpu_grads):
                torch.testing.assert_close(a.cpu(), b, equal_nan=True, **ref.tolerance(dtype))


def test_expert_choice_and_noisy_load_are_deterministic_and_sync_free():
    g = _gen()
    logits = torch.randn(512, 16, generator=g).to(CUDA).requires_grad_()
    clean, noisy, std = (t.to(CUDA).requires_grad_() for t in _noisy_inputs(512, 16, g, torch.float32))
    valid = (torch.rand(512, generator=g) > 0.2).to(CUDA)
    upstream = torch.randn(16, device=CUDA)

    def step():
        for t in (logits, clean, noisy, std):
            t.grad = None
        out = ops.expert_choice(logits, 40, valid)
        load = ops.noisy_topk_load(clean, noisy, std, 2, valid)
        ((out.weights * upstream).sum() + (load * upstream).sum()).backward()
        return [out.weights, out.slots, out.token_ids, load] + [t.grad for t in (logits, clean, noisy, std)]

    first = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
