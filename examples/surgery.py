# %% [markdown]
# # Model surgery and parameter-efficient fine-tuning on a small Hugging Face model (CPU)
#
# A tiny Llama (built from a config, nothing is downloaded) is first pre-trained on one domain, the Python
# standard library's `.py` sources, then adapted to another, the English reference text of `pydoc_data` (also
# shipped with every Python), in three ways:
#
# 1. **plain LoRA** through PEFT on the dense FFN linears (`gate_proj`, `up_proj`, `down_proj`);
# 2. **MoLoRA** (`torch_moe.lora.molorafy`, Zadouri et al. 2023; Dou et al. 2024): the same linears, frozen, with
#    E routed low-rank experts each, at **exactly the same number of trainable parameters** as plain LoRA (the
#    LoRA ranks are chosen per linear to match, routers included);
# 3. an **upcycled MoE** (`torch_moe.moefy(..., upcycle=True)`): every FFN becomes E copies of itself behind a
#    router, briefly fine-tuned in full, then **pruned** (drop the least used experts, Lu et al. 2024) and
#    **merged** (group similar experts and average them, Li et al. 2024) with `torch_moe.surgery`; the loss is
#    reported after each step.
#
# Every run shares the seed, the initial weights and the batches. This notebook is generated from its twin
# `examples/surgery.py` (`python examples/notebook_twin.py examples/surgery.py`); `SURGERY_SIZE=tiny|small` picks
# the scale (`tiny` is what CI runs, just to prove every cell works; `small`, whose outputs are shown here, took 7
# to 17 minutes on 2 shared CPU cores).

# %%
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes PNGs; a notebook shows them inline
import matplotlib.pyplot as plt
import peft
import pydoc_data.topics
import torch
import torch.nn.functional as F
import transformers

import torch_moe
from torch_moe.lora import MoLoRALinear, molorafy

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
sys.path.insert(0, str(HERE))
import train_lm  # noqa: E402  (the character vocabulary and data helpers of the main example)

SIZES = {
    "tiny": dict(d_model=32, d_ff=64, layers=1, heads=2, seq_len=32, batch_size=4, pretrain_steps=3,
                 finetune_steps=3, eval_batches=1, lora_experts=6, lora_top_k=2, lora_rank=2, moe_experts=4,
                 moe_top_k=2, moe_steps=2, keep_experts=3, merged_experts=2),
    "small": dict(d_model=64, d_ff=128, layers=2, heads=4, seq_len=64, batch_size=16, pretrain_steps=300,
                  finetune_steps=150, eval_batches=8, lora_experts=6, lora_top_k=2, lora_rank=2, moe_experts=8,
                  moe_top_k=2, moe_steps=60, keep_experts=6, merged_experts=4),
}
SIZE = os.environ.get("SURGERY_SIZE", "small")
if SIZE not in SIZES:
    raise ValueError(f"SURGERY_SIZE must be one of {sorted(SIZES)}, got {SIZE!r}")
CFG = SIZES[SIZE]
OUT = Path(os.environ.get("SURGERY_OUT", HERE / "out" / "surgery"))
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(min(2, os.cpu_count() or 1))
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations between the peft and transformers versions
print(f"size={SIZE}: {CFG}; torch {torch.__version__}, transformers {transformers.__version__}, peft "
      f"{peft.__version__}; writing to {OUT}")

# %% [markdown]
# ## Data: code to pre-train on, prose to adapt to

# %%
code_files, _ = train_lm.stdlib_sources()
if SIZE == "tiny":
    code_files = code_files[:20]
code_ids = train_lm.encode_files(code_files)
topics = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
prose_train = train_lm.encode_text("\n\n".join(t for i, t in enumerate(topics) if i % 5 != 4))
prose_val = train_lm.encode_text("\n\n".join(t for i, t in enumerate(topics) if i % 5 == 4))
val_batches = train_lm.fixed_batches(prose_val, CFG["eval_batches"], CFG["batch_size"], CFG["seq_len"])
print(f"{len(code_ids):,} characters of code; {len(prose_train):,} / {len(prose_val):,} of prose "
      "(fine-tuning / validation)")

# %% [markdown]
# ## The dense model, pre-trained on code

# %%
def lm_loss(model, x, y):
    return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def val_loss(model):
    model.eval()
    loss = float(torch.stack([lm_loss(model, x, y) for x, y in val_batches]).mean())
    model.train()
    return loss


def train(model, ids, steps, params, lr, seed=1, with_aux=False):
    """AdamW on ``params`` over ``steps`` random windows of ``ids``; returns the training losses (floats, read once
    at the end so the loop never waits on a value)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train_lm.lr_at(step, steps, lr)
        x, y = train_lm.sample_batch(ids, CFG["batch_size"], CFG["seq_len"], generator)
        loss = lm_loss(model, x, y)
        losses.append(loss.detach())
        if with_aux:
            loss = loss + torch_moe.aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [float(v) for v in losses]


torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=len(train_lm.VOCAB), hidden_size=CFG["d_model"],
                                  intermediate_size=CFG["d_ff"], num_hidden_layers=CFG["layers"],
                                  num_attention_heads=CFG["heads"], num_key_value_heads=CFG["heads"],
                                  max_position_embeddings=CFG["seq_len"], tie_word_embeddings=True)
config._attn_implementation = "eager"
dense = transformers.LlamaForCausalLM(config)
start = time.perf_counter()
pretrain_losses = train(dense, code_ids, CFG["pretrain_steps"], dense.parameters(), lr=3e-3)
val = {"dense, before fine-tuning": val_loss(dense)}
print(f"pre-trained in {time.perf_counter() - start:.1f}s; loss on the prose: {val['dense, before fine-tuning']:.3f}")

# %% [markdown]
# ## MoLoRA and plain LoRA at equal trainable parameters
#
# MoLoRA puts E experts of rank r and a router [E, d_in] on each FFN linear: E·(r·(d_in + d_out) + d_in)
# parameters. A plain LoRA of rank ρ on a linear has ρ·(d_in + d_out); the three FFN linears all have
# d_in + d_out = d + d_ff, so the LoRA ranks (given per linear through PEFT's `rank_pattern`) are chosen to sum to
# MoLoRA's count divided by d + d_ff. Both use LoRA scaling alpha / rank = 2.

# %%
def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


molora = molorafy(copy.deepcopy(dense), CFG["lora_experts"], CFG["lora_top_k"], rank=CFG["lora_rank"],
                  alpha=2 * CFG["lora_rank"])
molora_params = trainable(molora)
ffn_linears = [(name, m) for name, m in molora.named_modules() if isinstance(m, MoLoRALinear)]
unit = CFG["d_model"] + CFG["d_ff"]
assert all(m.in_features + m.out_features == unit for _, m in ffn_linears)
if molora_params % unit:
    raise ValueError(f"MoLoRA has {molora_params} trainable parameters, not a multiple of d + d_ff = {unit}: no "
                     "set of LoRA ranks matches it; change lora_experts, layers or the widths")
total_rank = molora_params // unit
ranks = {name: total_rank // len(ffn_linears) + (i < total_rank % len(ffn_linears))
         for i, (name, _) in enumerate(ffn_linears)}
lora_config = peft.LoraConfig(r=max(ranks.values()), lora_alpha=2 * max(ranks.values()), lora_dropout=0.0,
                              target_modules=["gate_proj", "up_proj", "down_proj"], rank_pattern=ranks,
                              alpha_pattern={name: 2 * r for name, r in ranks.items()})
lora = peft.get_peft_model(copy.deepcopy(dense), lora_config)
lora_params = trainable(lora)
print(f"trainable parameters: MoLoRA {molora_params:,} ({CFG['lora_experts']} experts of rank {CFG['lora_rank']}, "
      f"top-{CFG['lora_top_k']}), plain LoRA {lora_params:,} (ranks {sorted(set(ranks.values()))}); the dense "
      f"model has {sum(p.numel() for p in dense.parameters()):,}")
assert lora_params == molora_params

curves = {}
start = time.perf_counter()
curves["LoRA (PEFT)"] = train(lora, prose_train, CFG["finetune_steps"],
                              [p for p in lora.parameters() if p.requires_grad], lr=1e-2)
val["LoRA (PEFT)"] = val_loss(lora)
curves["MoLoRA"] = train(molora, prose_train, CFG["finetune_steps"],
                         [p for p in molora.parameters() if p.requires_grad], lr=1e-2, with_aux=True)
val["MoLoRA"] = val_loss(molora)
load = torch.stack([m.stats.tokens_per_expert for _, m in ffn_linears]).float()
imbalance = float((load.max(1).values / load.mean(1)).mean())
print(f"fine-tuned both in {time.perf_counter() - start:.1f}s; loss on held-out prose: LoRA {val['LoRA (PEFT)']:.3f}, "
      f"MoLoRA {val['MoLoRA']:.3f}; MoLoRA expert load on the last batch, max / mean: {imbalance:.2f}")

# %% [markdown]
# ## An upcycled MoE, fine-tuned, then pruned and merged
#
# `moefy(..., upcycle=True)` makes every expert a copy of the dense FFN (dropless, normalised weights), so the
# converted model starts exactly where the dense one was. After a brief full fine-tune, each layer's experts are
# ranked by how many tokens the router sends them (`expert_importance`), the least used are dropped
# (`prune_experts`, the router renormalised over the rest), and the survivors are merged into fewer experts
# (`merge_experts`, grouped by the similarity of their router logits).

# %%
moe = torch_moe.moefy(copy.deepcopy(dense), CFG["moe_experts"], CFG["moe_top_k"], upcycle=True)
ffns = [m for m in moe.modules() if isinstance(m, torch_moe.convert.MoEFeedForward)]
val["upcycled MoE"] = val_loss(moe)
curves["upcycled MoE (full fine-tune)"] = train(moe, prose_train, CFG["moe_steps"], moe.parameters(), lr=3e-3,
                                                with_aux=True)
val["upcycled MoE, fine-tuned"] = val_loss(moe)
print(f"upcycled: {val['upcycled MoE']:.3f} (dense {val['dense, before fine-tuning']:.3f}), after "
      f"{CFG['moe_steps']} steps: {val['upcycled MoE, fine-tuned']:.3f}")


@torch.no_grad()
def layer_inputs(model):
    """The hidden states [T, d] that reach each MoE layer on the fine-tuning batches (one list per layer)."""
    seen = {id(f.moe): [] for f in ffns}
    hooks = [f.moe.register_forward_pre_hook(lambda m, args: seen[id(m)].append(args[0].reshape(-1, m.d_model)))
             for f in ffns]
    model.eval()
    generator = torch.Generator().manual_seed(2)
    for _ in range(CFG["eval_batches"]):
        model(input_ids=train_lm.sample_batch(prose_train, CFG["batch_size"], CFG["seq_len"], generator)[0])
    for hook in hooks:
        hook.remove()
    return [seen[id(f.moe)] for f in ffns]


try:
    from torch_moe import surgery
except ImportError:
    surgery = None
    print("skipped pruning and merging: torch_moe.surgery is missing from this torch_moe")

if surgery is not None:
    for ffn, batches in zip(ffns, layer_inputs(moe)):
        importance = surgery.expert_importance(ffn.moe, batches, criterion="frequency")
        keep = importance.topk(CFG["keep_experts"]).indices.sort().values
        ffn.moe = surgery.prune_experts(ffn.moe, keep=keep)
    val["pruned"] = val_loss(moe)
    for ffn, batches in zip(ffns, layer_inputs(moe)):
        ffn.moe = surgery.merge_experts(ffn.moe, num_groups=CFG["merged_experts"], similarity="router_logits",
                                        batches=batches)
    val["merged"] = val_loss(moe)
    print(f"{CFG['moe_experts']} experts per layer -> pruned to {CFG['keep_experts']}: {val['pruned']:.3f} -> merged "
          f"into {CFG['merged_experts']}: {val['merged']:.3f}")

# %% [markdown]
# ## Results

# %%
fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
for name, losses in curves.items():
    window = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax_curve.plot(range(1, len(losses) + 1), smooth, label=name)
ax_curve.axhline(val["dense, before fine-tuning"], color="gray", linestyle=":", label="dense, before (held-out)")
ax_curve.set(xlabel="fine-tuning step", ylabel="training loss (nats / char)", title="Fine-tuning on prose")
ax_curve.legend()
names = list(val)
ax_bar.barh(names, [val[n] for n in names], color=["gray", "C0", "C1", "C2", "C2", "C3", "C4"][:len(names)])
ax_bar.invert_yaxis()
ax_bar.set_xlim(0.95 * min(val.values()), 1.04 * max(val.values()))  # the differences, not the totals
ax_bar.set(xlabel="held-out loss (nats / char)", title="After each step")
for i, n in enumerate(names):
    ax_bar.text(val[n], i, f" {val[n]:.3f}", va="center")
fig.tight_layout()
fig.savefig(OUT / "surgery.png", dpi=120)
if "ipykernel" in sys.modules:
    plt.show()

results = {"size": SIZE, "trainable_params": {"lora": lora_params, "molora": molora_params}, "val_loss": val,
           "surgery_skipped": surgery is None}
(OUT / "surgery.json").write_text(json.dumps(results, indent=2))
width = max(len(n) for n in names)
print("\n".join(f"{n:<{width}}  {val[n]:.4f}" for n in names))
assert all(math.isfinite(v) for v in val.values())
