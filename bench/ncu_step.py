#!/usr/bin/env python3
"""Sums Nsight Compute's per-kernel GPU time over one training step.

Input: `ncu --csv --page raw --metrics gpu__time_duration.sum ...` of an eager run of
`ternlab bench` (TERNLAB_CUDA_GRAPH=0). A step is the kernels after one `adamw_multi` up to and
including the next (AdamW ends every step). Prints the step's kernel count and GPU time, then
each kernel name's calls and time, largest first.

    python3 bench/ncu_step.py ncu.csv [--top N] [--budget TFLOP PEAK SHARE]

--budget: the step's model TFLOP (the bench JSON's `model_tflop_per_step`), the card's peak in
TFLOP/s and a share of it: prints the step time at that share, the kernels by family (cuBLAS's
GEMMs, flash attention, AdamW, the loss, the rest) and what the budget leaves for each family
when the others stay as they are.
"""
import argparse
import collections
import csv
import io
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--budget", type=float, nargs=3, metavar=("TFLOP", "PEAK", "SHARE"))
    args = ap.parse_args()
    text = open(args.csv).read()
    start = text.find('"ID","Process ID"')
    if start < 0:
        sys.exit(f"{args.csv}: no ncu raw CSV header (\"ID\",\"Process ID\",...) in it")
    rows = list(csv.reader(io.StringIO(text[start:])))
    head = rows[0]
    name_at, time_at = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    unit = rows[1][time_at]
    scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0,
             "msecond": 1.0}.get(unit)
    if scale is None:
        sys.exit(f"{args.csv}: gpu__time_duration in an unknown unit {unit!r}")
    kernels = [r for r in rows[2:] if len(r) > time_at and r[0].isdigit()]
    ends = [i for i, r in enumerate(kernels) if "adamw_multi" in r[name_at]]
    if len(ends) >= 2:
        step = kernels[ends[0] + 1:ends[1] + 1]
    else:
        # Fewer than two AdamW launches: the step's length is the shortest period p of the
        # kernel names from the AdamW launch on (kernel i runs what kernel i - p ran), and any
        # p consecutive kernels make up one step (steps repeat kernel for kernel).
        names = [r[name_at] for r in kernels]
        # (a period counts when at least half a step's kernels repeat the step before)
        period = next((p for p in range(2, len(names)) if ends and
                       len(names) - max(p, ends[0]) >= p // 2 and
                       all(names[i] == names[i - p] for i in range(max(p, ends[0]), len(names)))),
                      None)
        if period is None:
            sys.exit(f"{args.csv}: {len(ends)} adamw_multi launch(es) among {len(kernels)} "
                     "kernels and no repeating step found (profile more launches)")
        step = kernels[len(kernels) - period:]
        print(f"(one AdamW launch: a step of {period} kernels from the repetition of their names)")
    ms = lambda r: float(r[time_at].replace(",", "")) * scale
    total = sum(ms(r) for r in step)
    print(f"one step: {len(step)} kernels, {total:.3f} ms of GPU time (clocks and caches as "
          "ncu was told)")
    by = collections.defaultdict(lambda: [0, 0.0])
    for r in step:
        by[r[name_at][:70]][0] += 1
        by[r[name_at][:70]][1] += ms(r)
    for name, (calls, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{t:8.3f} ms {100 * t / total:5.1f}% {calls:5d} x {1000 * t / calls:7.1f} us  {name}")
    if args.budget:
        tflop, peak, share = args.budget
        target = 1000 * tflop / (peak * share)
        family = lambda name: ("GEMMs (cuBLAS)" if name.startswith(("nvjet", "sm90_", "cutlass"))
                               else "flash attention" if name.startswith("flash_")
                               else "AdamW" if name.startswith("adamw")
                               else "loss" if name.startswith("cross_entropy") else "the rest")
        fams = collections.defaultdict(float)
        for r in step:
            fams[family(r[name_at])] += ms(r)
        print(f"{share:.0%} of {peak:g} TFLOP/s for {tflop:g} TFLOP: a step of {target:.1f} ms; "
              f"the kernels take {total:.1f}")
        for f, t in sorted(fams.items(), key=lambda kv: -kv[1]):
            left = target - (total - t)
            print(f"  {f:16s} {t:8.2f} ms; with the others as they are, it may take {left:7.2f}")


if __name__ == "__main__":
    main()
