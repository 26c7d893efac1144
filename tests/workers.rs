//! `ternlab sweep --devices ... --jobs N`: each run in a child process on a worker slot. A
//! child that dies (here `TERNLAB_INJECT=exit@1:seed=1`, the process ending at once as if
//! killed) leaves the other runs training and finishing; its run is recorded `failed`; the
//! rerun trains only it; and the runs' results equal those of a sweep in one process.

mod common;

use common::cli::{on_spec, read_json, spec_text, write_spec};
use std::collections::BTreeSet;
use std::path::Path;

const SWEEP: &str = "[sweep]\n\"train.seed\" = [0, 1, 2]\n";

/// Run ids whose model a sweep built, from `[slot] <id>: building the model on ...` lines.
fn built(stderr: &str) -> BTreeSet<String> {
    stderr
        .lines()
        .filter_map(|l| l.split_once(": building the model on "))
        .map(|(head, _)| head.rsplit(' ').next().unwrap().to_string())
        .collect()
}

fn report(results: &Path, id: &str) -> serde_json::Value {
    read_json(&results.join("pool").join(id).join("report.json"))
}

fn ids(results: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(results.join("pool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("seed="))
        .collect();
    v.sort();
    v
}

#[test]
fn a_crashed_worker_leaves_the_others_finishing_and_the_rerun_trains_only_its_run() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "pool.toml", &spec_text("pool", &[], SWEEP));
    let results = tmp.path().join("results");
    let workers = ["--devices", "cpu", "--jobs", "2"];
    let out = on_spec(
        "sweep",
        &spec,
        &results,
        &workers,
        &[("TERNLAB_INJECT", "exit@1:seed=1")],
    );
    assert_eq!(out.code, Some(1), "{}", out.show());
    // Both slots trained.
    for slot in ["[cpu#0]", "[cpu#1]"] {
        assert!(out.stderr.contains(slot), "{slot}: {}", out.show());
    }
    let all = ids(&results);
    assert_eq!(all.len(), 3, "{all:?}");
    let crashed = all.iter().find(|i| i.starts_with("seed=1_")).unwrap();
    for id in &all {
        let dir = results.join("pool").join(id);
        let status = read_json(&dir.join("status.json"));
        if id == crashed {
            assert_eq!(status["status"], "failed", "{status}");
            let err = status["error"].as_str().unwrap();
            assert!(
                err.contains("the worker process died") && err.contains("137"),
                "{err}"
            );
            assert!(!dir.join("report.json").exists());
        } else {
            assert_eq!(status["status"], "completed", "{id}: {status}");
            assert_eq!(report(&results, id)["status"], "completed");
        }
    }
    let summary = out
        .stdout
        .lines()
        .find(|l| l.starts_with(crashed.as_str()))
        .unwrap();
    assert!(summary.contains("failed"), "{summary}");

    // The rerun trains the crashed run only.
    let out = on_spec("sweep", &spec, &results, &workers, &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(built(&out.stderr), BTreeSet::from([crashed.clone()]));
    let out = common::cli::ternlab(
        tmp.path(),
        &["compare", results.join("pool").to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stdout.lines().nth(1).unwrap().starts_with("3 "),
        "{}",
        out.stdout
    );

    // The same runs trained in one process write the same results.
    let inline = tmp.path().join("inline");
    let out = on_spec("sweep", &spec, &inline, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(ids(&inline), all);
    for id in &all {
        let (a, b) = (report(&results, id), report(&inline, id));
        for k in ["loss_curve", "val_nll", "samples", "config_hash"] {
            assert_eq!(a[k], b[k], "{id}: {k}");
        }
    }
}

#[test]
fn run_one_trains_the_named_run_and_refuses_an_unknown_id() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "pool.toml", &spec_text("pool", &[], SWEEP));
    let results = tmp.path().join("results");
    let plan = common::cli::plan_ids(&spec, &results, &[]);
    let out = on_spec("run-one", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(2), "the id is required: {}", out.show());
    let out = common::cli::ternlab(
        tmp.path(),
        &[
            "run-one",
            spec.to_str().unwrap(),
            &plan[2],
            "--results",
            results.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(ids(&results), vec![plan[2].clone()]);
    let out = common::cli::ternlab(
        tmp.path(),
        &[
            "run-one",
            spec.to_str().unwrap(),
            "seed=9_00000000",
            "--results",
            results.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("no run \"seed=9_00000000\"") && out.stderr.contains("3 runs"),
        "{}",
        out.show()
    );
}
