#!/usr/bin/env python3
"""The first launch of each kernel in an Nsight Compute raw CSV (`ncu --csv --page raw
--metrics ...`, the `elementwise` section of bench/device_run.sh): its time, DRAM bytes read
and written, DRAM and SM throughput (% of peak), achieved occupancy, registers, block and grid,
L2 hit rate, and the four largest issue stalls (cycles per issued instruction), one line a
kernel. Metrics the CSV lacks print as `?`.

    python3 bench/ncu_table.py ncu.csv
"""
import csv
import io
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: ncu_table.py NCU_RAW_CSV")
    text = open(sys.argv[1]).read()
    # (one CSV, or several appended one after another, each with its header)
    parts = text.split('"ID","Process ID"')[1:]
    if not parts:
        sys.exit(f"{sys.argv[1]}: no ncu raw CSV header (\"ID\",\"Process ID\",...) in it")
    seen = set()
    for part in parts:
        rows = list(csv.reader(io.StringIO('"ID","Process ID"' + part)))
        show(rows[0], rows[1], rows[2:], seen)


def show(head, units, data, seen):
    def unit(key):
        return units[head.index(key)] if key in head else ""

    for r in data:
        d = dict(zip(head, r))
        name = d.get("Kernel Name")
        if name is None or name in seen:
            continue
        seen.add(name)

        def g(key):
            return d.get(key, "?")

        stalls = sorted(
            ((float(v.replace(",", "")), k.split("stalled_")[1].split("_per")[0])
             for k, v in d.items() if "issue_stalled" in k and v not in ("", "n/a")),
            reverse=True,
        )[:4]
        print(
            f"{name[:40]:40} {g('gpu__time_duration.sum')}{unit('gpu__time_duration.sum')} "
            f"dram r/w {g('dram__bytes_read.sum')}/{g('dram__bytes_write.sum')} "
            f"{unit('dram__bytes_read.sum')} "
            f"dram% {g('dram__throughput.avg.pct_of_peak_sustained_elapsed')} "
            f"sm% {g('sm__throughput.avg.pct_of_peak_sustained_elapsed')} "
            f"occ% {g('sm__warps_active.avg.pct_of_peak_sustained_active')} "
            f"regs {g('launch__registers_per_thread')} block {g('launch__block_size')} "
            f"grid {g('launch__grid_size')} L2hit {g('lts__t_sector_hit_rate.pct')} "
            f"stalls {', '.join(f'{n} {v:.2f}' for v, n in stalls)}"
        )


if __name__ == "__main__":
    main()
