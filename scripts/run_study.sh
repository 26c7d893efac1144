#!/usr/bin/env bash
# The study of docs/study.md, on one CUDA GPU, from the repository root:
#
#   sh scripts/make_debian_corpus.sh     # data/debian-docs.txt, checked against its manifest
#   bash scripts/run_study.sh pretrain   # the small Qwen3 in full precision, saved
#   bash scripts/run_study.sh ternary    # 8 configurations x 3 seeds of ternary QAT from it
#   bash scripts/run_study.sh extra      # the lr and the distillation weight, 3 x 3 seeds each
#   bash scripts/run_study.sh report     # compare table and plots into docs/study/
#
# TERNLAB (default: `cargo run --release --features cuda --`) is the ternlab to run, RESULTS
# (default: results) where runs go. Each step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a tl <<<"${TERNLAB:-cargo run --release --features cuda --}"
results=${RESULTS:-results}
case ${1:-} in
pretrain)
  "${tl[@]}" run experiments/study/pretrain.toml --results "$results"
  ;;
ternary)
  "${tl[@]}" sweep experiments/study/ternary.toml --results "$results"
  ;;
extra)
  for spec in lr distill; do
    "${tl[@]}" sweep "experiments/study/$spec.toml" --results "$results"
  done
  ;;
report)
  mkdir -p docs/study
  "${tl[@]}" compare "$results/study-pretrain" --metric val_nll --format markdown \
    >docs/study/pretrain.md
  "${tl[@]}" compare "$results/study-ternary" --metric gap_recovered --format markdown \
    >docs/study/ternary.md
  "${tl[@]}" compare "$results/study-ternary" --metric gap_recovered --format json \
    >docs/study/ternary.json
  "${tl[@]}" plot "$results/study-pretrain" -o docs/study/pretrain.png
  "${tl[@]}" plot "$results/study-ternary" -o docs/study/ternary.png
  for x in lr distill; do
    "${tl[@]}" compare "$results/study-$x" --metric gap_recovered --format markdown \
      >"docs/study/$x.md"
    "${tl[@]}" plot "$results/study-$x" -o "docs/study/$x.png"
  done
  ;;
*)
  echo "usage: bash scripts/run_study.sh pretrain|ternary|extra|report" >&2
  exit 2
  ;;
esac
