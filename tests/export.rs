//! `train.save = "ternary"`: the trained model as a Hugging Face Qwen3 directory that ternlab
//! (and transformers) load as an ordinary checkpoint.

mod common;

use candle_core::{DType, Device};
use common::cli::{on_spec, spec_text, write_spec};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Trains the tiny spec `name` with `set` in `dir`; returns its run folder and report.json.
fn run(dir: &Path, name: &str, set: &[(&str, &str)]) -> (PathBuf, Value) {
    let results = dir.join("results");
    let spec = write_spec(dir, &format!("{name}.toml"), &spec_text(name, set, ""));
    let out = on_spec("run", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let run = std::fs::read_dir(results.join(name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("report.json").is_file())
        .expect("a run folder with a report");
    let report = std::fs::read_to_string(run.join("report.json")).unwrap();
    (run, serde_json::from_str(&report).unwrap())
}

#[test]
fn a_saved_dense_model_starts_the_next_run_where_it_ended() {
    let dir = tempfile::tempdir().unwrap();
    // Pretraining as a study does it: no ternary projection, the trained model saved.
    let (first, report) = run(
        dir.path(),
        "pretrain",
        &[("quant.projections", "[]"), ("train.save", "\"ternary\"")],
    );
    let saved = first.join("ternary");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(
            saved.join(f).is_file(),
            "{f} missing in {}",
            saved.display()
        );
    }
    assert!(!first.join("ternary.tmp").exists());
    let tensors =
        candle_core::safetensors::load(saved.join("model.safetensors"), &Device::Cpu).unwrap();
    // The tiny preset: embedding, 4 layers of 7 projections and 4 norms, final norm (tied head).
    assert_eq!(tensors.len(), 1 + 4 * 11 + 1);
    assert!(tensors.values().all(|t| t.dtype() == DType::BF16));

    // A run from the saved directory starts from exactly the model the first run evaluated:
    // its dense held-out loss before training is the first run's final val_nll, bit for bit
    // (same data, same tokenizer as saved, same bf16 weights).
    let source = saved.to_str().unwrap().replace('\\', "/");
    let (_, next) = run(
        dir.path(),
        "from-saved",
        &[
            ("model.preset", ""),
            ("model.source", &format!("{source:?}")),
            ("train.steps", "1"),
        ],
    );
    let end = report["val_nll"].as_f64().unwrap();
    let start = next["recovery"]["nll_dense_start"].as_f64().unwrap();
    assert_eq!(start, end, "{start} vs {end}");
    assert_eq!(
        next["model_origin"].as_str().unwrap(),
        saved.to_str().unwrap()
    );
}

#[test]
fn a_saved_ternary_model_holds_the_ternary_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (run_dir, _) = run(
        dir.path(),
        "ternary",
        &[("quant.group_size", "32"), ("train.save", "\"ternary\"")],
    );
    let tensors = candle_core::safetensors::load(
        run_dir.join("ternary").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut projections = 0;
    for (name, t) in &tensors {
        let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let v = v.to_vec1::<f32>().unwrap();
        if !name.ends_with("_proj.weight") {
            continue;
        }
        projections += 1;
        // Each group of 32 input columns holds at most -s, 0 and +s (one bf16 scale).
        for group in v.chunks(32) {
            let mags: std::collections::BTreeSet<u32> = group
                .iter()
                .filter(|x| **x != 0.0)
                .map(|x| x.abs().to_bits())
                .collect();
            assert!(mags.len() <= 1, "{name}: group with magnitudes {mags:?}");
        }
    }
    assert_eq!(projections, 4 * 7);
}

#[test]
fn save_takes_only_the_names_it_knows() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        "bad.toml",
        &spec_text("bad", &[("train.save", "\"everything\"")], ""),
    );
    let out = on_spec("run", &spec, &dir.path().join("results"), &[], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("train.save") && out.stderr.contains("\"ternary\""),
        "{}",
        out.show()
    );
}
