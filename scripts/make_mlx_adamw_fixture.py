"""MLX's own AdamW on small f32 and bf16 parameters, kept as tests/fixtures/mlx_adamw.json for
tests/optim.rs, which checks that ternlab's composed AdamW (the seed's arithmetic) gives the
same parameters and moments to the bit.

    .mlx/bin/python scripts/make_mlx_adamw_fixture.py tests/fixtures/mlx_adamw.json

Each case: the dtype, weight decay and bias correction of `mlx.optimizers.AdamW`
(betas 0.9 / 0.95, eps 1e-8, as the seed), the initial parameter, one gradient and learning
rate per step, and the parameter and both moments after every step. Values are written as
the float32 numbers they are (bf16 values are exact in float32).
"""
import json
import sys
from importlib.metadata import version

import mlx.core as mx
import mlx.optimizers as optim

N = 48
STEPS = 4


def case(dtype, weight_decay, bias_correction, seed):
    mx.random.seed(seed)
    p = (mx.random.normal((N,)) * 0.05).astype(dtype)
    opt = optim.AdamW(learning_rate=1e-3, weight_decay=weight_decay, betas=(0.9, 0.95),
                      eps=1e-8, bias_correction=bias_correction)
    params = {"w": p}
    out = {
        "dtype": "bf16" if dtype == mx.bfloat16 else "f32",
        "weight_decay": weight_decay,
        "bias_correction": bias_correction,
        "init": p.astype(mx.float32).tolist(),
        "steps": [],
    }
    for step in range(STEPS):
        lr = 2e-3 * (step + 1) / STEPS
        # gradients of a few magnitudes, so that small updates round away in bf16
        g = (mx.random.normal((N,)) * mx.power(10.0, mx.random.randint(-6, 0, (N,)).astype(mx.float32))).astype(dtype)
        opt.learning_rate = lr
        params = opt.apply_gradients({"w": g}, params)
        mx.eval(params, opt.state)
        st = opt.state["w"]
        out["steps"].append({
            "lr": lr,
            "grad": g.astype(mx.float32).tolist(),
            "param": params["w"].astype(mx.float32).tolist(),
            "m": st["m"].astype(mx.float32).tolist(),
            "v": st["v"].astype(mx.float32).tolist(),
        })
    return out


def main(path):
    cases = [
        case(mx.bfloat16, 0.0, False, 1),
        case(mx.float32, 0.0, False, 2),
        case(mx.bfloat16, 0.1, False, 3),
        case(mx.float32, 0.1, False, 4),
        case(mx.bfloat16, 0.0, True, 5),
    ]
    doc = {"mlx": version("mlx"), "betas": [0.9, 0.95], "eps": 1e-8, "cases": cases}
    with open(path, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
