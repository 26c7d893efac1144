"""Make the fixture that tests/numpy_rng.rs checks src/numpy_rng.rs against.

The seed's MLX script draws its batch offsets with numpy:

    rng = np.random.default_rng(SEED)                           # once
    starts = rng.integers(0, max_start, size=(batch_size,))     # every step, int64

This records, for several seeds, what numpy gives at each stage (the SeedSequence pool,
generate_state(4, uint64), the PCG64 state and increment, the first raw 64-bit outputs) and
for many ranges several consecutive `integers` calls from a fresh generator, with the
bit generator's state after the last call and how many 64-bit outputs the calls used.

The ranges cover every branch of numpy's bounded fill for rng = high - 1 - low:
  rng == 0 (high 1), 32-bit Lemire (high 2 .. 2**32 - 1; 3 * 2**30 rejects a quarter of
  its draws), rng == 2**32 - 1 (high 2**32: raw 32-bit draws), 64-bit Lemire (high 2**32 + 1
  and up; 3 * 2**61 rejects an eighth), the whole int64 range (raw 64-bit draws),
and mixed sequences that switch between them, which pin that the kept high half of a
64-bit output outlives an `integers` call.

Run with any numpy >= 1.17 (the fixture was made with the version it names), then commit
the output (about 80 KB):

    python3 scripts/make_numpy_offsets.py tests/fixtures/numpy_offsets.json
"""
import json
import platform
import sys

import numpy as np
from numpy.random import PCG64, SeedSequence

SEEDS = [0, 1, 42, 1234, 2**32 + 7, 2**63 + 5]
HIGHS = [
    1,
    2,
    24_000,
    175_000,
    2**31,
    3 * 2**30,
    2**32 - 1,
    2**32,
    2**32 + 1,
    2**33 + 3,
    2**40 + 1,
    2**62,
    3 * 2**61,
]
SIZES = [1, 4, 7]
CALLS = 3
RAW = 3

# (low, high, size, endpoint) sequences run from a fresh generator.
MIXED = [
    [
        (0, 24_000, 1, False),
        (0, 2**40 + 1, 2, False),
        (0, 24_000, 1, False),
        (0, 2**32, 3, False),
        (0, 1, 2, False),
        (0, 175_000, 1, False),
        (0, 3 * 2**61, 2, False),
        (0, 2**31, 1, False),
    ],
    [
        (-1_000, 24_000, 3, False),
        (-(2**40), 2**40, 3, False),
        (-(2**63), 2**63 - 1, 3, True),  # the whole int64 range: integers(-2**63, 2**63)
        (5, 5, 2, True),
        (-(2**31), 2**31, 3, False),
    ],
]


def end_state(bg):
    s = bg.state
    return {
        "state": str(s["state"]["state"]),
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]) if s["has_uint32"] else None,
    }


def words_used(seed, end):
    """How many 64-bit outputs took a fresh PCG64(seed) to the state `end`."""
    bg = PCG64(SeedSequence(seed))
    target = int(end["state"])
    for n in range(100_000):
        if bg.state["state"]["state"] == target:
            return n
        bg.random_raw()
    raise RuntimeError("state not reached")


def draw(rng, low, high, size, endpoint):
    vals = rng.integers(low, high, size=(size,), endpoint=endpoint)
    assert vals.dtype == np.int64
    return [int(v) for v in vals]


def grid_case(seed, high, size):
    """CALLS consecutive integers(0, high, size=(size,)) from a fresh default_rng(seed)."""
    rng = np.random.default_rng(seed)
    calls = [draw(rng, 0, high, size, False) for _ in range(CALLS)]
    end = end_state(rng.bit_generator)
    return {"seed": seed, "high": high, "size": size, "calls": calls, "end": end,
            "words": words_used(seed, end)}


def mixed_case(seed, calls):
    rng = np.random.default_rng(seed)
    out = [
        {"low": low, "high": high, "size": size, "endpoint": endpoint,
         "out": draw(rng, low, high, size, endpoint)}
        for low, high, size, endpoint in calls
    ]
    end = end_state(rng.bit_generator)
    return {"seed": seed, "calls": out, "end": end, "words": words_used(seed, end)}


def main(path):
    seeds = []
    for seed in SEEDS:
        ss = SeedSequence(seed)
        bg = PCG64(ss)
        st = bg.state["state"]
        seeds.append({
            "seed": seed,
            "pool": [int(w) for w in ss.pool],
            "state_words": [int(w) for w in ss.generate_state(4, np.uint64)],
            "state": str(st["state"]),
            "inc": str(st["inc"]),
            "raw": [int(w) for w in bg.random_raw(RAW)],
        })
    grid = [grid_case(seed, high, size) for seed in SEEDS for high in HIGHS for size in SIZES]
    mixed = [mixed_case(seed, calls) for seed in SEEDS for calls in MIXED]

    lines = [
        "{",
        '"made_by": "scripts/make_numpy_offsets.py",',
        f'"numpy": {json.dumps(np.__version__)},',
        f'"python": {json.dumps(platform.python_version())},',
        '"seeds": [',
        ",\n".join(json.dumps(s, separators=(",", ":")) for s in seeds),
        "],",
        '"grid": [',
        ",\n".join(json.dumps(c, separators=(",", ":")) for c in grid),
        "],",
        '"mixed": [',
        ",\n".join(json.dumps(c, separators=(",", ":")) for c in mixed),
        "]",
        "}",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"numpy {np.__version__}: {len(seeds)} seeds, {len(grid)} grid cases, "
          f"{len(mixed)} mixed cases -> {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/numpy_offsets.json")
