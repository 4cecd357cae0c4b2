"""Expert parallelism on CPU: ``torchrun --nproc-per-node 2 examples/expert_parallel.py`` (gloo, about 15 s on 2 cores).

Every rank holds E/W experts of each MoE layer and trains on batches of its own. DDP averages the replicated
parameters (embedding, routers, norm, head) and is told to leave the expert shards alone; the shards get their
gradients through the all-to-all exchange, summed over the ranks, and are divided by W to match DDP's mean.
At the end the shards are gathered into the single-process checkpoint, which a model built without expert
parallelism loads and runs: its outputs equal the expert-parallel ones.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import torch_moe
from torch_moe import parallel


class TokenModel(nn.Module):
    """Embedding -> MoE (capacity mode) -> MoE (dropless) -> head, residual around each MoE."""

    def __init__(self, vocab: int, d_model: int, num_experts: int, group=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.moe_capacity = torch_moe.MoE(d_model, 2 * d_model, num_experts, top_k=2, capacity_factor=1.25,
                                          expert_parallel_group=group)
        self.moe_dropless = torch_moe.MoE(d_model, 2 * d_model, num_experts, top_k=2, capacity_factor=None,
                                          expert_parallel_group=group)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe_capacity(h)
        h = h + self.moe_dropless(h)
        return self.head(self.norm(h))


def batch(vocab: int, rows: int, length: int, generator: torch.Generator):
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    return ids, (ids * 7 + 3) % vocab  # a fixed permutation of the vocabulary to learn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    group = dist.group.WORLD  # experts sharded over every rank; any subgroup whose size divides E works too
    vocab, d_model = 64, 32

    torch.manual_seed(0)  # the same seed everywhere: the replicated parameters start equal (the experts do not)
    model = TokenModel(vocab, d_model, args.experts, group)
    expert_names = parallel.expert_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
    ddp = nn.parallel.DistributedDataParallel(model)
    expert_params = [p for name, p in model.named_parameters() if name in set(expert_names)]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    if rank == 0:
        local = model.moe_capacity.experts.w1.shape[0]
        print(f"{world_size} ranks, {args.experts} experts per layer, {local} on each rank; "
              f"{len(expert_names)} expert-parallel parameters, the rest replicated under DDP")

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    for step in range(args.steps + 1):
        ids, target = batch(vocab, 8, 32, data)
        logits = ddp(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (loss + torch_moe.aux_loss(model)).backward()
        for p in expert_params:  # summed over the ranks by the exchange; DDP averages the rest
            p.grad.div_(world_size)
        optimizer.step()
        if step % 20 == 0:
            stats = torch.stack([loss.detach(), (logits.argmax(-1) == target).float().mean(),
                                 model.moe_capacity.stats.dropped_fraction.float()])
            dist.all_reduce(stats)
            stats /= world_size
            if rank == 0:
                print(f"step {step:3d}  loss {stats[0]:.3f}  accuracy {stats[1]:.3f}  "
                      f"dropped (capacity layer) {stats[2]:.3f}")

    # The replicated parameters are still equal on every rank (DDP), the expert shards differ.
    router = model.moe_capacity.router.weight.detach()
    routers = [torch.empty_like(router) for _ in range(world_size)]
    dist.all_gather(routers, router)
    assert all(torch.equal(r, router) for r in routers), "router replicas diverged"

    # Checkpoint: the single-process state_dict, gathered on every rank (a collective); rank 0 writes it.
    state = parallel.full_state_dict(model)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "expert_parallel.pt")
        torch.save(state, path)
        print(f"saved the single-process checkpoint ({state['moe_capacity.experts.w1'].shape[0]} experts per layer) "
              f"to {path}")
    single = TokenModel(vocab, d_model, args.experts)  # no group: all experts in this process
    single.load_state_dict(state)
    model.eval()
    single.eval()
    ids, _ = batch(vocab, 4, 32, data)
    with torch.no_grad():
        difference = (model(ids) - single(ids)).abs().max()
    # And back: this rank's shard of the single-process checkpoint, for any group size dividing E.
    model.load_state_dict(parallel.shard_state_dict(state, model))
    worst = difference.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"single-process model from the checkpoint vs the expert-parallel model: max |difference| {worst:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
