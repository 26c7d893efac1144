"""Write the tiny Qwen3 that the seed-parity fixture trains (tests/fixtures/seed/model/).

A transformers-written Qwen3 in bf16, as Qwen3 checkpoints ship, with the bundled tokenizer
(data/tiny-tokenizer.json) given Qwen's own pre-tokenizer: mlx_lm tokenizes through
transformers' Qwen2Tokenizer, which applies Qwen's split regex, so the tokenizer.json carries
the same Split + ByteLevel(use_regex = false) pair as the real Qwen3 tokenizer.json, and the
`tokenizers` crate (ternlab) and transformers (the seed) encode alike.

config.json's eos_token_id is the id of " and" (not a special token), which a tiny model
trained for a few steps generates often: greedy generation then stops there on both sides,
which pins how each decides where to stop (mlx_lm: config.json / generation_config.json
eos_token_id plus the tokenizer's eos_token).

Run once with torch and transformers (CPU), then scripts/make_seed_fixture.py:

    python3 scripts/make_seed_model.py tests/fixtures/seed/model
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
# Qwen2/Qwen3's pre-tokenizer regex (the real tokenizer.json's Split pattern).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((ROOT / "data/tiny-tokenizer.json").read_text())
    tok["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    tok["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    vocab = tok["model"]["vocab"]
    stop = vocab["\u0120and"]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_prefix_space": False,
        "model_max_length": 4096,
    }, indent=2))

    torch.manual_seed(20261126)
    cfg = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=stop,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = Qwen3ForCausalLM(cfg)
    # Norm weights away from 1, so that their bf16 updates and the layer's use of them show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    print(f"wrote {out} (transformers {transformers.__version__}, torch {torch.__version__}); "
          f"eos_token_id = {stop} (' and')")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
