"""Bit-level fingerprints of MoE / SoftMoE forwards and backwards over a fixed set of configurations.

For refactors that must not change behaviour: record on the commit before the change, compare after it.

    python tools/layer_checksums.py record tools/layer_checksums.txt
    python tools/layer_checksums.py compare tools/layer_checksums.txt

Each case builds a layer from a fixed seed, runs two training steps (forward, aux loss, backward) and one eval
forward, and hashes the raw bytes of the outputs, the input and parameter gradients, the aux loss, every stats
tensor and every buffer. Fingerprints depend on the CPU's vector ISA and the torch build, so compare on the machine
that recorded them (the file's header names it); they are a tool, not a test.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile

import torch
import torch.distributed as dist

import torch_moe

D, F, E = 16, 32, 8

CASES = {
    "softmax-capacity-position": dict(top_k=2),
    "softmax-capacity-probability": dict(top_k=2, drop_policy="probability", capacity_factor=0.5, min_capacity=1),
    "softmax-dropless": dict(top_k=2, capacity_factor=None),
    "softmax-top1-unnormalised": dict(top_k=1, normalize_weights=False, capacity_factor=0.75, min_capacity=1),
    "softmax-groups": dict(top_k=2, n_groups=4, topk_groups=2, capacity_factor=None),
    "softmax-jitter": dict(top_k=2, jitter_eps=0.1),
    "softmax-importance-seq": dict(top_k=2, importance_loss_coef=0.1, seq_balance_loss_coef=0.1),
    "noisy-topk-losses": dict(top_k=2, router="noisy_topk", importance_loss_coef=0.1, load_loss_coef=0.1),
    "noisy-topk-dropless": dict(top_k=2, router="noisy_topk", capacity_factor=None),
    "expert-choice": dict(top_k=2, router="expert_choice", capacity_factor=1.0, importance_loss_coef=0.1),
    "sigmoid-bias-groups": dict(top_k=2, router="sigmoid", bias_update_rate=0.05, n_groups=4, topk_groups=2),
    "sigmoid-dropless": dict(top_k=2, router="sigmoid", capacity_factor=None, seq_balance_loss_coef=0.1),
    "hash": dict(top_k=2, router="hash"),
    "hash-dropless": dict(top_k=2, router="hash", capacity_factor=None),
    "random": dict(top_k=2, router="random", capacity_factor=None),
    "mlp-bias-dropless": dict(top_k=2, expert="mlp", activation="gelu_tanh", bias=True, capacity_factor=None),
    "geglu-bias-capacity": dict(top_k=2, expert="geglu", bias=True),
    "shared-fine-grained": dict(top_k=1, num_shared_experts=1, expert_granularity=2, capacity_factor=None),
    "shared-capacity": dict(top_k=2, num_shared_experts=2),
    "z-and-aux-coefs": dict(top_k=3, aux_loss_coef=0.3, z_loss_coef=0.2, capacity_factor=2.0),
}
# Expert parallelism over a one-rank gloo group: the exchange path with trivial collectives.
PARALLEL_CASES = {
    "ep1-capacity": dict(top_k=2),
    "ep1-dropless": dict(top_k=2, capacity_factor=None),
    "ep1-sigmoid-global": dict(top_k=2, router="sigmoid", bias_update_rate=0.05, global_load_balancing=True),
}


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _stats(layer):
    stats = layer.stats
    values = [stats.tokens_per_expert, stats.dropped_fraction, stats.router_entropy, stats.load_balancing_loss,
              stats.z_loss, stats.unrouted_fraction]
    values += [stats.losses[name] for name in sorted(stats.losses)]
    return values


def run_case(name: str, config: dict, group=None) -> str:
    torch.manual_seed(1234)
    kwargs = dict(config)
    if group is not None:
        kwargs["expert_parallel_group"] = group
    layer = torch_moe.MoE(D, F, E, dtype=torch.float32, **kwargs)
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(3, 10, D, generator=gen)
    token_ids = torch.randint(0, 50, (3, 10), generator=gen)
    padding = torch.ones(3, 10, dtype=torch.bool)
    padding[1, 7:] = False
    padding[2, 2] = False
    x[1, 8] = float("nan")  # padding rows may hold anything
    parts = []
    layer.train()
    for step in range(2):
        xs = x.clone().requires_grad_()
        y = layer(xs, padding, token_ids=token_ids)
        loss = (y.square() * torch.linspace(0.5, 1.5, D)).sum() + layer.aux_loss
        loss.backward()
        parts.append(_digest([y, xs.grad, layer.aux_loss] + _stats(layer)))
        parts.append(_digest([p.grad for _, p in sorted(layer.named_parameters())]))
        parts.append(_digest([b for _, b in sorted(layer.named_buffers())]))
        with torch.no_grad():
            for p in layer.parameters():
                p.sub_(0.01 * p.grad)
                p.grad = None
    layer.eval()
    with torch.no_grad():
        y = layer(x, padding, token_ids=token_ids)
    parts.append(_digest([y] + _stats(layer)))
    return _digest([]) if not parts else hashlib.sha256("".join(parts).encode()).hexdigest()[:32]


def run_soft_moe() -> str:
    torch.manual_seed(7)
    layer = torch_moe.SoftMoE(D, F, 4, slots_per_expert=2)
    x = torch.randn(2, 6, D, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    return _digest([y, x.grad] + [p.grad for _, p in sorted(layer.named_parameters())])


def all_fingerprints() -> dict[str, str]:
    out = {name: run_case(name, config) for name, config in CASES.items()}
    out["soft-moe"] = run_soft_moe()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            group = dist.new_group([0])
            for name, config in PARALLEL_CASES.items():
                out[name] = run_case(name, config, group)
        finally:
            dist.destroy_process_group()
    return out


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    fingerprints = all_fingerprints()
    if mode == "record":
        with open(path, "w") as f:
            f.write(f"# {platform.machine()} {platform.processor()} torch {torch.__version__}; "
                    f"cpu capability {torch.backends.cpu.get_cpu_capability()}\n")
            for name, value in fingerprints.items():
                f.write(f"{name} {value}\n")
        print(f"recorded {len(fingerprints)} fingerprints in {path}")
        return 0
    recorded = dict(line.split() for line in open(path) if not line.startswith("#"))
    differ = [name for name in recorded if fingerprints.get(name) != recorded[name]]
    missing = sorted(set(fingerprints) - set(recorded))
    for name in differ:
        print(f"DIFFERS {name}: recorded {recorded[name]}, now {fingerprints.get(name)}")
    print(f"{len(recorded) - len(differ)} of {len(recorded)} fingerprints identical"
          + (f"; not recorded: {missing}" if missing else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
