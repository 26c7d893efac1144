"""Run the seed itself (scripts/seed_mlx.py, the original MLX script with its line breaks
restored) on the tiny Qwen3 of scripts/make_seed_model.py and the bundled corpus, and keep its
reports as the seed-parity fixture (tests/fixtures/seed/{sequential,random}.json) that
tests/seed_parity.rs checks ternlab's defaults against.

Needs MLX (Linux CPU wheels work):

    python3 -m venv .mlx && .mlx/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
    .mlx/bin/python scripts/make_seed_fixture.py tests/fixtures/seed

Each fixture holds the seed's report.json (loss_curve, val_nll, samples, ...), the settings it
ran with, the token counts and a SHA-256 of the token ids its tokenizer produced (so a
tokenizer disagreement shows as such, not as a loss difference), and the versions. Beside it,
<sampling>-trained.safetensors: the parameters the seed generated its samples with (saved by
wrapping the seed's `generate`, its code untouched), so that generation is checked on exactly
the seed's weights.
"""
import hashlib
import importlib
import json
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The seed's recipe, scaled to a model of hidden size 64: every key is an environment knob of
# scripts/seed_mlx.py (read its header).
SETTINGS = {
    "GROUP_SIZE": 32,
    "SEQ_LEN": 64,
    "BATCH_SIZE": 4,
    "NUM_STEPS": 60,
    "LR": 5e-4,
    "WARMUP_STEPS": 10,
    "SEED": 7,
    "MAX_TOKENS": 20,
}


def token_digest(model_dir: Path, data: Path):
    """Train and held-out token ids as the seed makes them (its own load_tokens)."""
    from mlx_lm import load

    sys.path.insert(0, str(ROOT / "scripts"))
    import seed_mlx

    _, tokenizer = load(str(model_dir))
    train, val = seed_mlx.load_tokens(tokenizer, data)
    digest = lambda ids: hashlib.sha256(
        b"".join(int(i).to_bytes(4, "little") for i in ids.tolist())
    ).hexdigest()
    return {
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "train_sha256": digest(train),
        "val_sha256": digest(val),
    }


def run_seed(env: dict, weights_path: Path):
    """The seed's main() in this process, with the environment it reads at import. Its
    `generate` is wrapped to save the trained parameters (latents in f32, the rest in the
    checkpoint's bf16) the first time it is called, before any sample is drawn."""
    os.environ.update(env)
    sys.path.insert(0, str(ROOT / "scripts"))
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import seed_mlx

    seed_mlx = importlib.reload(seed_mlx)
    original = seed_mlx.generate

    def generate(model, *args, **kwargs):
        if not weights_path.exists():
            mx.save_safetensors(str(weights_path), dict(tree_flatten(model.parameters())))
        return original(model, *args, **kwargs)

    seed_mlx.generate = generate
    seed_mlx.main()


def main(out: Path):
    model_dir = out / "model"
    data = ROOT / "data/train_data.txt"
    tokens = token_digest(model_dir, data)
    for sampling in ["sequential", "random"]:
        with tempfile.TemporaryDirectory() as tmp:
            report_path = Path(tmp) / "report.json"
            env = {k: str(v) for k, v in SETTINGS.items()}
            env.update({
                "MODEL_PATH": str(model_dir),
                "DATA_PATH": str(data),
                "REPORT_PATH": str(report_path),
                "SAMPLING": sampling,
            })
            weights = out / f"{sampling}-trained.safetensors"
            weights.unlink(missing_ok=True)
            run_seed(env, weights)
            report = json.loads(report_path.read_text())
        fixture = {
            "sampling": sampling,
            "settings": SETTINGS,
            "tokens": tokens,
            "trained_weights": weights.name,
            "versions": {p: version(p) for p in ["mlx", "mlx-lm", "numpy", "transformers"]},
            "report": report,
        }
        path = out / f"{sampling}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {path}: final loss {report['final_loss']:.6f}, val nll {report['val_nll']:.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
