"""Tests of the ``torch_moe.MoE`` layer against the plain-PyTorch reference in reference_layer.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import torch_moe
from reference_layer import ReferenceMoE, reference_capacity, reference_keep, reference_topk

D_MODEL, D_FF = 12, 24
STAT_FIELDS = ("tokens_per_expert", "dropped_fraction", "router_entropy", "load_balancing_loss", "z_loss")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# (expert, activation, bias): every expert type with and without bias, each mlp activation.
# Gated experts with bias follow the layer's documented (silu|gelu)(x·w1 + b1)·(x·w3)·w2 + b2.
EXPERT_VARIANTS = [
    ("swiglu", "gelu", False),
    ("swiglu", "gelu", True),
    ("geglu", "gelu", False),
    ("geglu", "gelu", True),
    ("mlp", "gelu", False),
    ("mlp", "gelu", True),
    ("mlp", "relu", False),
    ("mlp", "relu", True),
    ("mlp", "silu", False),
    ("mlp", "silu", True),
]
EXPERT_IDS = [
    (f"{e}-{a}" if e == "mlp" else e) + ("-bias" if b else "-nobias") for e, a, b in EXPERT_VARIANTS
]

# capacity_factor 0.5 with min_capacity 1 leaves E*C < T*k slots, so assignments really are dropped.
ROUTING_MODES = {
    "position": dict(drop_policy="position", capacity_factor=0.5, min_capacity=1),
    "probability": dict(drop_policy="probability", capacity_factor=0.5, min_capacity=1),
    "dropless": dict(capacity_factor=None),
}


# --------------------------------------------------------------------------------------------------
# helpers


def make_config(num_experts=6, top_k=2, **overrides):
    config = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, top_k=top_k, jitter_eps=0.0)
    config.update(overrides)
    return config


def ref_config(config):
    """The layer config without the arguments the reference does not take."""
    return {key: value for key, value in config.items() if key != "jitter_eps"}


def randomize_(layer, seed, router_scale=0.5):
    """Overwrite every parameter with seeded random values, so the test does not depend on the layer's init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
            scale = router_scale if name == "router.weight" else 1.0 / math.sqrt(fan_in)
            if name.startswith("experts.b"):
                scale = 0.3
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return layer


def make_layer(config, seed=0, device="cpu", dtype=torch.float64):
    layer = torch_moe.MoE(**config, device=device, dtype=dtype)
    return randomize_(layer, seed)


def random_x(shape, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D_MODEL, generator=gen, dtype=torch.float64).to(dtype)


def run_layer(layer, x, mask=None, grad_out=None, forward=None):
    """Forward and backward of (y * grad_out).sum() + aux_loss; returns (y, aux_loss, stats, x.grad, param grads).

    forward: what to call instead of ``layer`` (a compiled version of it); parameters are read from ``layer``.
    """
    forward = layer if forward is None else forward
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = forward(x) if mask is None else forward(x, padding_mask=mask)
    aux_loss, stats = layer.aux_loss, layer.stats
    if grad_out is None:
        grad_out = torch.ones_like(y)
    ((y * grad_out).sum() + aux_loss).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y, aux_loss, stats, x.grad, grads


def run_reference(ref, x, mask=None, grad_out=None):
    x = x.detach().clone().requires_grad_()
    y = ref(x, mask)
    if grad_out is None:
        grad_out = torch.ones_like(y)
    ((y * grad_out).sum() + ref.aux_loss).backward()
    grads = {name: p.grad for name, p in ref.params.items()}
    return y, ref.aux_loss, ref.stats, x.grad, grads


def expected_param_shapes(config):
    E, d, f = config["num_experts"], config["d_model"], config["d_ff"]
    shapes = {"router.weight": (E, d), "experts.w1": (E, d, f), "experts.w2": (E, f, d)}
    if config.get("expert", "swiglu") in ("swiglu", "geglu"):
        shapes["experts.w3"] = (E, d, f)
    if config.get("bias", False):
        shapes["experts.b1"] = (E, f)
        shapes["experts.b2"] = (E, d)
    return shapes


def check_stats_are_tensors(stats):
    for field in STAT_FIELDS:
        value = getattr(stats, field)
        assert isinstance(value, torch.Tensor), f"stats.{field} is {type(value).__name__}, not a tensor"


def compare_with_reference(config, x_shape, mask=None, device="cpu", seed=0, expect_drops=None):
    """Runs the layer (float64 on `device`) and the reference (float64, CPU) and compares everything."""
    layer = make_layer(config, seed=seed, device=device)
    ref = ReferenceMoE.from_layer(layer, **ref_config(config))
    x = random_x(x_shape, seed=seed + 1)
    grad_out = random_x(x_shape, seed=seed + 2)
    dev_mask = None if mask is None else mask.to(device)

    y, aux, stats, x_grad, grads = run_layer(layer, x.to(device), dev_mask, grad_out.to(device))
    y_ref, aux_ref, stats_ref, x_grad_ref, grads_ref = run_reference(ref, x, mask, grad_out)

    assert y.shape == x.shape and y.dtype == torch.float64 and y.device.type == torch.device(device).type
    assert_close(y.cpu(), y_ref, msg=lambda m: f"output: {m}")
    if mask is not None:
        assert torch.all(y.cpu()[~mask] == 0), "padding tokens must output exactly zero"

    assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and aux.requires_grad
    assert_close(aux.detach().cpu(), aux_ref.detach(), msg=lambda m: f"aux_loss: {m}")

    check_stats_are_tensors(stats)
    assert stats.tokens_per_expert.shape == (config["num_experts"],)
    assert torch.equal(stats.tokens_per_expert.cpu().to(torch.int64), stats_ref.tokens_per_expert), (
        f"tokens_per_expert {stats.tokens_per_expert.tolist()} != reference {stats_ref.tokens_per_expert.tolist()}"
    )
    for field in ("dropped_fraction", "router_entropy", "load_balancing_loss", "z_loss"):
        got = getattr(stats, field).detach().cpu().to(torch.float64).reshape(())
        want = getattr(stats_ref, field).detach().to(torch.float64).reshape(())
        assert_close(got, want, msg=lambda m, field=field: f"stats.{field}: {m}")

    if expect_drops is True:
        assert stats_ref.dropped_fraction > 0, "test setup: the reference drops nothing"
        assert stats.dropped_fraction.item() > 0
    elif expect_drops is False:
        assert stats.dropped_fraction.item() == 0

    assert_close(x_grad.cpu(), x_grad_ref, msg=lambda m: f"grad of x: {m}")
    assert set(grads) == set(grads_ref), f"parameters {sorted(grads)} != expected {sorted(grads_ref)}"
    for name in grads_ref:
        assert grads[name] is not None, f"{name} got no gradient"
        assert_close(grads[name].cpu(), grads_ref[name], msg=lambda m, name=name: f"grad of {name}: {m}")
    return layer, stats_ref


# --------------------------------------------------------------------------------------------------
# the reference itself, on hand-made cases (so a wrong reference cannot hide a wrong layer)


def test_reference_routing_hand_made():
    probs = torch.tensor(
        [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64
    )
    ids = reference_topk(probs, 2)
    assert ids == [[0, 1], [1, 2], [0, 2], [2, 0]]  # ties to the lower id
    valid = [True] * 4
    # position, C=1: 1st choices t0->0, t1->1, t2->0 (full), t3->2; then 2nd choices: t0->1 (full), t1->2 (full),
    # t2->2 (full), t3->0 (full).
    assert reference_keep(ids, probs, 3, 1, "position", valid) == [
        [True, False], [True, False], [False, False], [True, False]
    ]
    # probability, C=1: expert 0 candidates (t0 .5, t2 .6, t3 .25) -> t2; expert 1 (t0 .3, t1 .5) -> t1;
    # expert 2 (t1 .3, t2 .3, t3 .5) -> t3.
    assert reference_keep(ids, probs, 3, 1, "probability", valid) == [
        [False, False], [True, False], [True, False], [True, False]
    ]
    # probability ties go to the lower token index; padding takes nothing.
    tied = torch.full((3, 2), 0.5, dtype=torch.float64)
    assert reference_keep([[0], [0], [0]], tied, 2, 1, "probability", [False, True, True]) == [[False], [True], [False]]
    assert reference_capacity(1.25, 4, 24, 2, 6) == 10
    assert reference_capacity(0.0625, 3, 24, 2, 6) == 3


def test_reference_uniform_router_losses():
    ref = ReferenceMoE(D_MODEL, D_FF, 4, 2, capacity_factor=None)
    with torch.no_grad():
        ref.params["router.weight"].zero_()
    ref(random_x((10,)))
    assert ref.stats.load_balancing_loss.item() == pytest.approx(1.0, abs=1e-12)
    assert ref.stats.z_loss.item() == pytest.approx(math.log(4) ** 2, abs=1e-12)
    assert ref.stats.router_entropy.item() == pytest.approx(math.log(4), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize("expert,activation,bias", EXPERT_VARIANTS, ids=EXPERT_IDS)
def test_parameters(expert, activation, bias):
    config = make_config(expert=expert, activation=activation, bias=bias)
    layer = torch_moe.MoE(**config, dtype=torch.float64)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == expected_param_shapes(config)
    assert all(p.dtype == torch.float64 for p in layer.parameters())


# --------------------------------------------------------------------------------------------------
# the layer against the reference


@pytest.mark.parametrize("expert,activation,bias", EXPERT_VARIANTS, ids=EXPERT_IDS)
@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_against_reference(top_k, mode, expert, activation, bias):
    config = make_config(top_k=top_k, expert=expert, activation=activation, bias=bias, **ROUTING_MODES[mode])
    compare_with_reference(config, (3, 8), expect_drops=mode != "dropless")


@pytest.mark.parametrize("drop_policy", ["position", "probability"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_against_reference_min_capacity(top_k, drop_policy):
    # ceil(0.0625 * 24 * k / 6) = 1 < min_capacity = 3, so C = 3.
    config = make_config(top_k=top_k, drop_policy=drop_policy, capacity_factor=0.0625, min_capacity=3)
    _, stats_ref = compare_with_reference(config, (24,), expect_drops=True)
    assert stats_ref.capacity == 3


@pytest.mark.parametrize("drop_policy", ["position", "probability"])
def test_against_reference_large_capacity_drops_nothing(drop_policy):
    config = make_config(top_k=2, drop_policy=drop_policy, capacity_factor=6.0, min_capacity=0)
    compare_with_reference(config, (20,), expect_drops=False)


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("top_k", [1, 2])
def test_against_reference_with_padding(top_k, mode):
    # In capacity mode C still comes from the full T (padding included).
    config = make_config(top_k=top_k, **ROUTING_MODES[mode])
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(4, 8, generator=gen) < 0.7
    mask[0, 0], mask[3, 7] = False, True
    compare_with_reference(config, (4, 8), mask=mask, expect_drops=mode != "dropless")


@pytest.mark.parametrize("drop_policy", ["position", "probability"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_against_reference_tied_router(top_k, drop_policy):
    # A zero router makes every prob 1/E: top-k ties go to the lower ids and probability ties to lower tokens.
    config = make_config(num_experts=4, top_k=top_k, drop_policy=drop_policy, capacity_factor=1.0, min_capacity=0)
    layer = make_layer(config)
    with torch.no_grad():
        layer.router.weight.zero_()
    ref = ReferenceMoE.from_layer(layer, **ref_config(config))
    x = random_x((12,))
    y, aux, stats, x_grad, grads = run_layer(layer, x)
    y_ref, aux_ref, stats_ref, x_grad_ref, grads_ref = run_reference(ref, x)
    expected_counts = [12] * top_k + [0] * (4 - top_k)
    assert stats.tokens_per_expert.tolist() == expected_counts
    assert stats.dropped_fraction.item() > 0
    assert_close(y, y_ref)
    assert_close(aux.detach(), aux_ref.detach())
    assert_close(x_grad, x_grad_ref)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("expert,activation,bias", [("swiglu", "gelu", False), ("mlp", "gelu", True)], ids=["swiglu", "mlp-bias"])
@pytest.mark.parametrize("device", DEVICES)
def test_against_reference_device(device, expert, activation, bias, mode):
    config = make_config(top_k=2, expert=expert, activation=activation, bias=bias, **ROUTING_MODES[mode])
    compare_with_reference(config, (2, 12), device=device, expect_drops=mode != "dropless")


@requires_cuda
@pytest.mark.parametrize("drop_policy", ["position", "probability"])
def test_cuda_capacity_mode_does_not_sync(drop_policy):
    config = make_config(top_k=2, drop_policy=drop_policy, capacity_factor=1.0)
    layer = make_layer(config, device="cuda", dtype=torch.float32)
    x = random_x((16,), dtype=torch.float32).cuda()
    layer(x)  # warm-up (allocations, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        _ = (layer.aux_loss, layer.stats.tokens_per_expert, layer.stats.dropped_fraction)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == x.shape


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_non_contiguous_input(mode):
    layer = make_layer(make_config(top_k=2, **ROUTING_MODES[mode]))
    wide = random_x((10,), seed=3).repeat(1, 2)  # [10, 2 * d_model]
    inputs = [
        random_x((5, 3)).transpose(0, 1),  # [3, 5, d] with swapped strides
        wide[:, :D_MODEL],  # rows of stride 2 * d_model
        wide[:, ::2],  # elements of stride 2
    ]
    for x in inputs:
        assert not x.is_contiguous()
        assert_close(layer(x), layer(x.contiguous()), msg=lambda m, s=x.stride(): f"x with strides {s}: {m}")


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_no_grad_and_inference_mode(mode):
    layer = make_layer(make_config(top_k=2, **ROUTING_MODES[mode]))
    x = random_x((9,))
    y = layer(x)
    with torch.no_grad():
        y_no_grad = layer(x)
    with torch.inference_mode():
        y_inference = layer(x)
    assert_close(y_no_grad, y.detach())
    assert_close(y_inference, y.detach())


@pytest.mark.parametrize("expert,activation,bias", EXPERT_VARIANTS[:4], ids=EXPERT_IDS[:4])
def test_dropless_inference_takes_the_fused_gated_op(expert, activation, bias, monkeypatch):
    # Gated experts in dropless mode: inference runs both projections in one op (gather_grouped_glu), training
    # keeps them separate; both must give the same output.
    layer = make_layer(make_config(top_k=2, expert=expert, activation=activation, bias=bias, capacity_factor=None))
    calls = []
    fused = torch_moe.ops.gather_grouped_glu

    def counting(*args):
        calls.append(args[-1])
        return fused(*args)

    monkeypatch.setattr(torch_moe.experts.ops, "gather_grouped_glu", counting)
    x = random_x((2, 9))
    y = layer(x)
    assert calls == []
    with torch.no_grad():
        y_no_grad = layer(x)
    assert calls == ["silu" if expert == "swiglu" else "gelu"]
    with torch.inference_mode():
        y_inference = layer(x)
    assert len(calls) == 2
    assert_close(y_no_grad, y.detach(), rtol=1e-12, atol=1e-12)
    assert_close(y_inference, y.detach(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# padding mask


@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_mask_equals_valid_tokens_only(top_k):
    config = make_config(top_k=top_k, capacity_factor=None)
    layer = make_layer(config)
    x = random_x((3, 5))
    mask = torch.tensor(
        [[True, True, False, True, False], [False, False, False, False, False], [True, True, True, True, True]]
    )
    grad_out = random_x((3, 5), seed=9)

    y, aux, stats, x_grad, grads = run_layer(layer, x, mask, grad_out)
    y_valid, aux_valid, stats_valid, x_grad_valid, grads_valid = run_layer(layer, x[mask], None, grad_out[mask])

    assert y.shape == (3, 5, D_MODEL)
    assert torch.all(y[~mask] == 0), "padding tokens must output exactly zero"
    assert_close(y[mask], y_valid)
    assert_close(aux.detach(), aux_valid.detach())
    for field in STAT_FIELDS:
        assert_close(getattr(stats, field), getattr(stats_valid, field), msg=lambda m, f=field: f"stats.{f}: {m}")
    assert torch.all(x_grad[~mask] == 0), "padding tokens must get zero gradient"
    assert_close(x_grad[mask], x_grad_valid)
    for name in grads_valid:
        assert_close(grads[name], grads_valid[name], msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("mode", ["position", "dropless"])
def test_all_padding(mode):
    config = make_config(**ROUTING_MODES[mode])
    layer = make_layer(config)
    x = random_x((2, 4))
    y = layer(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert y.shape == x.shape and torch.all(y == 0)
    assert torch.isfinite(layer.aux_loss) and layer.aux_loss.item() == 0
    assert layer.stats.tokens_per_expert.tolist() == [0] * config["num_experts"]
    for field in ("load_balancing_loss", "z_loss"):
        assert getattr(layer.stats, field).item() == 0, field


# --------------------------------------------------------------------------------------------------
# torch.compile and determinism


@pytest.mark.parametrize("drop_policy", ["position", "probability"])
def test_compile_fullgraph_matches_eager(drop_policy):
    torch._dynamo.reset()
    config = make_config(top_k=2, drop_policy=drop_policy, capacity_factor=1.0, min_capacity=2)
    layer = make_layer(config, dtype=torch.float32)
    x = random_x((2, 8), dtype=torch.float32)
    grad_out = random_x((2, 8), seed=3, dtype=torch.float32)

    y, aux, stats, x_grad, grads = run_layer(layer, x, None, grad_out)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    yc, auxc, statsc, x_gradc, gradsc = run_layer(layer, x, None, grad_out, forward=compiled)

    assert yc.dtype == torch.float32
    assert_close(yc, y)
    assert_close(auxc.detach(), aux.detach())
    for field in STAT_FIELDS:
        assert_close(getattr(statsc, field), getattr(stats, field), msg=lambda m, f=field: f"stats.{f}: {m}")
    assert_close(x_gradc, x_grad)
    for name in grads:
        assert_close(gradsc[name], grads[name], msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_two_runs_bitwise_equal(mode):
    # Jitter is on and the layer is in training mode: the same seed must give the same bits.
    def run():
        torch.manual_seed(123)
        layer = torch_moe.MoE(**make_config(top_k=2, jitter_eps=0.1, **ROUTING_MODES[mode]), dtype=torch.float32)
        layer.train()
        x = random_x((3, 8), dtype=torch.float32)
        torch.manual_seed(7)
        return run_layer(layer, x, None, random_x((3, 8), seed=4, dtype=torch.float32))

    y1, aux1, stats1, xg1, g1 = run()
    y2, aux2, stats2, xg2, g2 = run()
    assert torch.equal(y1, y2)
    assert torch.equal(aux1, aux2)
    for field in STAT_FIELDS:
        assert torch.equal(getattr(stats1, field), getattr(stats2, field)), field
    assert torch.equal(xg1, xg2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


# --------------------------------------------------------------------------------------------------
# normalize_weights and jitter


@pytest.mark.parametrize(
    "top_k,normalize_weights,normalized", [(1, None, False), (2, None, True), (1, True, True), (2, False, False), (2, True, True)]
)
def test_normalize_weights(top_k, normalize_weights, normalized):
    config = make_config(top_k=top_k, capacity_factor=None, normalize_weights=normalize_weights)
    layer = make_layer(config)
    x = random_x((10,))
    y = layer(x)
    expected = ReferenceMoE.from_layer(layer, **ref_config({**config, "normalize_weights": normalized}))(x)
    opposite = ReferenceMoE.from_layer(layer, **ref_config({**config, "normalize_weights": not normalized}))(x)
    assert_close(y, expected.detach())
    assert not torch.allclose(y, opposite.detach()), "test setup: normalization makes no difference"


def test_jitter_only_in_training():
    config = make_config(top_k=2, capacity_factor=None, jitter_eps=0.5)
    jittered = make_layer(config)
    plain = make_layer({**config, "jitter_eps": 0.0})
    plain.load_state_dict(jittered.state_dict())
    x = random_x((16,))

    jittered.eval(), plain.eval()
    torch.manual_seed(0)
    assert torch.equal(jittered(x), plain(x)), "jitter must not act in eval mode"

    jittered.train(), plain.train()
    torch.manual_seed(0)
    assert not torch.allclose(jittered(x), plain(x)), "jitter_eps=0.5 changed nothing in training mode"


def test_jitter_acts_on_router_input_only():
    # With a zero router every logit is 0 whatever the jitter, k=1 picks expert 0 with weight 1 (normalized),
    # so a jitter of the router's input alone cannot change the output; a jitter of the experts' input would.
    config = make_config(num_experts=4, top_k=1, capacity_factor=None, normalize_weights=True, jitter_eps=0.5)
    jittered = make_layer(config)
    with torch.no_grad():
        jittered.router.weight.zero_()
    plain = make_layer({**config, "jitter_eps": 0.0})
    plain.load_state_dict(jittered.state_dict())
    jittered.train(), plain.train()
    x = random_x((8,))
    assert_close(jittered(x), plain(x))


# --------------------------------------------------------------------------------------------------
# losses


class _Block(nn.Module):
    def __init__(self, config, seed):
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL, dtype=torch.float64)
        self.moe = make_layer(config, seed=seed)

    def forward(self, x):
        return x + self.moe(self.norm(x))


def test_aux_loss_sums_over_layers():
    config = make_config(top_k=2, capacity_factor=1.0)
    first = make_layer(config, seed=10)
    blocks = [_Block(config, seed=11), _Block(config, seed=12)]
    model = nn.Sequential(first, nn.Linear(D_MODEL, D_MODEL, dtype=torch.float64), *blocks)
    moes = [first, blocks[0].moe, blocks[1].moe]

    model(random_x((2, 6)))
    total = torch_moe.aux_loss(model)
    expected = sum(m.aux_loss for m in moes)
    assert total.dim() == 0
    assert_close(total, expected)
    assert all(m.aux_loss.item() > 0 for m in moes)

    # Only the last forward counts.
    model(random_x((2, 6), seed=2) * 3)
    total2 = torch_moe.aux_loss(model)
    assert_close(total2, sum(m.aux_loss for m in moes))
    assert not torch.allclose(total2, total)
    total2.backward()
    for m in moes:
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0

    # A single layer is its own model.
    assert_close(torch_moe.aux_loss(first), first.aux_loss)


def test_aux_loss_is_weighted_sum():
    config = make_config(top_k=2, capacity_factor=None, aux_loss_coef=0.3, z_loss_coef=0.07)
    layer = make_layer(config)
    layer(random_x((9,)))
    stats = layer.stats
    assert_close(layer.aux_loss, 0.3 * stats.load_balancing_loss + 0.07 * stats.z_loss)
    assert stats.load_balancing_loss.item() > 0 and stats.z_loss.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop_policy", ["position", "probability"])
def test_load_balancing_loss_is_one_for_uniform_router(drop_policy, dtype):
    # T*k = 32 and E = 4 keep every f_i and P_i dyadic, so the loss is exactly 1.
    config = make_config(num_experts=4, top_k=2, drop_policy=drop_policy)
    layer = make_layer(config, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(random_x((16,), dtype=dtype))
    stats = layer.stats
    assert stats.load_balancing_loss.item() == 1.0
    assert stats.tokens_per_expert.tolist() == [16, 16, 0, 0]
    assert stats.z_loss.item() == pytest.approx(math.log(4) ** 2, rel=1e-5)
    assert stats.router_entropy.item() == pytest.approx(math.log(4), rel=1e-5)


def test_load_balancing_loss_is_one_for_uniform_router_any_size():
    config = make_config(num_experts=6, top_k=1, capacity_factor=None)
    layer = make_layer(config)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(random_x((10,)))
    assert layer.stats.load_balancing_loss.item() == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# bad input and edge cases


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=7), "top_k"),  # > num_experts = 6
        (dict(num_experts=0, top_k=1), "num_experts"),
        (dict(num_experts=-2, top_k=1), "num_experts"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(min_capacity=-1), "min_capacity"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(expert="moe"), r"\bexpert\b"),
        (dict(expert="mlp", activation="tanh"), "activation"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_bad_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        torch_moe.MoE(**make_config(**overrides))


@pytest.mark.parametrize("shape", [(5, D_MODEL + 1), (2, 3, D_MODEL - 2)])
def test_wrong_d_model(shape):
    layer = make_layer(make_config())
    with pytest.raises((ValueError, RuntimeError), match="d_model"):
        layer(torch.randn(*shape, dtype=torch.float64))


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_nan_logits_give_in_range_experts(mode):
    # NaN logits must never produce an out-of-range expert id (a crash or a corrupt count).
    config = make_config(top_k=2, **ROUTING_MODES[mode])
    layer = make_layer(config)
    with torch.no_grad():
        layer.router.weight[1] = float("nan")
    x = random_x((10,))
    y = layer(x)
    counts = layer.stats.tokens_per_expert
    assert y.shape == x.shape
    assert counts.shape == (6,)
    assert counts.min().item() >= 0 and counts.sum().item() == 10 * 2


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)])
def test_zero_tokens(mode, lead_shape):
    config = make_config(**ROUTING_MODES[mode])
    layer = make_layer(config, dtype=torch.float32)
    x = torch.zeros(*lead_shape, D_MODEL, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead_shape, D_MODEL) and y.dtype == torch.float32
    aux = layer.aux_loss
    assert isinstance(aux, torch.Tensor) and aux.dim() == 0
    assert torch.isfinite(aux) and aux.item() == 0
    stats = layer.stats
    check_stats_are_tensors(stats)
    assert stats.tokens_per_expert.tolist() == [0] * config["num_experts"]
    for field in ("load_balancing_loss", "z_loss"):
        assert getattr(stats, field).item() == 0, field
    for field in ("dropped_fraction", "router_entropy"):
        assert torch.isfinite(getattr(stats, field)), field
    (y.sum() + aux).backward()  # an empty batch must not break a training step
    assert x.grad is None or x.grad.shape == x.shape


@pytest.mark.parametrize("mode", ["position", "dropless"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_output_dtype_follows_input(dtype, mode):
    config = make_config(**ROUTING_MODES[mode])
    layer = make_layer(config, dtype=dtype)
    x = random_x((2, 8), dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    assert torch.isfinite(layer.aux_loss)
    check_stats_are_tensors(layer.stats)


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_nonfinite_padding_leaves_gradients_finite(mode):
    # Padding rows may hold anything; their values must not reach any gradient (0 * NaN would be NaN).
    config = make_config(**ROUTING_MODES[mode])
    layer = make_layer(config)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    x_clean = random_x((2, 3))
    x_clean[~mask] = 0.0
    x_nan = x_clean.clone()
    x_nan[~mask] = float("nan")
    y_clean, aux_clean, _, gx_clean, grads_clean = run_layer(layer, x_clean, mask)
    y_nan, aux_nan, _, gx_nan, grads_nan = run_layer(layer, x_nan, mask)
    assert_close(y_nan, y_clean, rtol=0, atol=0)
    assert_close(aux_nan, aux_clean, rtol=0, atol=0)
    assert torch.equal(gx_nan[~mask], torch.zeros_like(gx_nan[~mask]))
    assert_close(gx_nan, gx_clean, rtol=0, atol=0)
    for name in grads_clean:
        assert torch.isfinite(grads_nan[name]).all(), name
        assert_close(grads_nan[name], grads_clean[name], rtol=0, atol=0)
