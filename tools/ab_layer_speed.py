"""Speed of the whole MoE layer (fwd+bwd, Python and C++) in one tree, for before/after checks of a refactor.

Two trees are compared by running this script once per tree, alternately, on an otherwise idle machine:

    # each tree: a copy of torch_moe/ (git archive REV torch_moe | tar -x -C DIR) with that revision's built
    # _C*.so and _build_info.py copied in
    for i in 1 2; do python tools/ab_layer_speed.py /tmp/ab/old; python tools/ab_layer_speed.py /tmp/ab/new; done

It prints one JSON line of median milliseconds per (shape, mode). The editable install's import hook is removed so
that ``torch_moe`` comes from the given directory. This is a refactor check across processes, not a benchmark
against contenders (those are in benchmarks/).
"""

from __future__ import annotations

import json
import sys
import time

import torch

CASES = {"tiny-T8": (64, 128, 8, 2, 8), "olmoe-T128": (512, 256, 64, 8, 128), "olmoe-T2048": (512, 256, 64, 8, 2048),
         "mixtral-T512": (1024, 3584, 8, 2, 512)}


def _import_from(tree: str):
    sys.path.insert(0, tree)
    sys.meta_path = [f for f in sys.meta_path
                     if not any(word in repr(f).lower() for word in ("scikit", "editable", "torch_moe"))]
    import torch_moe

    if not torch_moe.__file__.startswith(tree):
        raise SystemExit(f"torch_moe was imported from {torch_moe.__file__}, not from {tree}")
    return torch_moe


def main() -> None:
    torch_moe = _import_from(sys.argv[1])
    torch.set_num_threads(2)
    out = {}
    for name, (d, f, num_experts, k, tokens) in CASES.items():
        for mode, capacity_factor in (("dropless", None), ("capacity", 1.25)):
            torch.manual_seed(0)
            layer = torch_moe.MoE(d, f, num_experts, k, capacity_factor=capacity_factor)
            x = torch.randn(tokens, d, requires_grad=True)

            def step():
                y = layer(x)
                (y.square().mean() + layer.aux_loss).backward()

            for _ in range(3):
                step()
            start = time.perf_counter()
            step()
            reps = max(3, int(0.3 / max(1e-4, time.perf_counter() - start)))
            times = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(reps):
                    step()
                times.append((time.perf_counter() - start) / reps)
            out[f"{name} {mode}"] = sorted(times)[3] * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main()
