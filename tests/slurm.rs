//! `ternlab sweep --slurm`: the job array script (checked as text, and run by hand as one
//! task, with no Slurm needed), and a sweep submitted to a real single-node Slurm that
//! finishes through the scheduler.
//!
//! The second test needs Slurm up on this machine (`scripts/slurm/up.sh`, which `.ci/run`
//! calls first, and this test calls itself when none answers) and fails, saying so, when it
//! cannot have one. To see `queued` without racing the
//! scheduler, its first submission goes through an `sbatch` on PATH that adds `--hold` (the
//! 22.05 of Debian 12 has no SBATCH_HOLD variable): the job waits until the test cancels it,
//! which must turn the runs back to `pending`; the second submission is the real one.

mod common;

use common::cli::{on_spec, plan_rows, read_json, spec_text, ternlab, write_spec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SWEEP: &str = "[sweep]\n\"train.seed\" = [0, 1, 2]\n";

/// A `--set` whose value the job script must quote: a single quote, a blank and a `$`.
const SET: &str = "eval.prompts=[\"It's $HOME\"]";

/// `ternlab plan` with `extra` arguments: run id -> state.
fn states(spec: &Path, results: &Path, extra: &[&str]) -> BTreeMap<String, String> {
    let out = on_spec("plan", spec, results, extra, &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    plan_rows(&out.stdout).into_iter().collect()
}

fn scripts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "sbatch"));
    v.sort();
    v
}

#[test]
fn dry_run_writes_a_job_array_of_the_pending_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "dry.toml", &spec_text("dry", &[], SWEEP));
    let results = tmp.path().join("results");
    let ids = common::cli::plan_ids(&spec, &results, &[SET]);
    assert_eq!(ids.len(), 3);
    // One run done before: the array holds the other two.
    let out = ternlab(
        tmp.path(),
        &[
            "run-one",
            spec.to_str().unwrap(),
            &ids[0],
            "--set",
            SET,
            "--results",
            results.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());

    // No sbatch on PATH: --dry-run does not need one.
    let empty = tmp.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let no_slurm = [("PATH", empty.to_str().unwrap())];
    let dry = [
        "--slurm",
        "--dry-run",
        "--set",
        SET,
        "--time",
        "00:10:00",
        "--partition",
        "debug",
    ];
    let out = on_spec("sweep", &spec, &results, &dry, &no_slurm);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let slurm_dir = results.join("dry").join("slurm");
    let written = scripts(&slurm_dir);
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(
        out.stdout
            .contains(&format!("wrote {} (not submitted)", written[0].display())),
        "{}",
        out.show()
    );
    assert!(
        out.stderr.contains(&format!("{}: done", ids[0])),
        "{}",
        out.show()
    );
    let text = std::fs::read_to_string(&written[0]).unwrap();
    for line in [
        "#SBATCH --array=0-1",
        "#SBATCH --time=00:10:00",
        "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --job-name=ternlab-dry",
        &format!("#SBATCH --output={}/%A_%a.out", slurm_dir.display()),
        &format!("runs=(\n  '{}'\n  '{}'\n)", ids[1], ids[2]),
        r#"--set 'eval.prompts=["It'\''s $HOME"]'"#,
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    assert!(
        !text.contains(&ids[0]),
        "a done run is not resubmitted:\n{text}"
    );
    // A CPU run asks for no GPU.
    assert!(!text.contains("gres") && !text.contains("gpu"), "{text}");
    assert!(!text.contains("--force"), "{text}");
    // Nothing was queued.
    let s = states(&spec, &results, &["--set", SET]);
    assert_eq!(s[&ids[1]], "pending", "{s:?}");
    assert!(!slurm_dir.join("queued").exists());

    // The script is what a task runs: as array task 1 (by hand, as Slurm would start it) it
    // trains the third run, with the prompt as written.
    let mut bash = Command::new("bash");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TERNLAB_") {
            bash.env_remove(k);
        }
    }
    let out = bash
        .arg(&written[0])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_CPUS_PER_TASK", "2")
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_json(&results.join("dry").join(&ids[2]).join("report.json"));
    assert_eq!(report["status"], "completed");
    assert_eq!(report["samples"][0]["prompt"], "It's $HOME");
    let s = states(&spec, &results, &["--set", SET]);
    assert_eq!(
        s.values().collect::<Vec<_>>(),
        ["done", "pending", "done"],
        "{s:?}"
    );

    // Without --dry-run and without sbatch: bad input, nothing written.
    let out = on_spec(
        "sweep",
        &spec,
        &results,
        &["--slurm", "--set", SET],
        &no_slurm,
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("sbatch is not on PATH")
            && out.stderr.contains("slurm-client")
            && out.stderr.contains("--dry-run"),
        "{}",
        out.show()
    );
    assert_eq!(scripts(&slurm_dir), written);
}

/// Whether a Slurm answers here with a usable node; else what `sinfo` said.
fn slurm_state() -> Result<(), String> {
    let out = Command::new("sinfo").args(["-h", "-o", "%T"]).output();
    match &out {
        Ok(o) if o.status.success() => {
            let states = String::from_utf8_lossy(&o.stdout).to_string();
            if states
                .lines()
                .any(|s| ["idle", "mixed", "allocated"].contains(&s.trim()))
            {
                return Ok(());
            }
            Err(format!("sinfo lists no usable node: {states:?}"))
        }
        Ok(o) => Err(format!(
            "sinfo failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("sinfo cannot run: {e}")),
    }
}

/// Starts a single-node Slurm when none is up (`scripts/slurm/up.sh`, as `.ci/run` does, so
/// that a plain `cargo test` works too where it can: as root, with Debian's packages reachable);
/// fails (does not skip) when there is still none, saying why and how to start one.
fn require_slurm() {
    if slurm_state().is_ok() {
        return;
    }
    let up = Command::new("bash")
        .arg(common::repo_root().join("scripts/slurm/up.sh"))
        .output();
    let said = match slurm_state() {
        Ok(()) => return,
        Err(e) => e,
    };
    let up = match up {
        Ok(o) => format!(
            "scripts/slurm/up.sh exited {:?}: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("scripts/slurm/up.sh did not start: {e}"),
    };
    panic!(
        "tests/slurm.rs needs a Slurm on this machine and none is up ({said}; {up}). Start a \
         single-node one with `sudo bash scripts/slurm/up.sh` (Debian; .ci/run does this \
         before the tests)."
    );
}

/// The first `name` on PATH.
fn on_path(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

/// Cancels the jobs it was given when the test ends, however it ends.
struct Jobs(Vec<String>);

impl Drop for Jobs {
    fn drop(&mut self) {
        for j in &self.0 {
            let _ = Command::new("scancel").arg(j).output();
        }
    }
}

/// The job id of `submitted job N: ...`.
fn job_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("submitted job "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no job id in {stdout:?}"))
        .to_string()
}

fn show(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => format!(
            "$ {cmd} {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("$ {cmd}: {e}\n"),
    }
}

/// Polls `plan` until every run is in `want` or `limit` passes; returns the last states.
fn wait_for(spec: &Path, results: &Path, want: &str, limit: Duration) -> BTreeMap<String, String> {
    let start = Instant::now();
    loop {
        let s = states(spec, results, &[]);
        let stuck = s.values().any(|v| v == "failed" || v == "diverged");
        if s.values().all(|v| v == want) || stuck || start.elapsed() > limit {
            return s;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_sweep_submitted_to_slurm_is_queued_then_finishes_through_the_scheduler() {
    require_slurm();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "slurm.toml", &spec_text("slurm", &[], SWEEP));
    let results = tmp.path().join("results");
    let slurm_dir = results.join("slurm").join("slurm");
    let mut jobs = Jobs(Vec::new());

    // An sbatch that holds what it submits.
    let shim = tmp.path().join("hold");
    std::fs::create_dir(&shim).unwrap();
    let real = on_path("sbatch");
    let fake = shim.join("sbatch");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\nexec '{}' --hold \"$@\"\n", real.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        shim.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let held = [("PATH", path.as_str())];

    let out = on_spec("sweep", &spec, &results, &["--slurm"], &held);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let first = job_id(&out.stdout);
    jobs.0.push(first.clone());
    let s = states(&spec, &results, &[]);
    assert_eq!(s.len(), 3);
    assert!(s.values().all(|v| v == "queued"), "{s:?}");
    for (i, id) in s.keys().enumerate() {
        let r = read_json(&slurm_dir.join("queued").join(format!("{id}.json")));
        assert_eq!(r["job_id"], first.as_str());
        assert_eq!(r["array_index"], i);
    }
    // Queued runs are not submitted twice.
    let out = on_spec("sweep", &spec, &results, &["--slurm"], &held);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.stdout.contains("nothing to submit"), "{}", out.show());
    assert!(
        out.stderr
            .contains(&format!("queued as Slurm job {first}_0")),
        "{}",
        out.show()
    );

    // A job that leaves the queue without starting its runs leaves them pending.
    let cancel = Command::new("scancel").arg(&first).output().unwrap();
    assert!(cancel.status.success(), "{cancel:?}");
    let s = wait_for(&spec, &results, "pending", Duration::from_secs(30));
    assert!(s.values().all(|v| v == "pending"), "{s:?}");

    // The real submission: every run trains as an array task.
    let out = on_spec("sweep", &spec, &results, &["--slurm"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let job = job_id(&out.stdout);
    jobs.0.push(job.clone());
    let s = wait_for(&spec, &results, "done", Duration::from_secs(300));
    if !s.values().all(|v| v == "done") {
        let mut report = format!("runs not done: {s:?}\n");
        for f in std::fs::read_dir(&slurm_dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "out") {
                report.push_str(&format!("--- {}\n", f.display()));
                report.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
            }
        }
        report.push_str(&show("scontrol", &["show", "job", &job]));
        report.push_str(&show("squeue", &[]));
        report.push_str(&show("sinfo", &[]));
        panic!("{report}");
    }
    for (i, id) in s.keys().enumerate() {
        let status = read_json(&results.join("slurm").join(id).join("status.json"));
        assert_eq!(status["status"], "completed", "{id}");
        let out = slurm_dir.join(format!("{job}_{i}.out"));
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains(id.as_str()), "{}:\n{text}", out.display());
    }
    // The tasks removed their records as they started.
    let left: Vec<_> = std::fs::read_dir(slurm_dir.join("queued"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let out = ternlab(
        tmp.path(),
        &["compare", results.join("slurm").to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stdout.lines().nth(1).unwrap().starts_with("3 "),
        "{}",
        out.show()
    );
    assert!(!out.stderr.contains("not shown"), "{}", out.show());

    // Everything done: nothing to submit, no script written.
    let before = scripts(&slurm_dir);
    let out = on_spec("sweep", &spec, &results, &["--slurm"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.stdout.contains("nothing to submit"), "{}", out.show());
    assert_eq!(scripts(&slurm_dir), before);
    eprintln!(
        "tests/slurm.rs: through Slurm in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
