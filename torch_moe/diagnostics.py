"""Routing statistics of a MoE layer's last forward, kept as tensors so reading them never syncs the device."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor

__all__ = ["MoEStats"]


@dataclass
class MoEStats:
    """What a MoE forward saw. Every field is a detached tensor on the layer's device.

    tokens_per_expert: [E] int64, valid assignments per expert before dropping.
    dropped_fraction: 0-dim, dropped assignments / valid assignments (0 when dropless or no valid token).
    router_entropy: 0-dim, mean over valid tokens of -sum_e p log p.
    load_balancing_loss, z_loss: 0-dim, unweighted.
    unrouted_fraction: 0-dim, fraction of valid tokens that reached no expert (every choice dropped; with expert
        choice, no expert took the token).
    losses: every unweighted aux loss the layer computed, by name (``load_balancing``, ``z``, and ``importance``,
        ``load``, ``sequence_balance`` when their coefficients are set).
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor
    load_balancing_loss: Tensor
    z_loss: Tensor
    unrouted_fraction: Tensor
    losses: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
