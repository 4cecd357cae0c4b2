"""Results do not depend on the number of CPU threads: every op on the dropless path and the whole layer (dropless
and capacity mode), forward and backward, give bit-identical outputs and gradients at 1, 2, 3 and 4 threads.

Each thread count runs in its own child process (torch.set_num_threads before any work, so no pool of another size
was ever started) and saves what it computed; the parent compares the saves bit for bit. The shapes cover uneven
expert segments, segments long enough that each expert's GEMM runs threaded, and many small segments run side by
side, in float32, float64 and bfloat16.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

THREAD_COUNTS = (1, 2, 3, 4)

_CHILD = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    import torch_moe
    from torch_moe import ops

    results = {}

    def skewed_ids(T, E, k, generator):
        # Token-choice ids with distinct experts per token, most tokens on the first experts: uneven segments.
        scores = torch.rand(T, E, generator=generator) + torch.linspace(1.0, 0.0, E)
        return scores.topk(k, dim=1).indices

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    def record(name, fn, inputs, generator):
        # Leaves of this op alone, so that each gradient is the op's own.
        inputs = [leaf(t) for t in inputs]
        out = fn(*inputs)
        out.backward(torch.randn(out.shape, generator=generator).to(out.dtype))
        results[name + " out"] = out.detach()
        for i, t in enumerate(inputs):
            results[f"{name} grad{i}"] = t.grad

    results["library"] = ops.cpu_gemm_library()
    # (T, K, M, E, k): uneven small segments; a few long segments; many small ones (side by side); GEMMs of more
    # than 2^26 multiply-adds cut into blocks: of rows ("row blocks", float32 ones on oneDNN) and of columns, for
    # few rows and wide weights ("few rows": the forward's blocks are columns on at::mm, the weight gradient's rows).
    shapes = {"uneven": (300, 24, 40, 6, 2), "long": (3000, 96, 160, 4, 2), "many": (1024, 64, 32, 64, 8),
              "row blocks": (1100, 256, 512, 2, 1), "few rows": (64, 1024, 2048, 2, 1)}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape_name, (T, K, M, E, k) in shapes.items():
            g = torch.Generator().manual_seed(0)
            tag = f"{shape_name} {dtype}"
            ids = skewed_ids(T, E, k, g)
            row_index, offsets = ops.permute_plan(ids, E)
            x = torch.randn(T, K, generator=g).to(dtype)
            b = (torch.randn(E, K, M, generator=g) / K**0.5).to(dtype)
            b2 = (torch.randn(E, K, M, generator=g) / K**0.5).to(dtype)
            down = (torch.randn(E, M, K, generator=g) / M**0.5).to(dtype)
            weights = torch.rand(T, k, generator=g).to(dtype)
            a = torch.randn(T * k, K, generator=g).to(dtype)
            h = torch.randn(T * k, M, generator=g).to(dtype)
            record(f"grouped_mm {tag}", lambda a, b: ops.grouped_mm(a, b, offsets), [a, b], g)
            record(f"gather_grouped_mm {tag}", lambda x, b: ops.gather_grouped_mm(x, b, offsets, row_index), [x, b], g)
            for activation in ("silu", "gelu"):
                record(f"gather_grouped_glu {activation} {tag}",
                       lambda x, b, b2: ops.gather_grouped_glu(x, b, b2, offsets, row_index, activation), [x, b, b2], g)
            record(f"grouped_mm_unpermute {tag}",
                   lambda h, down, weights: ops.grouped_mm_unpermute(h, down, offsets, weights, row_index),
                   [h, down, weights], g)
            gate, up = torch.randn(T * k, M, generator=g).to(dtype), torch.randn(T * k, M, generator=g).to(dtype)
            record(f"glu {tag}", ops.glu, [gate, up], g)
            record(f"permute+unpermute {tag}",
                   lambda x, weights: ops.unpermute(ops.permute(x, ids, E).rows * 1.5, weights, row_index),
                   [x, weights], g)
            if dtype != torch.bfloat16:
                logits = torch.randn(T, E, generator=g).to(dtype)
                record(f"router_topk {tag}", lambda logits: ops.router_topk(logits, k).weights, [logits], g)
                record(f"router_losses {tag}", lambda logits: torch.stack(list(ops.router_losses(logits, ids))),
                       [logits], g)

    # Whole layers: (d, f, E, k, T, capacity_factor, expert).
    layers = {
        "olmoe-like dropless": (128, 64, 32, 8, 1024, None, "swiglu"),
        "long segments dropless": (256, 384, 4, 2, 2048, None, "swiglu"),
        "uneven dropless mlp": (48, 80, 6, 2, 700, None, "mlp"),
        "few tokens dropless": (64, 96, 8, 2, 40, None, "geglu"),
        "uneven capacity": (64, 96, 8, 2, 600, 1.25, "swiglu"),
        "olmoe-like capacity": (128, 64, 32, 8, 1024, 2.0, "swiglu"),
    }
    for name, (d, f, E, k, T, capacity_factor, expert) in layers.items():
        torch.manual_seed(0)
        layer = torch_moe.MoE(d, f, E, k, capacity_factor=capacity_factor, expert=expert)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, d, generator=g)
        with torch.no_grad():
            # The first experts' router rows follow feature 0, which every token carries: uneven segments.
            router_weight = [p for n, p in layer.named_parameters() if n.startswith("router")][0]
            router_weight[:2, 0] += torch.tensor([2.0, 1.0])
            x[:, 0] += 2.0
        x.requires_grad_(True)
        y = layer(x)
        (y * torch.randn(y.shape, generator=g)).sum().add(layer.aux_loss).backward()
        results[f"layer {name} out"] = y.detach()
        results[f"layer {name} aux"] = layer.aux_loss.detach()
        results[f"layer {name} grad x"] = x.grad
        for pname, p in layer.named_parameters():
            results[f"layer {name} grad {pname}"] = p.grad
    torch.save(results, sys.argv[2])
""")


# The library of float32 GEMM blocks (torch_moe.ops.set_cpu_gemm_library): each must be thread-count invariant.
LIBRARIES = ("onednn", "aten", "torch_moe")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers, so that comparing them treats NaN like any other value."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


@pytest.fixture(scope="module", params=LIBRARIES)
def runs(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"threads-{request.param}")
    env = dict(os.environ, TORCH_MOE_CPU_GEMM=request.param)
    out = {}
    for threads in THREAD_COUNTS:
        path = directory / f"{threads}.pt"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(path)], capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[threads] = torch.load(path)
    if out[1]["library"] != request.param:
        # aten is always there; TORCH_MOE_CPU_GEMM naming another that is not falls back to aten
        assert request.param != "aten" and out[1]["library"] == "aten", out[1]["library"]
        pytest.skip(f"{request.param}'s float32 GEMM is not available with this torch build or CPU")
    return out


@pytest.mark.parametrize("threads", THREAD_COUNTS[1:])
def test_results_are_bit_identical_across_thread_counts(runs, threads):
    reference, other = dict(runs[1]), dict(runs[threads])
    assert reference.pop("library") == other.pop("library")
    assert reference.keys() == other.keys()
    assert any(key.startswith("layer") for key in reference) and any(key.startswith("grouped_mm_unpermute")
                                                                      for key in reference)
    differing = []
    for key, expected in reference.items():
        got = other[key]
        assert (expected is None) == (got is None), key
        if expected is None:
            continue
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if not torch.equal(_bits(got), _bits(expected)):
            differing.append(f"{key}: max |diff| {(got.double() - expected.double()).abs().max().item():.3g}")
    assert not differing, f"{threads} threads differ from 1 thread in:\n" + "\n".join(differing)
