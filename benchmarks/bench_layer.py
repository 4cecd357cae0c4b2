"""CPU benchmark of torch_moe.MoE against a Hugging-Face-style MoE block and a dense SwiGLU FFN, fp32.

    python benchmarks/bench_layer.py [--quick] [--threads N] [--out PATH]

All contenders run in this one process on the same weights and the same input; the table gives median times
(torch.utils.benchmark) and each time divided by the HF-style block's and the dense FFN's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_moe
from _common import (publish, DenseSwiGLU, cpu_model, forward_backward_fn, forward_fn, git_revision, load_average_check,
                     measure_autorange)

# (d_model, d_ff, num_experts, top_k, tokens)
CASES = [(512, 256, 64, 8, 512), (1024, 3584, 8, 2, 512), (256, 512, 16, 2, 2048)]
QUICK_CASES = [(64, 32, 16, 4, 64), (128, 256, 8, 2, 64), (64, 128, 4, 2, 256)]
CAPACITY_FACTOR = 1.25
MATCH_TOL = 1e-4


class HFStyleMoE(nn.Module):
    """The Mixtral-style sparse block of Hugging Face transformers, rewritten from its description.

    Router linear -> softmax -> top-k -> renormalise -> one-hot expert mask -> a Python loop over experts that
    gathers each expert's tokens with torch.where and scatters the weighted outputs back with index_add_.
    """

    def __init__(self, moe: torch_moe.MoE) -> None:
        super().__init__()
        self.top_k = moe.top_k
        self.num_experts = moe.num_experts
        self.router_weight = nn.Parameter(moe.router.weight.detach().clone())  # [E, d]
        self.w1 = nn.Parameter(moe.experts.w1.detach().clone())  # [E, d, d_ff]
        self.w3 = nn.Parameter(moe.experts.w3.detach().clone())  # [E, d, d_ff]
        self.w2 = nn.Parameter(moe.experts.w2.detach().clone())  # [E, d_ff, d]

    def forward(self, x: Tensor) -> Tensor:
        """x: [T, d] -> [T, d]."""
        logits = F.linear(x, self.router_weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        expert_mask = F.one_hot(expert_ids, self.num_experts).permute(2, 1, 0)  # [E, k, T]
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rank, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            rows = x[token]
            h = (F.silu(rows @ self.w1[e]) * (rows @ self.w3[e])) @ self.w2[e]
            out.index_add_(0, token, h * weights[token, rank, None])
        return out


def bench_case(case, threads: int, min_run_time: float):
    d_model, d_ff, num_experts, top_k, tokens = case
    torch.manual_seed(0)
    capacity = torch_moe.MoE(d_model, d_ff, num_experts, top_k, capacity_factor=CAPACITY_FACTOR)
    dropless = torch_moe.MoE(d_model, d_ff, num_experts, top_k, capacity_factor=None)
    dropless.load_state_dict(capacity.state_dict())
    hf = HFStyleMoE(capacity)
    dense = DenseSwiGLU(d_model, top_k * d_ff)
    x = torch.randn(tokens, d_model, requires_grad=True)
    grad_out = torch.randn(tokens, d_model)

    with torch.no_grad():
        reference = dropless(x)
        error = (hf(x) - reference).abs().max().item()
        capacity(x)
    if not error <= MATCH_TOL:
        sys.exit(f"bench_layer: case {case}: the HF-style block differs from torch_moe dropless by {error:.3g} "
                 f"(max abs), more than {MATCH_TOL}; the comparison would be meaningless, aborting")
    dropped = capacity.stats.dropped_fraction.item()

    contenders = {
        f"torch_moe capacity {CAPACITY_FACTOR}": capacity,
        "torch_moe dropless": dropless,
        "HF-style loop": hf,
        f"dense SwiGLU {top_k}·d_ff": dense,
    }
    results = {}
    for name, module in contenders.items():
        fwd = measure_autorange(forward_fn(module, x), threads, min_run_time)
        fwd_bwd = measure_autorange(forward_backward_fn(module, x, grad_out, [x, *module.parameters()]), threads,
                                    min_run_time)
        results[name] = (fwd, fwd_bwd)
        print(f"  {name:<26} fwd {fwd.median * 1e3:9.3f} ms   fwd+bwd {fwd_bwd.median * 1e3:9.3f} ms", flush=True)
    return results, error, dropped, capacity.capacity(tokens)


def render(rows, threads: int, min_run_time: float, quick: bool, load_at_start) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# torch_moe layer benchmark, CPU, fp32{' (--quick smoke run, not a result)' if quick else ''}",
        "",
        f"- date: {now}",
        f"- machine: platform.processor()={platform.processor()!r} ({cpu_model()}), os.cpu_count()={os.cpu_count()}, "
        f"torch threads={threads}, {platform.platform()}",
        f"- load average at start (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load_at_start)}",
        f"- versions: torch {torch.__version__}, torch_moe {torch_moe.__version__} (git {git_revision()}), "
        f"Python {platform.python_version()}",
        f"- method: torch.utils.benchmark Timer.blocked_autorange(min_run_time={min_run_time}) per cell, median; "
        "one warm-up call first. fwd runs under no_grad; fwd+bwd is forward plus torch.autograd.grad of a fixed "
        "random output gradient with respect to the input and every parameter.",
        "- contenders share weights (the HF-style block and torch_moe dropless copy the capacity layer's) and the "
        "input; the dense FFN has its own weights, hidden width top_k·d_ff. The HF-style output matched torch_moe "
        f"dropless within {MATCH_TOL} (max abs) before timing.",
        "- ÷HF and ÷dense: the contender's median time divided by that of the HF-style block / the dense FFN "
        "(below 1 is faster). IQR: interquartile range over median of the timed blocks, fwd / fwd+bwd.",
        "",
        "| case (d, d_ff, E, k, T) | contender | fwd ms | fwd ÷HF | fwd ÷dense | fwd+bwd ms | fwd+bwd ÷HF "
        "| fwd+bwd ÷dense | IQR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for case, results, error, dropped, capacity in rows:
        hf_fwd, hf_bwd = results["HF-style loop"]
        dense_fwd, dense_bwd = next(v for k, v in results.items() if k.startswith("dense"))
        for name, (fwd, bwd) in results.items():
            lines.append(
                f"| {case} | {name} | {fwd.median * 1e3:.3f} | {fwd.median / hf_fwd.median:.2f} "
                f"| {fwd.median / dense_fwd.median:.2f} | {bwd.median * 1e3:.3f} | {bwd.median / hf_bwd.median:.2f} "
                f"| {bwd.median / dense_bwd.median:.2f} | {fwd.iqr / fwd.median:.0%} / {bwd.iqr / bwd.median:.0%} |"
            )
        notes.append(f"- {case}: capacity mode C={capacity} slots per expert, dropped {dropped:.1%} of assignments; "
                     f"HF-style vs dropless max abs difference {error:.2g}.")
    return "\n".join(lines + [""] + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timing: a ~10 s smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown output (default benchmarks/RESULTS-layer-cpu.md; "
                             "benchmarks/RESULTS-layer-cpu-quick.md with --quick, so a smoke run never "
                             "overwrites real numbers)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = args.out or Path(__file__).resolve().parent / (
        "RESULTS-layer-cpu-quick.md" if args.quick else "RESULTS-layer-cpu.md")

    load_at_start = load_average_check("bench_layer", args.threads)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    cases = QUICK_CASES if args.quick else CASES
    min_run_time = 0.1 if args.quick else 1.0

    rows = []
    for case in cases:
        print(f"case (d, d_ff, E, k, T) = {case}", flush=True)
        rows.append((case, *bench_case(case, args.threads, min_run_time)))

    report = render(rows, args.threads, min_run_time, args.quick, load_at_start)
    publish(report, out)


if __name__ == "__main__":
    main()
