//! Parity with the seed itself: the original MLX script (scripts/seed_mlx.py, run with MLX
//! 0.32.4 / mlx-lm 0.32.2 on Linux CPU by scripts/make_seed_fixture.py) trained the tiny
//! transformers-written bf16 Qwen3 of scripts/make_seed_model.py on the bundled corpus, and
//! its reports are committed under tests/fixtures/seed/. `ternlab run` with nothing but the
//! same settings (every other key at its default) must give the same run: the same tokens,
//! every step's loss, the held-out NLL and the greedy samples, in the seed's sequential
//! windows and in its own random offsets (numpy's generator).
//!
//! CI runs it on the CPU in f32. With a CUDA build, `TERNLAB_TEST_DEVICE=cuda` runs it through
//! the hand-written CUDA step, and `TERNLAB_TEST_DTYPE=bf16` with bf16 compute (the CUDA
//! default), where the bounds are those of bf16 (see `Bounds`).

mod common;

use common::cli::{on_spec, quote, read_json, write_spec};
use common::repo_root;
use serde_json::Value;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    repo_root().join("tests/fixtures/seed")
}

/// How close ternlab must come to the seed, about 5-10x above what the test measures (it prints
/// its numbers): on the CPU in f32, every step within 1.9e-4 relative and the held-out NLL
/// within 1.9e-4; through the CUDA step on an H200 in f32 1.3e-4 and 4.2e-4.
struct Bounds {
    /// max over steps of |ternlab - seed| / seed
    step_loss_rel: f64,
    /// |ternlab - seed| of the held-out mean NLL
    val_nll_abs: f64,
    /// whether the greedy samples must be equal
    same_samples: bool,
}

fn bounds(dtype: &str) -> Bounds {
    match dtype {
        "f32" => Bounds {
            step_loss_rel: 1e-3,
            val_nll_abs: 1e-3,
            same_samples: true,
        },
        // bf16 activations and matmuls against the seed's f32: on an H200 through the
        // hand-written step 3.6e-4 and 7.1e-4 (bench/RESULTS.md).
        "bf16" => Bounds {
            step_loss_rel: 4e-3,
            val_nll_abs: 7e-3,
            same_samples: true,
        },
        other => panic!("TERNLAB_TEST_DTYPE={other:?}: expected f32 or bf16"),
    }
}

fn samples(r: &Value) -> Vec<(String, String)> {
    r["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["prompt"].as_str().unwrap().to_string(),
                s["generation"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn check(sampling: &str) {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join(format!("{sampling}.json"))).unwrap(),
    )
    .unwrap();
    let set = &fixture["settings"];
    let seed = &fixture["report"];
    let device = std::env::var("TERNLAB_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dtype = std::env::var("TERNLAB_TEST_DTYPE").unwrap_or_else(|_| "f32".into());
    let b = bounds(&dtype);

    // The seed's knobs, and nothing else: every other key is ternlab's default.
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        "seed.toml",
        &format!(
            "name = \"seed-{sampling}\"\n\
             [model]\nsource = {}\n\
             [data]\npath = {}\nseq_len = {}\nbatch_size = {}\nsampling = \"{sampling}\"\n\
             [quant]\ngroup_size = {}\n\
             [train]\nsteps = {}\nlr = {}\nwarmup_steps = {}\nseed = {}\ndtype = \"{dtype}\"\n\
             [eval]\nmax_new_tokens = {}\n\
             [run]\ndevice = \"{device}\"\n",
            quote(fixture_dir().join("model").to_str().unwrap()),
            quote(repo_root().join("data/train_data.txt").to_str().unwrap()),
            set["SEQ_LEN"],
            set["BATCH_SIZE"],
            set["GROUP_SIZE"],
            set["NUM_STEPS"],
            set["LR"],
            set["WARMUP_STEPS"],
            set["SEED"],
            set["MAX_TOKENS"],
        ),
    );
    let results = tmp.path().join("results");
    let ran = on_spec("run", &spec, &results, &[], &[]);
    assert_eq!(ran.code, Some(0), "{}", ran.show());
    let run_dir = std::fs::read_dir(results.join(format!("seed-{sampling}")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("report.json").is_file())
        .expect("a run folder with a report");
    let ours = read_json(&run_dir.join("report.json"));

    assert_eq!(ours["semantics"], "seed", "the defaults are the seed's");
    assert_eq!(
        ours["dense_dtype"], "bf16",
        "embeddings and norms stay bf16"
    );
    // Same tokenizer, same split: the token counts the seed printed.
    assert_eq!(ours["train_tokens"], fixture["tokens"]["train_tokens"]);
    assert_eq!(ours["val_tokens"], fixture["tokens"]["val_tokens"]);

    let theirs: Vec<f64> = serde_json::from_value(seed["loss_curve"].clone()).unwrap();
    let mine: Vec<f64> = serde_json::from_value(ours["loss_curve"].clone()).unwrap();
    assert_eq!(mine.len(), theirs.len());
    let mut worst = (0usize, 0f64);
    for (step, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        let rel = (a - b).abs() / b.abs();
        if rel > worst.1 {
            worst = (step, rel);
        }
    }
    let val = ours["val_nll"].as_f64().unwrap() - seed["val_nll"].as_f64().unwrap();
    eprintln!(
        "{sampling} ({device}, {dtype}): worst step loss {:.3e} relative at step {} \
         (ternlab {:.6}, seed {:.6}); step 0 {:.3e}; held-out NLL {:+.3e} (seed {:.6})",
        worst.1,
        worst.0,
        mine[worst.0],
        theirs[worst.0],
        (mine[0] - theirs[0]).abs() / theirs[0],
        val,
        seed["val_nll"].as_f64().unwrap()
    );
    assert!(
        worst.1 < b.step_loss_rel,
        "{sampling}: step {} loss {} vs the seed's {} ({:.3e} relative)",
        worst.0,
        mine[worst.0],
        theirs[worst.0],
        worst.1
    );
    assert!(
        val.abs() < b.val_nll_abs,
        "{sampling}: held-out NLL differs from the seed's by {val:e}"
    );
    // The run learned: the seed's own curve falls (by 0.46 nats in sequential mode).
    assert!(theirs[0] - theirs[theirs.len() - 1] > 0.3);

    // The run's own samples come from weights that differ from the seed's at the 1e-4 level,
    // enough to flip near-ties of a barely trained model's argmax: shown, not compared. The
    // generation itself is compared on the seed's own trained weights below.
    eprintln!(
        "{sampling}: run samples {:?}\n  seed's {:?}",
        samples(&ours),
        samples(seed)
    );
    let generated = generate_on_seed_weights(&fixture, &device, &dtype);
    if b.same_samples {
        assert_eq!(generated, samples(seed), "{sampling}: greedy samples");
    } else {
        eprintln!("{sampling}: on the seed's weights {generated:?}");
    }
}

/// Greedy samples of ternlab's generation (the code `run` uses: all prompts in one batch, the ternary projection of the
/// latents, mlx_lm's stop ids, its detokenizer's leading space) on the parameters the seed
/// generated its samples with (`<sampling>-trained.safetensors`: f32 latents, bf16 rest).
fn generate_on_seed_weights(fixture: &Value, device: &str, dtype: &str) -> Vec<(String, String)> {
    use ternlab::model::load::{read_weights, resolve_checkpoint};
    use ternlab::model::{Qwen3, Qwen3Config, TernarySpec};
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_dir().join("model");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::copy(
        fixture_dir().join(fixture["trained_weights"].as_str().unwrap()),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let files = resolve_checkpoint(tmp.path().to_str().unwrap(), "main").unwrap();
    let cfg = Qwen3Config::from_hf_json(&files.config).unwrap();
    let ternary = TernarySpec::new(
        <ternlab::model::Projection as ternlab::choice::Choice>::ALL.to_vec(),
        ternlab::spec::GroupSize::Columns(
            fixture["settings"]["GROUP_SIZE"].as_u64().unwrap() as usize
        ),
    );
    let dev = match device {
        "cuda" => {
            ternlab::device::open(ternlab::device::DeviceChoice::Cuda(Some(0)))
                .unwrap()
                .0
        }
        _ => candle_core::Device::Cpu,
    };
    let weights = read_weights(&files).unwrap();
    assert_eq!(
        weights["model.embed_tokens.weight"].dtype(),
        candle_core::DType::BF16
    );
    let (m, _) = Qwen3::new(&cfg, weights, &ternary, &dev).unwrap();
    let cd = if dtype == "bf16" {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    };
    let frozen = m.with_compute_dtype(cd).with_fused(true).frozen().unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    let eos = ternlab::train::eos_ids(Some(tmp.path()), &tokenizer).unwrap();
    let max_new = fixture["settings"]["MAX_TOKENS"].as_u64().unwrap() as usize;
    // All prompts in one batch, as a run makes its samples (left padded, each row at its own
    // positions); the seed made them one at a time.
    let prompts: Vec<String> = fixture["report"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["prompt"].as_str().unwrap().to_string())
        .collect();
    let texts = ternlab::train::generate_greedy_batch(&frozen, &tokenizer, &eos, &prompts, max_new)
        .unwrap();
    prompts.into_iter().zip(texts).collect()
}

#[test]
fn sequential_windows_train_as_the_seed_does() {
    check("sequential");
}

#[test]
fn random_offsets_train_as_the_seed_does() {
    check("random");
}
