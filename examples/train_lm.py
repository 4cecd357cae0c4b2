"""Train the same small character-level Transformer LM twice, with dense SwiGLU FFNs and with torch_moe.MoE FFNs.

The corpus is the Python standard library's own ``.py`` sources (every Python install ships them, nothing is
downloaded). Both runs share the seed, the initialisation order and the exact sequence of batches.

Two comparisons (``--compare``):

- ``flops`` (default), the standard one (Switch Transformer): every expert is as wide as the dense FFN
  (``d_ff``) and each token goes to ``top_k`` = 1 expert, so the FLOPs per token match the dense model while the
  MoE holds E times the FFN parameters. (``--top-k 2`` doubles the FFN FLOPs; the output says so.)
- ``active-params``: ``top_k`` (default 2) experts of width ``d_ff / top_k`` per token, so the active FFN
  parameters and FLOPs per token match the dense model and the MoE holds E / top_k times the FFN parameters.

The script prints both validation losses against step and against training wall time (evaluation excluded),
the MoE layers' expert utilisation and drops, and writes a PNG with the loss curves (per step and per second)
and a layer x expert utilisation heat map.

    python examples/train_lm.py                 # defaults: about 5 minutes on 2 CPU cores
    python examples/train_lm.py --steps 5       # smoke test
    python examples/train_lm.py --compare active-params
    python examples/train_lm.py --experts 16 --capacity-factor none
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import torch_moe

# A fixed vocabulary keeps token ids independent of which files were read: tab, newline and printable ASCII;
# everything else (non-ASCII, form feeds, carriage returns) becomes "?".
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN_ID = VOCAB.index("?")


# ----------------------------------------------------------------------------------------------- data


def stdlib_sources(val_every: int = 10) -> tuple[list[Path], list[Path]]:
    """The top-level ``.py`` files of the standard library, sorted by name; every ``val_every``-th goes to validation.

    Splitting by file (not by position in one long string) keeps whole modules out of training.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if len(files) < val_every:
        raise RuntimeError(f"found only {len(files)} .py files under {stdlib}; is the standard library installed?")
    train_files = [p for i, p in enumerate(files) if i % val_every != val_every - 1]
    val_files = [p for i, p in enumerate(files) if i % val_every == val_every - 1]
    return train_files, val_files


def encode_files(files: list[Path]) -> torch.Tensor:
    """Concatenate the files (each followed by a blank line) into a 1-D int64 tensor of VOCAB ids."""
    return encode_text("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files))


def encode_text(text: str) -> torch.Tensor:
    """text -> a 1-D int64 tensor of VOCAB ids (characters outside VOCAB become "?")."""
    raw = torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8).long()
    byte_to_id = torch.full((256,), UNKNOWN_ID, dtype=torch.long)
    for token_id, ch in enumerate(VOCAB):
        byte_to_id[ord(ch)] = token_id
    return byte_to_id[raw]


def unigram_entropy(train_ids: torch.Tensor, val_ids: torch.Tensor) -> float:
    """Cross-entropy in nats of the validation text under the training text's character frequencies."""
    counts = torch.bincount(train_ids, minlength=len(VOCAB)).double() + 1.0  # add-one: no infinite loss
    log_p = (counts / counts.sum()).log()
    return float(-log_p[val_ids].mean())


def sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows of ``ids``: x, y: [batch_size, seq_len] with y the next character of x."""
    starts = torch.randint(len(ids) - seq_len - 1, (batch_size,), generator=generator)
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(ids: torch.Tensor, num_batches: int, batch_size: int, seq_len: int):
    """Evenly spaced windows over all of ``ids``, the same for every evaluation and both models."""
    num_windows = num_batches * batch_size
    starts = torch.linspace(0, len(ids) - seq_len - 2, num_windows).long()
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)]
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


# ---------------------------------------------------------------------------------------------- model


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x), x: [..., d_model]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads)
        self.ffn_norm = nn.RMSNorm(d_model)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class CharLM(nn.Module):
    """Pre-norm decoder-only Transformer with learned positions and a tied output head; idx: [B, S] -> [B, S, V]."""

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, seq_len: int, make_ffn):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, make_ffn()) for _ in range(num_layers))
        self.norm = nn.RMSNorm(d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tok_emb.weight.t()


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch_moe.MoE)]


def count_params(model: nn.Module, top_k: int, num_experts: int) -> tuple[int, int]:
    """(total, active per token): an expert's weights count top_k / num_experts toward the active total."""
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for m in moe_layers(model)
                        for name, p in m.named_parameters() if name.startswith("experts."))
    return total, total - expert_params + expert_params * top_k // max(num_experts, 1)


# ------------------------------------------------------------------------------------------- training


@dataclass
class RunResult:
    name: str
    train_loss: list[float]  # cross-entropy per step (the aux loss is not included)
    val_steps: list[int]
    val_loss: list[float]
    val_times_s: list[float]  # training wall time (evaluation excluded) at each validation point
    wall_time_s: float
    total_params: int
    active_params: int
    # MoE only: per layer, summed over training steps
    tokens_per_expert: Optional[torch.Tensor] = None  # [L, E] int64, assignments before dropping
    dropped_fraction_mean: Optional[torch.Tensor] = None  # [L], mean over steps
    dropped_fraction_last: Optional[torch.Tensor] = None  # [L], last training step


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()))
    model.train()
    return float(torch.stack(losses).mean())


def lr_at(step: int, steps: int, peak_lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(name: str, model: nn.Module, args, train_ids, val_batches, device: torch.device) -> RunResult:
    moes = moe_layers(model)
    total_params, active_params = count_params(model, args.top_k, args.experts if moes else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data_generator = torch.Generator().manual_seed(args.seed)  # identical batch sequence for every model

    # Statistics stay on the device as tensors and are summed without a host sync; read once at the end.
    train_loss = torch.zeros(args.steps, device=device)
    tokens_per_expert = torch.zeros(len(moes), args.experts, dtype=torch.long, device=device)
    dropped_fraction_sum = torch.zeros(len(moes), device=device)
    val_steps, val_loss, val_times_s = [], [], []
    eval_time_s = 0.0  # excluded from the training wall time: both models evaluate the same batches

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synchronize()
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"{name:>5}", dynamic_ncols=True)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        x, y = sample_batch(train_ids, args.batch_size, args.seq_len, data_generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss = ce + torch_moe.aux_loss(model) if moes else ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        train_loss[step] = ce.detach()
        for i, layer in enumerate(moes):
            tokens_per_expert[i] += layer.stats.tokens_per_expert
            dropped_fraction_sum[i] += layer.stats.dropped_fraction.detach()

        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            synchronize()
            eval_start = time.perf_counter()
            val_times_s.append(eval_start - start - eval_time_s)
            val_steps.append(step + 1)
            val_loss.append(evaluate(model, val_batches, device))
            eval_time_s += time.perf_counter() - eval_start
            recent = train_loss[max(0, step + 1 - args.eval_every) : step + 1].mean()
            progress.set_postfix(train=f"{recent:.3f}", val=f"{val_loss[-1]:.3f}")
    synchronize()
    wall_time_s = time.perf_counter() - start - eval_time_s
    progress.close()

    result = RunResult(name, train_loss.cpu().tolist(), val_steps, val_loss, val_times_s, wall_time_s, total_params,
                       active_params)
    if moes:
        result.tokens_per_expert = tokens_per_expert.cpu()
        result.dropped_fraction_mean = (dropped_fraction_sum / args.steps).cpu()
        result.dropped_fraction_last = torch.stack([m.stats.dropped_fraction.detach() for m in moes]).cpu()
    return result


# ------------------------------------------------------------------------------------------- reporting


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so the first points are averages of what exists so far."""
    out, running = [], 0.0
    for i, v in enumerate(values):
        running += v
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def plot(results: list[RunResult], args, unigram: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = results[1]
    fig, (ax_loss, ax_time, ax_util) = plt.subplots(1, 3, figsize=(18, 4.8),
                                                    gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for result, color in zip(results, ("tab:blue", "tab:orange")):
        steps = range(1, len(result.train_loss) + 1)
        window = max(1, len(result.train_loss) // 50)
        ax_loss.plot(steps, smooth(result.train_loss, window), color=color, alpha=0.55, lw=1,
                     label=f"{result.name} train")
        ax_loss.plot(result.val_steps, result.val_loss, "o-", color=color, ms=3,
                     label=f"{result.name} val ({result.val_loss[-1]:.3f})")
    ax_loss.axhline(unigram, color="gray", ls=":", lw=1, label=f"unigram entropy ({unigram:.2f})")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats / char)", title="Loss")
    ax_loss.set_ylim(top=unigram + 0.5)
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    for result, color in zip(results, ("tab:blue", "tab:orange")):
        ax_time.plot(result.val_times_s, result.val_loss, "o-", color=color, ms=3, label=f"{result.name} val")
    ax_time.axhline(unigram, color="gray", ls=":", lw=1)
    ax_time.set(xlabel="training wall time (s, evaluation excluded)", ylabel="validation cross-entropy",
                title="Validation loss against wall time")
    ax_time.set_ylim(top=unigram + 0.5)
    ax_time.legend(fontsize=8)
    ax_time.grid(alpha=0.3)

    counts = moe.tokens_per_expert.double()
    fraction = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    num_layers, num_experts = fraction.shape
    image = ax_util.imshow(fraction.numpy(), aspect="auto", cmap="viridis", vmin=0)
    if num_experts <= 16 and num_layers <= 12:
        for layer in range(num_layers):
            for expert in range(num_experts):
                ax_util.text(expert, layer, f"{fraction[layer, expert]:.2f}", ha="center", va="center",
                             fontsize=7, color="white" if fraction[layer, expert] < fraction.max() * 0.6 else "black")
    ax_util.set(xlabel="expert", ylabel="layer", xticks=range(num_experts), yticks=range(num_layers),
                title=f"Share of routed tokens over training (uniform = {1 / num_experts:.3f})")
    fig.colorbar(image, ax=ax_util, fraction=0.046, pad=0.04)
    cf = "dropless" if args.capacity_factor is None else f"capacity factor {args.capacity_factor:g}"
    fig.suptitle(f"char LM on the stdlib: d_model {args.d_model}, {args.layers} layers; "
                 f"MoE {args.experts} experts of width {args.expert_d_ff}, top-{args.top_k}, {cf} "
                 f"({comparison_line(args)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_line(args) -> str:
    """What is held equal between the two models, in words."""
    if args.compare == "active-params":
        return (f"equal active parameters: {args.top_k} experts of width d_ff/{args.top_k} = {args.expert_d_ff} per "
                f"token, {args.experts // args.top_k}x the dense FFN parameters")
    flops = "equal FLOPs per token" if args.top_k == 1 else f"{args.top_k}x the dense FFN FLOPs per token"
    return (f"Switch-style, {flops}: experts as wide as the dense FFN ({args.expert_d_ff}), top-{args.top_k}, "
            f"{args.experts}x the dense FFN parameters")


def loss_at_time(result: RunResult, time_s: float) -> Optional[float]:
    """Validation loss of ``result`` at training wall time ``time_s``, linear between its validation points;
    ``None`` outside them (no extrapolation)."""
    times, losses = result.val_times_s, result.val_loss
    if not times or not times[0] <= time_s <= times[-1]:
        return None
    for (t0, l0), (t1, l1) in zip(zip(times, losses), zip(times[1:], losses[1:])):
        if t0 <= time_s <= t1:
            return l0 + (l1 - l0) * (time_s - t0) / max(t1 - t0, 1e-12)
    return losses[-1]


def common_times(results: list[RunResult], points: int = 4) -> list[float]:
    """``points`` training wall times where both curves have been measured (empty when they do not overlap)."""
    low = max(r.val_times_s[0] for r in results)
    high = min(r.val_times_s[-1] for r in results)
    if low > high:
        return []
    if points == 1 or high == low:
        return [high]
    return [low + (high - low) * i / (points - 1) for i in range(points)]


def print_table(results: list[RunResult]) -> None:
    dense, moe = results
    print("validation loss by step (t = training wall time, evaluation excluded):")
    print(f"  {'step':>6}  {'dense':>8} {'t (s)':>7}  {'moe':>8} {'t (s)':>7}  {'moe - dense':>11}")
    for i, step in enumerate(dense.val_steps):
        print(f"  {step:>6}  {dense.val_loss[i]:8.4f} {dense.val_times_s[i]:7.1f}  {moe.val_loss[i]:8.4f} "
              f"{moe.val_times_s[i]:7.1f}  {moe.val_loss[i] - dense.val_loss[i]:+11.4f}")
    times = common_times(results)
    if not times:
        print("validation loss at equal training wall time: the two runs' measured times do not overlap")
        return
    print("validation loss at equal training wall time (linear between validation points, where both measured; "
          "times are comparable only on an otherwise idle machine):")
    print(f"  {'t (s)':>7}  {'dense':>8}  {'moe':>8}  {'moe - dense':>11}")
    for t in times:
        d, m = loss_at_time(dense, t), loss_at_time(moe, t)
        print(f"  {t:7.1f}  {d:8.4f}  {m:8.4f}  {m - d:+11.4f}")


def verdict(results: list[RunResult], args) -> list[str]:
    """The result in plain words and, where MoE loses, the likely reasons read from this run."""
    dense, moe = results
    by_step = moe.val_loss[-1] - dense.val_loss[-1]
    lines = [f"moe - dense val loss after {args.steps} steps: {by_step:+.4f} ({comparison_line(args)})"]
    times = common_times(results, points=1)
    by_time = None
    if times:
        by_time = loss_at_time(moe, times[0]) - loss_at_time(dense, times[0])
        lines.append(f"moe - dense val loss at equal training wall time ({times[0]:.0f} s): {by_time:+.4f}")
    if by_step < 0:
        lines.append(f"MoE wins per step by {-by_step:.4f} nats/char ({comparison_line(args)}).")
    else:
        reasons = [f"each expert sees about top_k/E = {args.top_k}/{args.experts} of the tokens, so in {args.steps} "
                   "steps it gets that fraction of the updates a dense FFN gets; the extra capacity pays off only "
                   "when training is long enough to use it"]
        drop = float(moe.dropped_fraction_mean.mean())
        if drop > 0.01:
            reasons.append(f"{drop:.1%} of the assignments were dropped (capacity factor {args.capacity_factor}), "
                           "so those tokens skip the FFN")
        if args.compare == "active-params":
            reasons.append(f"at equal active parameters each expert is only d_ff/{args.top_k} wide")
        lines.append("MoE does not win per step here. Likely reasons: " + "; ".join(reasons) + ".")
    if by_time is not None and by_time > 0 and moe.wall_time_s > dense.wall_time_s:
        ratio = moe.wall_time_s / dense.wall_time_s
        lines.append(f"Per second of training MoE is behind: a step takes {ratio:.2f}x the dense step"
                     " (routing, dispatch and combine cost FLOPs and memory traffic that the equal-FLOPs "
                     "count leaves out, a large share at this small width on CPU).")
    return lines


def report(results: list[RunResult], args, unigram: float, total_time_s: float) -> None:
    dense, moe = results
    print()
    print(f"unigram entropy of the validation text: {unigram:.4f} nats/char")
    for r in results:
        print(f"{r.name:>5}: final val loss {r.val_loss[-1]:.4f}  wall time {r.wall_time_s:7.1f} s  "
              f"params {r.total_params / 1e6:.3f} M total, {r.active_params / 1e6:.3f} M active per token")
    print()
    print_table(results)
    print()
    for line in verdict(results, args):
        print(line)
    print()
    print("MoE layers, summed over training (assignments before dropping; uniform share = "
          f"{1 / args.experts:.3f}):")
    for layer, counts in enumerate(moe.tokens_per_expert):
        share = counts.double() / counts.sum().clamp_min(1)
        print(f"  layer {layer}: tokens per expert {counts.tolist()}")
        print(f"           share {[round(s, 3) for s in share.tolist()]}  max/mean {share.max() * len(share):.2f}")
        print(f"           dropped fraction: mean {moe.dropped_fraction_mean[layer]:.4f}, "
              f"last step {moe.dropped_fraction_last[layer]:.4f}")
    print()
    print(f"total run time {total_time_s:.1f} s")


# ---------------------------------------------------------------------------------------------- main


def parse_capacity_factor(text: str) -> Optional[float]:
    if text.lower() in ("none", "dropless"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"capacity factor must be > 0 or 'none', got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--compare", choices=("flops", "active-params"), default="flops",
                        help="flops: experts as wide as the dense FFN, top-1 (Switch, equal FLOPs per token); "
                             "active-params: top-k experts of width d_ff / top_k (equal active parameters)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per token (default: 1 with --compare flops, 2 with --compare active-params)")
    parser.add_argument("--capacity-factor", type=parse_capacity_factor, default=1.25,
                        help="expert capacity relative to an even split, or 'none' for dropless")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-ff", type=int, default=None, help="dense FFN width (default 4 * d_model)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                        help="directory for train_lm.png and train_lm.json")
    args = parser.parse_args(argv)
    if args.d_ff is None:
        args.d_ff = 4 * args.d_model
    if args.top_k is None:
        args.top_k = 1 if args.compare == "flops" else 2
    for name in ("steps", "experts", "top_k", "batch_size", "seq_len", "d_model", "layers", "eval_every",
                 "eval_batches", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        parser.error(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    if args.compare == "active-params" and args.d_ff % args.top_k:
        parser.error(f"--d-ff ({args.d_ff}) must be divisible by --top-k ({args.top_k}) to match active FLOPs")
    args.expert_d_ff = args.d_ff // args.top_k if args.compare == "active-params" else args.d_ff
    if args.d_model % args.head_dim:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --head-dim ({args.head_dim})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    train_files, val_files = stdlib_sources()
    train_ids, val_ids = encode_files(train_files), encode_files(val_files)
    unigram = unigram_entropy(train_ids, val_ids)
    val_batches = fixed_batches(val_ids, args.eval_batches, args.batch_size, args.seq_len)
    print(f"comparison: {comparison_line(args)}")
    print(f"data: {len(train_files)} train files ({len(train_ids):,} chars), {len(val_files)} val files "
          f"({len(val_ids):,} chars) from {sysconfig.get_paths()['stdlib']}; vocab {len(VOCAB)}; "
          f"torch threads {torch.get_num_threads()}")

    num_heads = args.d_model // args.head_dim
    ffns = {
        "dense": lambda: SwiGLU(args.d_model, args.d_ff),
        "moe": lambda: torch_moe.MoE(args.d_model, args.expert_d_ff, args.experts, top_k=args.top_k,
                                     capacity_factor=args.capacity_factor, expert="swiglu", device=device),
    }
    results = []
    for name, make_ffn in ffns.items():
        torch.manual_seed(args.seed)  # same initialisation stream for the shared (non-FFN) shapes
        model = CharLM(len(VOCAB), args.d_model, args.layers, num_heads, args.seq_len, make_ffn).to(device)
        results.append(train(name, model, args, train_ids, val_batches, device))
        del model

    total_time_s = time.perf_counter() - run_start
    report(results, args, unigram, total_time_s)

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "train_lm.png"
    plot(results, args, unigram, png)
    metrics = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "unigram_entropy": unigram,
        "total_time_s": total_time_s,
        "comparison": comparison_line(args),
        **{r.name: {"final_val_loss": r.val_loss[-1], "wall_time_s": r.wall_time_s, "val_steps": r.val_steps,
                    "val_loss": r.val_loss, "val_times_s": r.val_times_s, "total_params": r.total_params, "active_params": r.active_params}
           for r in results},
    }
    moe = results[1]
    metrics["moe"].update(tokens_per_expert=moe.tokens_per_expert.tolist(),
                          dropped_fraction_mean=moe.dropped_fraction_mean.tolist(),
                          dropped_fraction_last=moe.dropped_fraction_last.tolist())
    (args.out / "train_lm.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {png} and {args.out / 'train_lm.json'}")


if __name__ == "__main__":
    main()
