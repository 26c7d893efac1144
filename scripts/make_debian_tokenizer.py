#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer (vocab 8192) on data/debian-docs.txt and write
data/debian-tokenizer.json.

    python3 scripts/make_debian_tokenizer.py            # builds .tokvenv on first use
    python3 scripts/make_debian_tokenizer.py --pretokenizer gpt2

Runs inside the virtual environment .tokvenv/ (created on first use, with the HuggingFace
`tokenizers` Python package pinned to the version of the Rust `tokenizers` crate in
Cargo.lock, so that the JSON it writes is one the crate reads). Corpus: scripts/
make_debian_corpus.sh.

The tokenizer is laid out like data/tiny-tokenizer.json (same top-level keys, a BPE model
with the same fields, `<|endoftext|>` as added special token id 0, no normalizer, ByteLevel
decoder). Pre-tokenizer:
  --pretokenizer qwen (default): Qwen2/Qwen3's own Split regex + ByteLevel(add_prefix_space =
      false, use_regex = false), as in the real Qwen3 tokenizer.json (single digits, "\\n\\n"
      kept as its own piece). mlx_lm / transformers' Qwen2Tokenizer encode exactly like the
      `tokenizers` crate with this one (see scripts/seed_mlx.py).
  --pretokenizer gpt2: plain ByteLevel(add_prefix_space = false, use_regex = true), GPT-2's
      regex, exactly the layout of data/tiny-tokenizer.json.

By default the tokenizer is trained on the paragraphs that src/data.rs puts in the training
split (all but the last --val-fraction, 0.1, of the blank-line-separated paragraphs), so the
held-out text stays unseen; --val-fraction 0 trains on everything. Training is deterministic
and single-threaded unless TOKENIZERS_PARALLELISM=true is set.

It then reloads the file, checks that decode(encode(x)) == x on a sample of paragraphs and
on odd strings, and counts the corpus' tokens the way src/data.rs does (train and held-out
sides each joined with "\\n\\n", encoded without special tokens).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".tokvenv"
# The Rust crate in Cargo.lock is tokenizers 0.23.2; the Python package of the same version
# is built from that crate, so it writes exactly the JSON the crate reads.
TOKENIZERS_VERSION = "0.23.2"

# Qwen2/Qwen3's pre-tokenizer regex (the Split pattern of the real tokenizer.json; the same
# string as in scripts/make_seed_model.py).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOT = "<|endoftext|>"


def ensure_venv():
    """Re-runs this script under .tokvenv/bin/python, creating the venv when needed."""
    py = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not py.exists():
        print(f"==> creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = subprocess.run(
        [str(py), "-c", "import tokenizers; print(tokenizers.__version__)"],
        capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != TOKENIZERS_VERSION:
        print(f"==> installing tokenizers=={TOKENIZERS_VERSION} into {VENV}", flush=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q",
                        f"tokenizers=={TOKENIZERS_VERSION}"], check=True)
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def paragraphs(text):
    """src/data.rs's split: on "\\n\\n", stripped, empty ones dropped."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def n_held_out(n, fraction):
    """src/data.rs's n_held_out: floor(n * fraction), at least 1."""
    return max(1, int(n * fraction + 1e-9))


def chunks(paras, target_bytes=1 << 20):
    """Training sequences: runs of paragraphs joined by "\\n\\n" (as the loader joins them),
    about 1 MB each, so that the paragraph separator is learned too."""
    buf, size = [], 0
    for p in paras:
        buf.append(p)
        size += len(p) + 2
        if size >= target_bytes:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def build(kind):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())  # no unk token, no byte fallback: ByteLevel covers all bytes
    if kind == "qwen":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.post_processor = processors.ByteLevel(
            add_prefix_space=False, trim_offsets=False, use_regex=False)
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                         use_regex=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        tok.decoder = decoders.ByteLevel()
    return tok


def check_layout(new, ref, kind):
    """Same top-level keys and BPE model fields as the bundled tokenizer."""
    problems = []
    if list(new) != list(ref):
        problems.append(f"top-level keys {list(new)} != {list(ref)}")
    if new["version"] != ref["version"]:
        problems.append(f"version {new['version']} != {ref['version']}")
    if list(new["model"]) != list(ref["model"]):
        problems.append(f"model keys {list(new['model'])} != {list(ref['model'])}")
    for k in ("type", "dropout", "unk_token", "continuing_subword_prefix",
              "end_of_word_suffix", "fuse_unk", "byte_fallback", "ignore_merges"):
        if new["model"][k] != ref["model"][k]:
            problems.append(f"model.{k} {new['model'][k]!r} != {ref['model'][k]!r}")
    if type(new["model"]["merges"][0]) is not type(ref["model"]["merges"][0]):
        problems.append("merges are not written in the same form")
    if new["added_tokens"] != ref["added_tokens"]:
        problems.append(f"added_tokens {new['added_tokens']} != {ref['added_tokens']}")
    if new["normalizer"] != ref["normalizer"]:
        problems.append(f"normalizer {new['normalizer']} != {ref['normalizer']}")
    if new["decoder"]["type"] != "ByteLevel":
        problems.append("decoder is not ByteLevel")
    if kind == "gpt2":
        for k in ("pre_tokenizer", "post_processor", "decoder"):
            if new[k] != ref[k]:
                problems.append(f"{k} {new[k]} != {ref[k]}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "data/debian-docs.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "data/debian-tokenizer.json")
    ap.add_argument("--reference", type=Path, default=ROOT / "data/tiny-tokenizer.json",
                    help="tokenizer whose JSON layout the output must follow")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--pretokenizer", choices=("qwen", "gpt2"), default="qwen")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="trailing fraction of paragraphs left out of training (src/data.rs's "
                         "held-out split); 0 trains on all")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_venv()
    import tokenizers
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    if tokenizers.__version__ != TOKENIZERS_VERSION:
        sys.exit(f"tokenizers {tokenizers.__version__} found, {TOKENIZERS_VERSION} needed")
    if not args.corpus.exists():
        sys.exit(f"{args.corpus} not found: run scripts/make_debian_corpus.sh first")

    t_start = time.time()
    raw = args.corpus.read_bytes()
    text = raw.decode("utf-8")
    paras = paragraphs(text)
    n_val = n_held_out(len(paras), args.val_fraction) if args.val_fraction > 0 else 0
    n_val = min(n_val, len(paras) - 1)
    train_paras = paras[: len(paras) - n_val]
    val_paras = paras[len(paras) - n_val:]
    print(f"==> corpus {args.corpus}: {len(raw)} bytes, sha256 "
          f"{hashlib.sha256(raw).hexdigest()}", flush=True)
    print(f"    {len(paras)} paragraphs; training the tokenizer on the first "
          f"{len(train_paras)} (held out: {n_val})", flush=True)

    tok = build(args.pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t0 = time.time()
    tok.train_from_iterator(chunks(train_paras), trainer=trainer)
    t_train = time.time() - t0
    print(f"==> trained {args.pretokenizer} BPE, vocab {tok.get_vocab_size()} in "
          f"{t_train:.1f} s (TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']})",
          flush=True)
    if tok.get_vocab_size() != args.vocab_size:
        sys.exit(f"vocab size {tok.get_vocab_size()} != {args.vocab_size}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out), pretty=True)

    # -- layout check against the bundled tokenizer
    new = json.loads(args.out.read_text(encoding="utf-8"))
    ref = json.loads(args.reference.read_text(encoding="utf-8"))
    problems = check_layout(new, ref, args.pretokenizer)
    if problems:
        sys.exit("layout differs from " + str(args.reference) + ":\n  " + "\n  ".join(problems))
    print(f"    layout matches {args.reference.name} (top-level keys, BPE fields, "
          f"added tokens, normalizer)")
    if new["model"]["vocab"].get(EOT) != 0:
        sys.exit(f"{EOT} is not id 0")

    # -- reload and round-trip
    tok = Tokenizer.from_file(str(args.out))
    samples = paras[:: max(1, len(paras) // 2000)]
    samples += [
        "Hello, world!\n\n  Indented\tline with tabs\r\nand CRLF.",
        "Unicode: naïve café – “quotes” — 東京 한국어 😀 ∑x² ¶",
        "Numbers 1234567890, 3.14159 and 0xDEADBEEF; path /usr/share/doc/; $HOME ~/.bashrc",
        f"text with the special token {EOT} inside",
        " leading space and trailing space ",
        "\n\n\n",
    ]
    bad = 0
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        if tok.decode(ids, skip_special_tokens=False) != s:
            bad += 1
            if bad <= 5:
                print(f"    round-trip FAILED: {s[:80]!r}")
    if bad:
        sys.exit(f"{bad} of {len(samples)} samples do not round-trip")
    eot_ids = tok.encode(f"a{EOT}b", add_special_tokens=False).ids
    if 0 not in eot_ids:
        sys.exit(f"{EOT} is not recognised as a special token")
    print(f"    round-trip ok on {len(samples)} samples; {EOT} -> id 0")

    # -- token counts, as src/data.rs computes them
    t0 = time.time()
    n_train = len(tok.encode("\n\n".join(train_paras), add_special_tokens=False).ids)
    n_valt = len(tok.encode("\n\n".join(val_paras), add_special_tokens=False).ids) if val_paras else 0
    t_count = time.time() - t0
    train_bytes = len("\n\n".join(train_paras).encode("utf-8"))
    val_bytes = len("\n\n".join(val_paras).encode("utf-8"))
    total = n_train + n_valt
    out_bytes = args.out.read_bytes()
    print(f"==> wrote {args.out}: {len(out_bytes)} bytes, sha256 "
          f"{hashlib.sha256(out_bytes).hexdigest()}")
    print(f"    tokens: train {n_train} ({train_bytes / n_train:.3f} bytes/token), held-out "
          f"{n_valt}" + (f" ({val_bytes / n_valt:.3f} bytes/token)" if n_valt else "")
          + f", total {total} ({(train_bytes + val_bytes) / total:.3f} bytes/token of "
          f"paragraph text; {len(raw) / total:.3f} corpus bytes/token); counted in "
          f"{t_count:.1f} s")
    print(f"    total {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
