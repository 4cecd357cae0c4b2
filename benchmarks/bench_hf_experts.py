"""HF experts implementations (eager, grouped_mm, batched_mm) beside "torch_moe" on one HF experts module, CPU fp32.

Run: ``python benchmarks/bench_hf_experts.py [--quick] [--out benchmarks/RESULTS-hf-experts.md]``.
One experts module per case (OlmoeExperts / MixtralExperts built from a config, HF's init), one routing; each
contender is the same module with ``config._experts_implementation`` switched, timed in the same process,
interleaved round by round (order rotated), median per call. Ratios are against the best HF implementation.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import torch_moe
import torch_moe.integrations.hf_experts  # noqa: F401  (registers "torch_moe")
import transformers
from _common import cpu_gemm_library, gemm_library_line
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

HF_CONTENDERS = ("eager", "grouped_mm", "batched_mm")
# "torch_moe" with its float32 GEMM blocks on ATen's at::mm (MKL), the library HF's implementations use: the
# speed-up with the GEMM library held equal (ops.set_cpu_gemm_library; only where the default is oneDNN).
ATEN = "torch_moe, aten GEMMs"
IMPLEMENTATION_OF = {ATEN: "torch_moe"}
CONTENDERS = HF_CONTENDERS + ("torch_moe",) + ((ATEN,) if torch_moe.ops.cpu_gemm_library() != "aten" else ())
# batched_mm gathers a [d_in, d_out] weight per (token, choice): skip it when those copies would pass this size.
BATCHED_MM_LIMIT_BYTES = 2 << 30


def make_experts(kind: str, d: int, f: int, E: int, k: int):
    if kind == "OLMoE":
        config = transformers.OlmoeConfig(hidden_size=d, intermediate_size=f, num_experts=E, num_experts_per_tok=k)
        module = OlmoeExperts(config)
    else:
        config = transformers.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k)
        module = MixtralExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


def routing(T: int, E: int, k: int, d: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, d, generator=g)
    logits = torch.randn(T, E, generator=g)
    weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return x, ids, weights / weights.sum(-1, keepdim=True)


def fits(contender: str, T: int, d: int, f: int, k: int) -> bool:
    return contender != "batched_mm" or T * k * 3 * d * f * 4 <= BATCHED_MM_LIMIT_BYTES


def run_case(module, x, ids, w, backward: bool, rounds: int, budget_s: float, contenders):
    params = list(module.parameters())
    grad_out = torch.randn_like(x)

    def call(name):
        module.config._experts_implementation = IMPLEMENTATION_OF.get(name, name)
        with cpu_gemm_library("aten" if name in IMPLEMENTATION_OF else None):
            run(backward)

    def run(backward):
        if backward:
            xr = x.detach().requires_grad_(True)
            wr = w.detach().requires_grad_(True)
            y = module(xr, ids, wr)
            torch.autograd.grad(y, [xr, wr, *params], grad_out)
        else:
            with torch.no_grad():
                module(x, ids, w)

    # Check agreement once, then warm up.
    with torch.no_grad():
        outs = {}
        for name in contenders:
            module.config._experts_implementation = IMPLEMENTATION_OF.get(name, name)
            outs[name] = module(x, ids, w)
    ref = outs["eager"]
    err = max(float((o - ref).abs().max() / ref.abs().max()) for o in outs.values())
    # The agreement check is the forward warm-up; a backward case warms up in its first round (median of >= 2).
    times = {name: [] for name in contenders}
    start = time.perf_counter()
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for name in order:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
        if r >= 1 and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}, err, len(times[contenders[0]])


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads = {torch.get_num_threads()}, {platform.platform()}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small cases only (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-hf-experts.md")))
    parser.add_argument("--deadline", type=float, default=9.0, help="minutes after which no new case starts")
    parser.add_argument("--no-mixtral-train", action="store_true", help="skip Mixtral-mini T=2048 (the slowest case)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.time()
    load_start = os.getloadavg()

    olmoe = ("OLMoE", 512, 256, 64, 8)
    mixtral = ("Mixtral", 1024, 3584, 8, 2)
    # (block, T, backward, rounds, budget seconds per case)
    # In priority order: the run stops adding cases once --deadline minutes are spent (a loaded 2-core machine).
    cases = [(olmoe, 128, False, 15, 10), (olmoe, 128, True, 9, 20)]
    for block in (olmoe, mixtral):
        cases += [(block, T, False, 21, 6) for T in (1, 8, 32)]
    cases += [(olmoe, 2048, False, 7, 30), (olmoe, 2048, True, 5, 45)]
    if not args.no_mixtral_train:
        cases += [(mixtral, 2048, False, 3, 30), (mixtral, 2048, True, 3, 60)]
    if args.quick:
        cases = [(olmoe, 128, False, 3, 2), (olmoe, 128, True, 3, 2), (olmoe, 8, False, 3, 2)]

    rows, skipped = [], []
    for (kind, d, f, E, k), T, backward, rounds, budget in cases:
        if time.time() - began > args.deadline * 60:
            skipped.append(f"{kind}-mini T={T} {'fwd+bwd' if backward else 'fwd'}")
            continue
        module = make_experts(kind, d, f, E, k)
        x, ids, w = routing(T, E, k, d)
        contenders = tuple(c for c in CONTENDERS if fits(c, T, d, f, k))
        ms, err, n = run_case(module, x, ids, w, backward, rounds, budget, contenders)
        best_hf = min((name for name in contenders if name in HF_CONTENDERS), key=ms.get)
        label = f"{kind}-mini (d {d}, f {f}, E {E}, k {k}), T={T}"
        row = (label, "fwd+bwd" if backward else "fwd", ms, best_hf, err, n, contenders)
        rows.append(row)
        cells = ", ".join(f"{c} {ms[c]:.2f}" for c in contenders)
        print(f"{label} {row[1]}: {cells} ms; torch_moe / {best_hf} = {ms['torch_moe'] / ms[best_hf]:.2f}", flush=True)

    minutes = (time.time() - began) / 60
    lines = [
        "# HF experts implementations vs \"torch_moe\" (CPU, fp32)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the run took {minutes:.1f} min",
        f"- machine: {machine()}",
        f"- load average at start / end (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load_start)} ; "
        f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())} (a shared 2-core machine: treat times as noisy)",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, torch_moe "
        f"{getattr(torch_moe, '__version__', '?')}, Python {platform.python_version()}",
        f"- command: `python benchmarks/bench_hf_experts.py{' --quick' if args.quick else ''}`",
        "- module: one HF experts module (OlmoeExperts / MixtralExperts, weights N(0, 0.02)), softmax top-k routing of "
        "random logits; each contender = the same module with `config._experts_implementation` switched. fwd under "
        "no_grad; fwd+bwd = forward + autograd.grad w.r.t. x, routing weights and the expert weights. Contenders "
        "interleaved round by round (order rotated) after one agreement-check forward each (the warm-up), median per call; a case stops after its time budget once it has 2 rounds.",
        f"- batched_mm left out where its per-assignment weight copies would exceed {BATCHED_MM_LIMIT_BYTES >> 30} GiB.",
        "- ratio = torch_moe time / best HF implementation's time (below 1: torch_moe faster).",
        "",
        gemm_library_line(ATEN, "HF's implementations"),
        "",
        "| case | pass | eager ms | grouped_mm ms | batched_mm ms | torch_moe ms | torch_moe, aten GEMMs ms | best HF "
        "| torch_moe ÷ best HF | aten GEMMs ÷ best HF | max rel. diff | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for label, kind, ms, best_hf, err, n, contenders in rows:
        cell = lambda c: f"{ms[c]:.2f}" if c in ms else "—"  # noqa: E731
        aten_ratio = f"{ms[ATEN] / ms[best_hf]:.2f}" if ATEN in ms else "—"
        lines.append(f"| {label} | {kind} | {cell('eager')} | {cell('grouped_mm')} | {cell('batched_mm')} | "
                     f"{cell('torch_moe')} | {cell(ATEN)} | {best_hf} | {ms['torch_moe'] / ms[best_hf]:.2f} "
                     f"| {aten_ratio} | {err:.1e} | {n} |")
    if skipped:
        lines += ["", f"Not run (the {args.deadline:g}-minute deadline had passed): {', '.join(skipped)}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
