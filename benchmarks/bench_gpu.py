"""GPU benchmark of torch_moe.MoE in bf16 against a dense SwiGLU FFN and an HF-style loop over experts.

Issue 3: forward+backward time, the ratio to a dense SwiGLU FFN of the same active FLOPs, routing+dispatch+combine
bandwidth, router share, model TFLOP/s and the speed-up over a plain-PyTorch loop over experts written the way
Hugging Face's Mixtral block does it; writes benchmarks/RESULTS-gpu.md.

Timing: CUDA events around each call after warm-up, the L2 cache flushed before every repeat, the median of the
repeats. Contenders run in this process on the same inputs and weights. Needs a CUDA GPU; ``--help`` works anywhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, DenseSwiGLU, git_revision, publish  # noqa: E402

import torch_moe  # noqa: E402
from torch_moe import ops  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    d: int
    d_ff: int
    E: int
    k: int
    T: int
    capacity_factor: Optional[float] = None  # None: dropless
    router: str = "softmax"
    n_groups: Optional[int] = None
    topk_groups: Optional[int] = None

    def shape(self) -> str:
        mode = "dropless" if self.capacity_factor is None else f"cf {self.capacity_factor}"
        extra = f", {self.router}" + (f" {self.n_groups}/{self.topk_groups} groups" if self.n_groups else "")
        return f"d={self.d} d_ff={self.d_ff} E={self.E} k={self.k} T={self.T}, {mode}{extra}"


CASES = {
    "mixtral": Case("Mixtral", 4096, 14336, 8, 2, 8192),
    "olmoe": Case("OLMoE", 2048, 1024, 64, 8, 16384),
    "qwen3": Case("Qwen3-30B-A3B", 2048, 768, 128, 8, 16384),
    "deepseek": Case("DeepSeek-V3-like", 7168, 2048, 256, 8, 16384, router="sigmoid", n_groups=8, topk_groups=4),
    "switch": Case("Switch (capacity)", 768, 3072, 64, 1, 16384, capacity_factor=1.25),
}
QUICK = {
    key: Case(c.name, min(c.d, 256), min(c.d_ff, 256), min(c.E, 16), min(c.k, 4), 1024, c.capacity_factor, c.router,
              min(c.n_groups, 4) if c.n_groups else None, min(c.topk_groups, 2) if c.topk_groups else None)
    for key, c in CASES.items()
}


# ---------------------------------------------------------------------------------------------- contenders


class HFLoopMoE(nn.Module):
    """The Hugging Face Mixtral block's algorithm in plain PyTorch: softmax router, top-k, renormalise, then a Python
    loop over experts that gathers each expert's tokens, runs its SwiGLU and index_adds the weighted result.
    Shares the weights of a torch_moe.MoE (w1/w3 [E, d, d_ff], w2 [E, d_ff, d])."""

    def __init__(self, layer: torch_moe.MoE) -> None:
        super().__init__()
        self.layer = layer
        self.k = layer.top_k
        self.E = layer.num_experts

    def forward(self, x: Tensor) -> Tensor:
        experts = self.layer.experts
        logits = F.linear(x, self.layer.router.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(ids, num_classes=self.E).permute(2, 1, 0)  # [E, k, T]
        for e in range(self.E):
            choice, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            h = x[token]
            h = F.silu(h @ experts.w1[e]) * (h @ experts.w3[e])
            out.index_add_(0, token, (h @ experts.w2[e]) * weights[token, choice, None])
        return out


def make_layer(case: Case, device: str) -> torch_moe.MoE:
    kwargs = dict(capacity_factor=case.capacity_factor, router=case.router, device=device, dtype=torch.bfloat16)
    if case.n_groups:
        kwargs.update(n_groups=case.n_groups, topk_groups=case.topk_groups)
    return torch_moe.MoE(case.d, case.d_ff, case.E, case.k, **kwargs)


# ---------------------------------------------------------------------------------------------- timing


class L2Flush:
    """Overwrites a buffer larger than the L2 cache, so each repeat starts cold, as in a real model."""

    def __init__(self) -> None:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
        self.buffer = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        self.buffer.zero_()


def time_ms(fn: Callable[[], object], flush: L2Flush, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls, each timed with CUDA events after an L2 flush."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(module: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor, params, aux=None) -> Callable[[], None]:
    wrt = [x, *params]

    def run():
        y = module(x)
        outputs, grads = [y], [grad]
        if aux is not None:
            outputs.append(aux())
            grads.append(torch.ones_like(outputs[-1]))
        torch.autograd.grad(outputs, wrt, grads)

    return run


def fwd_only(module: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            module(x)

    return run


def copy_bandwidth(flush: L2Flush, warmup: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), on 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), flush, warmup, repeats)
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(flush: L2Flush, warmup: int, repeats: int, n: int = 8192) -> float:
    """bf16 GEMM FLOP/s on an n x n x n problem."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, flush, warmup, repeats)
    return 2 * n**3 / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------- one case


def bench_case(case: Case, args, flush: L2Flush, copy_bw: float, mm_rate: float) -> dict:
    torch.manual_seed(0)
    layer = make_layer(case, "cuda")
    x = torch.randn(case.T, case.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    w, r = args.warmup, args.repeats
    row: dict = {"case": case, "path": ""}

    layer_params = list(layer.parameters())
    row["layer_ms"] = time_ms(fwd_bwd(layer, x, grad, layer_params, lambda: layer.aux_loss), flush, w, r)
    row["path"] = layer.experts.last_path
    row["layer_fwd_ms"] = time_ms(fwd_only(layer, x), flush, w, r)

    # Router share of the forward: the router's GEMM plus the fused top-k op.
    router_weight = layer.router.weight
    bias = layer.router.selection_bias() if hasattr(layer.router, "selection_bias") else None

    def router_step():
        logits = F.linear(x, router_weight).float()
        if case.n_groups:
            ops.router_topk(logits, case.k, case.router, bias, True, case.n_groups, case.topk_groups)
        else:
            ops.router_topk(logits, case.k, case.router, bias)

    with torch.no_grad():
        row["router_ms"] = time_ms(router_step, flush, w, r)

        # Routing + dispatch + combine bandwidth (the layer's row movement, without the expert GEMMs).
        logits = F.linear(x, router_weight).float()
        routed = ops.router_topk(logits, case.k, "softmax")
        if case.capacity_factor is None:
            def movement():
                rt = ops.router_topk(logits, case.k, "softmax")
                rows, row_index, _ = ops.permute(x, rt.expert_ids, case.E)
                ops.unpermute(rows, rt.weights, row_index)
        else:
            capacity = layer.capacity(case.T)

            def movement():
                rt = ops.router_topk(logits, case.k, "softmax")
                plan = ops.capacity_plan(rt.expert_ids, case.E, capacity)
                buffer = ops.dispatch(x, rt.expert_ids, plan.slots, case.E, capacity)
                ops.combine(buffer, rt.weights, rt.expert_ids, plan.slots)
        del routed
        row["movement_ms"] = time_ms(movement, flush, w, r)
    row_bytes = case.d * 2
    moved = (case.T * case.E * 4 * 2  # logits read, scores written
             + case.T * row_bytes  # x read
             + 2 * case.T * case.k * row_bytes  # rows written, rows read
             + case.T * row_bytes)  # y written
    row["bandwidth_fraction"] = moved / (row["movement_ms"] * 1e-3) / copy_bw

    # FLOPs of fwd+bwd: 3 GEMMs per active expert, each 2·d·d_ff per token, backward twice the forward.
    # Capacity mode counts the k assignments per token too (dropped ones included): the dense baseline's FLOPs.
    flops = 3 * 3 * 2 * case.T * case.k * case.d * case.d_ff
    row["tflops"] = flops / (row["layer_ms"] * 1e-3) / 1e12
    row["mm_fraction"] = flops / (row["layer_ms"] * 1e-3) / mm_rate

    dense = DenseSwiGLU(case.d, case.k * case.d_ff).to("cuda", torch.bfloat16)
    row["dense_ms"] = time_ms(fwd_bwd(dense, x, grad, list(dense.parameters())), flush, w, r)
    del dense

    row["hf_ms"] = None
    if not args.no_hf and case.capacity_factor is None:
        hf = HFLoopMoE(layer)
        params = [layer.router.weight, layer.experts.w1, layer.experts.w2, layer.experts.w3]
        row["hf_ms"] = time_ms(fwd_bwd(hf, x, grad, params), flush, w, max(3, r // 2))
    del layer, x, grad
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------- report


def render(rows: list[dict], args, copy_bw: float, mm_rate: float, revision: str, run_s: float) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# torch_moe GPU benchmark" + (" (quick smoke run, not results)" if args.quick else ""),
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; revision {revision}; run time {run_s:.0f} s",
        f"- GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}); "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, torch_moe built with CUDA "
        f"{torch_moe.build_info().get('cuda_runtime_version', '?')}",
        f"- bf16, forward+backward (autograd.grad w.r.t. input and parameters, aux loss included), CUDA events, "
        f"{args.warmup} warm-up calls, median of {args.repeats} repeats, L2 flushed before each repeat",
        f"- Measured device copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write); bf16 GEMM rate "
        f"{mm_rate / 1e12:.0f} TFLOP/s (8192³)",
        "",
        "| case | shape | expert path | layer fwd+bwd ms | vs dense SwiGLU (same active FLOPs) | routing+dispatch+combine "
        "/ copy bandwidth | router share of forward | model TFLOP/s (fraction of GEMM rate) | speed-up over HF-style loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["case"]
        hf = f"{row['hf_ms'] / row['layer_ms']:.2f}× ({row['hf_ms']:.1f} ms)" if row["hf_ms"] else "n/a"
        lines.append(
            f"| {c.name} | {c.shape()} | {row['path']} | {row['layer_ms']:.2f} | "
            f"{row['layer_ms'] / row['dense_ms']:.2f} ({row['dense_ms']:.2f} ms) | {row['bandwidth_fraction']:.2f} | "
            f"{100 * row['router_ms'] / row['layer_fwd_ms']:.1f}% | {row['tflops']:.0f} ({row['mm_fraction']:.2f}) | {hf} |"
        )
    lines += ["", "Goals (issue 3; measured, not asserted): dense ratio ≤ 1.3 on Mixtral; bandwidth fraction ≥ 0.6; "
              "router share ≤ 5%; speed-up over the HF-style loop ≥ 3× on OLMoE.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run (not results)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--no-hf", action="store_true", help="skip the plain-PyTorch loop-over-experts contender")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown output (default benchmarks/RESULTS-gpu.md, RESULTS-gpu-quick.md with --quick)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not torch_moe.build_info().get("with_cuda"):
        sys.exit("torch_moe was built without CUDA kernels; rebuild against a CUDA build of torch")
    if args.quick:
        args.repeats = min(args.repeats, 5)
    table = QUICK if args.quick else CASES
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {list(table)}")
    out = args.out or REPO / "benchmarks" / ("RESULTS-gpu-quick.md" if args.quick else "RESULTS-gpu.md")
    revision = git_revision()
    start = time.time()
    flush = L2Flush()
    copy_bw = copy_bandwidth(flush, args.warmup, args.repeats)
    mm_rate = matmul_rate(flush, args.warmup, args.repeats)
    rows = []
    for key in keys:
        print(f"[bench_gpu] {table[key].name}: {table[key].shape()}", file=sys.stderr, flush=True)
        rows.append(bench_case(table[key], args, flush, copy_bw, mm_rate))
    publish(render(rows, args, copy_bw, mm_rate, revision, time.time() - start), out)


if __name__ == "__main__":
    main()
