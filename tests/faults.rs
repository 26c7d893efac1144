//! Bad input and runtime faults through the real `ternlab` binary, each test in its own
//! temporary folder with tiny runs (the `tiny` preset on the CPU). Every bad input (malformed
//! TOML, unknown or mistyped keys, impossible values, a group size that does not divide a
//! projection, unusable data files, a missing model, bad sweep axes, one bad run of a sweep)
//! exits with code 2, names the spec file, the key and the bad value, and writes nothing.
//! Runtime faults injected with `TERNLAB_INJECT` (NaN loss, an error, a panic) are recorded in
//! the run's status.json while the sweep goes on; a diverged run is a result that is not
//! retrained without `--force`. Ctrl-C (SIGINT) stops a sweep promptly with code 130 and the
//! run marked interrupted; a killed process leaves its run `unfinished` and only that run is
//! trained again; two sweeps on one results folder train each run exactly once.

mod common;

use common::cli::{
    command, corpus, on_spec, plan_ids, plan_states, quote, read_json, snapshot, spec_args,
    spec_text, ternlab, trained_ids, write_spec, Ran,
};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A `ternlab <cmd>` running in the background, its output going to files.
struct Background {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    fn start(cmd: &str, spec: &Path, results: &Path, tag: &str) -> Self {
        let dir = spec.parent().unwrap();
        let (stdout, stderr) = (
            dir.join(format!("{tag}.stdout")),
            dir.join(format!("{tag}.stderr")),
        );
        let child = command(dir, &spec_args(cmd, spec, results), &[])
            .stdout(Stdio::from(File::create(&stdout).unwrap()))
            .stderr(Stdio::from(File::create(&stderr).unwrap()))
            .spawn()
            .expect("the ternlab binary starts");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        )
    }

    /// Waits for the process to exit, killing it after `limit`; None when it had to be killed.
    fn wait_for(&mut self, limit: Duration) -> Option<Ran> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let (stdout, stderr) = self.output();
                return Some(Ran {
                    code: status.code(),
                    stdout,
                    stderr,
                });
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `csv` holds at least `rows` rows after its header; panics if the process
    /// ends first or it takes over a minute.
    fn wait_for_rows(&mut self, csv: &Path, rows: usize) {
        let start = Instant::now();
        loop {
            let n = std::fs::read_to_string(csv)
                .map(|t| t.lines().count().saturating_sub(1))
                .unwrap_or(0);
            if n >= rows {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let (out, err) = self.output();
                panic!(
                    "ternlab ended ({status}) before {} had {rows} rows\n{out}\n{err}",
                    csv.display()
                );
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} never reached {rows} rows", csv.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Never leave a trainer behind when a test fails.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Data rows of a loss.csv (after the header).
fn csv_rows(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .count()
        .saturating_sub(1)
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit code 2, the file, the key and the value named, nothing written
// ---------------------------------------------------------------------------------------------

/// Runs `ternlab sweep` on `text` in a fresh folder (with `env`) and checks that it is
/// refused as bad input, before anything is written, with every `needle` in the message
/// besides the spec file's path. Returns stderr.
fn refused_with(text: &str, env: &[(&str, &str)], needles: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "bad.toml", text);
    let results = tmp.path().join("results");
    for cmd in ["sweep", "run"] {
        let out = on_spec(cmd, &spec, &results, &[], env);
        assert_eq!(out.code, Some(2), "`{cmd}`: bad input: {}", out.show());
        assert!(
            out.stderr.contains(spec.to_str().unwrap()),
            "`{cmd}`: names the spec file: {}",
            out.show()
        );
        for n in needles {
            assert!(
                out.stderr.contains(n),
                "`{cmd}`: mentions {n:?}: {}",
                out.show()
            );
        }
        assert!(
            trained_ids(&out.stderr).is_empty(),
            "nothing trains: {}",
            out.show()
        );
        assert!(
            !results.exists(),
            "`{cmd}`: the results folder is not created: {}",
            out.show()
        );
        if cmd == "sweep" && text.contains("[sweep]") {
            break; // `run` refuses a multi-run sweep for another reason.
        }
    }
    ternlab(tmp.path(), &spec_args("plan", &spec, &results), env).stderr
}

fn refused(set: &[(&str, &str)], needles: &[&str]) -> String {
    refused_with(&spec_text("bad", set, ""), &[], needles)
}

#[test]
fn malformed_toml_names_the_line() {
    let text = spec_text("bad", &[], "");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("steps = "))
        .unwrap();
    let mut broken: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    broken[at] = "steps = = 3".into();
    let stderr = refused_with(
        &(broken.join("\n") + "\n"),
        &[],
        &["not valid TOML", &format!("line {}", at + 1)],
    );
    // `plan` refuses it the same way.
    assert!(stderr.contains("not valid TOML"), "{stderr}");
}

#[test]
fn unknown_key_suggests_the_nearest() {
    refused(&[("train.lrr", "1e-3")], &["`train.lrr`", "`train.lr`"]);
    refused(
        &[("data.seqlen", "16")],
        &["`data.seqlen`", "`data.seq_len`"],
    );
}

#[test]
fn wrong_type_names_key_and_value() {
    refused(&[("train.steps", "\"ten\"")], &["`train.steps`", "\"ten\""]);
    refused(
        &[("quant.group_size", "\"column\"")],
        &["`quant.group_size`", "\"column\"", "\"row\""],
    );
}

#[test]
fn group_size_must_divide_every_projection_width() {
    // tiny: hidden 128 (q/k/v/o/gate/up inputs), intermediate 384 (down_proj's input).
    refused(
        &[
            ("quant.group_size", "256"),
            ("quant.projections", "[\"down_proj\"]"),
        ],
        &["`quant.group_size`", "256", "down_proj", "384"],
    );
    refused(
        &[("quant.group_size", "256")],
        &["`quant.group_size`", "256", "q_proj", "128"],
    );
}

#[test]
fn quantizer_keys_name_their_valid_values() {
    refused(
        &[("quant.granularity", "\"block\"")],
        &[
            "`quant.granularity`",
            "\"block\"",
            "\"group\"",
            "\"row\"",
            "\"tensor\"",
        ],
    );
    refused(
        &[("quant.scale", "\"lsq\"")],
        &[
            "`quant.scale`",
            "\"lsq\"",
            "\"absmean\", \"absmax\" or \"learned\"",
        ],
    );
    refused(
        &[("quant.scale_dtype", "\"f8\"")],
        &["`quant.scale_dtype`", "\"f8\"", "\"f16\""],
    );
    refused(
        &[("distill.weight", "-1.0")],
        &["`distill.weight`", "-1", ">= 0"],
    );
    refused(
        &[("distill.temperature", "0.0")],
        &["`distill.temperature`", "> 0"],
    );
    refused(
        &[("quant.activation_bits", "4")],
        &["`quant.activation_bits`", "4", "0 (off) or 8"],
    );
    refused(
        &[("quant.scale", "\"learned\""), ("quant.scale_lr", "0.0")],
        &["`quant.scale_lr`", "0", "> 0"],
    );
    refused(
        &[("train.save", "\"dense\"")],
        &[
            "`train.save`",
            "\"none\"",
            "\"ternary\"",
            "\"latent\"",
            "\"both\"",
        ],
    );
    // Data parallelism: CUDA only, an even split of the batch, a build with NCCL.
    refused(&[("run.devices", "0")], &["`run.devices`", "at least 1"]);
    refused(
        &[("run.devices", "2")],
        &["`run.devices`", "CUDA GPUs", "run.device = \"cuda\""],
    );
    refused(
        &[("run.devices", "3"), ("run.device", "\"cuda\"")],
        &["`run.devices`", "data.batch_size = 2"],
    );
    #[cfg(not(feature = "nccl"))]
    refused(
        &[("run.devices", "2"), ("run.device", "\"cuda:1\"")],
        &["`run.devices`", "--features cuda,nccl"],
    );
    // tiny has layers 0 to 3.
    refused(
        &[("quant.exclude_layers", "[1, 4]")],
        &["`quant.exclude_layers`", "layer 4", "0 to 3"],
    );
}

#[test]
fn unknown_projection_is_named() {
    refused(
        &[("quant.projections", "[\"q_proj\", \"qq_proj\"]")],
        &["`quant.projections`", "\"qq_proj\"", "down_proj"],
    );
}

#[test]
fn impossible_numbers_are_refused() {
    refused(&[("train.lr", "0.0")], &["`train.lr`", "0.0", "> 0"]);
    refused(&[("train.lr", "-1e-3")], &["`train.lr`", "-0.001"]);
    refused(&[("train.steps", "0")], &["`train.steps`", "= 0"]);
    refused(&[("data.batch_size", "0")], &["`data.batch_size`", "= 0"]);
    refused(&[("data.seq_len", "0")], &["`data.seq_len`", "= 0"]);
    refused(
        &[("train.betas", "[0.9, 1.0]")],
        &["`train.betas[1]`", "1.0", "[0, 1)"],
    );
    refused(
        &[("train.betas", "[-0.1, 0.95]")],
        &["`train.betas[0]`", "-0.1"],
    );
    refused(
        &[("data.val_fraction", "0.0")],
        &["`data.val_fraction`", "0.0", "(0, 1)"],
    );
    refused(
        &[("data.val_fraction", "1.5")],
        &["`data.val_fraction`", "1.5"],
    );
}

#[test]
fn unusable_data_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    std::fs::write(
        d.join("latin1.txt"),
        b"caf\xe9 au lait\n\nsecond paragraph\n",
    )
    .unwrap();
    std::fs::write(
        d.join("short.txt"),
        "A short first paragraph.\n\nA held-out one.\n",
    )
    .unwrap();

    let missing = path("missing.txt");
    refused(
        &[("data.path", &quote(&missing))],
        &["`data.path`", &missing, "does not exist"],
    );
    let empty = path("empty.txt");
    refused(
        &[("data.path", &quote(&empty))],
        &["`data.path`", &empty, "0 paragraph"],
    );
    let latin1 = path("latin1.txt");
    refused(
        &[("data.path", &quote(&latin1))],
        &["`data.path`", &latin1, "UTF-8"],
    );
    let short = path("short.txt");
    refused(
        &[("data.path", &quote(&short))],
        &["`data.seq_len`", &short, "seq_len = 32"],
    );
    // A folder is not a data file.
    let folder = d.to_str().unwrap();
    refused(&[("data.path", &quote(folder))], &["`data.path`", folder]);
}

#[test]
fn a_model_that_does_not_exist_is_named() {
    refused(
        &[
            ("model.preset", ""),
            ("model.source", &quote("./nope/model")),
        ],
        &["`model.source`", "./nope/model"],
    );
    let hf = tempfile::tempdir().unwrap();
    let hf_home = hf.path().to_str().unwrap();
    let text = spec_text(
        "bad",
        &[
            ("model.preset", ""),
            ("model.source", &quote("nobody/no-such-model")),
        ],
        "",
    );
    // HF_HUB_CACHE would win over HF_HOME: point it into the empty home too.
    let cache = hf.path().join("hub");
    let stderr = refused_with(
        &text,
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", hf_home),
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ],
        &[
            "`model.source`",
            "nobody/no-such-model",
            "not found",
            "HF_HUB_OFFLINE",
        ],
    );
    // `plan` checks no model: it lists the run.
    assert!(stderr.is_empty(), "{stderr}");
    assert!(
        std::fs::read_dir(hf.path()).unwrap().next().is_none(),
        "nothing downloaded or cached"
    );
}

#[test]
fn bad_sweep_axes_are_refused() {
    refused_with(
        &spec_text("bad", &[], "[sweep]\n\"train.lrr\" = [1e-3, 2e-3]\n"),
        &[],
        &["`train.lrr`", "`train.lr`"],
    );
    refused_with(
        &spec_text("bad", &[], "[sweep]\n\"train.lr\" = []\n"),
        &[],
        &["`train.lr`", "empty list"],
    );
    refused_with(
        &spec_text("bad", &[], "[sweep]\n\"train.lr\" = 1e-3\n"),
        &[],
        &["`train.lr`", "list"],
    );
}

#[test]
fn one_bad_run_stops_the_whole_sweep_before_any_training() {
    // The bad value is the second of the axis: the first run would be fine on its own.
    let stderr = refused_with(
        &spec_text(
            "bad",
            &[],
            "[sweep]\n\"train.lr\" = [1e-3, -1.0]\n\"train.seed\" = [0, 1]\n",
        ),
        &[],
        &["`train.lr`", "-1.0"],
    );
    assert!(stderr.contains("in the sweep run with"), "{stderr}");
    // The same when the bad run only shows against the data (checked by prepare, not plan).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("t.txt"), "Tiny.\n\nHeld out.\n").unwrap();
    let tiny = tmp.path().join("t.txt");
    refused_with(
        &spec_text(
            "bad",
            &[],
            &format!(
                "[sweep]\n\"data.path\" = [{}, {}]\n",
                quote(&corpus()),
                quote(tiny.to_str().unwrap())
            ),
        ),
        &[],
        &["`data.seq_len`", tiny.to_str().unwrap()],
    );
}

// ---------------------------------------------------------------------------------------------
// Runtime faults
// ---------------------------------------------------------------------------------------------

#[test]
fn nan_loss_is_a_diverged_result_not_retrained_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "nan.toml",
        &spec_text("nan", &[("train.steps", "4")], ""),
    );
    let out = on_spec(
        "sweep",
        &spec,
        &results,
        &[],
        &[("TERNLAB_INJECT", "nan@2")],
    );
    assert_eq!(out.code, Some(1), "{}", out.show());
    let ids = plan_ids(&spec, &results, &[]);
    let dir = results.join("nan").join(&ids[0]);
    let status = read_json(&dir.join("status.json"));
    assert_eq!(status["status"], "diverged", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("at step 2"),
        "{status}"
    );
    assert_eq!(csv_rows(&dir.join("loss.csv")), 2, "the 2 steps before");
    let report = read_json(&dir.join("report.json"));
    assert_eq!(report["status"], "diverged");
    assert_eq!(report["loss_curve"].as_array().unwrap().len(), 2);
    assert!(out.stdout.contains("diverged"), "{}", out.show());
    assert_eq!(plan_states(&spec, &results)[&ids[0]], "diverged");

    // A diverged run is a result: a rerun (no fault now) does not retrain it.
    let before = snapshot(&dir.join("report.json"));
    let again = on_spec("sweep", &spec, &results, &[], &[]);
    assert!(trained_ids(&again.stderr).is_empty(), "{}", again.show());
    assert!(
        again.stderr.contains("diverged (skipped"),
        "{}",
        again.show()
    );
    assert_eq!(snapshot(&dir.join("report.json")), before);

    // --force retrains it.
    let forced = on_spec("sweep", &spec, &results, &["--force"], &[]);
    assert_eq!(forced.code, Some(0), "{}", forced.show());
    assert_eq!(trained_ids(&forced.stderr), ids);
    assert_eq!(read_json(&dir.join("status.json"))["status"], "completed");
    assert_eq!(csv_rows(&dir.join("loss.csv")), 4);
}

/// A diverged run writes NaN metrics (val_nll, val_ppl) to report.json, where serde_json makes
/// them `null`; the report must still read back, so that `compare` and `plot` leave the
/// diverged run out instead of refusing the whole experiment.
#[test]
fn compare_and_plot_leave_out_a_diverged_run() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "div.toml",
        &spec_text("div", &[], "[sweep]\n\"train.seed\" = [0, 1]\n"),
    );
    let out = on_spec(
        "sweep",
        &spec,
        &results,
        &[],
        &[("TERNLAB_INJECT", "nan@1:seed=1")],
    );
    assert_eq!(out.code, Some(1), "{}", out.show());
    let exp = results.join("div");
    let exp_s = exp.to_str().unwrap();
    let cmp = ternlab(tmp.path(), &["compare", exp_s], &[]);
    assert_eq!(
        cmp.code,
        Some(0),
        "compare with a diverged run: {}",
        cmp.show()
    );
    assert!(cmp.stderr.contains("1 diverged"), "{}", cmp.show());
    let png = tmp.path().join("div.png");
    let plot = ternlab(
        tmp.path(),
        &["plot", exp_s, "-o", png.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        plot.code,
        Some(0),
        "plot with a diverged run: {}",
        plot.show()
    );
    assert!(png.is_file());
}

#[test]
fn an_error_during_training_marks_the_run_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(tmp.path(), "err.toml", &spec_text("err", &[], ""));
    let out = on_spec(
        "run",
        &spec,
        &results,
        &[],
        &[("TERNLAB_INJECT", "error@1")],
    );
    assert_eq!(out.code, Some(1), "{}", out.show());
    let ids = plan_ids(&spec, &results, &[]);
    let dir = results.join("err").join(&ids[0]);
    let status = read_json(&dir.join("status.json"));
    assert_eq!(status["status"], "failed");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("injected error at step 1"),
        "{status}"
    );
    assert!(!dir.join("report.json").exists());
    assert_eq!(csv_rows(&dir.join("loss.csv")), 1);
    assert!(
        out.stderr.contains("failed: injected error at step 1"),
        "{}",
        out.show()
    );
    assert_eq!(plan_states(&spec, &results)[&ids[0]], "failed");
}

#[test]
fn a_panic_marks_the_run_failed_and_the_sweep_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "pan.toml",
        &spec_text("pan", &[], "[sweep]\n\"train.seed\" = [0, 1]\n"),
    );
    let ids = plan_ids(&spec, &results, &[]);
    let out = on_spec(
        "sweep",
        &spec,
        &results,
        &[],
        &[
            ("TERNLAB_INJECT", "panic@1:seed=0"),
            ("RUST_BACKTRACE", "0"),
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.show());
    let exp = results.join("pan");
    let (first, second) = (&ids[0], &ids[1]);
    assert!(first.starts_with("seed=0_"));
    let status = read_json(&exp.join(first).join("status.json"));
    assert_eq!(status["status"], "failed");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("panicked: injected panic at step 1"),
        "{status}"
    );
    // The sweep went on to the next run, which completed.
    assert_eq!(trained_ids(&out.stderr), ids.clone(), "{}", out.show());
    assert_eq!(
        read_json(&exp.join(second).join("status.json"))["status"],
        "completed"
    );
    assert_eq!(
        read_json(&exp.join(second).join("report.json"))["status"],
        "completed"
    );
    let summary = out.stdout.lines().find(|l| l.starts_with(first.as_str()));
    assert!(
        summary.is_some_and(|l| l.contains("failed") && l.contains("injected panic")),
        "{}",
        out.show()
    );
}

// ---------------------------------------------------------------------------------------------
// Interruption, a killed process, concurrent sweeps
// ---------------------------------------------------------------------------------------------

/// Two runs slow enough to interrupt: 400 steps of 8 x 64 tokens.
fn slow_spec(dir: &Path) -> PathBuf {
    write_spec(
        dir,
        "slow.toml",
        &spec_text(
            "slow",
            &[
                ("train.steps", "400"),
                ("data.seq_len", "64"),
                ("data.batch_size", "8"),
            ],
            "[sweep]\n\"train.seed\" = [0, 1]\n",
        ),
    )
}

#[test]
fn sigint_stops_the_sweep_promptly_and_marks_the_run_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = slow_spec(tmp.path());
    let ids = plan_ids(&spec, &results, &[]);
    let exp = results.join("slow");
    let mut bg = Background::start("sweep", &spec, &results, "sweep");
    bg.wait_for_rows(&exp.join(&ids[0]).join("loss.csv"), 3);

    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &bg.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = bg
        .wait_for(Duration::from_secs(20))
        .expect("the sweep exits within 20 s of SIGINT");
    assert!(sent.elapsed() < Duration::from_secs(20));
    assert_eq!(out.code, Some(130), "{}", out.show());

    let dir = exp.join(&ids[0]);
    let status = read_json(&dir.join("status.json"));
    assert_eq!(status["status"], "interrupted", "{status}");
    let rows = csv_rows(&dir.join("loss.csv"));
    assert!((3..400).contains(&rows), "{rows} rows kept");
    let report = read_json(&dir.join("report.json"));
    assert_eq!(report["status"], "interrupted");
    assert_eq!(report["loss_curve"].as_array().unwrap().len(), rows);
    assert!(
        !exp.join(&ids[1]).exists(),
        "the second run never started: {}",
        out.show()
    );
    assert_eq!(trained_ids(&out.stderr), vec![ids[0].clone()]);
    assert!(out.stdout.contains("not run"), "{}", out.show());

    let states = plan_states(&spec, &results);
    assert_eq!(states[&ids[0]], "unfinished");
    assert_eq!(states[&ids[1]], "pending");
}

#[test]
fn a_killed_run_is_unfinished_and_only_it_trains_again() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    // A short run first, then one of 50 steps that is killed while it trains.
    let spec = write_spec(
        tmp.path(),
        "kill.toml",
        &spec_text("kill", &[], "[sweep]\n\"train.steps\" = [3, 50]\n"),
    );
    let ids = plan_ids(&spec, &results, &[]);
    assert!(ids[0].starts_with("steps=3_") && ids[1].starts_with("steps=50_"));
    let exp = results.join("kill");
    let (short, long) = (exp.join(&ids[0]), exp.join(&ids[1]));

    let mut bg = Background::start("sweep", &spec, &results, "sweep");
    bg.wait_for_rows(&long.join("loss.csv"), 3);
    bg.child.kill().unwrap(); // SIGKILL: no handler, no cleanup.
    bg.child.wait().unwrap();

    assert_eq!(read_json(&short.join("status.json"))["status"], "completed");
    let short_report = snapshot(&short.join("report.json"));
    assert_eq!(
        read_json(&long.join("status.json"))["status"],
        "running",
        "the killed run's status was never updated"
    );
    assert!(csv_rows(&long.join("loss.csv")) < 50);
    assert!(!long.join("report.json").exists());
    // Nobody holds its lock any more: unfinished, not running.
    let states = plan_states(&spec, &results);
    assert_eq!(states[&ids[0]], "done");
    assert_eq!(states[&ids[1]], "unfinished");

    let again = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(again.code, Some(0), "{}", again.show());
    assert_eq!(trained_ids(&again.stderr), vec![ids[1].clone()]);
    assert_eq!(snapshot(&short.join("report.json")), short_report);
    assert_eq!(read_json(&long.join("status.json"))["status"], "completed");
    assert_eq!(csv_rows(&long.join("loss.csv")), 50);
    assert_eq!(
        read_json(&long.join("report.json"))["loss_curve"]
            .as_array()
            .unwrap()
            .len(),
        50
    );
}

#[test]
fn two_concurrent_sweeps_train_each_run_once() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "conc.toml",
        &spec_text("conc", &[], "[sweep]\n\"train.seed\" = [0, 1, 2, 3]\n"),
    );
    let ids = plan_ids(&spec, &results, &[]);
    assert_eq!(ids.len(), 4);
    let mut a = Background::start("sweep", &spec, &results, "a");
    let mut b = Background::start("sweep", &spec, &results, "b");
    let limit = Duration::from_secs(120);
    let out_a = a.wait_for(limit).expect("sweep A ends");
    let out_b = b.wait_for(limit).expect("sweep B ends");
    let both = format!("A: {}\n\nB: {}", out_a.show(), out_b.show());
    assert_eq!(out_a.code, Some(0), "{both}");
    assert_eq!(out_b.code, Some(0), "{both}");

    let (ta, tb) = (trained_ids(&out_a.stderr), trained_ids(&out_b.stderr));
    let exp = results.join("conc");
    for id in &ids {
        let n = ta.iter().chain(&tb).filter(|t| *t == id).count();
        assert_eq!(n, 1, "{id} trained exactly once\n{both}");
        // The other process said why it did not train it.
        let other = if ta.contains(id) { &out_b } else { &out_a };
        let logged = other.stderr.lines().any(|l| {
            l.contains(id.as_str())
                && (l.contains("being trained by another process") || l.contains("skipped"))
        });
        let summary = other
            .stdout
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_default();
        assert!(
            logged || summary.contains(" done "),
            "{id}: the other process skipped it\n{both}"
        );
        assert_eq!(
            read_json(&exp.join(id).join("status.json"))["status"],
            "completed"
        );
        let report = read_json(&exp.join(id).join("report.json"));
        assert_eq!(report["status"], "completed");
        assert_eq!(report["run_id"], id.as_str());
    }
    let states = plan_states(&spec, &results);
    assert!(states.values().all(|s| s == "done"), "{states:?}");
}
