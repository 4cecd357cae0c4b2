"""Regression tests of issue 20's findings: every input a user can give gets a correct result or a clear error,
and layers survive copying and pickling. Each test failed before its fix."""

from __future__ import annotations

import copy
import io
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_moe

D, F, E = 8, 16, 4


def _padded_input(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, D, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = mask[0, 4] = False
    x[1, 3] = float("nan")
    x[0, 4] = float("inf")
    return x, mask


@pytest.mark.parametrize("capacity_factor", [1.25, None])
@pytest.mark.parametrize("bias", [False, True])
def test_nan_padding_never_reaches_shared_experts(capacity_factor, bias):
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, F, E, 2, num_shared_experts=1, capacity_factor=capacity_factor, bias=bias)
    x, mask = _padded_input()
    x.requires_grad_()
    y = layer(x, mask)
    (y.sum() + layer.aux_loss).backward()
    assert torch.isfinite(y).all() and y[~mask].eq(0).all()
    assert torch.isfinite(x.grad).all() and x.grad[~mask].eq(0).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # the valid tokens get what they get with any finite padding
    clean = torch.where(mask.unsqueeze(-1), x.detach(), 7.0)
    torch.testing.assert_close(layer(clean, mask)[mask], y.detach()[mask], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_x_is_rejected(dtype):
    layer = torch_moe.MoE(D, F, E, 2)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, D, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_hash_routing_takes_every_integer_dtype(dtype):
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, F, E, 2, router="hash")
    x = torch.randn(2, 6, D)
    ids = torch.arange(12).view(2, 6) * 9 % 100
    expected = layer(x, token_ids=ids)
    torch.testing.assert_close(layer(x, token_ids=ids.to(dtype)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(router="sigmoid", bias_update_rate=float("nan")), "bias_update_rate must be a number >= 0 and finite"),
    (dict(router="sigmoid", bias_update_rate=float("inf")), "bias_update_rate must be a number >= 0 and finite"),
    (dict(capacity_factor=float("inf")), "capacity_factor must be > 0 and finite"),
    (dict(capacity_factor=float("nan")), "capacity_factor must be > 0 and finite"),
    (dict(jitter_eps=float("nan")), "jitter_eps must be in"),
    (dict(aux_loss_coef=float("nan")), "aux_loss_coef must be a number >= 0 and finite"),
    (dict(z_loss_coef=float("inf")), "z_loss_coef must be a number >= 0 and finite"),
    (dict(z_loss_coef=-1.0), "z_loss_coef must be a number >= 0 and finite"),
    (dict(importance_loss_coef=float("nan")), "importance_loss_coef must be a number >= 0 and finite"),
    (dict(router="noisy_topk", load_loss_coef=float("inf")), "load_loss_coef must be a number >= 0 and finite"),
    (dict(seq_balance_loss_coef=float("nan")), "seq_balance_loss_coef must be a number >= 0 and finite"),
])
def test_non_finite_options_are_rejected(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        torch_moe.MoE(D, F, E, 2, **kwargs)


@pytest.mark.parametrize("shape", [(2, 0, D), (0, 3, D)])
@pytest.mark.parametrize("capacity_factor", [1.25, None])
def test_no_tokens_with_sequence_balance_loss(shape, capacity_factor):
    layer = torch_moe.MoE(D, F, E, 2, seq_balance_loss_coef=0.1, capacity_factor=capacity_factor)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    assert layer.stats.losses["sequence_balance"].item() == 0.0 and math.isfinite(layer.aux_loss.item())
    (y.sum() + layer.aux_loss).backward()


@pytest.mark.parametrize("router", ["softmax", "noisy_topk", "sigmoid", "expert_choice", "random"])
def test_router_logits_stay_float32_under_autocast(router):
    torch.manual_seed(0)
    layer = torch_moe.MoE(32, 64, 16, 2, router=router, capacity_factor=2.0).eval()
    x = torch.randn(256, 32)
    routing = layer.router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_routing = layer.router(x)
    assert autocast_routing.logits.dtype == torch.float32
    torch.testing.assert_close(autocast_routing.logits, routing.logits, rtol=0, atol=0)
    assert torch.equal(autocast_routing.expert_ids, routing.expert_ids)


@pytest.mark.parametrize("router", ["softmax", "noisy_topk", "sigmoid", "expert_choice"])
def test_deepcopy_and_pickle_after_a_training_forward(router):
    torch.manual_seed(0)
    extra = dict(importance_loss_coef=0.1) if router != "sigmoid" else {}
    layer = torch_moe.MoE(D, F, E, 2, router=router, expert="mlp", activation="gelu_tanh", **extra)
    layer(torch.randn(6, D))
    assert layer.aux_loss.requires_grad
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone.aux_loss, layer.aux_loss.detach())
        assert not clone.aux_loss.requires_grad
        for (name, p), (_, q) in zip(layer.state_dict().items(), clone.state_dict().items()):
            assert torch.equal(p, q), name
    buffer = io.BytesIO()
    torch.save(torch.nn.Sequential(torch_moe.MoE(D, F, E, 2)), buffer)  # the default expert pickles too
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False)[0], torch_moe.MoE)
    assert layer.aux_loss.requires_grad  # the original keeps its graph for backward


def test_importing_the_unbuilt_source_tree_says_what_to_do(tmp_path):
    """A copy of the package without the build's outputs (as the repository root holds after `pip install .`)."""
    package = tmp_path / "torch_moe"
    package.mkdir()
    source = Path(torch_moe.__file__).parent
    for path in source.glob("*.py"):
        if path.name != "_build_info.py":
            (package / path.name).write_text(path.read_text())
    result = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                             "sys.path.extend(sys.argv[2:]); import torch_moe", str(tmp_path),
                             *[p for p in sys.path if p]], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "holds no build of the extension" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr


def _mixed_device_calls():
    ops = torch_moe.ops
    logits = torch.randn(6, 4)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    slots = torch.zeros(6, 2, dtype=torch.int64)
    x = torch.randn(6, D)
    meta = lambda t: t.to("meta")  # noqa: E731
    return {
        "router_topk": lambda: ops.router_topk(logits, 2, "softmax", meta(torch.zeros(4))),
        "capacity_plan": lambda: ops.capacity_plan(ids, 4, 3, "position", None, meta(torch.ones(6, dtype=torch.bool))),
        "dispatch": lambda: ops.dispatch(x, meta(ids), slots, 4, 3),
        "combine": lambda: ops.combine(meta(torch.randn(4, 3, D)), torch.rand(6, 2), ids, slots),
        "glu": lambda: ops.glu(x, meta(x), "silu"),
        "expert_choice": lambda: ops.expert_choice(logits, 2, meta(torch.ones(6, dtype=torch.bool))),
    }


@pytest.mark.parametrize("op", list(_mixed_device_calls()))
def test_fake_kernels_refuse_mixed_meta_and_real_tensors(op):
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        _mixed_device_calls()[op]()


CHECKPOINT_ROUTERS = {
    "softmax-jitter": dict(jitter_eps=0.2),
    "noisy_topk": dict(router="noisy_topk", load_loss_coef=0.1),
    "sigmoid": dict(router="sigmoid", bias_update_rate=0.5),
    "expert_choice": dict(router="expert_choice", jitter_eps=0.2),
    "sigmoid-dropless-shared": dict(router="sigmoid", bias_update_rate=0.5, capacity_factor=None,
                                    num_shared_experts=1),
    "sparsemixer": dict(router="sparsemixer", jitter_eps=0.2),  # Gumbel samples and Heun coins replayed
}


def _train(layer, steps, checkpointed, reentrant=False, microbatches=1):
    """`steps` SGD steps, each over `microbatches` forwards whose losses are summed into one backward.

    Reentrant checkpointing runs the original forward under no_grad, so the layer's aux_loss of that forward has
    no graph (the README says to use use_reentrant=False, HF's default, for aux losses): the loss leaves it out."""
    gen = torch.Generator().manual_seed(5)
    records = []
    for _ in range(steps):
        total = 0
        for _ in range(microbatches):
            x = torch.randn(2, 6, D, generator=gen, requires_grad=True)
            if checkpointed:
                y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant)
            else:
                y = layer(x)
            total = total + (y * torch.linspace(-1, 1, D)).square().sum() + (0 if reentrant else layer.aux_loss)
        total.backward()
        # With reentrant checkpointing the original forward has no graph, so the bias update of a step lands at
        # the next forward instead of the end of the backward: its buffers are compared after the last forward.
        buffers = [] if reentrant else [b.clone() for b in layer.buffers()]
        records.append([total.detach()] + [p.grad.clone() for p in layer.parameters()] + buffers)
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    layer.eval()
    with torch.no_grad():
        records.append([layer(torch.randn(3, D, generator=gen))] + [b.clone() for b in layer.buffers()])
    return records


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", list(CHECKPOINT_ROUTERS))
@pytest.mark.parametrize("microbatches", [1, 2])
def test_activation_checkpointing_reproduces_the_uncheckpointed_run(name, reentrant, microbatches):
    """Recomputation routes as the original forward (noise, jitter, the sigmoid router's bias) and the bias moves
    once per backward, as without checkpointing."""
    torch.manual_seed(0)
    plain = torch_moe.MoE(D, F, E, 2, dtype=torch.float64, **CHECKPOINT_ROUTERS[name])
    checkpointed = copy.deepcopy(plain)
    if "sigmoid" in name and reentrant:  # its original forward has no graph: a clear error, not other routing
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            _train(checkpointed, 1, checkpointed=True, reentrant=True, microbatches=microbatches)
        return
    torch.manual_seed(1)
    expected = _train(plain, 3, checkpointed=False, reentrant=reentrant, microbatches=microbatches)
    torch.manual_seed(1)
    got = _train(checkpointed, 3, checkpointed=True, reentrant=reentrant, microbatches=microbatches)
    for step, (g, e) in enumerate(zip(got, expected)):
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"step {step}: {m}")
    if "sigmoid" in name:
        assert not torch.equal(checkpointed.router.expert_bias, torch.zeros(E)), "the bias never moved"
