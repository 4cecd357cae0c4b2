"""Routing override and router replay: route MoE layers by a given assignment, and record one pass's routing to
replay it in the next (R2/R3 router replay for RL fine-tuning, Megatron-Core's router replay).

:func:`override_routing` (:mod:`torch_moe.override`) is what
``MoE.forward(..., expert_ids=..., routing_weights=...)`` does;
:class:`RoutingRecorder` uses the layer's one routing hook (:meth:`torch_moe.MoE.register_routing_hook`), so the
layer's forward has no record/replay branch of its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from .layer import MoE
from .override import override_routing
from .routing import Routing, recomputing

__all__ = ["override_routing", "RoutingRecorder"]


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"RoutingRecorder: {type(model).__name__} holds no torch_moe.MoE layer")
    return layers


class RoutingRecorder:
    """Records the routing of every MoE layer of a model in one pass and replays it in another.

    ``with recorder.record(model): model(batch)`` stores, per layer (by its name in ``model``), the expert ids
    [T, k] of each of its forwards (and the weights [T, k] when ``record_weights``), detached. ``with
    recorder.replay(model): loss = model(batch); loss.backward()`` then routes each layer's i-th forward by its
    i-th recorded ids (and weights), through ``MoE.forward``'s routing override: without recorded weights the
    router weights the recorded experts itself, so it still learns (R3); with them, the recorded values are used
    and the router's gradient flows as through its own weights (straight-through).

    A forward recomputed by activation checkpointing (torch.utils.checkpoint, HF ``gradient_checkpointing_enable``)
    is not recorded again; in replay it reuses its layer's recorded routing, which needs each layer to run once per
    pass (the usual case) and the backward inside the ``replay`` block. Replaying on other tokens (a different
    count) raises ValueError; a layer run more times than recorded raises RuntimeError.

    ``routing``: name -> list of dicts with ``expert_ids`` (and ``weights``), one per recorded forward, e.g. to
    save a rollout's routing or to assemble one from an inference engine's.
    """

    def __init__(self, record_weights: bool = False) -> None:
        self.record_weights = bool(record_weights)
        self.routing: dict[str, list[dict[str, Tensor]]] = {}

    @contextmanager
    def record(self, model: nn.Module) -> Iterator["RoutingRecorder"]:
        """Record the routing of ``model``'s MoE layers in this block (replacing what was recorded before)."""
        layers = _moe_layers(model)
        self.routing = {name: [] for name, _ in layers}

        def hook_for(name: str):
            def hook(layer, routing: Routing, valid) -> None:
                if recomputing():
                    return None
                entry = {"expert_ids": routing.expert_ids.detach()}
                if self.record_weights:
                    entry["weights"] = routing.weights.detach()
                self.routing[name].append(entry)
                return None
            return hook

        with _hooks_installed(layers, hook_for):
            yield self

    @contextmanager
    def replay(self, model: nn.Module) -> Iterator["RoutingRecorder"]:
        """Route ``model``'s MoE layers by the recorded routing in this block."""
        layers = _moe_layers(model)
        missing = [name for name, _ in layers if name not in self.routing]
        if missing:
            raise ValueError(f"RoutingRecorder.replay: nothing recorded for MoE layer(s) {missing}; record a pass "
                             "of this model first")
        cursors = {name: 0 for name, _ in layers}

        def hook_for(name: str):
            entries = self.routing[name]

            def hook(layer, routing: Routing, valid) -> Routing:
                if recomputing():
                    if len(entries) != 1:
                        raise RuntimeError(f"RoutingRecorder.replay: MoE layer {name!r} is recomputed (activation "
                                           f"checkpointing) but ran {len(entries)} times in the recorded pass; "
                                           "replay under checkpointing needs one forward per layer and pass")
                    entry = entries[0]
                else:
                    if cursors[name] >= len(entries):
                        raise RuntimeError(f"RoutingRecorder.replay: MoE layer {name!r} runs more often than in the "
                                           f"recorded pass ({len(entries)} forward(s) recorded)")
                    entry = entries[cursors[name]]
                    cursors[name] += 1
                return layer.override_routing(routing, entry["expert_ids"], entry.get("weights"))
            return hook

        with _hooks_installed(layers, hook_for):
            yield self


@contextmanager
def _hooks_installed(layers, hook_for) -> Iterator[None]:
    """Each (name, layer) of ``layers`` carries the routing hook ``hook_for(name)`` inside the block."""
    handles = [layer.register_routing_hook(hook_for(name)) for name, layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
