#!/usr/bin/env bash
# Builds ternlab at an earlier commit for the `before` section of bench/device_run.sh and packs
# it as .device/ternlab-before.xz (beside bench/pack_device.sh's build of this checkout):
#
#   bash bench/pack_before.sh <commit>
#
# The commit is checked out into a git worktree of its own under ../ternlab-before, built in a
# target folder of its own (../target-cuda-before: a target folder shared with another checkout
# can leave cargo taking the other's binary as up to date), and the binary must name that
# commit (build.rs) before it is packed. The worktree stays for the next call; the first build
# takes as long as bench/pack_device.sh's first.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --verify "${1:?usage: bench/pack_before.sh <commit>}^{commit}")
repo=$PWD
tree=$repo/../ternlab-before
export CARGO_TARGET_DIR=${BEFORE_TARGET_DIR:-$repo/../target-cuda-before}
if [[ -d $tree ]]; then
  git -C "$tree" checkout -q --detach "$commit"
else
  git worktree prune  # (a worktree folder removed by hand)
  git worktree add -q --detach "$tree" "$commit"
fi
(cd "$tree" && source "$repo/bench/cuda-offline-build.sh" &&
  cargo build --release --features cuda,nccl)
short=$(git rev-parse --short=12 "$commit")
bin=$CARGO_TARGET_DIR/release/ternlab
# (builds from before build.rs existed name no source: their commit is checked out above and
# their target folder is their own)
if git -C "$tree" cat-file -e HEAD:build.rs 2>/dev/null &&
  ! grep -aqF "ternlab-source=$short;" "$bin"; then
  echo "pack_before: $bin does not name $short" >&2
  exit 1
fi
mkdir -p .device
xz -T2 -6 -c "$bin" >.device/ternlab-before.xz
echo "packed $short as .device/ternlab-before.xz"
