//! The experiments workflow through the real `ternlab` binary, each test in its own temporary
//! folder with tiny runs (the `tiny` preset, 3-4 steps of 2 x 32 tokens on the CPU): `run`
//! writes a run folder (config.toml, loss.csv, status.json, report.json with every key of the
//! seed's report); `plan` expands grids, seeds and `[[sweep.zip]]` axes into stable, unique
//! run ids, and `--set` on a grid key pins that axis; the same config and seed give the same
//! loss curve; a second `sweep` skips finished runs, `--force` retrains them, and a changed key
//! makes new runs beside the old ones; a failing run (`TERNLAB_INJECT=error@...`) is recorded
//! while the rest of the sweep completes, and only it is retrained next time; `compare` (table,
//! markdown, csv, json), `diff` and `plot` (.png, .svg) read the results back.

mod common;

use common::cli::{
    on_spec, plan_ids, plan_rows, read_json, snapshot, spec_text, ternlab, trained_ids, write_spec,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn curve(report: &Value) -> Vec<f64> {
    report["loss_curve"]
        .as_array()
        .expect("loss_curve is a list")
        .iter()
        .map(|v| v.as_f64().expect("a finite loss"))
        .collect()
}

/// The subfolders of an experiment's results folder that are runs (not `.locks`).
fn run_dirs(exp: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(exp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// The hex config-hash suffix of a run id.
fn hash8(id: &str) -> &str {
    id.rsplit('_').next().unwrap()
}

// ---------------------------------------------------------------------------------------------
// run: the run folder
// ---------------------------------------------------------------------------------------------

#[test]
fn run_writes_config_curve_status_and_a_full_report() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "one.toml",
        &spec_text("one", &[("train.steps", "4")], ""),
    );
    let out = on_spec("run", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());

    let exp = results.join("one");
    let runs = run_dirs(&exp);
    assert_eq!(runs.len(), 1, "one run folder: {runs:?}");
    let id = &runs[0];
    assert!(id.starts_with("seed=0_"), "run id {id}");
    let dir = exp.join(id);
    assert!(out.stdout.contains(id.as_str()), "{}", out.show());

    // config.toml: the resolved spec.
    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    assert_eq!(config["name"].as_str(), Some("one"));
    assert_eq!(config["train"]["steps"].as_integer(), Some(4));
    assert_eq!(config["data"]["seq_len"].as_integer(), Some(32));

    // loss.csv: the header and one row per step.
    let csv = std::fs::read_to_string(dir.join("loss.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "step,lr,loss,tokens_seen,elapsed_s,val_loss");
    assert_eq!(lines.len(), 1 + 4, "{csv}");
    for (i, line) in lines[1..].iter().enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 6, "{line}");
        assert_eq!(cells[0], i.to_string());
        assert!(cells[2].parse::<f64>().unwrap().is_finite());
        assert_eq!(cells[3], ((i + 1) * 2 * 32).to_string(), "tokens_seen");
    }

    // status.json
    let status = read_json(&dir.join("status.json"));
    assert_eq!(status["status"], "completed");
    assert!(status["error"].is_null());

    // report.json: every key of the seed's report, plus what comparing needs.
    let report = read_json(&dir.join("report.json"));
    let seed_keys = [
        "first_5_loss_avg",
        "last_20_loss_avg",
        "final_loss",
        "ternary_ok",
        "ternary_max_err",
        "val_nll",
        "val_ppl",
        "num_steps",
        "batch_size",
        "seq_len",
        "lr_peak",
        "group_size",
        "n_ternary_layers",
        "n_ternary_params",
        "samples",
        "loss_curve",
    ];
    let added = [
        "run_id",
        "config_hash",
        "config",
        "seed",
        "device",
        "wall_time_s",
        "tokens_per_s",
        "status",
    ];
    for k in seed_keys.iter().chain(&added) {
        assert!(
            report.get(*k).is_some(),
            "report.json lacks `{k}`: {report}"
        );
    }
    assert_eq!(report["status"], "completed");
    // The source the binary was built from, as `ternlab --version` names it.
    let source = report["versions"]["source"].as_str().unwrap_or_default();
    assert_source(source);
    let version = ternlab(tmp.path(), &["--version"], &[]);
    assert_eq!(
        version.stdout.trim(),
        format!("ternlab {} ({source})", env!("CARGO_PKG_VERSION")),
        "{}",
        version.show()
    );
    // The CPU trains through the composed graph and autograd.
    assert_eq!(report["trainer"], "autograd");
    assert_eq!(report["run_id"], id.as_str());
    assert_eq!(report["num_steps"], 4);
    assert_eq!(report["batch_size"], 2);
    assert_eq!(report["seq_len"], 32);
    assert_eq!(report["seed"], 0);
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["ternary_ok"], true);
    assert_eq!(
        report["n_ternary_layers"],
        4 * 7,
        "tiny: 4 layers x 7 projections"
    );
    assert_eq!(report["config"]["train"]["steps"], 4);
    assert!(id.ends_with(&report["config_hash"].as_str().unwrap()[..8]));
    assert_eq!(status["config_hash"], report["config_hash"]);
    let c = curve(&report);
    assert_eq!(c.len(), 4);
    assert_eq!(report["final_loss"].as_f64(), c.last().copied());
    // The curve in the report is the curve in loss.csv.
    let csv_losses: Vec<f64> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(csv_losses, c);
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0]["prompt"], "The");
    assert!(report["val_ppl"].as_f64().unwrap() > 1.0);
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);

    // `run` refuses a spec that expands to several runs.
    let multi = write_spec(
        tmp.path(),
        "multi.toml",
        &spec_text("multi", &[], "[sweep]\n\"train.seed\" = [0, 1]\n"),
    );
    let out = on_spec("run", &multi, &results, &[], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("ternlab sweep"), "{}", out.show());
    assert!(!results.join("multi").exists());
}

// ---------------------------------------------------------------------------------------------
// plan: sweep expansion and run ids
// ---------------------------------------------------------------------------------------------

#[test]
fn plan_crosses_grid_axes_with_seeds_into_stable_unique_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "grid.toml",
        &spec_text(
            "grid",
            &[],
            "[sweep]\n\"train.lr\" = [1e-3, 3e-3]\n\"train.seed\" = [0, 1, 2]\n",
        ),
    );
    let out = on_spec("plan", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.stdout.contains("6 run(s)"), "{}", out.show());
    let rows = plan_rows(&out.stdout);
    assert_eq!(rows.len(), 6, "{}", out.stdout);
    assert!(rows.iter().all(|(_, s)| s == "pending"), "{rows:?}");
    let ids: Vec<String> = rows.into_iter().map(|(id, _)| id).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 6, "ids unique: {ids:?}");
    // Every (lr, seed) combination, once.
    let combos: BTreeSet<(String, String)> = ids
        .iter()
        .map(|id| {
            let part = |k: &str| {
                id.split('_')
                    .find_map(|p| p.strip_prefix(k))
                    .unwrap_or_else(|| panic!("{id} lacks {k}"))
                    .to_string()
            };
            (part("lr="), part("seed="))
        })
        .collect();
    let want: BTreeSet<(String, String)> = ["0.001", "0.003"]
        .iter()
        .flat_map(|lr| ["0", "1", "2"].map(|s| (lr.to_string(), s.to_string())))
        .collect();
    assert_eq!(combos, want);
    // The same ids when planned again; nothing written.
    assert_eq!(plan_ids(&spec, &results, &[]), ids);
    assert!(!results.exists(), "plan writes nothing");

    // --set on a grid key pins that axis: fewer runs, the same configs (and ids) as the
    // pinned ones of the full sweep.
    let pinned = plan_ids(&spec, &results, &["train.seed=1"]);
    assert_eq!(pinned.len(), 2, "{pinned:?}");
    assert!(pinned.iter().all(|id| ids.contains(id)), "{pinned:?}");
    let seed1: BTreeSet<&str> = ids
        .iter()
        .filter(|id| id.contains("seed=1_"))
        .map(|id| hash8(id))
        .collect();
    let pinned_hashes: BTreeSet<&str> = pinned.iter().map(|id| hash8(id)).collect();
    assert_eq!(pinned_hashes, seed1, "a pinned run is the same config");
    let both = plan_ids(&spec, &results, &["train.seed=1", "train.lr=0.001"]);
    assert_eq!(both.len(), 1, "{both:?}");

    // --set on another key keeps the runs and changes every id.
    let longer = plan_ids(&spec, &results, &["train.steps=4"]);
    assert_eq!(longer.len(), 6);
    assert!(longer.iter().all(|id| !ids.contains(id)), "{longer:?}");
}

#[test]
fn plan_zip_axis_moves_its_keys_together() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "zip.toml",
        &spec_text(
            "zip",
            &[],
            "[sweep]\n\"train.seed\" = [0, 1]\n\n[[sweep.zip]]\n\
             \"train.lr\" = [1e-3, 3e-3]\n\"train.warmup_steps\" = [1, 2]\n",
        ),
    );
    let ids = plan_ids(&spec, &results, &[]);
    assert_eq!(ids.len(), 2 * 2, "zipped keys are one axis: {ids:?}");
    for id in &ids {
        let zipped_ok = (id.contains("lr=0.001_") && id.contains("warmup_steps=1_"))
            || (id.contains("lr=0.003_") && id.contains("warmup_steps=2_"));
        assert!(zipped_ok, "{id}: lr and warmup_steps move together");
    }
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 4);
    assert_eq!(plan_ids(&spec, &results, &[]), ids);

    // A --set on a zipped key is refused (it would break the zip).
    let out = on_spec("plan", &spec, &results, &["--set", "train.lr=0.01"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("sweep.zip"), "{}", out.show());
}

/// Axes are crossed in the order written, the last one varying fastest (plan.rs), not in the
/// alphabetical order of a sorted TOML table.
#[test]
fn plan_crosses_axes_in_the_order_written() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "order.toml",
        &spec_text(
            "order",
            &[],
            "[sweep]\n\"train.seed\" = [0, 1]\n\"train.lr\" = [1e-3, 3e-3]\n",
        ),
    );
    let ids = plan_ids(&spec, &results, &[]);
    assert_eq!(ids.len(), 4);
    assert!(
        ids[0].starts_with("seed=0_lr=0.001_") && ids[1].starts_with("seed=0_lr=0.003_"),
        "train.seed is written first, so it varies slowest and leads the id; got {ids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------------------------

#[test]
fn same_config_and_seed_give_the_same_curve_other_seeds_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "det.toml", &spec_text("det", &[], ""));
    let (ra, rb) = (tmp.path().join("results-a"), tmp.path().join("results-b"));
    for r in [&ra, &rb] {
        let out = on_spec("run", &spec, r, &[], &[]);
        assert_eq!(out.code, Some(0), "{}", out.show());
    }
    let (ida, idb) = (run_dirs(&ra.join("det")), run_dirs(&rb.join("det")));
    assert_eq!(ida, idb, "the same run id in both folders");
    let a = read_json(&ra.join("det").join(&ida[0]).join("report.json"));
    let b = read_json(&rb.join("det").join(&idb[0]).join("report.json"));
    assert_eq!(curve(&a).len(), 3);
    assert_eq!(
        curve(&a),
        curve(&b),
        "same config and seed: identical curve"
    );
    assert_eq!(a["val_nll"], b["val_nll"]);
    assert_eq!(a["samples"], b["samples"]);

    let out = on_spec("run", &spec, &ra, &["--set", "train.seed=1"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let ids = run_dirs(&ra.join("det"));
    assert_eq!(ids.len(), 2, "{ids:?}");
    let other = ids.iter().find(|id| id.starts_with("seed=1_")).unwrap();
    let c = read_json(&ra.join("det").join(other).join("report.json"));
    assert_eq!(c["seed"], 1);
    assert_ne!(curve(&a), curve(&c), "another seed: another curve");
}

// ---------------------------------------------------------------------------------------------
// Skip, force, changed config
// ---------------------------------------------------------------------------------------------

#[test]
fn second_sweep_skips_finished_runs_and_force_retrains_them() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "skip.toml",
        &spec_text("skip", &[], "[sweep]\n\"train.seed\" = [0, 1]\n"),
    );
    let first = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let ids = plan_ids(&spec, &results, &[]);
    let mut trained = trained_ids(&first.stderr);
    trained.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(trained, sorted, "the first sweep trains every run");
    let exp = results.join("skip");
    let reports: Vec<(String, SystemTime)> = ids
        .iter()
        .map(|id| snapshot(&exp.join(id).join("report.json")))
        .collect();

    // Planned as done; a second sweep trains nothing and leaves the reports alone.
    let out = on_spec("plan", &spec, &results, &[], &[]);
    assert!(
        plan_rows(&out.stdout).iter().all(|(_, s)| s == "done"),
        "{}",
        out.show()
    );
    let second = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(second.code, Some(0), "{}", second.show());
    assert!(trained_ids(&second.stderr).is_empty(), "{}", second.show());
    for id in &ids {
        assert!(
            second
                .stderr
                .lines()
                .any(|l| l.contains(id.as_str()) && l.contains("skipped")),
            "{id} reported as skipped: {}",
            second.show()
        );
        assert!(second.stdout.contains(id.as_str()), "{}", second.show());
    }
    for (id, before) in ids.iter().zip(&reports) {
        assert_eq!(
            &snapshot(&exp.join(id).join("report.json")),
            before,
            "{id}: report.json untouched"
        );
    }

    // --force retrains every run (the same curves: same config and seed).
    let forced = on_spec("sweep", &spec, &results, &["--force"], &[]);
    assert_eq!(forced.code, Some(0), "{}", forced.show());
    let mut trained = trained_ids(&forced.stderr);
    trained.sort();
    assert_eq!(trained, sorted, "--force retrains every run");
    for (id, (text, mtime)) in ids.iter().zip(&reports) {
        let (now_text, now_mtime) = snapshot(&exp.join(id).join("report.json"));
        assert_ne!(&now_mtime, mtime, "{id}: report.json rewritten");
        let (old, new): (Value, Value) = (
            serde_json::from_str(text).unwrap(),
            serde_json::from_str(&now_text).unwrap(),
        );
        assert_eq!(
            curve(&old),
            curve(&new),
            "{id}: retrained to the same curve"
        );
    }
}

#[test]
fn a_changed_key_makes_new_runs_beside_the_old_and_compare_shows_both() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "chg.toml",
        &spec_text("chg", &[], "[sweep]\n\"train.seed\" = [0, 1]\n"),
    );
    let first = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let exp = results.join("chg");
    let old_ids = run_dirs(&exp);
    assert_eq!(old_ids.len(), 2);
    let old: Vec<(String, SystemTime)> = old_ids
        .iter()
        .map(|id| snapshot(&exp.join(id).join("report.json")))
        .collect();

    let second = on_spec("sweep", &spec, &results, &["--set", "train.steps=4"], &[]);
    assert_eq!(second.code, Some(0), "{}", second.show());
    let new_ids = plan_ids(&spec, &results, &["train.steps=4"]);
    assert_eq!(new_ids.len(), 2);
    assert!(
        new_ids.iter().all(|id| !old_ids.contains(id)),
        "a changed config gets new run ids: {old_ids:?} vs {new_ids:?}"
    );
    let mut trained = trained_ids(&second.stderr);
    trained.sort();
    let mut want = new_ids.clone();
    want.sort();
    assert_eq!(trained, want, "only the new configuration trains");
    assert_eq!(run_dirs(&exp).len(), 4, "{:?}", run_dirs(&exp));
    for (id, before) in old_ids.iter().zip(&old) {
        assert_eq!(&snapshot(&exp.join(id).join("report.json")), before, "{id}");
        assert_eq!(read_json(&exp.join(id).join("report.json"))["num_steps"], 3);
    }
    for id in &new_ids {
        let r = read_json(&exp.join(id).join("report.json"));
        assert_eq!(r["num_steps"], 4);
        assert_eq!(curve(&r).len(), 4);
    }
    // The old spec still plans its runs as done.
    let out = on_spec("plan", &spec, &results, &[], &[]);
    assert!(
        plan_rows(&out.stdout).iter().all(|(_, s)| s == "done"),
        "{}",
        out.show()
    );

    // compare: one row per configuration, the differing key as a column, n = 2 seeds each.
    let out = ternlab(tmp.path(), &["compare", exp.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 3, "header + 2 rows: {}", out.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header[0], "train.steps", "{}", out.stdout);
    assert!(
        !header.contains(&"train.seed"),
        "seeds are aggregated: {}",
        out.stdout
    );
    let steps: BTreeSet<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(steps, BTreeSet::from(["3", "4"]), "{}", out.stdout);
    for l in &lines[1..] {
        assert_eq!(l.split_whitespace().nth(1), Some("2"), "n = 2: {l}");
    }
}

/// A `--set` that pins a grid axis keeps that key in the run id, so after the full sweep
/// `sweep --set train.seed=0` finds the seed-0 runs done instead of training them again under
/// other ids, and `compare` never counts a seed twice.
#[test]
fn pinning_a_seed_after_the_full_sweep_does_not_count_that_seed_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "pin.toml",
        &spec_text(
            "pin",
            &[],
            "[sweep]\n\"train.lr\" = [1e-3, 3e-3]\n\"train.seed\" = [0, 1]\n",
        ),
    );
    let out = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let pinned = on_spec("sweep", &spec, &results, &["--set", "train.seed=0"], &[]);
    assert_eq!(pinned.code, Some(0), "{}", pinned.show());
    let exp = results.join("pin");
    let out = ternlab(
        tmp.path(),
        &["compare", exp.to_str().unwrap(), "--format", "json"],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    let rows: Value = serde_json::from_str(&out.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        let seeds: Vec<&str> = row["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let distinct: BTreeSet<&str> = seeds.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            seeds.len(),
            "a seed counted twice in {}: the pinned sweep retrained {:?} into {:?}",
            row["config"],
            trained_ids(&pinned.stderr),
            run_dirs(&exp)
        );
        assert_eq!(row["metrics"]["final_loss"]["n"], 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Failure isolation
// ---------------------------------------------------------------------------------------------

#[test]
fn a_failing_run_is_recorded_and_the_others_complete_then_only_it_retrains() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "iso.toml",
        &spec_text("iso", &[], "[sweep]\n\"train.seed\" = [0, 1, 2]\n"),
    );
    let ids = plan_ids(&spec, &results, &[]);
    assert_eq!(ids.len(), 3);
    let bad = ids
        .iter()
        .find(|id| id.starts_with("seed=1_"))
        .unwrap()
        .clone();
    let part = format!("seed=1_{}", hash8(&bad));
    let inject = format!("error@1:{part}");

    let out = on_spec(
        "sweep",
        &spec,
        &results,
        &[],
        &[("TERNLAB_INJECT", &inject)],
    );
    assert_eq!(
        out.code,
        Some(1),
        "a failed run makes exit code 1: {}",
        out.show()
    );
    let exp = results.join("iso");
    for id in &ids {
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("summary lists {id}: {}", out.show()));
        let status = read_json(&exp.join(id).join("status.json"));
        if *id == bad {
            assert!(row.contains("failed"), "{row}");
            assert_eq!(status["status"], "failed");
            let err = status["error"].as_str().unwrap_or_default();
            assert!(err.contains("injected error at step 1"), "{status}");
            assert!(!exp.join(id).join("report.json").exists());
            let rows = std::fs::read_to_string(exp.join(id).join("loss.csv")).unwrap();
            assert_eq!(rows.lines().count(), 1 + 1, "step 0 kept: {rows}");
        } else {
            assert!(row.contains("completed"), "{row}");
            assert_eq!(status["status"], "completed");
            assert_eq!(
                read_json(&exp.join(id).join("report.json"))["status"],
                "completed"
            );
        }
    }
    let out2 = on_spec("plan", &spec, &results, &[], &[]);
    let states: BTreeMap<String, String> = plan_rows(&out2.stdout).into_iter().collect();
    assert_eq!(states[&bad], "failed", "{}", out2.stdout);

    // compare shows the completed runs and says one has no report.
    let cmp = ternlab(tmp.path(), &["compare", exp.to_str().unwrap()], &[]);
    assert_eq!(cmp.code, Some(0), "{}", cmp.show());
    assert!(cmp.stderr.contains("1 without a report"), "{}", cmp.show());

    let good: Vec<&String> = ids.iter().filter(|id| **id != bad).collect();
    let before: Vec<(String, SystemTime)> = good
        .iter()
        .map(|id| snapshot(&exp.join(id).join("report.json")))
        .collect();
    let again = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(again.code, Some(0), "{}", again.show());
    assert_eq!(
        trained_ids(&again.stderr),
        vec![bad.clone()],
        "{}",
        again.show()
    );
    for (id, snap) in good.iter().zip(&before) {
        assert_eq!(&snapshot(&exp.join(id).join("report.json")), snap, "{id}");
    }
    assert_eq!(
        read_json(&exp.join(&bad).join("status.json"))["status"],
        "completed"
    );
    assert_eq!(
        read_json(&exp.join(&bad).join("report.json"))["status"],
        "completed"
    );
}

// ---------------------------------------------------------------------------------------------
// compare, diff, plot
// ---------------------------------------------------------------------------------------------

/// `source` names this checkout's commit (12 hex digits, `+dirty` where the sources differ
/// from it), or is "unknown" where git cannot tell (build.rs). A binary built elsewhere
/// (`TERNLAB_BIN`) names a commit of its own checkout: only its form is checked.
fn assert_source(source: &str) {
    if std::env::var_os("TERNLAB_BIN").is_some() {
        let commit = source.strip_suffix("+dirty").unwrap_or(source);
        let hex = commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(hex || source == "unknown", "the build's source {source:?}");
        return;
    }
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert!(
            source == head || source == format!("{head}+dirty"),
            "the build's source {source:?}, the checkout's commit {head}"
        ),
        None => assert_eq!(source, "unknown"),
    }
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn compare_renders_table_markdown_csv_and_json_with_stats_over_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "cmp.toml",
        &spec_text(
            "cmp",
            &[],
            "[sweep]\n\"train.lr\" = [1e-3, 3e-3]\n\"train.seed\" = [0, 1]\n",
        ),
    );
    let out = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let exp = results.join("cmp");
    let exp_s = exp.to_str().unwrap();

    // The reports, by lr.
    let mut by_lr: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for id in run_dirs(&exp) {
        let r = read_json(&exp.join(&id).join("report.json"));
        let lr = r["config"]["train"]["lr"].as_f64().unwrap();
        by_lr.entry(lr.to_string()).or_default().push(r);
    }
    assert_eq!(by_lr.len(), 2);

    // json
    let out = ternlab(tmp.path(), &["compare", exp_s, "--format", "json"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let rows: Value = serde_json::from_str(&out.stdout).expect("compare --format json is JSON");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{}", out.stdout);
    for row in rows {
        let lr = row["config"]["train.lr"].as_str().unwrap();
        let reports = &by_lr[&lr.parse::<f64>().unwrap().to_string()];
        assert_eq!(row["seeds"].as_array().unwrap().len(), 2);
        for m in ["final_loss", "last_20_loss_avg", "val_ppl", "val_nll"] {
            let xs: Vec<f64> = reports.iter().map(|r| r[m].as_f64().unwrap()).collect();
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let std = (xs[0] - xs[1]).abs() / 2f64.sqrt();
            let s = &row["metrics"][m];
            assert_eq!(s["n"], 2, "{m}: {s}");
            assert!(
                approx(s["mean"].as_f64().unwrap(), mean),
                "{m}: {s} vs mean {mean}"
            );
            assert!(
                approx(s["std"].as_f64().unwrap(), std),
                "{m}: {s} vs std {std}"
            );
        }
    }
    // Sorted by last_20_loss_avg, lowest first.
    let key = |r: &Value| r["metrics"]["last_20_loss_avg"]["mean"].as_f64().unwrap();
    assert!(key(&rows[0]) <= key(&rows[1]));

    // table
    let out = ternlab(tmp.path(), &["compare", exp_s], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header[..3],
        ["train.lr", "n", "final_loss"],
        "{}",
        out.stdout
    );
    assert!(lines[1..].iter().all(|l| l.contains('±')), "{}", out.stdout);

    // markdown
    let out = ternlab(tmp.path(), &["compare", exp_s, "--format", "markdown"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("| train.lr | n | final_loss |"),
        "{}",
        out.stdout
    );
    assert!(lines[1].starts_with("|---|"), "{}", out.stdout);
    assert_eq!(lines.len(), 4, "{}", out.stdout);

    // csv: means and stds as plain numbers.
    let out = ternlab(tmp.path(), &["compare", exp_s, "--format", "csv"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let mut rdr = csv::Reader::from_reader(out.stdout.as_bytes());
    let header = rdr.headers().unwrap().clone();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("csv column {name}: {header:?}"))
    };
    let (lr_col, n_col, mean_col) = (col("train.lr"), col("n"), col("final_loss_mean"));
    col("final_loss_std");
    let records: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(&r[n_col], "2");
        let reports = &by_lr[&r[lr_col].parse::<f64>().unwrap().to_string()];
        let mean = reports
            .iter()
            .map(|r| r["final_loss"].as_f64().unwrap())
            .sum::<f64>()
            / 2.0;
        assert!(approx(r[mean_col].parse().unwrap(), mean));
    }

    // An unknown metric is bad input.
    let out = ternlab(tmp.path(), &["compare", exp_s, "--metric", "nope"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
}

#[test]
fn diff_names_the_differing_key_and_where_curves_part() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "dif.toml",
        &spec_text("dif", &[], "[sweep]\n\"train.lr\" = [1e-3, 3e-3]\n"),
    );
    let out = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let exp = results.join("dif");
    let ids = run_dirs(&exp);
    let a = ids.iter().find(|i| i.starts_with("lr=0.001_")).unwrap();
    let b = ids.iter().find(|i| i.starts_with("lr=0.003_")).unwrap();
    let (pa, pb) = (exp.join(a), exp.join(b));

    let out = ternlab(
        tmp.path(),
        &["diff", pa.to_str().unwrap(), pb.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stdout.contains("train.lr: 0.001 -> 0.003"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("(identical)"), "{}", out.stdout);
    // Step 0's loss is taken before the first update: the same weights and batch, so the
    // curves part at step 1.
    assert!(out.stdout.contains("part at step 1 "), "{}", out.stdout);
    let ra = read_json(&pa.join("report.json"));
    assert_eq!(curve(&ra)[0], curve(&read_json(&pb.join("report.json")))[0]);

    // The same config trained again elsewhere: identical.
    let again = tmp.path().join("again");
    let out = on_spec("sweep", &spec, &again, &["--set", "train.lr=0.001"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let twin_ids = run_dirs(&again.join("dif"));
    assert_eq!(twin_ids.len(), 1);
    let twin = again.join("dif").join(&twin_ids[0]);
    let out = ternlab(
        tmp.path(),
        &["diff", pa.to_str().unwrap(), twin.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.stdout.contains("(identical)"), "{}", out.stdout);
    assert!(
        out.stdout.contains("identical over all 3 steps"),
        "{}",
        out.stdout
    );

    // A folder without a report is an error.
    let out = ternlab(
        tmp.path(),
        &["diff", pa.to_str().unwrap(), tmp.path().to_str().unwrap()],
        &[],
    );
    assert_ne!(out.code, Some(0), "{}", out.show());
    assert!(out.stderr.contains("report.json"), "{}", out.show());
}

#[test]
fn plot_writes_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let spec = write_spec(
        tmp.path(),
        "plt.toml",
        &spec_text(
            "plt",
            &[("eval.every", "2")],
            "[sweep]\n\"train.seed\" = [0, 1]\n",
        ),
    );
    let out = on_spec("sweep", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let exp = results.join("plt");
    let exp_s = exp.to_str().unwrap();

    let png = tmp.path().join("loss.png");
    let out = ternlab(
        tmp.path(),
        &["plot", exp_s, "-o", png.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    let bytes = std::fs::read(&png).expect("the PNG exists");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "PNG magic bytes");
    assert!(bytes.len() > 1000);

    let svg = tmp.path().join("loss.svg");
    let out = ternlab(
        tmp.path(),
        &["plot", exp_s, "--out", svg.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    let text = std::fs::read_to_string(&svg).expect("the SVG exists");
    assert!(text.contains("<svg"), "{}", &text[..text.len().min(200)]);
    assert!(text.contains("plt"), "the title names the experiment");

    let jpg = tmp.path().join("loss.jpg");
    let out = ternlab(
        tmp.path(),
        &["plot", exp_s, "-o", jpg.to_str().unwrap()],
        &[],
    );
    assert_ne!(out.code, Some(0), "{}", out.show());
    assert!(out.stderr.contains(".png or .svg"), "{}", out.show());
}

/// `bench` times training steps only, so a window longer than the held-out split is fine there
/// (the bundled text's 10% held out is 2,092 tokens with the tiny tokenizer), while `run`, which
/// evaluates on that split, refuses it before training, naming the key.
#[test]
fn bench_takes_windows_longer_than_the_held_out_split_and_run_refuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        "long.toml",
        &spec_text(
            "long",
            &[("data.seq_len", "2100"), ("data.batch_size", "1")],
            "",
        ),
    );
    let spec_s = spec.to_str().unwrap();
    let json = tmp.path().join("bench.json");
    let args = [
        "bench",
        spec_s,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        json.to_str().unwrap(),
    ];
    let out = ternlab(tmp.path(), &args, &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let r = read_json(&json);
    assert!(r["median_step_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["last_loss"].as_f64().unwrap().is_finite(), "{r}");
    assert_source(r["source"].as_str().unwrap_or_default());

    let results = tmp.path().join("results");
    let out = on_spec("run", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    for want in ["long.toml", "data.val_fraction", "2092 tokens", "2101"] {
        assert!(out.stderr.contains(want), "no {want:?} in\n{}", out.show());
    }
    assert!(
        !results.join("long").exists(),
        "nothing is written for a refused run"
    );
}
