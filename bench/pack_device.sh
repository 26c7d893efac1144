#!/usr/bin/env bash
# Builds the CUDA binaries for bench/device_run.sh on a machine without a GPU and packs them
# into .device/ (git-ignored; name it in the device call's carry). Run from the repo root with
# the workspace's ../shared beside it. Uses its own target folder, so the CPU build stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/../target-cuda}
source ../shared/tools/cuda-offline-build.sh
cargo build --release --features cuda
mkdir -p .device
cp "$CARGO_TARGET_DIR/release/ternlab" .device/ternlab
cargo test --release --features cuda --no-run --test parity --test gradients --test fused \
  --test seed_parity 2>&1 |
  sed -n 's/.*Executable tests\/\([a-z_]*\)\.rs (\(.*\))/\1 \2/p' |
  while read -r name exe; do cp "$exe" ".device/$name"; done
(cd .device && for b in ternlab parity gradients fused seed_parity; do xz -T2 -6 -f "$b"; done)
cp ../shared/tools/cuda-run-env.sh ../shared/bench/ref_ternary_torch.py .device/
ls -la .device
