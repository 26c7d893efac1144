//! `ternlab sweep SPEC --slurm`: a sweep's pending runs handed to Slurm as one job array, a
//! task a run, each task `ternlab run-one SPEC RUN_ID` with the sweep's `--set`s. The runs are
//! checked here first, as a plain sweep checks them, so bad input stops everything before a
//! script is written or a job submitted. The tasks write their run folders as any other way of
//! training does (locks, status.json, report.json), so `plan`, a rerun and `compare` need no
//! Slurm of their own.
//!
//! `<results>/<name>/slurm/` holds the scripts (`<UTC time>.sbatch`), the tasks' output
//! (`<job>_<task>.out`) and, under `queued/`, one record per submitted run (`<run-id>.json`:
//! job, array index, submit time). A record says "queued" until the run starts training (the
//! process that takes the run's lock removes it) or its job is gone from the queue (a
//! cancelled job, or a task that failed before training): then the run is what its folder says
//! again, and submitting again queues it anew.

use crate::device::DeviceChoice;
use crate::plan::{Plan, PlannedRun};
use crate::report::write_json_atomic;
use crate::runner::{skips, state_of, RunState};
use crate::spec::BadInput;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder of an experiment's Slurm files, beside its run folders (`compare` skips it).
pub const FOLDER: &str = "slurm";

/// What `sweep --slurm` was asked for, beyond the spec.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    /// GPUs a run (array task) gets; None: what the runs' `run.device` needs (see
    /// [`default_gpus`]).
    pub gpus_per_run: Option<u32>,
    pub cpus_per_task: Option<u32>,
    /// `--time`, as Slurm writes it (HH:MM:SS, D-HH:MM:SS, minutes, ...).
    pub time: Option<String>,
    pub dry_run: bool,
    pub force: bool,
}

/// How a task starts its run: `<exe> run-one <spec> <run-id> --results <results> --set ...`,
/// every path absolute, in `cwd` (where relative paths of the spec, such as `data.path`, were
/// resolved at submission).
#[derive(Debug, Clone)]
pub struct TaskCommand {
    pub exe: PathBuf,
    pub spec: PathBuf,
    pub results: PathBuf,
    pub cwd: PathBuf,
    /// `--set` overrides as `key=value` (TOML values), passed on unchanged.
    pub sets: Vec<String>,
    /// The spec's environment layer at submission (`TERNLAB_<SECTION>__<KEY>`, `TERNLAB_NAME`),
    /// exported by the script: the run ids depend on it, and a script submitted again later by
    /// hand must name the same runs.
    pub env: Vec<(String, String)>,
}

impl TaskCommand {
    /// The command as the sweep's own process sees it: its binary, spec and results made
    /// absolute, its working directory, and the spec variables of its environment.
    pub fn from_here(spec: &Path, results: &Path, sets: Vec<String>) -> anyhow::Result<Self> {
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| crate::spec::is_spec_variable(k))
            .collect();
        env.sort();
        Ok(Self {
            exe: std::env::current_exe()?,
            spec: std::path::absolute(spec)?,
            results: std::path::absolute(results)?,
            cwd: std::env::current_dir()?,
            sets,
            env,
        })
    }
}

/// `<results>/<name>/slurm/queued/<run-id>.json`: a run submitted and not yet started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedRecord {
    pub job_id: String,
    pub array_index: usize,
    pub submitted_unix_s: u64,
    pub script: PathBuf,
}

impl QueuedRecord {
    /// The array task as Slurm names it: `<job>_<index>`.
    pub fn task(&self) -> String {
        format!("{}_{}", self.job_id, self.array_index)
    }
}

pub fn folder(results: &Path, name: &str) -> PathBuf {
    results.join(name).join(FOLDER)
}

fn queued_path(results: &Path, name: &str, id: &str) -> PathBuf {
    folder(results, name)
        .join("queued")
        .join(format!("{id}.json"))
}

pub fn read_queued(results: &Path, name: &str, id: &str) -> Option<QueuedRecord> {
    let text = std::fs::read_to_string(queued_path(results, name, id)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Drops a run's queued record: its training starts now (called by the process that took the
/// run's lock), or its job is gone.
pub fn forget_queued(results: &Path, name: &str, id: &str) {
    let _ = std::fs::remove_file(queued_path(results, name, id));
}

/// What squeue says about submitted jobs, asked once per job.
pub struct Queue {
    squeue: Option<PathBuf>,
    tasks: HashMap<String, Option<Vec<usize>>>,
}

impl Default for Queue {
    fn default() -> Self {
        Self::new()
    }
}

impl Queue {
    /// Asks the `squeue` on PATH; without one, every record is taken at its word.
    pub fn new() -> Self {
        Self {
            squeue: find_on_path("squeue"),
            tasks: HashMap::new(),
        }
    }

    /// Whether the record's array task still waits or runs. True when nobody can tell (no
    /// squeue, or it failed for another reason than not knowing the job): a queue that cannot
    /// be asked is no evidence that the job is gone.
    pub fn alive(&mut self, record: &QueuedRecord) -> bool {
        let squeue = self.squeue.clone();
        let tasks = self
            .tasks
            .entry(record.job_id.clone())
            .or_insert_with(|| squeue.and_then(|s| live_tasks(&s, &record.job_id)));
        match tasks {
            None => true,
            Some(live) => live.contains(&record.array_index),
        }
    }
}

/// The array indices of `job` that are pending or running, one line a task (`-r`); an empty
/// list when the controller no longer knows the job (squeue lists neither finished nor
/// cancelled jobs, and forgets them entirely a while after); None when squeue cannot answer.
fn live_tasks(squeue: &Path, job: &str) -> Option<Vec<usize>> {
    let out = Command::new(squeue)
        .args(["-h", "-r", "-j", job, "-o", "%i %T"])
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return err.contains("Invalid job id").then(Vec::new);
    }
    const ENDED: &[&str] = &[
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    ];
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (id, state) = (w.next()?, w.next()?);
                let index = id.strip_prefix(job)?.strip_prefix('_')?.parse().ok()?;
                (!ENDED.contains(&state)).then_some(index)
            })
            .collect(),
    )
}

/// The state `plan` shows: as [`state_of`] says, except that a run with a queued record whose
/// array task is still in the queue is `Queued` unless it finished, runs, or conflicts (what the
/// folder and the lock say wins: the record may be older than a run trained some other way).
pub fn state_with_queue(
    results: &Path,
    name: &str,
    run: &PlannedRun,
    queue: &mut Queue,
) -> RunState {
    let state = state_of(results, name, run);
    match state {
        RunState::Pending | RunState::Failed(_) | RunState::Unfinished => {
            match read_queued(results, name, &run.id) {
                Some(r) if queue.alive(&r) => RunState::Queued(r.task()),
                _ => state,
            }
        }
        _ => state,
    }
}

/// GPUs a run asks for by default: `run.devices` (1 unless the run is data-parallel) for a
/// CUDA run (`cuda`, `cuda:N`, or `auto` in a build with CUDA, which then picks it), none for
/// the CPU or Metal. A job array asks the same for every task, so the most any run needs.
pub fn default_gpus(plan: &Plan) -> u32 {
    plan.runs
        .iter()
        .map(|r| match r.spec.run.device {
            DeviceChoice::Cuda(_) => r.spec.run.devices as u32,
            DeviceChoice::Auto if candle_core::utils::cuda_is_available() => {
                r.spec.run.devices as u32
            }
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// What a submission did (or, with `--dry-run`, would do).
#[derive(Debug)]
pub struct Submission {
    /// The runs given to Slurm, in array order.
    pub runs: Vec<String>,
    /// None when there was nothing to submit.
    pub script: Option<PathBuf>,
    /// None with `--dry-run` or when there was nothing to submit.
    pub job_id: Option<String>,
    /// Runs left out, and why (done, queued as job ..., being trained elsewhere, ...).
    pub skipped: Vec<(String, String)>,
}

/// Submits the runs of `plan` that need training and are not queued yet, as one job array;
/// every run has been checked by the caller (`runner::prepare_all`).
pub fn submit(plan: &Plan, task: &TaskCommand, opts: &SlurmOptions) -> anyhow::Result<Submission> {
    check_options(opts)?;
    let gpus = opts.gpus_per_run.unwrap_or_else(|| default_gpus(plan));
    check_devices(plan, gpus)?;
    let results = &task.results;
    let mut queue = Queue::new();
    let mut pending = Vec::new();
    let mut skipped = Vec::new();
    for run in &plan.runs {
        let state = state_with_queue(results, &plan.name, run, &mut queue);
        let why = match &state {
            s if skips(s, opts.force) => format!("{} (--force resubmits)", s.label()),
            RunState::Running => "being trained by another process".to_string(),
            RunState::Queued(task) => format!("queued as Slurm job {task}"),
            _ => {
                pending.push(run.id.clone());
                continue;
            }
        };
        skipped.push((run.id.clone(), why));
    }
    if pending.is_empty() {
        return Ok(Submission {
            runs: pending,
            script: None,
            job_id: None,
            skipped,
        });
    }
    let sbatch = find_on_path("sbatch");
    if sbatch.is_none() && !opts.dry_run {
        return Err(BadInput(
            "sbatch is not on PATH: install Slurm's client commands (Debian: slurm-client; \
             scripts/slurm/up.sh brings up a single-node Slurm on this machine), or use \
             --dry-run to write the job script without submitting it"
                .into(),
        )
        .into());
    }
    let dir = folder(results, &plan.name);
    let shown = dir.to_string_lossy();
    if shown.contains(['"', '%', '\\', '\n', '\r']) {
        // (the `--output` line: sbatch reads `%` as a pattern, and a quote or a line break
        // would end the value)
        return Err(BadInput(format!(
            "{shown:?}: a results folder for --slurm cannot have a double quote, %, backslash \
             or line break in its path"
        ))
        .into());
    }
    std::fs::create_dir_all(&dir)?;
    let now = unix_now();
    let text = script(&plan.name, &pending, task, opts, gpus, &dir, now);
    let path = new_script_path(&dir, now);
    let tmp = path.with_extension("sbatch.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    let Some(sbatch) = sbatch.filter(|_| !opts.dry_run) else {
        return Ok(Submission {
            runs: pending,
            script: Some(path),
            job_id: None,
            skipped,
        });
    };
    let out = Command::new(&sbatch)
        .arg("--parsable")
        .arg(&path)
        .output()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", sbatch.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "sbatch refused {} ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `--parsable` prints `<job id>` or `<job id>;<cluster>`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job_id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|j| !j.is_empty() && j.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| anyhow::anyhow!("sbatch printed no job id: {stdout:?}"))?
        .to_string();
    // The records come after the job exists, so a task may start before its record is
    // written; the task spends its first seconds checking the run (model, data) before it
    // takes the lock and removes the record, which is far longer than writing these.
    let queued = dir.join("queued");
    std::fs::create_dir_all(&queued)?;
    for (i, id) in pending.iter().enumerate() {
        let record = QueuedRecord {
            job_id: job_id.clone(),
            array_index: i,
            submitted_unix_s: now,
            script: path.clone(),
        };
        write_json_atomic(&queued_path(results, &plan.name, id), &record)?;
    }
    Ok(Submission {
        runs: pending,
        script: Some(path),
        job_id: Some(job_id),
        skipped,
    })
}

/// Refuses options that would not survive an `#SBATCH` line.
fn check_options(opts: &SlurmOptions) -> anyhow::Result<()> {
    if let Some(t) = &opts.time {
        let words = ["INFINITE", "UNLIMITED"];
        let ok = !t.is_empty()
            && (words.contains(&t.to_ascii_uppercase().as_str())
                || t.chars()
                    .all(|c| c.is_ascii_digit() || c == ':' || c == '-'));
        if !ok {
            return Err(BadInput(format!(
                "--time {t:?}: expected a Slurm time limit such as 01:30:00, 90 or 1-12:00:00"
            ))
            .into());
        }
    }
    if let Some(p) = &opts.partition {
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.,".contains(c))
        {
            return Err(BadInput(format!(
                "--partition {p:?}: expected a partition name (or a comma-separated list)"
            ))
            .into());
        }
    }
    if opts.cpus_per_task == Some(0) {
        return Err(BadInput("--cpus-per-task must be at least 1".into()).into());
    }
    Ok(())
}

/// A task sees the GPUs Slurm gave it numbered from 0 (CUDA_VISIBLE_DEVICES): a run on
/// `cuda:N` needs N + 1 of them, which fails only once the task starts unless caught here.
fn check_devices(plan: &Plan, gpus: u32) -> anyhow::Result<()> {
    for r in &plan.runs {
        if let DeviceChoice::Cuda(Some(n)) = r.spec.run.device {
            // (a data-parallel run takes cuda:n and the devices - 1 after it)
            if (n + r.spec.run.devices) as u32 > gpus {
                return Err(BadInput(format!(
                    "{}: run {} is on cuda:{n}, but a Slurm task sees only the {gpus} GPU(s) it \
                     asks for, numbered from 0: set run.device = \"cuda\" (or \"auto\"), or \
                     raise --gpus-per-run",
                    plan.file.display(),
                    r.id
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// The job array script: task i trains `runs[i]`.
pub fn script(
    name: &str,
    runs: &[String],
    task: &TaskCommand,
    opts: &SlurmOptions,
    gpus: u32,
    dir: &Path,
    now: u64,
) -> String {
    let job_name: String = format!("ternlab-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Two cores for a CPU run (candle's matmuls use what they are given); a GPU run mostly
    // waits on its card, but gets a few per GPU for the checkpoint writer and the host side.
    let cpus = opts
        .cpus_per_task
        .unwrap_or(if gpus > 0 { 4 * gpus } else { 2 });
    let mut s = String::from("#!/bin/bash\n");
    let mut sbatch = |line: String| s.push_str(&format!("#SBATCH {line}\n"));
    sbatch(format!("--job-name={job_name}"));
    sbatch(format!("--array=0-{}", runs.len() - 1));
    sbatch(format!(
        "--output={}",
        sbatch_quote(&dir.join("%A_%a.out").to_string_lossy())
    ));
    sbatch("--nodes=1".into());
    sbatch("--ntasks=1".into());
    sbatch(format!("--cpus-per-task={cpus}"));
    if gpus > 0 {
        sbatch(format!("--gres=gpu:{gpus}"));
    }
    if let Some(p) = &opts.partition {
        sbatch(format!("--partition={p}"));
    }
    if let Some(t) = &opts.time {
        sbatch(format!("--time={t}"));
    }
    s.push_str(&format!(
        "#\n# Written by `ternlab sweep --slurm` at {}, for\n#   {}\n\
         # One array task per run that was pending then: task i trains runs[i] with `ternlab\n\
         # run-one`, which takes the run's lock and writes its folder as any sweep does (and skips\n\
         # a run that finished in the meantime).\n\
         set -euo pipefail\n",
        utc(now),
        task.spec.display().to_string().replace(['\n', '\r'], "?")
    ));
    s.push_str("runs=(\n");
    for id in runs {
        s.push_str(&format!("  {}\n", shell_quote(id)));
    }
    s.push_str(")\n");
    s.push_str(
        ": \"${SLURM_ARRAY_TASK_ID:?this script is a Slurm job array: submit it with sbatch}\"\n\
         run=${runs[$SLURM_ARRAY_TASK_ID]}\n",
    );
    if !task.env.is_empty() {
        s.push_str("# The spec's environment layer at submission: the run ids depend on it.\n");
        for (k, v) in &task.env {
            s.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
    }
    s.push_str(
        "# candle's CPU threads: as many as the task was given, not every core of the node.\n\
         export RAYON_NUM_THREADS=\"${RAYON_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}\"\n",
    );
    s.push_str("# Relative paths in the spec (data.path, ...) are relative to this folder.\n");
    s.push_str(&format!(
        "cd {}\n",
        shell_quote(&task.cwd.to_string_lossy())
    ));
    let mut cmd = vec![
        shell_quote(&task.exe.to_string_lossy()),
        "run-one".into(),
        shell_quote(&task.spec.to_string_lossy()),
        "\"$run\"".into(),
        "--results".into(),
        shell_quote(&task.results.to_string_lossy()),
    ];
    for set in &task.sets {
        cmd.push("--set".into());
        cmd.push(shell_quote(set));
    }
    if opts.force {
        cmd.push("--force".into());
    }
    s.push_str(&format!("exec {}\n", cmd.join(" ")));
    s
}

/// `s` as one bash word: bare when it holds nothing the shell treats specially anywhere in a
/// command (a path, a flag), else in single quotes (a quote inside written as `'\''`).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:,+@".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A value on an `#SBATCH` line: sbatch splits those lines at blanks unless the value is in
/// double quotes.
fn sbatch_quote(s: &str) -> String {
    if s.contains(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s.to_string()
    }
}

/// `<dir>/<UTC time>.sbatch`, with `-2`, `-3`, ... when a script of that second exists.
fn new_script_path(dir: &Path, now: u64) -> PathBuf {
    let stamp = utc(now).replace(['-', ':'], "");
    let mut k = 1;
    loop {
        let name = if k == 1 {
            format!("{stamp}.sbatch")
        } else {
            format!("{stamp}-{k}.sbatch")
        };
        let p = dir.join(name);
        if !p.exists() {
            return p;
        }
        k += 1;
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (the civil-from-days algorithm of
/// Howard Hinnant's date library).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The first executable `name` in PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && executable(&m)))
}

#[cfg(unix)]
fn executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_: &std::fs::Metadata) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_of_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    /// Two runs of the tiny preset on `devices` (set after planning: this build may lack CUDA).
    fn plan_on(devices: [DeviceChoice; 2]) -> Plan {
        let table = toml::from_str(
            "name = \"g\"\n[model]\npreset = \"tiny\"\n[sweep]\n\"train.seed\" = [0, 1]\n",
        )
        .unwrap();
        let mut p = crate::plan::plan_table(Path::new("g.toml"), table, &[]).unwrap();
        for (r, d) in p.runs.iter_mut().zip(devices) {
            r.spec.run.device = d;
        }
        p
    }

    #[test]
    fn gpus_follow_the_runs_devices() {
        use DeviceChoice::*;
        assert_eq!(default_gpus(&plan_on([Cpu, Cpu])), 0);
        assert_eq!(default_gpus(&plan_on([Cpu, Cuda(None)])), 1);
        assert_eq!(default_gpus(&plan_on([Metal, Cuda(Some(0))])), 1);
        let auto = u32::from(candle_core::utils::cuda_is_available());
        assert_eq!(default_gpus(&plan_on([Auto, Cpu])), auto);
        // A task's GPUs are numbered from 0.
        assert!(check_devices(&plan_on([Cuda(Some(0)), Cuda(None)]), 1).is_ok());
        let e = check_devices(&plan_on([Cuda(Some(1)), Cpu]), 1).unwrap_err();
        assert!(e.to_string().contains("cuda:1"), "{e}");
        // A data-parallel run asks for its GPUs.
        let mut dp = plan_on([Cuda(Some(0)), Cpu]);
        dp.runs[0].spec.run.devices = 4;
        assert_eq!(default_gpus(&dp), 4);
        assert!(check_devices(&dp, 4).is_ok());
        assert!(check_devices(&dp, 2).is_err());
        assert!(check_devices(&plan_on([Cuda(Some(1)), Cpu]), 2).is_ok());
    }

    #[test]
    fn a_gpu_job_asks_for_its_gpus_and_cores() {
        let task = TaskCommand {
            exe: "/opt/ternlab".into(),
            spec: "/w/s.toml".into(),
            results: "/w/results".into(),
            cwd: "/w".into(),
            sets: vec![],
            env: vec![],
        };
        let ids = ["a".to_string()];
        let opts = SlurmOptions::default();
        let dir = Path::new("/w/results/g/slurm");
        let s = script("g", &ids, &task, &opts, 2, dir, 0);
        assert!(s.contains("#SBATCH --gres=gpu:2\n"), "{s}");
        assert!(s.contains("#SBATCH --cpus-per-task=8\n"), "{s}");
        assert!(s.contains("#SBATCH --array=0-0\n"), "{s}");
        assert!(!s.contains("--partition") && !s.contains("--time"), "{s}");
    }

    #[test]
    fn shell_quote_keeps_one_word() {
        assert_eq!(shell_quote("/opt/ternlab-1.0/bin"), "/opt/ternlab-1.0/bin");
        assert_eq!(shell_quote("seed=0_ab12cd34"), "'seed=0_ab12cd34'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
