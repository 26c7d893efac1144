#!/usr/bin/env bash
# One device call: GPU parity, ternlab bench and the PyTorch reference, back to back on the
# same card. Expects in .device/ (git-ignored, carried): ternlab.xz, parity.xz,
# gradients.xz (CUDA builds from ../shared/tools/cuda-offline-build.sh), cuda-run-env.sh and
# ref_ternary_torch.py (copies from ../shared). Writes logs and JSON under $OUT.
#
#   bash bench/device_run.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ternlab-bench}; mkdir -p "$out/json"
log="$out/log.txt"
exec > >(tee -a "$log") 2>&1
for b in ternlab parity gradients; do
  [[ -f .device/$b.xz ]] && xz -dkf .device/$b.xz && chmod +x .device/$b
done
source .device/cuda-run-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
date -u
export PYTHONUNBUFFERED=1

echo "== parity and gradients on the GPU (fixture from scripts/make_parity_fixture.py)"
TERNLAB_TEST_DEVICE=cuda .device/parity --test-threads 1 --nocapture
TERNLAB_TEST_DEVICE=cuda .device/gradients --test-threads 1

tl=.device/ternlab
bench() {  # name, then ternlab bench args
  local name=$1; shift
  echo "== ternlab bench $name"
  $tl bench --set run.device=cuda --steps 20 --warmup 5 --out "$out/json/ternlab-$name.json" "$@" \
    | grep -E '"(median_step_s|tokens_per_s|achieved_tflops|share_of_peak|peak_memory_gib|device_name)"'
}
ref() {  # name, then ref args
  local name=$1; shift
  echo "== reference $name: python3 ref_ternary_torch.py $*"
  python3 .device/ref_ternary_torch.py "$@" | tee "$out/json/ref-$name.json"
}
bench f32-4x256 --set train.dtype=f32
bench tf32-4x256 --set train.dtype=tf32
bench bf16-4x256 --set train.dtype=bf16
ref fp32-4x256
ref amp-4x256 --amp
ref amp-compile-4x256 --amp --compile
if [[ "${1:-}" != quick ]]; then
  bench bf16-16x1024 --set train.dtype=bf16 --set data.batch_size=16 --set data.seq_len=1024
  ref amp-16x1024 --amp --batch 16 --seq 1024
fi

echo "== tiny default on the GPU, f32 vs bf16"
for dt in f32 bf16; do
  $tl run experiments/tiny.toml --set run.device=cuda --set train.dtype=$dt --results "$out/tiny" | tail -3
done
tar czf "$out/results.tgz" -C "$out" json tiny
