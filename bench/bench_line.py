#!/usr/bin/env python3
"""One line from the JSON of `ternlab bench --out`, for alternating runs side by side: the tag,
the median and the fastest step, the median forward / backward / optimizer phases (ms; the
bench's second pass, a device sync after each phase; `-` where a run has none), tokens/s, the
peak memory (GiB), the card, and the source the build was made from (`-` for builds older
than that field).

    python3 bench/bench_line.py bench.json "TAG"
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: bench_line.py BENCH_JSON TAG")
    d = json.load(open(sys.argv[1]))

    def ms(key):
        v = d.get(key)
        return "-" if v is None else f"{v * 1000:.2f}"

    keys = ["median_step_s", "min_step_s", "median_forward_s", "median_backward_s",
            "median_optimizer_s"]
    peak = d.get("peak_memory_gib")
    print(sys.argv[2], *(ms(k) for k in keys), int(d["tokens_per_s"]),
          "-" if peak is None else f"{peak:.2f}", d["device_name"], d.get("source", "-"))


if __name__ == "__main__":
    main()
