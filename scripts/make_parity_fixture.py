"""Make the parity fixture that tests/parity.rs checks ternlab against.

The peer is Hugging Face transformers' Qwen3 (PyTorch), trained with the same
ternary STE recipe as the seed and bench/reference/ref_ternary_torch.py:
every Linear in the decoder layers becomes W_eff = W + (W_t - W).detach() with
W_t = clip(round(W / s), -1, 1) * s, s = mean|W| over groups of G input columns;
AdamW(0.9, 0.95, eps 1e-8, wd 0); linear warm-up then cosine to 10% of peak;
loss = mean token cross-entropy in fp32.

Run once on a machine with torch and transformers (CPU, fp32), then commit the
output folder (about 1 MB):

    python3 scripts/make_parity_fixture.py tests/fixtures/parity

Writes:
  model/            config.json + model.safetensors (fp32, tied embeddings: no lm_head)
  tokens.json       the token stream, the sequential batches, hyper-parameters,
                    the per-step losses and learning rates, versions
  tensors.safetensors
                    logits_dense   (B, L, V) the untouched model on batch 0
                    logits_ternary (B, L, V) after ternarizing, before any update
                    grad.<name>    every parameter's gradient at step 0 (STE)
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP = 32
SEQ = 16
BATCH = 2
STEPS = 8
WINDOWS = 6
LR = 5e-3
WARMUP = 2
SEED = 1234


class TernaryLinear(nn.Module):
    def __init__(self, weight, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight.detach().float().clone())

    @staticmethod
    def ternarize(w, g):
        o, i = w.shape
        wg = w.reshape(o, i // g, g)
        s = wg.abs().mean(-1, keepdim=True).clamp_min(1e-8)
        return ((wg / s).round().clamp(-1, 1) * s).reshape(o, i)

    def forward(self, x):
        w = self.weight
        return F.linear(x, w + (self.ternarize(w, self.group) - w).detach())


def lr_at(step):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = min(1.0, (step - WARMUP) / max(1, STEPS - WARMUP))
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def sequential_batch(tokens, i):
    """ternlab's `sampling = "sequential"`: window k = tokens[k*L .. k*L+L+1]."""
    k_total = (len(tokens) - 1) // SEQ
    xs, ys = [], []
    for b in range(BATCH):
        k = (i * BATCH + b) % k_total
        xs.append(tokens[k * SEQ : k * SEQ + SEQ])
        ys.append(tokens[k * SEQ + 1 : k * SEQ + SEQ + 1])
    return torch.tensor(xs), torch.tensor(ys)


def main(out):
    out = Path(out)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    cfg = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, initializer_range=0.1,
    )
    cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(cfg).float()
    # Norm weights start at 1 in a fresh model; perturb them so that a missing
    # or misplaced norm weight shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out / "model", safe_serialization=True)

    n_tokens = WINDOWS * SEQ + 1
    tokens = torch.randint(0, cfg.vocab_size, (n_tokens,)).tolist()
    x0, _ = sequential_batch(tokens, 0)

    tensors = {}
    model.eval()
    with torch.no_grad():
        tensors["logits_dense"] = model(input_ids=x0).logits.float().contiguous()

    n_ternary = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in PROJECTIONS:
                    setattr(parent, name, TernaryLinear(child.weight, GROUP))
                    n_ternary += 1
    with torch.no_grad():
        tensors["logits_ternary"] = model(input_ids=x0).logits.float().contiguous()

    model.train()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses, lrs = [], []
    for step in range(STEPS):
        x, y = sequential_batch(tokens, step)
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for name, p in params.items():
                tensors["grad." + name] = p.grad.detach().float().contiguous().clone()
        opt.step()
        losses.append(loss.item())
        lrs.append(lr)

    save_file(tensors, out / "tensors.safetensors")
    meta = {
        "made_by": "scripts/make_parity_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "group_size": GROUP, "seq_len": SEQ, "batch_size": BATCH, "steps": STEPS,
        "lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": 0.1,
        "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
        "projections": PROJECTIONS, "n_ternary_layers": n_ternary,
        "tokens": tokens, "losses": losses, "lrs": lrs,
    }
    (out / "tokens.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({"losses": losses, "n_ternary": n_ternary}))
    print((out / "model" / "config.json").read_text())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
