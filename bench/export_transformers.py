"""Loads a ternlab export (`<run>/ternary/`, written with train.save = "ternary") in
transformers' Qwen3 and measures the held-out NLL over the same non-overlapping windows as
`ternlab eval` (src/data.rs `eval_starts`), in f32, so that the two can be compared:

    python3 bench/export_transformers.py RUN/ternary TEXT SEQ_LEN [--device cpu|cuda]

Prints one JSON object: nll, tokens, windows, the largest |logit| of the first window, the
transformers version, and the projections' distinct magnitudes per group of the first layer
(a check that the weights are ternary times a scale).
"""
import argparse
import json

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("text")
ap.add_argument("seq_len", type=int)
ap.add_argument("--device", default="cpu")
a = ap.parse_args()

tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model_dir}/tokenizer.json")
ids = tok(open(a.text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).to(a.device)
model.eval()
L = a.seq_len
n_windows = max((len(ids) - 1) // L, 1)
starts = [i * L for i in range(n_windows) if i * L + L < len(ids)]
total, count, first_max = 0.0, 0, None
with torch.no_grad():
    for s in starts:
        x = torch.tensor([ids[s : s + L]], device=a.device)
        y = torch.tensor([ids[s + 1 : s + L + 1]], device=a.device)
        logits = model(x).logits.float()
        if first_max is None:
            first_max = logits.abs().max().item()
        ce = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum"
        )
        total += ce.item()
        count += L
w = model.model.layers[0].self_attn.q_proj.weight.detach().float().cpu()
group = 32 if w.shape[1] % 32 == 0 else w.shape[1]
mags = [len(set(g[g != 0].abs().tolist())) for g in w.reshape(-1, group)]
print(
    json.dumps(
        {
            "nll": total / count,
            "tokens": len(ids),
            "windows": len(starts),
            "first_window_max_abs_logit": first_max,
            "transformers": transformers.__version__,
            "q_proj_layer0_max_magnitudes_per_group_of_32": max(mags),
        }
    )
)
