"""A plain-PyTorch reference of the ``torch_moe.MoE`` layer (loops over tokens and experts), for tests."""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ReferenceMoE", "reference_capacity", "reference_topk", "reference_keep"]

_ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h, approximate="none"),
    "relu": F.relu,
    "silu": F.silu,
}


def reference_capacity(capacity_factor: float, min_capacity: int, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = max(min_capacity, ceil(capacity_factor * T * k / E)), computed exactly (Fraction, not float)."""
    return max(min_capacity, math.ceil(Fraction(capacity_factor) * num_tokens * top_k / num_experts))


def reference_topk(probs: Tensor, top_k: int) -> list[list[int]]:
    """For each row, the ids of the k largest probs, in decreasing order, ties to the lower id."""
    ids = []
    for row in probs.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        ids.append(order[:top_k])
    return ids


def reference_keep(
    expert_ids: list[list[int]],
    probs: Tensor,
    num_experts: int,
    capacity: Optional[int],
    drop_policy: str,
    valid: list[bool],
) -> list[list[bool]]:
    """keep[t][j]: whether assignment (t, j) gets a slot. capacity None means dropless."""
    num_tokens = len(expert_ids)
    top_k = len(expert_ids[0]) if num_tokens else 0
    keep = [[False] * top_k for _ in range(num_tokens)]
    if capacity is None:
        for t in range(num_tokens):
            if valid[t]:
                keep[t] = [True] * top_k
        return keep
    if drop_policy == "position":
        # Choice rank first, then token order (GShard): every 1st choice before any 2nd choice.
        used = [0] * num_experts
        for j in range(top_k):
            for t in range(num_tokens):
                if not valid[t]:
                    continue
                e = expert_ids[t][j]
                if used[e] < capacity:
                    used[e] += 1
                    keep[t][j] = True
        return keep
    if drop_policy == "probability":
        p = probs.tolist()
        for e in range(num_experts):
            candidates = [
                (t, j) for t in range(num_tokens) if valid[t] for j in range(top_k) if expert_ids[t][j] == e
            ]
            candidates.sort(key=lambda tj: (-p[tj[0]][e], tj[0]))
            for t, j in candidates[:capacity]:
                keep[t][j] = True
        return keep
    raise ValueError(f"unknown drop_policy {drop_policy!r}")


class ReferenceMoE:
    """Reference MoE with the contract of ``torch_moe.MoE``; parameters are plain leaf tensors.

    Build it from a layer with :meth:`from_layer` (copies the layer's parameters), call it like the
    layer, and read ``aux_loss`` and ``stats`` afterwards. Jitter is not modelled (use jitter_eps=0).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: Optional[float] = 1.25,
        min_capacity: int = 4,
        drop_policy: str = "position",
        normalize_weights: Optional[bool] = None,
        expert: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ):
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.capacity_factor, self.min_capacity, self.drop_policy = capacity_factor, min_capacity, drop_policy
        self.normalize_weights = top_k > 1 if normalize_weights is None else normalize_weights
        self.expert, self.activation, self.bias = expert, activation, bias
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        E = num_experts

        def param(*shape):
            return (torch.randn(*shape, dtype=dtype, device=device) / math.sqrt(shape[-2] if len(shape) > 1 else 1)).requires_grad_()

        self.params: dict[str, Tensor] = {"router.weight": param(E, d_model)}
        self.params["experts.w1"] = param(E, d_model, d_ff)
        self.params["experts.w2"] = param(E, d_ff, d_model)
        if expert in ("swiglu", "geglu"):
            self.params["experts.w3"] = param(E, d_model, d_ff)
        if bias:
            self.params["experts.b1"] = param(E, d_ff)
            self.params["experts.b2"] = param(E, d_model)
        self.aux_loss: Optional[Tensor] = None
        self.stats: Optional[SimpleNamespace] = None

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, dtype: torch.dtype = torch.float64, device="cpu", **config):
        """A reference with ``config`` (the layer's constructor arguments) and copies of ``layer``'s parameters."""
        ref = cls(dtype=dtype, device=device, **config)
        layer_params = dict(layer.named_parameters())
        for name in ref.params:
            ref.params[name] = layer_params[name].detach().to(device=device, dtype=dtype).clone().requires_grad_()
        return ref

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """x: [d] -> [d] through expert e."""
        p = self.params
        if self.expert not in ("swiglu", "geglu", "mlp"):
            raise ValueError(f"unknown expert {self.expert!r}")
        # With bias, b1 goes inside the activation and b2 after w2, for the gated types too (as torch_moe documents).
        h = x @ p["experts.w1"][e]
        if self.bias:
            h = h + p["experts.b1"][e]
        if self.expert == "swiglu":
            h = F.silu(h) * (x @ p["experts.w3"][e])
        elif self.expert == "geglu":
            h = F.gelu(h, approximate="none") * (x @ p["experts.w3"][e])
        else:
            h = _ACTIVATIONS[self.activation](h)
        y = h @ p["experts.w2"][e]
        if self.bias:
            y = y + p["experts.b2"][e]
        return y

    def __call__(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        E, k, d = self.num_experts, self.top_k, self.d_model
        lead_shape = x.shape[:-1]
        xt = x.reshape(-1, d)
        T = xt.shape[0]
        valid = [True] * T if padding_mask is None else [bool(v) for v in padding_mask.reshape(-1).tolist()]
        Tv = sum(valid)

        logits = xt @ self.params["router.weight"].t()  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        expert_ids = reference_topk(probs.detach(), k) if T else []
        capacity = (
            None
            if self.capacity_factor is None
            else reference_capacity(self.capacity_factor, self.min_capacity, T, k, E)
        )
        keep = reference_keep(expert_ids, probs.detach(), E, capacity, self.drop_policy, valid)

        rows = []
        for t in range(T):
            y_t = torch.zeros(d, dtype=x.dtype, device=x.device)
            if valid[t]:
                chosen = probs[t, expert_ids[t]]
                weights = chosen / chosen.sum() if self.normalize_weights else chosen
                for j in range(k):
                    if keep[t][j]:
                        y_t = y_t + weights[j] * self.expert_forward(expert_ids[t][j], xt[t])
            rows.append(y_t)
        y = torch.stack(rows) if rows else xt.new_zeros(0, d)

        tokens_per_expert = torch.zeros(E, dtype=torch.int64)
        for t in range(T):
            if valid[t]:
                for e in expert_ids[t]:
                    tokens_per_expert[e] += 1
        dropped = sum(1 for t in range(T) if valid[t] for j in range(k) if not keep[t][j])

        if Tv:
            idx = torch.tensor([t for t in range(T) if valid[t]], dtype=torch.long, device=x.device)
            probs_v, logits_v = probs[idx], logits[idx]
            f = tokens_per_expert.to(device=x.device, dtype=probs.dtype) / (Tv * k)
            P = probs_v.mean(dim=0)
            load_balancing_loss = E * (f * P).sum()
            z_loss = (torch.logsumexp(logits_v, dim=-1) ** 2).mean()
            router_entropy = torch.special.entr(probs_v.detach()).sum(dim=-1).mean()
            dropped_fraction = torch.tensor(dropped / (Tv * k), dtype=torch.float64)
        else:
            zero = logits.sum() * 0  # keeps the graph, 0 even for T = 0
            load_balancing_loss, z_loss = zero, zero
            router_entropy = torch.zeros((), dtype=torch.float64)
            dropped_fraction = torch.zeros((), dtype=torch.float64)

        self.aux_loss = self.aux_loss_coef * load_balancing_loss + self.z_loss_coef * z_loss
        self.stats = SimpleNamespace(
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=dropped_fraction,
            router_entropy=router_entropy,
            load_balancing_loss=load_balancing_loss,
            z_loss=z_loss,
            capacity=capacity,
            expert_ids=expert_ids,
            keep=keep,
        )
        return y.reshape(*lead_shape, d)
