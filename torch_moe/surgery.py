"""Model surgery on trained MoE layers: rank experts, prune them, merge them into fewer experts.

- :func:`expert_importance`: how much each expert is used (share of routed assignments, or mean routing weight).
- :func:`prune_experts`: drop experts, the router renormalised over the rest (Lu et al. 2024, "Not All Experts are
  Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large Language Models").
- :func:`merge_experts`: group experts and merge each group into one after aligning their hidden units (Li et al.
  2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy", M-SMoE).

Each returns a new layer and leaves its argument as it was. Upcycling variants (drop-upcycling, granular
upcycling) are options of :func:`torch_moe.convert.moefy`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import ops
from ._checks import is_int
from .diagnostics import MoETracker, expert_output_similarity
from .experts import unwrapped
from .layer import MoE
from .routing import RouterBase, RouterOptions, Routing

__all__ = ["expert_importance", "prune_experts", "merge_experts", "MergedRouter", "linear_assignment",
           "CRITERIA", "SIMILARITIES"]

CRITERIA = ("frequency", "weight")
SIMILARITIES = ("router_logits", "output")

Batches = Union[Tensor, Iterable[Tensor]]


# --------------------------------------------------------------------------------------------------
# shared checks and helpers


def _check_layer(layer, caller: str) -> MoE:
    if not isinstance(layer, MoE):
        hint = " (a converted model's MoEFeedForward holds it as .moe)" if hasattr(layer, "moe") else ""
        raise ValueError(f"{caller}: layer must be a torch_moe.MoE{hint}, got {type(layer).__name__}")
    if layer.expert_parallel_group is not None:
        raise ValueError(f"{caller}: the layer shards its experts over an expert_parallel_group; gather them first "
                         "(torch_moe.parallel) and operate on the single-process layer")
    if unwrapped(layer.experts) is not layer.experts or unwrapped(layer.router) is not layer.router:
        raise ValueError(f"{caller}: the layer's experts or router are wrapped (PEFT LoRA?); merge_and_unload() first")
    if layer.null_experts is not None and caller != "expert_importance":
        raise NotImplementedError(f"{caller}: the layer has null experts (num_zero/copy/constant_experts), whose router "
                                  "rows follow the FFN experts'; pruning or merging such a layer is not supported")
    if isinstance(layer.router, MergedRouter) and caller != "expert_importance":
        raise ValueError(f"{caller}: the layer is already merged (its router is a MergedRouter over the original "
                         "experts); operate on the layer before merging")
    return layer


def _batches(batches: Optional[Batches], d_model: int, caller: str) -> list[Tensor]:
    if batches is None:
        raise ValueError(f"{caller}: batches (a tensor [..., d_model={d_model}] or an iterable of them) is needed")
    items = [batches] if isinstance(batches, Tensor) else list(batches)
    if not items:
        raise ValueError(f"{caller}: batches is empty")
    for item in items:
        if not isinstance(item, Tensor) or item.dim() == 0 or item.shape[-1] != d_model or not item.is_floating_point():
            what = f"{item.dtype} of shape {tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(f"{caller}: every batch must be a floating-point tensor [..., d_model={d_model}], got "
                             f"{what}")
    return [item.reshape(-1, d_model) for item in items]


@torch.no_grad()
def _route(layer: MoE, tokens: Tensor) -> Routing:
    """The layer's routing of tokens [T, d_model] as at inference (no jitter, no noise); the router's mode is
    restored afterwards."""
    router = layer.router
    was_training = router.training
    router.eval()
    try:
        return router(tokens)  # the router computes in its own dtype (float32, float64 for float64 input)
    finally:
        router.train(was_training)


def _assignments(routing: Routing, num_experts: int) -> tuple[Tensor, Tensor]:
    """(assignments [E] float64, summed routing weight [E] float64) of one routing."""
    if routing.slots is not None and routing.expert_ids.shape[1] == num_experts:  # expert choice: [T, E] slots
        taken = routing.slots >= 0
        return taken.sum(0).to(torch.float64), torch.where(taken, routing.weights, 0).sum(0).to(torch.float64)
    ids = routing.expert_ids.reshape(-1)
    counts = torch.bincount(ids, minlength=num_experts).to(torch.float64)
    weights = torch.zeros(num_experts, dtype=torch.float64, device=ids.device)
    weights.index_add_(0, ids, routing.weights.reshape(-1).to(torch.float64))
    return counts, weights


def _moe_kwargs(layer: MoE, num_experts: int) -> dict:
    """The constructor arguments of a layer like ``layer`` (every option it was built with, from
    ``MoE.init_args``) with ``num_experts`` experts of the same (built) width: fine-grained layers are rebuilt with
    granularity 1 and their built d_ff and top_k. Pass them as ``MoE(**kwargs)``."""
    experts = unwrapped(layer.experts)
    kwargs = dict(layer.init_args)
    kwargs.update(d_model=layer.d_model, d_ff=layer.d_ff, num_experts=num_experts, top_k=layer.top_k,
                  expert_granularity=1, device=experts.w1.device, dtype=experts.w1.dtype)
    if layer.shared_experts is not None:
        kwargs.update(shared_expert_d_ff=layer.shared_experts.w1.shape[2])
    return kwargs


def _copy_shared(source: MoE, target: MoE) -> None:
    for name in ("shared_experts", "shared_expert_gate"):
        module = getattr(source, name)
        if module is not None:
            getattr(target, name).load_state_dict(module.state_dict())


# --------------------------------------------------------------------------------------------------
# importance


def expert_importance(source, batches: Optional[Batches] = None, criterion: str = "frequency", *,
                      layer_name: Optional[str] = None) -> Tensor:
    """How much each expert of a MoE layer is used: a criterion for :func:`prune_experts` (drop the least used,
    Lu et al. 2024 "Not All Experts are Equal") and the merge weights of :func:`merge_experts` (Li et al. 2024).

    ``source`` is a :class:`torch_moe.MoE` with ``batches`` (a tensor [..., d_model] or an iterable of them, routed
    as at inference: no jitter or noise), or a :class:`torch_moe.MoETracker` with ``layer_name`` (the counts it
    recorded during training; ``criterion="frequency"`` only).

    criterion ``"frequency"``: each expert's share of the routed assignments (before capacity drops; expert choice:
    of the tokens taken), [E] float64 summing to 1 (all 0 when nothing was routed). ``"weight"``: the mean over
    tokens of the routing weight each expert got (0 where it was not chosen), [E] float64.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"expert_importance: criterion must be one of {CRITERIA}, got {criterion!r}")
    if isinstance(source, MoETracker):
        if criterion != "frequency":
            raise ValueError("expert_importance: a MoETracker records token counts only; criterion='weight' needs "
                             "the layer and batches")
        if layer_name not in source.layer_names:
            raise ValueError(f"expert_importance: layer_name must be one of the tracker's layers "
                             f"{source.layer_names}, got {layer_name!r}")
        history = source.history("tokens_per_expert")[:, source.layer_names.index(layer_name)]  # [steps, E]
        counts = torch.nan_to_num(history, nan=0.0).sum(0)
        return counts / counts.sum().clamp(min=1)
    layer = _check_layer(source, "expert_importance")
    if layer_name is not None:
        raise ValueError("expert_importance: layer_name applies to a MoETracker source only")
    if layer.router_name == "hash":
        raise ValueError("expert_importance: router='hash' routes by token id, not by the hidden states; count its "
                         "choices with a MoETracker instead")
    if layer.router_name == "dselect_k" and criterion == "frequency":
        raise ValueError("expert_importance: router='dselect_k' routes every expert (zero weights included), so "
                         "counting its assignments says nothing; use criterion='weight'")
    counts = weights = None
    num_tokens = 0
    for tokens in _batches(batches, layer.d_model, "expert_importance"):
        c, w = _assignments(_route(layer, tokens), layer.num_experts)
        counts, weights = (c, w) if counts is None else (counts + c, weights + w)
        num_tokens += tokens.shape[0]
    if criterion == "frequency":
        return counts / counts.sum().clamp(min=1)
    return weights / max(num_tokens, 1)


# --------------------------------------------------------------------------------------------------
# pruning


def _expert_indices(indices, num_experts: int, what: str, caller: str) -> list[int]:
    if isinstance(indices, Tensor):
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"{caller}: {what} must be a 1-d integer tensor or a sequence of ints, got "
                             f"{indices.dtype} of shape {tuple(indices.shape)}")
        indices = indices.tolist()  # surgery, not a training step: one read of the chosen ids
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) and not isinstance(indices, range):
        raise ValueError(f"{caller}: {what} must be a sequence of expert ids, got {type(indices).__name__}")
    out = []
    for index in indices:
        if not is_int(index) or not 0 <= index < num_experts:
            raise ValueError(f"{caller}: {what} holds {index!r}; expert ids are ints in [0, num_experts={num_experts})")
        out.append(int(index))
    if len(set(out)) != len(out):
        raise ValueError(f"{caller}: {what} repeats an expert id: {out}")
    return out


def _same_slots_factor(layer: MoE, num_experts: int) -> Optional[float]:
    """The capacity factor that gives ``num_experts`` experts the slots per expert the layer had: factor · E'/E.
    It is shaved by a relative 1e-12 so that rounding cannot lift an exact integer over the ceil."""
    if layer.capacity_factor is None:
        return None
    return layer.capacity_factor * num_experts / layer.num_experts * (1.0 - 1e-12)


def prune_experts(layer: MoE, keep=None, *, drop=None, capacity_factor: Union[str, float, None] = "same") -> MoE:
    """A copy of ``layer`` without some experts (Lu et al. 2024, "Not All Experts are Equal: Efficient Expert
    Pruning and Skipping for Mixture-of-Experts Large Language Models": drop the experts a criterion ranks last,
    e.g. :func:`expert_importance`, then keep serving).

    ``keep`` (or ``drop``, exactly one of them): expert ids, a sequence or a 1-d tensor. The new :class:`MoE` has
    ``len(keep)`` experts in the order of ``keep`` and every other option of ``layer``; the router keeps the rows of
    the kept experts (``weight``, and ``noise_weight`` / the sigmoid router's ``expert_bias``), so its softmax is
    renormalised over them. Shared experts and their gate are copied. A fine-grained layer
    (``expert_granularity`` g) comes back with granularity 1 and its fine-grained experts, width and top_k.

    What stays equal: an expert the router never picks can be dropped without changing any token's choices; with
    normalised weights (the default for top_k > 1, and the sigmoid router) the outputs are then unchanged up to
    rounding. Un-normalised softmax weights grow by the pruned expert's share of the softmax. Capacity mode:
    C = ceil(factor · T · k / E) grows as E shrinks, which would keep tokens the original dropped;
    ``capacity_factor="same"`` (default) scales the factor by E'/E so that every expert keeps its C slots and
    drops exactly what it dropped before. Pass a number (or None for dropless) to choose another.

    Raises ValueError for ids out of range or repeated, for keeping fewer experts than top_k, for group-limited
    routing (n_groups > 1; the groups would no longer be equal), hash routing (its table names experts by id) and
    expert-parallel or PEFT-wrapped layers.
    """
    layer = _check_layer(layer, "prune_experts")
    num_experts = layer.num_experts
    if (keep is None) == (drop is None):
        raise ValueError("prune_experts: pass exactly one of keep= and drop= (expert ids)")
    if keep is not None:
        kept = _expert_indices(keep, num_experts, "keep", "prune_experts")
    else:
        dropped = set(_expert_indices(drop, num_experts, "drop", "prune_experts"))
        kept = [e for e in range(num_experts) if e not in dropped]
    if not kept:
        raise ValueError(f"prune_experts: no expert would be left of {num_experts}")
    if layer.top_k > len(kept):
        raise ValueError(f"prune_experts: the layer routes each token to top_k={layer.top_k} experts; keeping "
                         f"{len(kept)} cannot serve that (keep at least {layer.top_k})")
    if layer.router_name == "hash":
        raise ValueError("prune_experts: router='hash' maps token ids to expert ids through a fixed table; pruning "
                         "would leave tokens with no expert")
    if layer.router_name in ("dselect_k", "hierarchical"):
        raise ValueError(f"prune_experts: router={layer.router_name!r} is not supported: its parameters are not one "
                         "row per expert (binary codes of the expert ids; a gate per expert group)")
    if getattr(layer.router, "n_groups", 1) > 1:
        raise ValueError(f"prune_experts: the layer uses group-limited routing (n_groups={layer.router.n_groups}); "
                         "its equal expert groups would not survive pruning")
    kwargs = _moe_kwargs(layer, len(kept))
    if capacity_factor == "same":
        kwargs["capacity_factor"] = _same_slots_factor(layer, len(kept))
    elif capacity_factor is not None and not isinstance(capacity_factor, (int, float)):
        raise ValueError(f"prune_experts: capacity_factor must be 'same', a number or None, got {capacity_factor!r}")
    else:
        kwargs["capacity_factor"] = capacity_factor
    pruned = MoE(**kwargs)
    index = torch.tensor(kept, dtype=torch.int64)
    with torch.no_grad():
        for name, tensor in layer.experts.state_dict().items():
            getattr(pruned.experts, name).copy_(tensor[index.to(tensor.device)])
        router_state = {}
        for name, tensor in layer.router.state_dict().items():
            # Every per-expert router tensor leads with E (weight, noise_weight, expert_bias).
            router_state[name] = tensor[index.to(tensor.device)] if tensor.dim() and tensor.shape[0] == num_experts \
                else tensor
        pruned.router.load_state_dict(router_state)
    _copy_shared(layer, pruned)
    return pruned.train(layer.training)


# --------------------------------------------------------------------------------------------------
# merging


@torch.no_grad()
def linear_assignment(score: Tensor) -> Tensor:
    """The permutation ``perm`` [n] maximising ``sum_i score[i, perm[i]]`` of a square score [n, n] (the Hungarian
    method with potentials, O(n³); Kuhn 1955, in the shortest-augmenting-path form). Runs in float64 on the CPU,
    vectorised over columns: n² steps of O(n) tensor work, seconds for n in the low thousands. Ties go to the lower
    column."""
    if score.dim() != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"linear_assignment: score must be a square matrix, got shape {tuple(score.shape)}")
    n = score.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    cost = -score.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(cost).all():
        raise ValueError("linear_assignment: score must be finite")
    inf = float("inf")
    # 1-based rows and columns, column 0 a virtual start, as in the textbook form.
    u = torch.zeros(n + 1, dtype=torch.float64)
    v = torch.zeros(n + 1, dtype=torch.float64)
    row_of_col = torch.zeros(n + 1, dtype=torch.int64)
    way = torch.zeros(n + 1, dtype=torch.int64)
    padded = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    padded[1:, 1:] = cost
    for row in range(1, n + 1):
        row_of_col[0] = row
        col0 = 0
        min_to = torch.full((n + 1,), inf, dtype=torch.float64)
        used = torch.zeros(n + 1, dtype=torch.bool)
        while True:
            used[col0] = True
            r0 = int(row_of_col[col0])
            reduced = padded[r0] - u[r0] - v
            better = (~used) & (reduced < min_to)
            min_to = torch.where(better, reduced, min_to)
            way = torch.where(better, torch.full_like(way, col0), way)
            candidates = torch.where(used, torch.full_like(min_to, inf), min_to)
            candidates[0] = inf
            col1 = int(torch.argmin(candidates))
            delta = candidates[col1]
            u[row_of_col[used]] += delta  # the rows matched to used columns are distinct
            v = torch.where(used, v - delta, v)
            min_to = torch.where(used, min_to, min_to - delta)
            col0 = col1
            if int(row_of_col[col0]) == 0:
                break
        while True:
            col1 = int(way[col0])
            row_of_col[col0] = row_of_col[col1]
            col0 = col1
            if col0 == 0:
                break
    perm = torch.empty(n, dtype=torch.int64)
    perm[row_of_col[1:] - 1] = torch.arange(n)
    return perm


def _hidden_unit_features(experts, e: int) -> Tensor:
    """[d_ff, n]: what each hidden unit of expert e reads and writes (its w1 and w3 columns, w2 row, b1 and b3
    entries): two units match when these correlate."""
    parts = [experts.w1[e].t(), experts.w2[e]]
    if experts.w3 is not None:
        parts.append(experts.w3[e].t())
    for bias in (experts.b1, experts.b3):
        if bias is not None:
            parts.append(bias[e].unsqueeze(1))
    return torch.cat(parts, dim=1).to(torch.float64)


def _alignment(experts, anchor: int, member: int) -> Tensor:
    """perm [d_ff]: hidden unit perm[i] of ``member`` plays unit i of ``anchor`` (weight matching, Ainsworth et al.
    2023 "Git Re-Basin", as M-SMoE aligns experts before merging)."""
    if anchor == member:
        return torch.arange(experts.w1.shape[2])
    score = _hidden_unit_features(experts, anchor) @ _hidden_unit_features(experts, member).t()
    return linear_assignment(score)


def _groups_from(groups, num_experts: int) -> list[list[int]]:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(f"merge_experts: groups must be a sequence of sequences of expert ids, got "
                         f"{type(groups).__name__}")
    out = [_expert_indices(g, num_experts, f"groups[{i}]", "merge_experts") for i, g in enumerate(groups)]
    flat = sorted(e for g in out for e in g)
    if any(not g for g in out) or flat != list(range(num_experts)):
        raise ValueError(f"merge_experts: groups must partition the experts 0..{num_experts - 1} into non-empty "
                         f"groups (each expert in exactly one), got {[list(g) for g in out]}")
    return out


def _similarity(layer: MoE, similarity: str, tokens: list[Tensor]) -> Tensor:
    """[E, E] cosine similarity of the experts: of their router-logit columns over the tokens (M-SMoE's default),
    or of their outputs on the tokens (:func:`torch_moe.diagnostics.expert_output_similarity`)."""
    if similarity == "output":
        return expert_output_similarity(layer, torch.cat(tokens))
    logits = torch.cat([_route(layer, t).logits for t in tokens]).to(torch.float64)  # [T, E]
    columns = logits.t()
    unit = columns / columns.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return unit @ unit.t()


def _group_by_dominant(similarity: Tensor, frequencies: Tensor, num_groups: int) -> list[list[int]]:
    """M-SMoE's grouping: the ``num_groups`` most used experts lead a group each (ties to the lower id); every other
    expert joins the leader it is most similar to."""
    order = sorted(range(len(frequencies)), key=lambda e: (-float(frequencies[e]), e))
    leaders = order[:num_groups]
    groups = {leader: [leader] for leader in leaders}
    for e in order[num_groups:]:
        best = max(leaders, key=lambda lead: (float(similarity[e, lead]), -lead))
        groups[best].append(e)
    return [sorted(groups[lead]) for lead in sorted(leaders)]


class MergedRouter(RouterBase):
    """The router of a merged layer (M-SMoE, Li et al. 2024): the original router over the E original experts,
    each choice redirected to its group's merged expert by ``expert_map`` [E] -> [0, G).

    Why keep the original router: merging changes the experts, not who a token trusts; M-SMoE keeps the routing
    decisions and sends a token to the merged expert of each expert it chose. Two choices in one group reach the
    same merged expert twice, with their weights summed by the combine. A softmax over G merged-router rows could
    not reproduce this (the group probability is the sum of member probabilities, a logsumexp of logits, not a
    linear function of x). The losses and ``scores`` see group logits logsumexp(member logits) [T, G], whose
    softmax is the summed member probabilities. The sigmoid router's balancing bias stays frozen.

    Submodule ``router`` (the original), buffer ``expert_map`` [E] int64.
    """

    def __init__(self, router: nn.Module, expert_map: Tensor, num_groups: int) -> None:
        super().__init__()
        self.router = router
        self.name = router.name
        self.num_experts = num_groups
        self.top_k = router.top_k
        self.register_buffer("expert_map", expert_map.to(torch.int64))
        members = torch.full((num_groups, expert_map.numel()), float("-inf"))
        members[expert_map, torch.arange(expert_map.numel())] = 0.0
        self.register_buffer("_member_mask", members, persistent=False)  # [G, E]: 0 for members, -inf elsewhere

    def forward(self, x: Tensor, *, token_ids: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Routing:
        routing = self.router(x, token_ids=token_ids, valid=valid)
        mask = self._member_mask.to(routing.logits.dtype)
        group_logits = torch.logsumexp(routing.logits.unsqueeze(1) + mask, dim=2)  # [T, G]
        return Routing(group_logits, routing.weights, self.expert_map[routing.expert_ids],
                       torch.softmax(group_logits.detach(), dim=-1))

    def balance_losses(self, routing: Routing, valid: Optional[Tensor]) -> ops.RouterLosses:
        return ops.router_losses(routing.logits, routing.expert_ids, valid)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_experts}, expert_map={self.expert_map.tolist()}"


def merge_experts(layer: MoE, num_groups: Optional[int] = None, *, groups=None, similarity: str = "router_logits",
                  batches: Optional[Batches] = None, frequencies: Optional[Tensor] = None) -> MoE:
    """A copy of ``layer`` with its experts merged into G (M-SMoE: Li et al. 2024, "Merge, Then Compress: Demystify
    Efficient SMoE with Hints from Its Routing Policy").

    Grouping: ``groups`` (a partition of the expert ids, e.g. ``[[0, 3], [1], [2]]``), or ``num_groups`` G, in which
    case the G most used experts (``frequencies``, else :func:`expert_importance` on ``batches``) lead a group each
    and every other expert joins the leader it is most similar to: ``similarity="router_logits"`` (cosine of the
    experts' router-logit columns over ``batches``, M-SMoE's choice) or ``"output"`` (cosine of their outputs on
    ``batches``).

    Merging: in each group, every member's d_ff hidden units are first permuted to match the group's most used
    member (weight matching: a linear assignment maximising the correlation of the units' w1 / w3 columns, w2 rows
    and biases, :func:`linear_assignment`; a permutation of hidden units leaves an expert's function unchanged).
    The merged expert is then the frequency-weighted average of the aligned members (uniform where a group's
    frequencies are all 0). ``frequencies`` [E]: as from :func:`expert_importance`, or from ``batches``.

    Routing: the returned :class:`MoE` has G experts and a :class:`MergedRouter`, the original router whose choices
    go to their group's merged expert (see there why). Capacity mode: C = ceil(factor · T · k / G), so a merged expert
    has the slots of its members together. Needs G >= top_k (a token may pick k members of one group).

    Raises ValueError for a grouping that is not a partition, G out of [top_k, E], an unknown ``similarity``,
    missing ``batches``, expert choice / hash / random / noisy top-k routers (M-SMoE's redirect is defined for
    token-choice routers with logits; noisy top-k's load loss would need the ungrouped noise), and
    expert-parallel or PEFT-wrapped layers.
    """
    layer = _check_layer(layer, "merge_experts")
    num_experts = layer.num_experts
    if layer.router_name not in ("softmax", "sigmoid"):
        raise ValueError(f"merge_experts: router={layer.router_name!r} is not supported; M-SMoE's redirect of the "
                         "router's choices is defined here for the 'softmax' and 'sigmoid' token-choice routers")
    if similarity not in SIMILARITIES:
        raise ValueError(f"merge_experts: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if (groups is None) == (num_groups is None):
        raise ValueError("merge_experts: pass exactly one of num_groups= and groups=")
    if frequencies is not None:
        if (not isinstance(frequencies, Tensor) or frequencies.shape != (num_experts,)
                or frequencies.dtype == torch.bool or frequencies.is_complex()):
            raise ValueError(f"merge_experts: frequencies must be a tensor [E={num_experts}], got "
                             f"{getattr(frequencies, 'shape', type(frequencies).__name__)}")
        frequencies = frequencies.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(frequencies).all() or (frequencies < 0).any():
            raise ValueError("merge_experts: frequencies must be finite and >= 0")
    tokens = None if batches is None else _batches(batches, layer.d_model, "merge_experts")
    if frequencies is None:
        if tokens is None:
            raise ValueError("merge_experts: the merge weights need frequencies= or batches= to count them on")
        frequencies = expert_importance(layer, tokens, "frequency").cpu()
    if groups is not None:
        grouping = _groups_from(groups, num_experts)
    else:
        if not is_int(num_groups) or not 1 <= num_groups <= num_experts:
            raise ValueError(f"merge_experts: num_groups must be an int in [1, num_experts={num_experts}], got "
                             f"{num_groups!r}")
        if tokens is None:
            raise ValueError("merge_experts: grouping by similarity needs batches= (tokens [..., d_model])")
        grouping = _group_by_dominant(_similarity(layer, similarity, tokens).cpu(), frequencies, num_groups)
    num_merged = len(grouping)
    if num_merged < layer.top_k:
        raise ValueError(f"merge_experts: {num_merged} groups cannot serve top_k={layer.top_k} (a token may choose "
                         f"{layer.top_k} members of one group; keep at least top_k groups)")

    kwargs = _moe_kwargs(layer, num_merged)
    # The router options belong to the original router, which the merged layer keeps whole (MergedRouter).
    for option in ("router", *(f.name for f in dataclasses.fields(RouterOptions) if f.name != "normalize_weights")):
        kwargs.pop(option, None)
    merged = MoE(**kwargs)
    experts = layer.experts
    expert_map = torch.empty(num_experts, dtype=torch.int64)
    with torch.no_grad():
        for g, members in enumerate(grouping):
            expert_map[members] = g
            weights = frequencies[members]
            weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1.0 / len(members))
            anchor = max(members, key=lambda e: (float(frequencies[e]), -e))
            perms = {member: _alignment(experts, anchor, member).to(experts.w1.device) for member in members}
            for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
                source = getattr(experts, name)
                if source is None:
                    continue
                total = torch.zeros(source.shape[1:], dtype=torch.float64, device=source.device)
                for member, weight in zip(members, weights.tolist()):
                    perm = perms[member]
                    value = source[member].to(torch.float64)
                    # Hidden units are w1/w3's columns, w2's rows, b1/b3's entries; b2 has none.
                    value = {"w1": lambda v: v[:, perm], "w3": lambda v: v[:, perm], "w2": lambda v: v[perm],
                             "b1": lambda v: v[perm], "b3": lambda v: v[perm], "b2": lambda v: v}[name](value)
                    total += weight * value
                getattr(merged.experts, name)[g].copy_(total)
    merged.router = MergedRouter(copy.deepcopy(layer.router), expert_map.to(experts.w1.device), num_merged)
    merged.router_name = layer.router_name
    _copy_shared(layer, merged)
    return merged.train(layer.training)

