//! `train.checkpoint_every` and `train.save = "latent"`: a run killed (the process ends at
//! once, `TERNLAB_INJECT=exit@K`) or interrupted (as Ctrl-C, `interrupt@K`) goes on from its
//! newest latent checkpoint when the sweep is rerun, and ends exactly where the uninterrupted
//! run ends: the same loss curve, held-out losses, report numbers and saved files, bit for bit
//! on the CPU. The spec uses every piece of state a resume must restore: the random sampler,
//! AdamW's moments in f32 (latents, learned scales) and bf16 (dense tensors), the quantizer's
//! lambda warm-up, and the distillation terms.

mod common;

use common::cli::{on_spec, read_json, spec_text, write_spec};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SET: &[(&str, &str)] = &[
    ("train.steps", "12"),
    ("train.checkpoint_every", "4"),
    ("train.save", "\"both\""),
    ("quant.scale", "\"learned\""),
    ("quant.lambda_warmup_steps", "6"),
    ("distill.weight", "1.0"),
    ("eval.every", "3"),
];

struct Case {
    spec: PathBuf,
    results: PathBuf,
}

impl Case {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            spec: write_spec(dir, "resume.toml", &spec_text("resume", SET, "")),
            results: dir.join("results"),
        }
    }

    fn sweep(&self, extra: &[&str], inject: Option<&str>) -> common::cli::Ran {
        let env: Vec<(&str, &str)> = inject.map(|v| ("TERNLAB_INJECT", v)).into_iter().collect();
        on_spec("sweep", &self.spec, &self.results, extra, &env)
    }

    fn run_dir(&self) -> PathBuf {
        let name = self.results.join("resume");
        std::fs::read_dir(&name)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("config.toml").is_file())
            .expect("a run folder")
    }

    fn checkpoints(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.run_dir().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

/// loss.csv without its elapsed_s column (wall time differs between any two runs).
fn curve(run: &Path) -> Vec<Vec<String>> {
    let mut rd = csv::Reader::from_path(run.join("loss.csv")).unwrap();
    rd.records()
        .map(|r| {
            let r = r.unwrap();
            [0, 1, 2, 3, 5].iter().map(|&i| r[i].to_string()).collect()
        })
        .collect()
}

/// The report numbers a resume must reproduce.
fn results_of(report: &Value) -> Vec<(&'static str, Value)> {
    [
        "loss_curve",
        "val_nll",
        "first_5_loss_avg",
        "last_20_loss_avg",
        "final_loss",
        "distill",
        "recovery",
        "samples",
        "packed_max_err",
        "ternary_max_err",
    ]
    .into_iter()
    .map(|k| (k, report[k].clone()))
    .collect()
}

/// Every tensor of a safetensors file: name -> (dtype, shape, bytes). (Not the file's bytes:
/// the library writes the metadata of the packed file in a hash map's order.)
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let dtype = format!("{:?}", v.dtype());
            (name, (dtype, v.shape().to_vec(), v.data().to_vec()))
        })
        .collect()
}

#[test]
fn killed_then_interrupted_run_resumes_to_the_uninterrupted_runs_results_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = Case::new(&tmp.path().join("whole"));
    let out = whole.sweep(&[], None);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let whole_run = whole.run_dir();
    let whole_report = read_json(&whole_run.join("report.json"));
    assert!(whole_report.get("resumed_from_step").is_none());
    // Checkpoints after steps 4, 8 and 12; the newest two kept.
    assert_eq!(whole.checkpoints(), ["step-00000008", "step-00000012"]);
    // (three checkpoints and latent/, each holding every parameter and its two moments)
    let saves = &whole_report["saves"];
    assert_eq!(saves["count"], 4, "{saves}");
    let n_params = whole_report["n_params"].as_u64().unwrap();
    assert!(
        saves["bytes"].as_u64().unwrap() > 3 * 2 * n_params,
        "{saves}"
    );

    let broken = Case::new(&tmp.path().join("broken"));
    // Killed during step 6: the checkpoint of step 4 is what is left.
    let out = broken.sweep(&[], Some("exit@6"));
    assert_eq!(out.code, Some(137), "{}", out.show());
    assert_eq!(broken.checkpoints(), ["step-00000004"]);
    let run = broken.run_dir();
    assert!(!run.join("report.json").exists());
    assert_eq!(
        curve(&run).len(),
        6,
        "steps 0-5 were written before the kill"
    );
    let plan = on_spec("plan", &broken.spec, &broken.results, &[], &[]);
    assert!(
        plan.stdout.contains("unfinished  (resumes at step 4)"),
        "{}",
        plan.show()
    );

    // Rerun: on from step 4, then interrupted before step 10 (a checkpoint of step 10 is
    // written on the way out).
    let out = broken.sweep(&[], Some("interrupt@10"));
    assert_eq!(out.code, Some(130), "{}", out.show());
    assert!(
        out.stderr.contains("resuming from step 4"),
        "{}",
        out.show()
    );
    assert_eq!(broken.checkpoints(), ["step-00000008", "step-00000010"]);
    let report = read_json(&run.join("report.json"));
    assert_eq!(report["status"], "interrupted", "{report:#}");
    assert_eq!(report["resumed_from_step"], 4);

    // Rerun: on from step 10 to the end.
    let out = broken.sweep(&[], None);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stderr.contains("resuming from step 10"),
        "{}",
        out.show()
    );
    let report = read_json(&run.join("report.json"));
    assert_eq!(report["status"], "completed");
    assert_eq!(report["resumed_from_step"], 10);
    assert_eq!(broken.checkpoints(), ["step-00000010", "step-00000012"]);

    // The curve: one row per step, each equal to the uninterrupted run's (loss, lr, tokens,
    // held-out loss every 3 steps).
    let (ours, theirs) = (curve(&run), curve(&whole_run));
    assert_eq!(ours.len(), 12);
    assert_eq!(ours, theirs);
    for (k, v) in results_of(&whole_report) {
        assert_eq!(report[k], v, "report.json {k}");
    }
    // The saved models and the final training state, bit for bit: latents, learned scales,
    // AdamW moments and the curve in latent.safetensors; the packed ternary model.
    for file in [
        "latent/latent.safetensors",
        "ternary.safetensors",
        "ternary/model.safetensors",
    ] {
        let (ours, theirs) = (tensors(&run.join(file)), tensors(&whole_run.join(file)));
        assert!(ours.len() > 10, "{file}: {} tensors", ours.len());
        assert!(
            ours == theirs,
            "{file} differs from the uninterrupted run's"
        );
    }
    let state = read_json(&run.join("latent/state.json"));
    let whole_state = read_json(&whole_run.join("latent/state.json"));
    for k in [
        "step",
        "optimizer_steps",
        "sampler",
        "lambda",
        "config_hash",
    ] {
        assert_eq!(state[k], whole_state[k], "latent/state.json {k}");
    }
    assert_eq!(state["step"], 12);
    assert_eq!(state["lambda"], 1.0);

    // --force starts over: no resume, the same results again.
    let out = broken.sweep(&["--force"], None);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(!out.stderr.contains("resuming"), "{}", out.show());
    let report = read_json(&run.join("report.json"));
    assert!(report.get("resumed_from_step").is_none());
    assert_eq!(report["loss_curve"], whole_report["loss_curve"]);
}

#[test]
fn checkpoint_every_leaves_the_run_id_and_the_results_as_they_were() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = Case {
        spec: write_spec(
            tmp.path(),
            "plain.toml",
            &spec_text("resume", &[("train.steps", "4")], ""),
        ),
        results: tmp.path().join("plain-results"),
    };
    let every = Case {
        spec: write_spec(
            tmp.path(),
            "every.toml",
            &spec_text(
                "resume",
                &[("train.steps", "4"), ("train.checkpoint_every", "2")],
                "",
            ),
        ),
        results: tmp.path().join("every-results"),
    };
    for c in [&plain, &every] {
        let out = c.sweep(&[], None);
        assert_eq!(out.code, Some(0), "{}", out.show());
    }
    let (a, b) = (plain.run_dir(), every.run_dir());
    assert_eq!(a.file_name(), b.file_name(), "the run id");
    assert!(!a.join("checkpoints").exists());
    assert_eq!(every.checkpoints(), ["step-00000002", "step-00000004"]);
    let (ra, rb) = (
        read_json(&a.join("report.json")),
        read_json(&b.join("report.json")),
    );
    assert_eq!(ra["config_hash"], rb["config_hash"]);
    assert_eq!(ra["loss_curve"], rb["loss_curve"]);
    // The checkpoint after the last step holds the run's losses exactly (f64, not text).
    let saved = safetensors_f64(&b.join("checkpoints/step-00000004/latent.safetensors"));
    let curve: Vec<f64> = ra["loss_curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(saved, curve);
}

/// The `curve.loss` tensor of a latent checkpoint.
fn safetensors_f64(path: &Path) -> Vec<f64> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t["curve.loss"].to_vec1::<f64>().unwrap()
}
