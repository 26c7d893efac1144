//! Runs a plan: every run is resolved and checked before any training (one bad run stops the
//! sweep with nothing written); finished runs are skipped; each run's fate is recorded in its
//! `status.json`; a failing run is recorded and the sweep goes on.
//!
//! A run folder `<results>/<name>/<run-id>/` holds `config.toml` (written first), `loss.csv`
//! (streamed), `status.json` (running / completed / diverged / failed / interrupted, written
//! by rename) and, once training ended, `report.json`. `<results>/<name>/.locks/<run-id>.lock`
//! is held (an OS file lock) by the process training that run, so two sweeps on one folder
//! never train the same run; the OS drops the lock when its process dies, however it dies.

use crate::choice::Choice;
use crate::plan::{Plan, PlannedRun};
use crate::progress;
use crate::report::{write_json_atomic, RunStatus};
use crate::run::{execute, prepare, run_dir, PreparedRun};
use serde::{Deserialize, Serialize};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub status: RunStatus,
    pub config_hash: String,
    pub error: Option<String>,
    pub pid: u32,
    pub updated_unix_s: u64,
}

/// What the results folder and the locks say about a planned run: the state `plan` lists and
/// the sweep decides by. Not a `RunStatus`, which a run's own files record: a status.json saying
/// `running` or `interrupted` with no live process holding the lock is `Unfinished` here, and
/// `Running` means that another process holds it now.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    Pending,
    Done,
    Diverged(String),
    Failed(String),
    /// Started but never finished: interrupted, or the process died.
    Unfinished,
    /// Another live process is training it now.
    Running,
    /// Submitted to Slurm (`sweep --slurm`) and not started yet: the array task, `<job>_<i>`,
    /// is still in the queue. Only `plan` and `sweep --slurm` ask the queue (src/slurm.rs);
    /// [`state_of`] never says this.
    Queued(String),
    /// The folder holds results of another configuration (a hash prefix collision, or an edited
    /// config.toml): never mixed, retrained only with --force.
    Conflict(String),
}

impl RunState {
    pub fn label(&self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Done => "done",
            RunState::Diverged(_) => "diverged",
            RunState::Failed(_) => "failed",
            RunState::Unfinished => "unfinished",
            RunState::Running => "running",
            RunState::Queued(_) => "queued",
            RunState::Conflict(_) => "conflict",
        }
    }
}

/// An exclusive claim on one run while it trains.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the run's lock, or returns None if a live process holds it.
    pub fn try_acquire(results: &Path, name: &str, id: &str) -> anyhow::Result<Option<Self>> {
        let dir = results.join(name).join(".locks");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{id}.lock"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // `ternlab plan` probes locks for an instant: retry before concluding that another
        // process trains this run.
        let mut attempt = 0;
        let locked = loop {
            match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) if attempt < 10 => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other,
            }
        };
        match locked {
            Ok(()) => {
                use std::io::Write;
                file.set_len(0)?;
                writeln!(file, "pid {}", std::process::id())?;
                Ok(Some(Self { _file: file }))
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }
}

/// Whether another live process is training this run now.
pub fn is_running_elsewhere(results: &Path, name: &str, id: &str) -> bool {
    let path = results.join(name).join(".locks").join(format!("{id}.lock"));
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    matches!(
        file.try_lock_shared(),
        Err(std::fs::TryLockError::WouldBlock)
    )
}

pub fn read_status(dir: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(dir.join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_status(
    dir: &Path,
    status: RunStatus,
    hash: &str,
    error: Option<String>,
) -> anyhow::Result<()> {
    let s = Status {
        status,
        config_hash: hash.into(),
        error,
        pid: std::process::id(),
        updated_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    write_json_atomic(&dir.join("status.json"), &s)
}

/// The state of a run as `plan` shows it: `Running` if another process holds its lock.
pub fn state_of(results: &Path, name: &str, run: &PlannedRun) -> RunState {
    if is_running_elsewhere(results, name, &run.id) {
        return RunState::Running;
    }
    folder_state(results, name, run)
}

/// The state of a run from its folder alone (what the process holding its lock sees).
pub fn folder_state(results: &Path, name: &str, run: &PlannedRun) -> RunState {
    let dir = run_dir(results, name, &run.id);
    if !dir.exists() {
        return RunState::Pending;
    }
    let Some(st) = read_status(&dir) else {
        return RunState::Unfinished;
    };
    if st.config_hash != run.config_hash {
        return RunState::Conflict(format!(
            "{} holds config {} , not {}",
            dir.display(),
            &st.config_hash[..8.min(st.config_hash.len())],
            &run.config_hash[..8]
        ));
    }
    let err = st.error.clone().unwrap_or_default();
    match st.status {
        RunStatus::Completed if dir.join("report.json").is_file() => RunState::Done,
        RunStatus::Diverged => RunState::Diverged(err),
        RunStatus::Failed => RunState::Failed(err),
        RunStatus::Completed | RunStatus::Running | RunStatus::Interrupted => RunState::Unfinished,
    }
}

/// What a sweep did with one run: the status column of the summary.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Trained now, ending with this status (or `Failed` when it could not start).
    Ended(RunStatus),
    /// Not trained: finished before (done, diverged) or a folder of another config.
    Skipped(RunState),
    /// Another process is training it.
    Elsewhere,
    /// Not started: the sweep was interrupted before it.
    NotRun,
}

impl Fate {
    pub fn label(&self) -> &'static str {
        match self {
            Fate::Ended(status) => status.name(),
            Fate::Skipped(state) => state.label(),
            Fate::Elsewhere => "elsewhere",
            Fate::NotRun => "not run",
        }
    }
}

/// One line of the end-of-sweep summary.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: String,
    pub fate: Fate,
    pub final_loss: Option<f64>,
    pub val_ppl: Option<f64>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
}

pub struct SweepOptions {
    pub results: PathBuf,
    pub force: bool,
}

/// Checks every run of the plan against model and data; the first problem stops everything.
pub fn prepare_all(plan: &Plan) -> anyhow::Result<Vec<PreparedRun>> {
    plan.runs.iter().map(|r| prepare(r, &plan.file)).collect()
}

/// Trains the runs that need it and returns one outcome per run of the plan.
pub fn sweep(plan: &Plan, prepared: &[PreparedRun], opts: &SweepOptions) -> Vec<Outcome> {
    let total = plan.runs.len();
    let mut outcomes = Vec::with_capacity(total);
    for (i, (run, p)) in plan.runs.iter().zip(prepared).enumerate() {
        let label = format!("[{}/{total}] {}", i + 1, run.id);
        if crate::faults::interrupted() {
            outcomes.push(not_run(run, Fate::NotRun, None));
            continue;
        }
        let skip = |state: &RunState| skips(state, opts.force);
        let state = state_of(&opts.results, &plan.name, run);
        if skip(&state) {
            eprintln!("{label}: {} (skipped; --force retrains)", state.label());
            outcomes.push(outcome_from_folder(
                &opts.results,
                plan,
                run,
                Fate::Skipped(state),
            ));
            continue;
        }
        let lock = match RunLock::try_acquire(&opts.results, &plan.name, &run.id) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                eprintln!("{label}: being trained by another process; skipped");
                outcomes.push(not_run(run, Fate::Elsewhere, None));
                continue;
            }
            Err(e) => {
                outcomes.push(not_run(
                    run,
                    Fate::Ended(RunStatus::Failed),
                    Some(format!("taking the run lock: {e}")),
                ));
                continue;
            }
        };
        // Another process may have finished it between the look and the lock.
        let state = folder_state(&opts.results, &plan.name, run);
        if skip(&state) {
            outcomes.push(outcome_from_folder(
                &opts.results,
                plan,
                run,
                Fate::Skipped(state),
            ));
            continue;
        }
        // Training starts here, whoever was meant to: the run is no longer waiting in a Slurm
        // queue (a task of its job that starts later finds it running or done).
        crate::slurm::forget_queued(&opts.results, &plan.name, &run.id);
        outcomes.push(train_one(p, &opts.results, &label, opts.force));
        drop(lock);
    }
    outcomes
}

/// The summary line of a run that did not train here (nothing measured).
pub fn not_run(run: &PlannedRun, fate: Fate, error: Option<String>) -> Outcome {
    Outcome {
        id: run.id.clone(),
        fate,
        final_loss: None,
        val_ppl: None,
        seconds: None,
        error,
    }
}

/// Whether a sweep leaves a run in `state` alone: finished (done or diverged) or a folder of
/// another configuration, unless `force`.
pub fn skips(state: &RunState, force: bool) -> bool {
    match state {
        RunState::Done | RunState::Diverged(_) | RunState::Conflict(_) => !force,
        _ => false,
    }
}

/// The summary line of a run from what its folder holds (report.json, status.json).
pub fn outcome_from_folder(results: &Path, plan: &Plan, run: &PlannedRun, fate: Fate) -> Outcome {
    let dir = run_dir(results, &plan.name, &run.id);
    let report = std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let num = |k: &str| report.as_ref().and_then(|r| r[k].as_f64());
    let error = match &fate {
        Fate::Skipped(RunState::Conflict(e)) => Some(e.clone()),
        Fate::Skipped(RunState::Done) => None,
        _ => read_status(&dir).and_then(|s| s.error),
    };
    Outcome {
        id: run.id.clone(),
        fate,
        final_loss: num("final_loss"),
        val_ppl: num("val_ppl"),
        seconds: num("wall_time_s"),
        error,
    }
}

/// Trains one run, turning any error or panic into a `failed` status: in a fresh folder, or,
/// when its folder holds a latent checkpoint of this configuration (an unfinished or failed
/// run that had `train.checkpoint_every`) and `force` is off, on from the newest checkpoint.
fn train_one(p: &PreparedRun, results: &Path, label: &str, force: bool) -> Outcome {
    let dir = p.run_dir(results);
    let result = (|| -> anyhow::Result<crate::report::Report> {
        let resumable = crate::checkpoint::latest(&dir, &p.config_hash).is_some();
        if dir.exists() && (force || !resumable) {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        write_status(&dir, RunStatus::Running, &p.config_hash, None)?;
        let mut progress = progress::for_stderr(label);
        match catch_unwind(AssertUnwindSafe(|| execute(p, results, progress.as_mut()))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(anyhow::anyhow!("panicked: {msg}"))
            }
        }
    })();
    match result {
        Ok(report) => {
            let _ = write_status(&dir, report.status, &p.config_hash, report.error.clone());
            Outcome {
                id: p.run_id.clone(),
                fate: Fate::Ended(report.status),
                final_loss: Some(report.final_loss),
                val_ppl: Some(report.val_ppl),
                seconds: Some(report.wall_time_s),
                error: report.error,
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("{label}: failed: {msg}");
            if dir.exists() {
                let _ = write_status(&dir, RunStatus::Failed, &p.config_hash, Some(msg.clone()));
            }
            Outcome {
                id: p.run_id.clone(),
                fate: Fate::Ended(RunStatus::Failed),
                final_loss: None,
                val_ppl: None,
                seconds: None,
                error: Some(msg),
            }
        }
    }
}

/// The end-of-sweep table.
pub fn summary_table(outcomes: &[Outcome]) -> String {
    let w = outcomes
        .iter()
        .map(|o| o.id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = format!(
        "{:<w$}  {:<10}  {:>10}  {:>10}  {:>8}\n",
        "run", "status", "final_loss", "val_ppl", "time_s"
    );
    let f = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or("-".into());
    for o in outcomes {
        s.push_str(&format!(
            "{:<w$}  {:<10}  {:>10}  {:>10}  {:>8}",
            o.id,
            o.fate.label(),
            f(o.final_loss, 4),
            f(o.val_ppl, 2),
            f(o.seconds, 1)
        ));
        if let Some(e) = &o.error {
            s.push_str(&format!("  {e}"));
        }
        s.push('\n');
    }
    s
}
