"""Routing statistics of a MoE layer's last forward, kept as tensors so reading them never syncs the device."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .experts import unwrapped
from .layer import MoE, MoEStats

__all__ = [
    "MoEStats", "MoETracker", "RoutingRecorder", "load_balance", "layer_statistics", "model_statistics",
    "expert_weight_similarity", "expert_output_similarity", "similarity_summary", "collapsed_layers",
    "expert_label_mutual_information",
]


# --------------------------------------------------------------------------------------------------
# Diagnostics over layers and training steps. Everything up to MoETracker.summary/plot stays on the device.


def _moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def load_balance(tokens_per_expert: Tensor) -> dict[str, Tensor]:
    """Load statistics of counts [..., E]: ``load_cv`` (population std / mean) and ``load_max_over_mean``;
    both 0 when no token was routed. 1 token per expert everywhere gives cv 0 and max/mean 1."""
    load = tokens_per_expert.to(torch.float64 if tokens_per_expert.dtype == torch.float64 else torch.float32)
    mean = load.mean(-1)
    safe_mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    cv = torch.where(mean > 0, load.std(-1, correction=0) / safe_mean, torch.zeros_like(mean))
    max_over_mean = torch.where(mean > 0, load.amax(-1) / safe_mean, torch.zeros_like(mean))
    return {"load_cv": cv, "load_max_over_mean": max_over_mean}


def layer_statistics(layer: nn.Module) -> dict[str, Tensor]:
    """The routing statistics of ``layer``'s last forward, as tensors on its device (no sync):
    ``tokens_per_expert`` [E], ``load_fraction`` [E] (share of the assignments), ``dropped_fraction``,
    ``router_entropy``, ``load_cv``, ``load_max_over_mean``, ``load_balancing_loss``, ``z_loss`` and, when the
    layer reports it, ``unrouted_fraction``."""
    stats = getattr(layer, "stats", None)
    if not isinstance(stats, MoEStats):
        raise ValueError(f"layer_statistics: {type(layer).__name__} has no stats yet; run a forward first")
    tokens = stats.tokens_per_expert
    total = tokens.sum()
    out = {
        "tokens_per_expert": tokens,
        "load_fraction": tokens.to(torch.float32) / total.clamp(min=1).to(torch.float32),
        "dropped_fraction": stats.dropped_fraction,
        "router_entropy": stats.router_entropy,
        **load_balance(tokens),
        "load_balancing_loss": stats.load_balancing_loss,
        "z_loss": stats.z_loss,
    }
    unrouted = getattr(stats, "unrouted_fraction", None)
    if isinstance(unrouted, Tensor):
        out["unrouted_fraction"] = unrouted
    return out


def model_statistics(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """:func:`layer_statistics` of every MoE layer of ``model`` that has run, by module name."""
    return {name: layer_statistics(m) for name, m in _moe_layers(model).items() if m.stats is not None}


def _cosine_matrix(rows: Tensor) -> Tensor:
    """rows [E, n] -> [E, E] cosine similarities (0 for an all-zero row)."""
    rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
    unit = rows / rows.norm(dim=1, keepdim=True).clamp(min=torch.finfo(rows.dtype).tiny)
    return unit @ unit.t()


def expert_weight_similarity(layer: nn.Module) -> Tensor:
    """[E, E] cosine similarity of the experts' flattened parameters (w1, w3, w2, b1, b2 of each expert, joined).
    For an expert-parallel layer, of the experts this rank holds."""
    experts = unwrapped(layer.experts)
    with torch.no_grad():
        parts = [p.detach().flatten(1) for p in (experts.w1, experts.w3, experts.w2, experts.b1, experts.b2)
                 if p is not None]
        return _cosine_matrix(torch.cat(parts, dim=1))


def expert_output_similarity(layer: nn.Module, probe: Tensor) -> Tensor:
    """[E, E] cosine similarity of the experts' outputs on a probe batch ``probe`` [..., d_model]: every
    expert sees every probe token, and its outputs are flattened into one vector."""
    experts = layer.experts  # called, not read: a LoRA wrapper's update applies
    dtype = unwrapped(experts).w1.dtype
    num_experts = unwrapped(experts).num_experts
    tokens = probe.reshape(-1, probe.shape[-1]).to(dtype)
    with torch.no_grad():
        outputs = experts(tokens.unsqueeze(0).expand(num_experts, -1, -1).contiguous())
        return _cosine_matrix(outputs.flatten(1))


def similarity_summary(similarity: Tensor, threshold: float = 0.99) -> dict[str, Tensor]:
    """Off-diagonal summary of an [E, E] similarity matrix: ``mean`` and ``max`` over pairs of distinct experts,
    ``similar_pairs`` (pairs above ``threshold``) and ``collapsed`` (bool: the mean is above ``threshold``, the
    experts have become one). A single expert counts as not collapsed."""
    num = similarity.shape[0]
    off = ~torch.eye(num, dtype=torch.bool, device=similarity.device)
    values = similarity[off]
    if values.numel() == 0:
        zero = similarity.new_zeros(())
        return {"mean": zero, "max": zero, "similar_pairs": torch.zeros((), dtype=torch.int64),
                "collapsed": torch.zeros((), dtype=torch.bool)}
    mean = values.mean()
    return {"mean": mean, "max": values.max(), "similar_pairs": (values > threshold).sum() // 2,
            "collapsed": mean > threshold}


def collapsed_layers(model: nn.Module, threshold: float = 0.99, probe: Optional[Tensor] = None) -> list[str]:
    """Names of the MoE layers whose experts are, on average over pairs, more than ``threshold`` alike: by their
    weights, or by their outputs on ``probe`` [..., d_model] when given. Reads the result on the host."""
    flagged = []
    for name, layer in _moe_layers(model).items():
        sim = expert_weight_similarity(layer) if probe is None else expert_output_similarity(layer, probe)
        if bool(similarity_summary(sim, threshold)["collapsed"]):
            flagged.append(name)
    return flagged


def expert_label_mutual_information(expert_ids: Tensor, labels: Tensor, num_experts: int, num_labels: int,
                                    valid: Optional[Tensor] = None, assignment_mask: Optional[Tensor] = None
                                    ) -> Tensor:
    """Mutual information I(expert; label) in nats between the experts tokens were routed to and their labels
    (task, language, class ids), with each of a token's assignments counting once.

    expert_ids: [T, k] int; labels: [T] int in [0, num_labels), negative = ignore (e.g. -100); valid: [T] bool;
    assignment_mask: [T, k] bool, the assignments to count (default all). 0 when nothing is counted. No sync.
    """
    if expert_ids.dim() != 2 or labels.shape != expert_ids.shape[:1]:
        raise ValueError(f"expert_label_mutual_information: expert_ids must be [T, k] and labels [T], got "
                         f"{tuple(expert_ids.shape)} and {tuple(labels.shape)}")
    keep = (labels >= 0).unsqueeze(1).expand_as(expert_ids)
    if valid is not None:
        keep = keep & valid.reshape(-1, 1)
    if assignment_mask is not None:
        keep = keep & assignment_mask
    index = expert_ids * num_labels + labels.clamp(min=0, max=num_labels - 1).unsqueeze(1)
    counts = torch.zeros(num_experts * num_labels, dtype=torch.float64, device=expert_ids.device)
    counts.index_add_(0, index.reshape(-1), keep.reshape(-1).to(torch.float64))
    joint = (counts / counts.sum().clamp(min=1)).view(num_experts, num_labels)

    def entropy(p: Tensor) -> Tensor:
        return -torch.special.xlogy(p, p).sum()

    mi = entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)
    return mi.clamp(min=0)


class RoutingRecorder:
    """Keeps each MoE layer's expert assignments of its last forward (opt-in: a forward hook on every router).

    ``recorder.assignments[name]`` = (expert_ids [T, k], valid [T] bool or None, assignment_mask [T, k] or None),
    exactly what the layer's router returned (``assignment_mask`` marks the chosen pairs for expert-choice routing).
    Use as a context manager, or call :meth:`close` to remove the hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.assignments: dict[str, tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = {}
        self._handles = []
        for name, layer in _moe_layers(model).items():
            router = getattr(layer, "router", None)
            if isinstance(router, nn.Module):
                self._handles.append(router.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def hook(module, args, kwargs, output) -> None:
            if hasattr(output, "expert_ids"):
                routing = output
            elif isinstance(output, tuple) and len(output) == 2 and hasattr(output[1], "expert_ids"):
                routing = output[1]  # a (logits, routing) pair
            else:
                return
            extras = getattr(routing, "extras", None) or {}
            slots = extras.get("slots") if isinstance(extras, dict) else None
            mask = slots >= 0 if isinstance(slots, Tensor) and slots.shape == routing.expert_ids.shape else None
            self.assignments[name] = (routing.expert_ids.detach(), kwargs.get("valid"), mask)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SCALARS = ("dropped_fraction", "router_entropy", "load_cv", "load_max_over_mean", "load_balancing_loss", "z_loss",
            "unrouted_fraction")


class MoETracker:
    """Records the routing statistics of every MoE layer of ``model`` over training steps, and plots them.

    Call :meth:`step` after each forward (or each optimizer step): it copies the layers' statistics, on the
    device, with no host sync. With ``num_labels``, a :class:`RoutingRecorder` keeps each layer's assignments and
    ``step(labels=...)`` ([...] ints matching the layer inputs' leading dims, negative = ignore) adds the
    expert-label mutual information. :meth:`history`, :meth:`summary` and :meth:`plot` read the device.
    """

    def __init__(self, model: nn.Module, *, num_labels: Optional[int] = None, probe: Optional[Tensor] = None,
                 similarity_threshold: float = 0.99) -> None:
        self.model = model
        self.layer_names = list(_moe_layers(model))
        if not self.layer_names:
            raise ValueError(f"MoETracker: {type(model).__name__} has no MoE layer")
        if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
            raise ValueError(f"MoETracker: num_labels must be a positive int or None, got {num_labels!r}")
        self.num_labels = num_labels
        self.probe = probe
        self.similarity_threshold = similarity_threshold
        self.steps: list[int] = []
        self.records: list[dict[str, dict[str, Tensor]]] = []
        self.recorder = RoutingRecorder(model) if num_labels is not None else None

    def step(self, step: Optional[int] = None, labels: Optional[Tensor] = None) -> None:
        """Record the statistics of every layer's last forward (and the mutual information given ``labels``)."""
        if labels is not None and self.recorder is None:
            raise ValueError("MoETracker.step: labels need MoETracker(model, num_labels=...)")
        layers = _moe_layers(self.model)
        record: dict[str, dict[str, Tensor]] = {}
        for name in self.layer_names:
            layer = layers[name]
            if layer.stats is None:
                continue
            stats = {key: value.detach().clone() for key, value in layer_statistics(layer).items()}
            if labels is not None and name in self.recorder.assignments:
                expert_ids, valid, mask = self.recorder.assignments[name]
                stats["expert_label_mi"] = expert_label_mutual_information(
                    expert_ids, labels.reshape(-1).to(expert_ids.device), layer.num_experts, self.num_labels, valid,
                    mask)
            record[name] = stats
        self.steps.append(len(self.steps) if step is None else int(step))
        self.records.append(record)

    def history(self, key: str) -> Tensor:
        """The recorded ``key`` as a CPU tensor [steps, layers] (or [steps, layers, E] for per-expert keys); NaN
        where a layer had not run. Syncs."""
        if not self.records:
            raise ValueError("MoETracker.history: nothing recorded yet; call step() after a forward")
        example = next((r[n][key] for r in self.records for n in self.layer_names if n in r and key in r[n]), None)
        if example is None:
            raise ValueError(f"MoETracker.history: no statistic {key!r} was recorded")
        rows = []
        for record in self.records:
            row = []
            for name in self.layer_names:
                value = record.get(name, {}).get(key)
                row.append(value.to(torch.float64) if value is not None
                           else torch.full(example.shape, float("nan"), dtype=torch.float64, device=example.device))
            rows.append(torch.stack(row))
        return torch.stack(rows).cpu()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer: the last recorded value of every scalar statistic and the mean of each over the steps
        (``mean_<key>``), as Python floats. Syncs."""
        keys = [k for k in (*_SCALARS, "expert_label_mi")
                if any(k in r.get(n, {}) for r in self.records for n in self.layer_names)]
        out: dict[str, dict[str, float]] = {name: {} for name in self.layer_names}
        for key in keys:
            values = self.history(key)
            for i, name in enumerate(self.layer_names):
                column = values[:, i]
                seen = column[~column.isnan()]
                if seen.numel():
                    out[name][key] = float(seen[-1])
                    out[name][f"mean_{key}"] = float(seen.mean())
        return out

    def similarity(self) -> dict[str, Tensor]:
        """[E, E] expert similarity of every layer now: of the outputs on the probe batch if the tracker has one,
        else of the weights."""
        layers = _moe_layers(self.model)
        return {name: (expert_output_similarity(layers[name], self.probe) if self.probe is not None
                       else expert_weight_similarity(layers[name])) for name in self.layer_names}

    def plot(self, out_dir) -> list[Path]:
        """Write PNGs to ``out_dir``: ``utilisation.png`` (share of assignments per layer × expert over the steps),
        ``entropy.png``, ``drop_rate.png``, ``similarity.png`` (current expert similarity, one panel per layer) and,
        when recorded, ``expert_label_mi.png``. Returns the paths. Uses matplotlib's Agg canvas (no GUI, no
        change to the pyplot backend)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        steps = self.steps
        written = []

        def save(fig: Figure, filename: str) -> None:
            FigureCanvasAgg(fig)
            fig.tight_layout()
            fig.savefig(out / filename, dpi=100)
            written.append(out / filename)

        load = self.history("load_fraction")  # [steps, layers, E]
        num_layers, num_experts = load.shape[1], load.shape[2]
        fig = Figure(figsize=(max(6.0, 0.15 * len(steps) + 3), max(3.0, 0.18 * num_layers * num_experts + 1.5)))
        ax = fig.add_subplot()
        image = ax.imshow(load.reshape(len(steps), -1).t().numpy(), aspect="auto", interpolation="nearest",
                          cmap="viridis", extent=(-0.5, len(steps) - 0.5, num_layers * num_experts - 0.5, -0.5))
        for boundary in range(1, num_layers):
            ax.axhline(boundary * num_experts - 0.5, color="white", linewidth=1.0)
        ax.set_yticks([i * num_experts + (num_experts - 1) / 2 for i in range(num_layers)], self.layer_names,
                      fontsize=7)
        ax.set_xlabel("recorded step (index)")
        ax.set_title(f"share of assignments per expert ({num_experts} per layer; uniform = {1 / num_experts:.3g})")
        fig.colorbar(image, ax=ax)
        save(fig, "utilisation.png")

        for key, filename, label in (("router_entropy", "entropy.png", "router entropy (nats)"),
                                     ("dropped_fraction", "drop_rate.png", "dropped fraction of assignments"),
                                     ("expert_label_mi", "expert_label_mi.png", "I(expert; label) (nats)")):
            try:
                values = self.history(key)
            except ValueError:
                continue
            fig = Figure(figsize=(6.5, 4.0))
            ax = fig.add_subplot()
            for i, name in enumerate(self.layer_names):
                ax.plot(steps, values[:, i].numpy(), label=name)
            if key == "router_entropy":
                ax.axhline(math.log(num_experts), color="grey", linestyle="--", linewidth=0.8, label="log E")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
            save(fig, filename)

        similarities = {name: sim.cpu() for name, sim in self.similarity().items()}
        cols = min(4, len(similarities))
        rows = math.ceil(len(similarities) / cols)
        fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
        for i, (name, sim) in enumerate(similarities.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            image = ax.imshow(sim.numpy(), vmin=-1.0, vmax=1.0, cmap="coolwarm")
            flag = " COLLAPSED" if bool(similarity_summary(sim, self.similarity_threshold)["collapsed"]) else ""
            ax.set_title(f"{name}{flag}", fontsize=7)
            ax.set_xlabel("expert")
            if i % cols == 0:
                ax.set_ylabel("expert")
        fig.colorbar(image, ax=fig.axes)
        fig.suptitle("expert similarity (cosine of " + ("outputs on the probe)" if self.probe is not None
                                                       else "weights)"))
        FigureCanvasAgg(fig)
        fig.savefig(out / "similarity.png", dpi=100)
        written.append(out / "similarity.png")
        return written

    def close(self) -> None:
        """Remove the routing hooks (when tracking labels)."""
        if self.recorder is not None:
            self.recorder.close()
