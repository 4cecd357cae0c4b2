"""Size arguments that overflow int64 or cannot be allocated: every op and the layer raise an error naming the
argument instead of crashing. The crash cases run in a child process, so a segfault fails a test instead of pytest."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_moe
from torch_moe import ops

# name -> (statement run in the child, expected exception type, words the message must hold)
CASES = {
    "dispatch_capacity_overflow": ("ops.dispatch(x, ids, slots, 4, 2**62)", "RuntimeError", ["'capacity'", "overflows int64"]),
    "dispatch_experts_overflow": ("ops.dispatch(x, ids, slots, 2**61, 8)", "RuntimeError", ["'num_experts'", "overflows int64"]),
    "dispatch_capacity_unallocatable": ("ops.dispatch(x, ids, slots, 4, 2**40)", "RuntimeError", ["'capacity'", "bytes"]),
    "dispatch_slot_table_unallocatable": ("ops.dispatch(x[:, :0], ids, slots, 4, 2**45)", "RuntimeError",
                                          ["'capacity'", "slot table", "bytes"]),
    "dispatch_fake_capacity_overflow": ("ops.dispatch(x.to('meta'), ids.to('meta'), slots.to('meta'), 4, 2**62)",
                                        "RuntimeError", ["'capacity'", "overflows int64"]),
    "dispatch_fake_capacity_unallocatable": ("ops.dispatch(x.to('meta'), ids.to('meta'), slots.to('meta'), 4, 2**41)",
                                             "RuntimeError", ["'capacity'", "bytes"]),
    "capacity_plan_experts_overflow": ("ops.capacity_plan(ids, 2**63 - 1, 2)", "RuntimeError",
                                       ["'num_experts'", "overflows int64"]),
    "capacity_plan_experts_unallocatable": ("ops.capacity_plan(ids, 2**62, 2)", "RuntimeError", ["'num_experts'", "bytes"]),
    "capacity_plan_fake_experts": ("ops.capacity_plan(ids.to('meta'), 2**62, 2)", "RuntimeError", ["'num_experts'", "bytes"]),
    "permute_experts_overflow": ("ops.permute(x, ids, 2**63 - 1)", "RuntimeError", ["'num_experts'", "overflows int64"]),
    "permute_experts_unallocatable": ("ops.permute(x, ids, 2**50)", "RuntimeError", ["'num_experts'", "bytes"]),
    "permute_rows_overflow": ("ops.permute(torch.zeros(1, 1).expand(2**10, 2**50), "
                              "torch.zeros(1, 1, dtype=torch.long).expand(2**10, 2**4), 4)",
                              "RuntimeError", ["'expert_ids'", "T * k * d", "overflows int64"]),
    "permute_fake_experts": ("ops.permute(x.to('meta'), ids.to('meta'), 2**63 - 1)", "RuntimeError",
                             ["'num_experts'", "overflows int64"]),
    "permute_plan_experts": ("ops.permute_plan(ids, 2**62)", "RuntimeError", ["'num_experts'", "bytes"]),
    "permute_plan_fake_experts": ("ops.permute_plan(ids.to('meta'), 2**62)", "RuntimeError", ["'num_experts'", "bytes"]),
    "expert_choice_capacity_overflow": ("ops.expert_choice(logits, 2**62)", "RuntimeError", ["'capacity'", "overflows int64"]),
    "expert_choice_capacity_unallocatable": ("ops.expert_choice(logits, 2**44)", "RuntimeError", ["'capacity'", "bytes"]),
    "expert_choice_fake_capacity": ("ops.expert_choice(logits.to('meta'), 2**62)", "RuntimeError",
                                    ["'capacity'", "overflows int64"]),
    "moe_capacity_factor": ("torch_moe.MoE(8, 16, 4, 1, capacity_factor=2.0**62, min_capacity=1)(torch.randn(2, 3, 8))",
                            "ValueError", ["capacity_factor", "overflows int64"]),
    "moe_min_capacity": ("torch_moe.MoE(8, 16, 4, 1, min_capacity=2**62)", "ValueError", ["min_capacity", "overflows int64"]),
    # Known at construction: already one token's buffer [E, C, d] is past what one allocation can have.
    "moe_capacity_factor_huge": ("torch_moe.MoE(8, 16, 4, 1, capacity_factor=1e15)", "ValueError",
                                 ["capacity_factor", "capacity of 250000000000000 slots", "bytes"]),
    # Known only at the forward, where 6 tokens make a buffer of ~19 TB that no allocation gets.
    "moe_capacity_factor_unallocatable": ("torch_moe.MoE(8, 16, 4, 1, capacity_factor=1e11)(torch.randn(2, 3, 8))",
                                          "RuntimeError", ["'capacity'", "bytes"]),
    "glu_too_large": ("ops.glu(torch.zeros(1, 1).expand(2**24, 2**22), torch.zeros(1, 1).expand(2**24, 2**22))",
                      "RuntimeError", ["'gate'", "bytes"]),
    "glu_unallocatable": ("ops.glu(torch.zeros(1, 1).expand(2**20, 2**20), torch.zeros(1, 1).expand(2**20, 2**20))",
                          "RuntimeError", ["'gate'", "4398046511104 bytes"]),
    "glu_backward_unallocatable": ("torch.ops.torch_moe._glu_backward(torch.zeros(1, 1).expand(2**20, 2**20), "
                                   "torch.zeros(1, 1).expand(2**20, 2**20), torch.zeros(1, 1).expand(2**20, 2**20), "
                                   "'silu', [True, True])", "RuntimeError", ["'gate'", "bytes"]),
    "gather_grouped_mm_too_large": ("ops.gather_grouped_mm(x, torch.zeros(1, 1, 1).expand(4, 8, 2**44), "
                                    "*ops.permute_plan(ids, 4)[::-1])", "RuntimeError", ["'b'", "output [N, M]", "bytes"]),
    "gather_grouped_mm_unallocatable": ("ops.gather_grouped_mm(x, torch.zeros(1, 1, 1).expand(4, 8, 2**38), "
                                        "*ops.permute_plan(ids, 4)[::-1])", "RuntimeError", ["'b'", "bytes"]),
    "gather_grouped_glu_too_large": ("ops.gather_grouped_glu(x, torch.zeros(1, 1, 1).expand(4, 8, 2**44), "
                                     "torch.zeros(1, 1, 1).expand(4, 8, 2**44), *ops.permute_plan(ids, 4)[::-1])",
                                     "RuntimeError", ["'w_gate'", "output [N, M]", "bytes"]),
    "gather_grouped_glu_unallocatable": ("ops.gather_grouped_glu(x, torch.zeros(1, 1, 1).expand(4, 8, 2**38), "
                                         "torch.zeros(1, 1, 1).expand(4, 8, 2**38), *ops.permute_plan(ids, 4)[::-1])",
                                         "RuntimeError", ["'w_gate'", "bytes"]),
    "grouped_mm_unpermute_unallocatable": ("ops.grouped_mm_unpermute(torch.zeros(12, 8), "
                                           "torch.zeros(1, 1, 1).expand(4, 8, 2**40), "
                                           "ops.permute_plan(ids, 4)[1], torch.ones(6, 2), ops.permute_plan(ids, 4)[0])",
                                           "RuntimeError", ["'b'", "bytes"]),
}

# The CUDA kernels share the checks above; these run only with a GPU (the child moves the inputs there).
CUDA_CASES = {
    "dispatch_capacity_overflow_cuda": ("ops.dispatch(x.cuda(), ids.cuda(), slots.cuda(), 4, 2**62)", "RuntimeError",
                                        ["'capacity'", "overflows int64"]),
    "capacity_plan_experts_cuda": ("ops.capacity_plan(ids.cuda(), 2**62, 2)", "RuntimeError", ["'num_experts'", "bytes"]),
    "permute_experts_overflow_cuda": ("ops.permute(x.cuda(), ids.cuda(), 2**63 - 1)", "RuntimeError",
                                      ["'num_experts'", "overflows int64"]),
    "expert_choice_capacity_overflow_cuda": ("ops.expert_choice(logits.cuda(), 2**62)", "RuntimeError",
                                             ["'capacity'", "overflows int64"]),
    "gather_grouped_mm_too_large_cuda": ("ops.gather_grouped_mm(x.cuda(), torch.zeros(1, 1, 1, device='cuda')"
                                         ".expand(4, 8, 2**44), *[t.cuda() for t in ops.permute_plan(ids, 4)[::-1]])",
                                         "RuntimeError", ["'b'", "output [N, M]", "bytes"]),
    "gather_grouped_glu_too_large_cuda": ("ops.gather_grouped_glu(x.cuda(), *[torch.zeros(1, 1, 1, device='cuda')"
                                          ".expand(4, 8, 2**44)] * 2, *[t.cuda() for t in ops.permute_plan(ids, 4)[::-1]])",
                                          "RuntimeError", ["'w_gate'", "output [N, M]", "bytes"]),
}
if torch.cuda.is_available():
    CASES.update(CUDA_CASES)

_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import torch_moe
    from torch_moe import ops
    cases = json.loads(sys.argv[1])
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    ids = torch.randint(0, 4, (6, 2))
    slots = torch.full((6, 2), -1, dtype=torch.long)
    logits = torch.randn(6, 4)
    for name, statement in cases:
        print(json.dumps({"start": name}), flush=True)
        try:
            eval(statement)
            result = {"name": name, "type": None, "message": "no error"}
        except Exception as e:
            result = {"name": name, "type": type(e).__name__, "message": str(e).split("\\nException raised from")[0]}
        print(json.dumps(result), flush=True)
""")


@pytest.fixture(scope="module")
def outcomes():
    """Runs every case in one child; a case that kills the child is recorded as a crash and the child restarts after
    it, so one segfault does not hide the other cases."""
    pending = list(CASES)
    results = {}
    while pending:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([(n, CASES[n][0]) for n in pending])],
                              capture_output=True, text=True, timeout=120)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["name"]] = record
                started = None
        if started is not None:
            results[started] = {"type": f"crash (exit code {proc.returncode})", "message": proc.stderr[-2000:]}
        elif proc.returncode != 0 and not results:
            raise RuntimeError(f"the child failed before any case: {proc.stderr[-2000:]}")
        pending = [n for n in pending if n not in results]
    return results


@pytest.mark.parametrize("name", list(dict(CASES, **CUDA_CASES)))
def test_size_is_refused_with_the_argument_named(outcomes, name):
    if name not in CASES:
        pytest.skip("CUDA not available")
    _, expected_type, words = CASES[name]
    got = outcomes[name]
    assert got["type"] == expected_type, got
    for word in words:
        assert word in got["message"], got


def test_large_but_fine_sizes_still_work():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    ids = torch.randint(0, 4, (6, 2))
    plan = ops.capacity_plan(ids, 4, 2**40)  # capacity sizes no allocation here
    assert (plan.slots >= 0).all()
    buffer = ops.dispatch(x, ids, plan.slots, 4, 2**14)
    assert buffer.shape == (4, 2**14, 4)
    y = ops.combine(buffer, torch.ones(6, 2), ids, plan.slots)
    torch.testing.assert_close(y, 2 * x)
    assert ops.capacity_plan(ids, 2**20, 2).tokens_per_expert.shape == (2**20,)
    rows, _, offsets = ops.permute(x, ids, 2**20)
    assert rows.shape == (12, 4) and offsets.shape == (2**20 + 1,)
    assert ops.expert_choice(torch.randn(6, 4), 2**12).token_ids.shape == (4, 2**12)
    meta = ops.dispatch(x.to("meta"), ids.to("meta"), plan.slots.to("meta"), 4, 2**30)
    assert meta.shape == (4, 2**30, 4)
    moe = torch_moe.MoE(8, 16, 4, 1, capacity_factor=1e3, min_capacity=1)
    assert moe(torch.randn(2, 3, 8)).shape == (2, 3, 8)
