# ternlab recipes. `just --list` shows this help. Builds with the dev profile, which compiles
# every dependency fully optimised (Cargo.toml), so the recipes, `cargo run` and `cargo test`
# share one build. TERNLAB_FEATURES=cuda (or metal) builds for a GPU; TERNLAB_CARGO="--release"
# adds cargo flags.

features := env("TERNLAB_FEATURES", "")
cargo_flags := env("TERNLAB_CARGO", "")
ternlab := "cargo run --quiet " + cargo_flags + (if features == "" { "" } else { " --features " + features }) + " --"

# List the recipes
default:
    @just --list

# Check a spec's runs, then train those not yet done (e.g. just sweep experiments/lr.toml)
sweep SPEC *ARGS:
    @{{ternlab}} sweep {{SPEC}} {{ARGS}}

# Train the one run of a spec (e.g. just run experiments/tiny.toml --set train.steps=50)
run SPEC *ARGS:
    @{{ternlab}} run {{SPEC}} {{ARGS}}

# List the runs a spec would do and whether each is done, failed or pending
plan SPEC *ARGS:
    @{{ternlab}} plan {{SPEC}} {{ARGS}}

# Reproduce the seed: Qwen3-0.6B, 250 ternary STE steps (downloads the model once)
baseline *ARGS:
    @{{ternlab}} run experiments/baseline.toml {{ARGS}}

# One row per configuration, mean ± std over seeds (e.g. just compare results/lr --metric val_ppl)
compare DIR *ARGS:
    @{{ternlab}} compare {{DIR}} {{ARGS}}

# Two runs side by side: config, metrics, where the loss curves part
diff A B:
    @{{ternlab}} diff {{A}} {{B}}

# Loss curves per configuration with a band over seeds (default: <DIR>/curves.png)
plot DIR OUT="":
    @{{ternlab}} plot {{DIR}} -o {{ if OUT == "" { DIR + "/curves.png" } else { OUT } }}

# The tiny default: a short ternary run on CPU, offline
demo:
    @{{ternlab}} run experiments/tiny.toml

# The test suite (what CI runs)
test:
    @.ci/run

# Time training steps and write bench.json (default: the seed's recipe on the qwen3-0.6b preset)
bench *ARGS:
    @{{ternlab}} bench {{ARGS}}
