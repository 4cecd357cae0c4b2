"""Fake (meta) kernels of every torch_moe op, so torch.compile, FakeTensor and opcheck can trace them.

All output shapes follow from input shapes (dropless rows are always [T*k, d]), so no dynamic sizes are needed.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

_lib = "torch_moe::"


def _router_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check(cond: bool, message: str) -> None:
    torch._check(cond, lambda: message)


# The size checks of csrc/common/checks.h (checked_mul, checked_add, check_alloc_bytes), with the same messages, so
# that a fake asked for an absurd size raises what the kernel raises instead of building an unallocatable shape.
# Symbolic sizes are left to the kernels: checking them here would guard on their values.
_INT64_MAX = 2**63 - 1
_MAX_ALLOC_BYTES = 1 << 47


def _concrete(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _checked_mul(op: str, name: str, expr: str, a, b):
    if _concrete(a, b):
        _check(a * b <= _INT64_MAX, f"torch_moe.{op}: argument '{name}' is too large: {expr} = {a} * {b} overflows int64")
    return a * b


def _checked_add(op: str, name: str, expr: str, a, b):
    if _concrete(a, b):
        _check(a + b <= _INT64_MAX, f"torch_moe.{op}: argument '{name}' is too large: {expr} = {a} + {b} overflows int64")
    return a + b


def _check_alloc_bytes(op: str, name: str, what: str, numel, itemsize: int):
    if _concrete(numel):
        bytes_ = numel * itemsize
        shown = bytes_ if bytes_ <= _INT64_MAX else f"{numel} * {itemsize}"
        _check(bytes_ <= _MAX_ALLOC_BYTES,
               f"torch_moe.{op}: argument '{name}' is too large: {what} of {numel} elements would need {shown} bytes, "
               f"more than the {_MAX_ALLOC_BYTES} bytes one allocation can have")


def _check_num_experts(op: str, num_experts) -> None:
    """check_expert_ids's size check: offsets [num_experts + 1] int64 must be allocatable."""
    if _concrete(num_experts):
        _check(num_experts > 0, f"torch_moe.{op}: argument 'num_experts' must be positive, got {num_experts}")
    _check_alloc_bytes(op, "num_experts", "offsets [num_experts + 1]",
                       _checked_add(op, "num_experts", "num_experts + 1", num_experts, 1), 8)


def _fake(name: str):
    """Registers the decorated function as the fake kernel of ``torch_moe::name``, behind the check the real
    kernels make first: every tensor argument on one device. Without it a call mixing meta and real tensors lands
    here and returns uninitialised tensors on the real device."""

    def register(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            first = None
            for arg_name, value in signature.bind(*args, **kwargs).arguments.items():
                if not isinstance(value, Tensor):
                    continue
                if first is None:
                    first = (arg_name, value.device)
                    continue
                _check(value.device == first[1], f"torch_moe.{name}: all tensors must be on one device: '{arg_name}' "
                                                 f"is on {value.device} but '{first[0]}' is on {first[1]}")
            return fn(*args, **kwargs)

        torch.library.register_fake(_lib + name)(checked)
        return fn

    return register


@_fake("router_topk")
def _router_topk(logits, k, score_func="softmax", selection_bias=None, normalize=True, n_groups=1, topk_groups=1):
    _check(logits.dim() == 2, f"torch_moe.router_topk: argument 'logits' must be a 2-D tensor [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    _check(1 <= k <= E, f"torch_moe.router_topk: argument 'k' must be in [1, E] = [1, {E}], got {k}")
    dtype = _router_dtype(logits)
    return (
        logits.new_empty((T, k), dtype=dtype),
        logits.new_empty((T, k), dtype=torch.int64),
        logits.new_empty((T, E), dtype=dtype),
    )


@_fake("_router_topk_backward")
def _router_topk_backward(grad_weights, logits, expert_ids, score_func, normalize):
    return torch.empty_like(logits)


@_fake("expert_choice")
def _expert_choice(logits, capacity, valid_mask=None):
    _check(logits.dim() == 2, f"torch_moe.expert_choice: argument 'logits' must be a 2-D tensor [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    dtype = _router_dtype(logits)
    if _concrete(capacity):
        _check(capacity >= 0, f"torch_moe.expert_choice: argument 'capacity' must be >= 0, got {capacity}")
    _check_alloc_bytes("expert_choice", "capacity", "token_ids [E, C]",
                       _checked_mul("expert_choice", "capacity", "E * capacity", E, capacity), 8)
    return (
        logits.new_empty((T, E), dtype=dtype),
        logits.new_empty((T, E), dtype=torch.int64),
        logits.new_empty((E, capacity), dtype=torch.int64),
        logits.new_empty((T, E), dtype=dtype),
    )


@_fake("_expert_choice_backward")
def _expert_choice_backward(grad_weights, logits, slots):
    return torch.empty_like(logits)


@_fake("dselect_k_gate")
def _dselect_k_gate(code_logits, selector_logits, num_experts, gamma=1.0):
    _check(code_logits.dim() == 3, f"torch_moe.dselect_k_gate: argument 'code_logits' must be a 3-D tensor [T, k, m], "
                                   f"got {tuple(code_logits.shape)}")
    _check(selector_logits.dim() == 2, f"torch_moe.dselect_k_gate: argument 'selector_logits' must be a 2-D tensor "
                                       f"[T, k], got {tuple(selector_logits.shape)}")
    if _concrete(num_experts):
        _check(num_experts >= 1,
               f"torch_moe.dselect_k_gate: argument 'num_experts' must be in [1, 2^62], got {num_experts}")
    T, k, _ = code_logits.shape
    dtype = _router_dtype(code_logits)
    _check_alloc_bytes("dselect_k_gate", "num_experts", "selector_outputs [T, k, E]",
                       _checked_mul("dselect_k_gate", "num_experts", "T * k * num_experts", T * k, num_experts),
                       dtype.itemsize)
    return code_logits.new_empty((T, num_experts), dtype=dtype), code_logits.new_empty((T, k, num_experts), dtype=dtype)


@_fake("_dselect_k_gate_backward")
def _dselect_k_gate_backward(grad_weights, grad_selector_outputs, code_logits, selector_logits, num_experts, gamma):
    return torch.empty_like(code_logits), torch.empty_like(selector_logits)


@_fake("noisy_topk_load")
def _noisy_topk_load(clean_logits, noisy_logits, noise_std, k, valid_mask=None):
    _check(clean_logits.dim() == 2, "torch_moe.noisy_topk_load: argument 'clean_logits' must be a 2-D tensor [T, E]")
    return clean_logits.new_empty((clean_logits.shape[1],), dtype=_router_dtype(clean_logits))


@_fake("_noisy_topk_load_backward")
def _noisy_topk_load_backward(grad_load, clean_logits, noisy_logits, noise_std, k, valid_mask):
    return torch.empty_like(clean_logits), torch.empty_like(noisy_logits), torch.empty_like(noise_std)


@_fake("capacity_plan")
def _capacity_plan(expert_ids, num_experts, capacity, drop_policy="position", priority=None, valid_mask=None):
    _check(expert_ids.dim() == 2, "torch_moe.capacity_plan: argument 'expert_ids' must be a 2-D tensor [T, k]")
    _check_num_experts("capacity_plan", num_experts)
    return (
        torch.empty_like(expert_ids),
        expert_ids.new_empty((num_experts,)),
        expert_ids.new_empty((num_experts,)),
    )


@_fake("dispatch")
def _dispatch(x, expert_ids, slots, num_experts, capacity):
    _check(x.dim() == 2, "torch_moe.dispatch: argument 'x' must be a 2-D tensor [T, d]")
    if _concrete(num_experts, capacity):
        _check(num_experts > 0, f"torch_moe.dispatch: argument 'num_experts' must be positive, got {num_experts}")
        _check(capacity >= 0, f"torch_moe.dispatch: argument 'capacity' must be >= 0, got {capacity}")
        # As dispatch_op: name the larger of the two size arguments.
        name = "num_experts" if num_experts > capacity else "capacity"
        rows = _checked_mul("dispatch", name, "num_experts * capacity", num_experts, capacity)
        numel = _checked_mul("dispatch", name, "num_experts * capacity * d", rows, x.shape[1])
        _check_alloc_bytes("dispatch", name, "buffer [E, C, d]", numel, x.element_size())
        _check_alloc_bytes("dispatch", name, "slot table [E * C]", rows, 8)
    return x.new_empty((num_experts, capacity, x.shape[1]))


@_fake("_dispatch_backward")
def _dispatch_backward(grad_buffer, expert_ids, slots):
    return grad_buffer.new_empty((expert_ids.shape[0], grad_buffer.shape[2]))


@_fake("combine")
def _combine(buffer, weights, expert_ids, slots):
    _check(buffer.dim() == 3, "torch_moe.combine: argument 'buffer' must be a 3-D tensor [E, C, d]")
    return buffer.new_empty((expert_ids.shape[0], buffer.shape[2]))


@_fake("_combine_backward")
def _combine_backward(grad_y, buffer, weights, expert_ids, slots):
    return torch.empty_like(buffer), torch.empty_like(weights)


@_fake("permute")
def _permute(x, expert_ids, num_experts, valid_mask=None):
    _check(x.dim() == 2, "torch_moe.permute: argument 'x' must be a 2-D tensor [T, d]")
    _check_num_experts("permute", num_experts)
    T, k = expert_ids.shape
    _check_alloc_bytes("permute", "expert_ids", "rows [T * k, d]",
                       _checked_mul("permute", "expert_ids", "T * k * d", T * k, x.shape[1]), x.element_size())
    return (
        x.new_empty((T * k, x.shape[1])),
        torch.empty_like(expert_ids),
        expert_ids.new_empty((num_experts + 1,)),
    )


@_fake("_permute_backward")
def _permute_backward(grad_rows, row_index):
    return grad_rows.new_empty((row_index.shape[0], grad_rows.shape[1]))


@_fake("unpermute")
def _unpermute(rows, weights, row_index):
    _check(rows.dim() == 2, "torch_moe.unpermute: argument 'rows' must be a 2-D tensor [N, d]")
    return rows.new_empty((row_index.shape[0], rows.shape[1]))


@_fake("_unpermute_backward")
def _unpermute_backward(grad_y, rows, weights, row_index):
    return torch.empty_like(rows), torch.empty_like(weights)


def _masked(output_mask, *like):
    """Gradients shaped like `like`, None where output_mask is false (the kernels return undefined tensors)."""
    return tuple(torch.empty_like(t) if wanted else None for wanted, t in zip(output_mask, like))


@_fake("grouped_mm")
def _grouped_mm(a, b, offsets):
    _check(a.dim() == 2 and b.dim() == 3, "torch_moe.grouped_mm: arguments 'a' [N, K] and 'b' [E, K, M] expected")
    return a.new_empty((a.shape[0], b.shape[2]))


@_fake("_grouped_mm_backward")
def _grouped_mm_backward(grad_out, a, b, offsets, output_mask=(True, True)):
    return _masked(output_mask, a, b)


@_fake("permute_plan")
def _permute_plan(expert_ids, num_experts, valid_mask=None):
    _check_num_experts("permute_plan", num_experts)
    return torch.empty_like(expert_ids), expert_ids.new_empty((num_experts + 1,))


@_fake("gather_grouped_mm")
def _gather_grouped_mm(x, b, offsets, row_index):
    return x.new_empty((row_index.numel(), b.shape[2]))


@_fake("_gather_grouped_mm_backward")
def _gather_grouped_mm_backward(grad_out, x, b, offsets, row_index, output_mask=(True, True)):
    return _masked(output_mask, x, b)


@_fake("gather_grouped_glu")
def _gather_grouped_glu(x, w_gate, w_up, offsets, row_index, activation="silu"):
    _check(activation in ("silu", "gelu", "gelu_tanh"),
           f"torch_moe.gather_grouped_glu: argument 'activation' must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"{activation}\"")
    return tuple(x.new_empty((row_index.numel(), w_gate.shape[2])) for _ in range(3))


@_fake("_gather_grouped_glu_backward")
def _gather_grouped_glu_backward(grad_act, x, w_gate, w_up, gate, up, offsets, row_index, activation,
                                 output_mask=(True, True, True)):
    return _masked(output_mask, x, w_gate, w_up)


@_fake("glu")
def _glu(gate, up, activation="silu"):
    _check(activation in ("silu", "gelu", "gelu_tanh"),
           f"torch_moe.glu: argument 'activation' must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"{activation}\"")
    _check(gate.shape == up.shape, f"torch_moe.glu: argument 'up' must have the shape of 'gate', "
                                   f"got {list(up.shape)} and {list(gate.shape)}")
    return gate.new_empty(gate.shape)


@_fake("_glu_backward")
def _glu_backward(grad_act, gate, up, activation, output_mask=(True, True)):
    # Contiguous whatever the strides of gate and up, as the kernels return them.
    return tuple(gate.new_empty(gate.shape) if wanted else None for wanted in output_mask)


@_fake("grouped_mm_unpermute")
def _grouped_mm_unpermute(h, b, offsets, weights, row_index):
    return h.new_empty((row_index.shape[0], b.shape[2]))


@_fake("_grouped_mm_unpermute_backward")
def _grouped_mm_unpermute_backward(grad_y, h, b, offsets, weights, row_index, output_mask=(True, True, True)):
    return _masked(output_mask, h, b, weights)


@_fake("router_losses")
def _router_losses(logits, expert_ids, valid_mask=None):
    dtype = _router_dtype(logits)
    return tuple(logits.new_empty((), dtype=dtype) for _ in range(3))


@_fake("_router_losses_backward")
def _router_losses_backward(grad_load_balancing, grad_z, logits, expert_ids, valid_mask):
    return torch.empty_like(logits)
