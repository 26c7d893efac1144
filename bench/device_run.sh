#!/usr/bin/env bash
# One device call: GPU parity, ternlab bench and the PyTorch reference, back to back on the
# same card. Expects in .device/ (git-ignored, carried): ternlab.xz and the test binaries
# parity.xz, gradients.xz, fused.xz, seed_parity.xz, cuda-run-env.sh, ref_ternary_torch.py and
# qwen3/ (the real Qwen3 tokenizer files): bench/pack_device.sh makes them.
# Writes $OUT/log.txt and $OUT/results.tgz (every JSON result and the tiny runs).
#
#   bash bench/device_run.sh [SECTION...]    sections: parity seed bench ref big tiny profile
#                                            baseline before study-pretrain study-ternary
#                                            study-extra export generate resume dp dp-faults
#                                            graph e2e flash switch long long-ref headline
#                                            kernels elementwise detail
#                                            (default: parity seed bench ref big tiny)
# `before` benches .device/ternlab-before.xz (an earlier build: bench/pack_before.sh) against
# .device/ternlab, alternating, at 4 x 256 and 16 x 1024 in bf16: a change's speed on one card.
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-/tmp/ternlab-bench}; out=/tmp/ternlab-work; mkdir -p "$final" "$out/json"
exec > >(tee -a "$final/log.txt") 2>&1
# The test binaries find the fixtures and the ternlab binary through these (tests/common).
export TERNLAB_REPO=$PWD TERNLAB_BIN=$PWD/.device/ternlab
for b in ternlab ternlab-before parity gradients fused seed_parity; do
  # (kept when already unpacked from this archive: two calls may share the machine)
  [[ -f .device/$b.xz && ! .device/$b -nt .device/$b.xz ]] && xz -dkf .device/$b.xz &&
    chmod +x .device/$b
done
source .device/cuda-run-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
date -u
# The source each build was made from (build.rs; pack_device.sh checks the main one).
for b in .device/ternlab .device/ternlab-before; do
  [[ -x $b ]] && echo "$b: $(grep -aoE 'ternlab-source=[0-9a-f]{12}(\+dirty)?|ternlab-source=unknown' "$b" | head -1)"
done
export PYTHONUNBUFFERED=1

sections=${*:-parity seed bench ref big tiny}
want() { [[ " $sections " == *" $1 "* ]]; }

if want parity; then
echo "== parity and gradients on the GPU (fixture from scripts/make_parity_fixture.py)"
TERNLAB_TEST_DEVICE=cuda timeout 300 .device/parity --test-threads 1 --nocapture
TERNLAB_TEST_DEVICE=cuda timeout 300 .device/gradients --test-threads 1
echo "== fused kernels against the composed ops"
timeout 300 .device/fused --test-threads 1
fi

if want seed; then
echo "== seed parity through the hand-written step: f32, then bf16 compute (fixture: scripts/make_seed_fixture.py)"
TERNLAB_TEST_DEVICE=cuda TERNLAB_TEST_DTYPE=f32 timeout 300 .device/seed_parity --test-threads 1 --nocapture 2>&1 | grep -vE '^\s+[0-9]+:|^\s+at '
TERNLAB_TEST_DEVICE=cuda TERNLAB_TEST_DTYPE=bf16 timeout 300 .device/seed_parity --test-threads 1 --nocapture 2>&1 | grep -vE '^\s+[0-9]+:|^\s+at '
fi

tl=${TL:-.device/ternlab}  # (TL="timeout 300 .device/ternlab" bounds each command)
# A random Qwen3-0.6B-shaped bf16 checkpoint with the real tokenizer (made once per machine).
ckpt=/tmp/qwen3-0.6b-random
qwen3_checkpoint() {
  mkdir -p /tmp/qwen3-tok && cp .device/qwen3/tokenizer_config.json /tmp/qwen3-tok/ &&
    xz -dc .device/qwen3/tokenizer.json.xz > /tmp/qwen3-tok/tokenizer.json
  [[ -d $ckpt ]] || python3 bench/qwen3-0.6b/make_checkpoint.py /tmp/qwen3-tok $ckpt
}
bench() {  # name, then ternlab bench args
  local name=$1; shift
  echo "== ternlab bench $name"
  $tl bench --set run.device=cuda --steps 20 --warmup 5 --out "$out/json/ternlab-$name.json" "$@" \
    | grep -E '"(median_step_s|tokens_per_s|achieved_tflops|share_of_peak|peak_card|peak_memory_gib|device_name)"'
}
ref() {  # name, then ref args
  local name=$1; shift
  echo "== reference $name: python3 ref_ternary_torch.py $*"
  timeout "${REF_TIMEOUT:-900}" python3 .device/ref_ternary_torch.py "$@" |
    tee "$out/json/ref-$name.json"
}
if want bench; then
  bench f32-4x256 --set train.dtype=f32
  bench tf32-4x256 --set train.dtype=tf32
  bench bf16-4x256 --set train.dtype=bf16
  bench bf16-4x256-composed --set train.dtype=bf16 --set run.fused=false
fi
if want ref; then
  ref fp32-4x256
  ref amp-4x256 --amp
  ref amp-compile-4x256 --amp --compile
fi
if want headline; then
  # The issue's two shapes in bf16 beside the reference's eager bf16 and torch.compile (the
  # latter bounded by REF_TIMEOUT seconds: its compilation can take minutes).
  bench bf16-4x256 --set train.dtype=bf16
  bench bf16-16x1024 --set train.dtype=bf16 --set data.batch_size=16 --set data.seq_len=1024
  ref amp-4x256 --amp
  ref amp-compile-4x256 --amp --compile
fi
if want big; then
  bench bf16-16x1024 --set train.dtype=bf16 --set data.batch_size=16 --set data.seq_len=1024
  ref amp-16x1024 --amp --batch 16 --seq 1024
fi
if want tiny; then
  echo "== tiny default on the GPU, f32 vs bf16, three seeds"
  for dt in f32 bf16; do for seed in 0 1 2; do
    $tl run experiments/tiny.toml --set run.device=cuda --set train.dtype=$dt \
      --set train.seed=$seed --results "$out/tiny" | grep completed
  done; done
fi
if want before; then
  # One line a run (bench/bench_line.py): build, round, shape, then median and fastest step,
  # forward / backward / optimizer (ms), tokens/s, GiB, card. ROUNDS=2 by default;
  # BEFORE_BINS="ternlab-before ternlab" by default (any builds in .device/, xz-packed).
  echo "== alternating builds: median min forward backward optimizer (ms) tokens/s GiB card source"
  for b in ${BEFORE_BINS:-ternlab-before ternlab}; do
    [[ -x .device/$b ]] || { xz -dkf .device/$b.xz && chmod +x .device/$b; }
  done
  for round in $(seq "${ROUNDS:-2}"); do for bin in ${BEFORE_BINS:-ternlab-before ternlab}; do
    # (KERNEL_SHAPES="4x4096 16x1024" for others)
  for shape in ${KERNEL_SHAPES:-4x256 16x1024}; do set -- ${shape/x/ }
      json="$out/json/$bin-$round-$1x$2.json"
      .device/$bin bench --set run.device=cuda --set train.dtype=bf16 --set data.batch_size=$1 \
        --set data.seq_len=$2 --steps 20 --warmup 5 --out "$json" >/dev/null 2>&1 &&
        python3 bench/bench_line.py "$json" "$bin r$round $1x$2" ||
        echo "$bin r$round $1x$2: failed"
    done
  done; done
fi
if want elementwise; then
  # The first launch of each large elementwise kernel at 16 x 1024 (ncu at its locked clocks,
  # caches flushed between kernels: longer than inside a step), one line a kernel
  # (bench/ncu_table.py): time, DRAM bytes and share of bandwidth, SM throughput, occupancy,
  # registers, the largest issue stalls. ELEM_BINS: builds in .device/ (default ternlab);
  # ELEM_SETS: "regex:launches" pairs, each one ncu process profiling that many of the first
  # launches its regex matches (the defaults take each kernel's first launch in step order).
  for bin in ${ELEM_BINS:-ternlab}; do
    [[ -x .device/$bin ]] || { xz -dkf .device/$bin.xz && chmod +x .device/$bin; }
    echo "== $bin: elementwise kernels at 16 x 1024 (ncu, first launches)"
    n=0
    for set in ${ELEM_SETS:-norm_rope4|silu_mul_bf16|rmsnorm_v32|add_bf16:6 \
      cross_entropy|silu_mul_bwd|rmsnorm_bwd_add|flash_delta|rope_norm_bwd4:8}; do
      n=$((n + 1))
      csv="$final/elementwise-$bin-$n.csv"
      timeout 300 ncu --target-processes all --csv --page raw \
        -k "regex:^(${set%:*})" --launch-count "${set##*:}" \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__block_size,launch__grid_size,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        "$PWD/.device/$bin" bench --set run.device=cuda --set train.dtype=bf16 \
        --set data.batch_size=16 --set data.seq_len=1024 --steps 1 --warmup 1 \
        --out "$out/json/ncu-bench.json" >"$csv" 2>"$out/ncu.err" &&
        python3 bench/ncu_table.py "$csv" || tail -3 "$out/ncu.err"
    done
  done
fi
if want profile; then
  # Each op of the CUDA step timed alone (a device sync around it): where a step goes.
  # (KERNEL_SHAPES="4x4096 16x1024" for others)
  for shape in ${KERNEL_SHAPES:-4x256 16x1024}; do set -- ${shape/x/ }
    echo "== profile: bf16 $1 x $2 (TERNLAB_PROFILE=1)"
    TERNLAB_PROFILE=1 $tl bench --set run.device=cuda --set train.dtype=bf16 \
      --set data.batch_size=$1 --set data.seq_len=$2 --steps 3 --warmup 2 \
      --out "$out/json/profile-$1x$2.json" 2>&1 >/dev/null | head -40
  done
fi
if want kernels; then
  # Nsight Compute (the device image's ncu): every kernel of one eager step by its GPU time (no
  # launch cost), at 4 x 256 and 16 x 1024 at the card's own clocks and without flushing the
  # caches between kernels (so a step's kernels add up to about the replayed step: 17.3 against
  # 17.1 ms at 4 x 256 on an H100), then the flash kernels' issue stalls at 16 x 1024 (cycles per
  # issued instruction, by reason).
  bin=$PWD/.device/ternlab  # (ncu wants the program's absolute path)
  b=(bench --set run.device=cuda --set train.dtype=bf16)
  # (KERNEL_SHAPES="4x4096 16x1024" for others)
  for shape in ${KERNEL_SHAPES:-4x256 16x1024}; do set -- ${shape/x/ }
    echo "== kernels of one $1 x $2 step (ncu)"
    TERNLAB_CUDA_GRAPH=0 timeout 400 ncu --cache-control none --clock-control none \
      --target-processes all --launch-skip 4000 --launch-count 1800 \
      --metrics gpu__time_duration.sum --csv --page raw "$bin" "${b[@]}" \
      --set data.batch_size=$1 --set data.seq_len=$2 --steps 3 --warmup 1 \
      --out "$out/json/ncu-bench.json" >"$final/ncu-$1x$2.csv" 2>"$out/ncu.err"
    python3 bench/ncu_step.py "$final/ncu-$1x$2.csv"
  done
  for k in flash_fwd2_d128 flash_bwd_dq_d128 flash_bwd_dkdv_d128; do
    echo "== $k at 16 x 1024: stalls per issued instruction (ncu)"
    timeout 150 ncu --target-processes all -k "regex:$k" --launch-skip 30 --launch-count 1 \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      "$bin" "${b[@]}" --set data.batch_size=16 --set data.seq_len=1024 --steps 2 \
      --warmup 1 --out "$out/json/ncu-bench.json" 2>&1 |
      awk '/ratio/ && $NF + 0 >= 0.05 {sub("smsp__average_warps_issue_stalled_", ""); print "  " $1, $NF}'
  done
fi
if want detail; then
  # Nsight Compute's own sections for a few kernels (at its locked clocks): the pipes' shares
  # (the tensor pipe's among them), shared-memory and L2 traffic, warp states. DETAIL_SETS:
  # "regex:launches" pairs as ELEM_SETS; DETAIL_SHAPE (default 16x1024); the settings come from
  # the environment (TERNLAB_FLASH_WS=1 ...). Each set's whole report goes to $OUT, the lines
  # that say the most to the log.
  bin=$PWD/.device/ternlab
  set -- $(echo "${DETAIL_SHAPE:-16x1024}" | tr x ' ')
  n=0
  for set in ${DETAIL_SETS:-flash_bwd_ws:1 flash_bwd_dkdv:1}; do
    n=$((n + 1))
    echo "== ncu sections: ${set%:*} at $1 x $2"
    timeout 300 ncu --target-processes all -k "regex:^(${set%:*})" --launch-count "${set##*:}" \
      --section SpeedOfLight --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis_Tables --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section Occupancy \
      "$bin" bench --set run.device=cuda --set train.dtype=bf16 --set data.batch_size=$1 \
      --set data.seq_len=$2 --steps 1 --warmup 1 --out "$out/json/ncu-bench.json" \
      >"$final/detail-$n.txt" 2>"$out/ncu.err" || tail -3 "$out/ncu.err"
    grep -E "^  [a-z_0-9]+|Duration|Throughput|Issue Slots|Tensor|Shared|Pipe|Eligible|Active Warps|Stall" \
      "$final/detail-$n.txt" | head -60
  done
fi
if want baseline; then
  echo "== the 250-step baseline on a Qwen3-0.6B-shaped checkpoint, f32 and bf16 x 5 seeds"
  qwen3_checkpoint
  time $tl run experiments/baseline.toml --set model.source=$ckpt --set run.device=cuda \
    --results "$out/baseline" 2>&1 | grep -vE "step +[0-9]+/"
  $tl sweep bench/baseline-seeds.toml --set model.source=$ckpt --set run.device=cuda \
    --results "$out/baseline" 2>&1 | grep -vE "step +[0-9]+/"
  $tl compare "$out/baseline/baseline-seeds" --metric val_nll
  $tl compare "$out/baseline/baseline" --format json | head -c 3000
fi
# The same binary with switch $1 on (1) and off (0), alternating, bf16 at 4 x 256 and 16 x 1024:
# what one part of the step changes on one card. $2 names the JSON files.
on_off() {
  local var=$1 tag=$2 round v json
  echo "== $var on and off: median min forward backward optimizer (ms) tokens/s GiB card source"
  for round in $(seq "${ROUNDS:-2}"); do for v in 1 0; do
    # (KERNEL_SHAPES="4x4096 16x1024" for others)
  for shape in ${KERNEL_SHAPES:-4x256 16x1024}; do set -- ${shape/x/ }
      json="$out/json/$tag$v-$round-$1x$2.json"
      env "$var=$v" $tl bench --set run.device=cuda --set train.dtype=bf16 \
        --set data.batch_size=$1 --set data.seq_len=$2 --steps 20 --warmup 5 \
        --out "$json" >/dev/null 2>&1 &&
        python3 bench/bench_line.py "$json" "$var=$v r$round $1x$2" ||
        echo "$var=$v r$round $1x$2: failed"
    done
  done; done
}
# The step replayed from CUDA graphs (the default) against launch by launch.
want graph && on_off TERNLAB_CUDA_GRAPH graph
# Flash attention (the bf16 default) against the blocked scores.
want flash && on_off TERNLAB_FLASH_ATTENTION flash
# Any switch: SWITCH=TERNLAB_... bash bench/device_run.sh switch
want switch && on_off "$SWITCH" switch
if want long; then
  # Long sequences, bf16: flash and the blocked scores.
  for shape in "4 4096" "8 4096"; do set -- $shape
    long=(--set train.dtype=bf16 --set data.batch_size=$1 --set data.seq_len=$2)
    bench bf16-$1x$2 "${long[@]}"
    TERNLAB_FLASH_ATTENTION=0 bench bf16-blocked-$1x$2 "${long[@]}"
  done
fi
if want long-ref; then
  for shape in "4 4096" "8 4096"; do set -- $shape
    ref amp-$1x$2 --amp --batch $1 --seq $2 --steps 10 --warmup 5
    ref amp-compile-$1x$2 --amp --compile --batch $1 --seq $2 --steps 10 --warmup 5
  done
fi
if want e2e; then
  echo "== the 250-step baseline end to end, bf16, twice (the first on a fresh machine is cold)"
  qwen3_checkpoint
  for round in $(seq "${E2E_ROUNDS:-2}"); do
    rm -rf "$out/e2e"
    /usr/bin/time -f "round $round: %e s wall, %M KiB max RSS" $tl run experiments/baseline.toml \
      --set model.source=$ckpt --set run.device=cuda --set train.dtype=bf16 \
      --results "$out/e2e" 2>&1 | grep -vE "step +[0-9]+/" | tail -4
    python3 -c "import json,glob,sys; r=json.load(open(glob.glob(sys.argv[1]+'/*/*/report.json')[0])); print({k: r.get(k) for k in ['wall_time_s','train_time_s','tokens_per_s','phases','final_loss','val_nll','peak_memory_bytes','graph_memory_bytes']})" "$out/e2e"
    echo "PTX kept for the next process: $(ls ~/.cache/ternlab/ptx 2>/dev/null | wc -l) files"
  done
fi
if want export; then
  echo "== export: a tiny run saved with train.save = ternary, its ternary/ loaded in transformers"
  $tl run experiments/tiny.toml --set run.device=cuda --set quant.group_size=32 \
    --set train.save=ternary --set train.steps=50 --results "$out/export" | tail -3
  run=$(ls -d "$out"/export/tiny/*/ | head -1)
  grep -E '"(val_nll|packed_max_err|packed_ok|trainer)"' "$run/report.json"
  for m in "$run" "$run/ternary"; do
    echo "-- ternlab eval $m (CPU, f32)"
    $tl eval "$m" --text data/train_data.txt --seq-len 128 --batch-size 1 --device cpu
  done
  for dev in cpu cuda; do
    echo "-- transformers, $dev, f32"
    python3 bench/export_transformers.py "$run/ternary" data/train_data.txt 128 --device $dev
  done
fi
if want generate; then
  echo "== generate with and without the KV cache on a Qwen3-0.6B-shaped checkpoint, bf16"
  qwen3_checkpoint
  for round in 1 2; do for flag in "" --no-cache; do
    echo "-- round $round ${flag:-(cache)}"
    $tl generate $ckpt --prompt "Open source software has" --max-new-tokens 200 --device cuda \
      $flag 2>&1 >"$out/gen$round$flag.txt" | tail -1
  done; done
  cmp -s "$out/gen1.txt" "$out/gen1--no-cache.txt" && echo "-- the same 200 tokens with and without the cache"
fi
if want resume; then
  echo "== resume on the GPU: tiny, 40 steps, a checkpoint every 10; killed during step 25, rerun"
  r="$out/resume"; rm -rf "$r"
  set_=(--set run.device=cuda --set train.steps=40 --set train.checkpoint_every=10
    --set quant.scale=learned --set quant.lambda_warmup_steps=20 --set eval.every=5)
  for k in whole again; do
    $tl run experiments/tiny.toml "${set_[@]}" --results "$r/$k" 2>&1 | tail -1
  done
  TERNLAB_INJECT=exit@25 $tl run experiments/tiny.toml "${set_[@]}" --results "$r/broken" 2>&1 | tail -1
  $tl run experiments/tiny.toml "${set_[@]}" --results "$r/broken" 2>&1 | grep -E "resuming|completed"
  python3 - "$r" <<'PY'
import csv, glob, json, sys
r = sys.argv[1]
def run(k):
    d = glob.glob(f"{r}/{k}/tiny/*/")[0]
    rows = [(x["step"], x["loss"], x["val_loss"]) for x in csv.DictReader(open(d + "loss.csv"))]
    return rows, json.load(open(d + "report.json"))
whole, rw = run("whole")
for k in ["again", "broken"]:
    rows, rep = run(k)
    same = sum(a == b for a, b in zip(rows, whole))
    worst = max(abs(float(a[1]) - float(b[1])) for a, b in zip(rows, whole))
    print(f"{k}: {len(rows)} rows, {same} equal to the uninterrupted run's, worst loss diff {worst:.3g},"
          f" val_nll {rep['val_nll']!r} vs {rw['val_nll']!r}, resumed_from_step {rep.get('resumed_from_step')}")
PY
  echo "== latent checkpoints of a Qwen3-0.6B-shaped model: 250 steps, every 100 or none"
  qwen3_checkpoint
  for every in 0 100; do
    $tl run experiments/baseline.toml --set model.source=$ckpt --set run.device=cuda \
      --set train.checkpoint_every=$every --set eval.max_new_tokens=1 \
      --results "$r/big-$every" 2>&1 | tail -1
    grep -A6 -E '"(train_time_s|tokens_per_s|saves)"' "$r"/big-$every/*/*/report.json
  done
  du -sh "$r"/big-100/*/*/checkpoints/*
  rm -rf "$r"/big-*
fi
if want dp; then
  n=$(nvidia-smi -L | wc -l)
  echo "== data-parallel: tiny, 20 steps of 8 x 128, one GPU against 2..$n (f32, then bf16)"
  r="$out/dp"; rm -rf "$r"
  for dt in f32 bf16; do
    for g in $(seq 1 $n); do
      [[ $g == 1 || $g == 2 || $g == 4 ]] || continue
      $tl run experiments/tiny.toml --set run.device=cuda --set run.devices=$g --set train.steps=20 \
        --set train.dtype=$dt --set eval.max_new_tokens=1 --results "$r/tiny-$dt-$g" 2>&1 | tail -1
    done
  done
  python3 - "$r" <<'PY'
import glob, json, sys
r = sys.argv[1]
for dt in ["f32", "bf16"]:
    one = json.load(open(glob.glob(f"{r}/tiny-{dt}-1/tiny/*/report.json")[0]))
    for f in sorted(glob.glob(f"{r}/tiny-{dt}-[24]/tiny/*/report.json")):
        rep = json.load(open(f))
        d = [abs(a - b) / abs(b) for a, b in zip(rep["loss_curve"], one["loss_curve"])]
        print(f"{dt} {rep['device']}: {len(d)} steps, worst relative loss difference {max(d):.3g} "
              f"(step {d.index(max(d))}), val_nll {rep['val_nll']:.7f} vs {one['val_nll']:.7f}")
PY
  echo "== data-parallel at Qwen3-0.6B shapes, bf16, 8 x 1024 a GPU, 40 steps: tokens/s"
  qwen3_checkpoint
  for g in $(seq 1 $n); do
    [[ $g == 1 || $g == 2 || $g == 4 ]] || continue
    $tl run experiments/baseline.toml --set model.source=$ckpt --set run.device=cuda \
      --set run.devices=$g --set train.dtype=bf16 --set data.batch_size=$((8 * g)) \
      --set data.seq_len=1024 --set train.steps=40 --set eval.max_new_tokens=1 \
      --results "$r/big-$g" 2>&1 | tail -1
    grep -hE '"(device|tokens_per_s|train_time_s|peak_memory_bytes)"' "$r"/big-$g/*/*/report.json
  done
  rm -rf "$r"/big-*
  if (( n >= 2 )); then
    echo "== experiments/tiny-sweep.toml (6 runs, 300 steps of 8 x 64) on cuda:0, then on cuda:0,cuda:1"
    for devs in cuda:0 cuda:0,cuda:1; do
      start=$(date +%s.%N)
      $tl sweep experiments/tiny-sweep.toml --set train.steps=300 --devices $devs \
        --results "$r/sweep-$devs" 2>&1 | grep -cE "^(lr|seed).*completed"
      echo "--devices $devs: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s wall"
    done
  fi
fi
if want dp-faults; then
  n=$(nvidia-smi -L | wc -l); r="$out/dpf"; rm -rf "$r"
  dp=(experiments/tiny.toml --set run.device=cuda --set train.steps=20 --set eval.max_new_tokens=1)
  echo "== data-parallel faults: more ranks than cards ($((n + 2)) on $n)"
  $tl run "${dp[@]}" --set run.devices=$((n + 2)) --results "$r/cards" 2>&1 | grep -E "failed|error" | tail -2
  echo "== rank 1 killed at step 3 (TERNLAB_INJECT=exit@3:#rank1): the run fails, nothing waits"
  time TERNLAB_INJECT='exit@3:#rank1' $tl run "${dp[@]}" --set run.devices=2 --results "$r/rank1" 2>&1 |
    grep -E "failed|died|error" | tail -3
  echo "== resume a data-parallel run: every rank killed at step 12, a checkpoint every 5, rerun"
  for k in whole broken; do
    inject=(); [[ $k == broken ]] && inject=(TERNLAB_INJECT=exit@12)
    env "${inject[@]}" $tl run "${dp[@]}" --set run.devices=2 --set train.checkpoint_every=5 \
      --results "$r/$k" 2>&1 | tail -1
  done
  $tl run "${dp[@]}" --set run.devices=2 --set train.checkpoint_every=5 --results "$r/broken" 2>&1 |
    grep -E "resuming|completed"
  python3 - "$r" <<'PY'
import glob, json, sys
r = sys.argv[1]
a, b = (json.load(open(glob.glob(f"{r}/{k}/tiny/*/report.json")[0])) for k in ["whole", "broken"])
d = [abs(x - y) / abs(x) for x, y in zip(a["loss_curve"], b["loss_curve"])]
print(f"resumed from {b.get('resumed_from_step')}: {len(d)} steps, {sum(x == 0 for x in d)} equal, "
      f"worst relative difference {max(d):.3g}; val_nll {b['val_nll']!r} vs {a['val_nll']!r}")
PY
fi
if want study-pretrain || want study-ternary || want study-extra; then
  # docs/study.md: the corpus comes xz-compressed in .device (it is git-ignored here too).
  [[ -f data/debian-docs.txt ]] || xz -dc .device/debian-docs.txt.xz >data/debian-docs.txt
  sha256sum data/debian-docs.txt
  for step in study-pretrain study-ternary study-extra; do
    want $step || continue
    echo "== $step"
    time TERNLAB=$tl RESULTS=results bash scripts/run_study.sh ${step#study-} 2>&1 |
      grep -vE "step +[0-9]+/"
  done
  # (results/ stays on the machine for the next call; the runs' files, without the models,
  # come back)
  tar czf "$final/study.tgz" --exclude='*.safetensors' results/study-pretrain \
    $(ls -d results/study-ternary results/study-lr results/study-distill 2>/dev/null)
fi
tar czf "$final/results.tgz" -C "$out" $(cd "$out" && ls -d json tiny baseline export resume dp 2>/dev/null)
