//! `ternlab sweep --devices D1,D2,... [--jobs N]`: a sweep's pending runs spread over worker
//! slots (N per device), each run in a child process of its own (`ternlab run-one SPEC RUN_ID`),
//! so that a crash, an out-of-memory or a device fault in one run leaves the others training
//! and recorded. The parent checks every run first (bad input stops everything before any
//! training, as in a plain sweep), hands the next pending run to the first free slot, prefixes
//! each child's progress lines with its slot, and records a child that died without saying how
//! its run ended as `failed`. The per-run locks stay with the children, so two hosts sweeping one
//! shared results folder still never train the same run.

use crate::device::DeviceChoice;
use crate::plan::{Plan, PlannedRun};
use crate::report::RunStatus;
use crate::run::run_dir;
use crate::runner::{
    folder_state, is_running_elsewhere, not_run, outcome_from_folder, read_status, skips, state_of,
    write_status, Fate, Outcome, RunState, SweepOptions,
};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One worker slot: the device its runs train on and the label its output lines carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub device: DeviceChoice,
    pub label: String,
}

/// The slots of `--devices` and `--jobs`: `jobs` per device, labelled by the device (with
/// `#k` when a device has several).
pub fn slots(devices: &[DeviceChoice], jobs: usize) -> Vec<Slot> {
    let mut out = Vec::new();
    for d in devices {
        for k in 0..jobs {
            let label = if jobs == 1 {
                d.to_string()
            } else {
                format!("{d}#{k}")
            };
            out.push(Slot { device: *d, label });
        }
    }
    out
}

/// How the parent starts a child: `ternlab run-one <spec> <run-id>` with these arguments.
pub struct ChildCommand {
    pub exe: PathBuf,
    pub spec: PathBuf,
    /// `--set` overrides as `key=value` (TOML values), passed on unchanged.
    pub sets: Vec<String>,
}

impl ChildCommand {
    fn command(&self, run: &PlannedRun, slot: &Slot, opts: &SweepOptions) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("run-one").arg(&self.spec).arg(&run.id);
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        cmd.arg("--set")
            .arg(format!("run.device={:?}", slot.device.to_string()));
        cmd.arg("--results").arg(&opts.results);
        if opts.force {
            cmd.arg("--force");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }
}

struct Active {
    index: usize,
    slot: usize,
    child: Child,
    printer: std::thread::JoinHandle<()>,
}

/// Trains the runs of `plan` that need it on `slots`, one child process a run; returns one
/// outcome per run of the plan, in plan order.
pub fn sweep(
    plan: &Plan,
    opts: &SweepOptions,
    slots: &[Slot],
    child: &ChildCommand,
) -> Vec<Outcome> {
    let n = plan.runs.len();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut queue = std::collections::VecDeque::new();
    for (i, run) in plan.runs.iter().enumerate() {
        let state = state_of(&opts.results, &plan.name, run);
        if skips(&state, opts.force) {
            eprintln!("{}: {} (skipped; --force retrains)", run.id, state.label());
            outcomes[i] = Some(outcome_from_folder(
                &opts.results,
                plan,
                run,
                Fate::Skipped(state),
            ));
        } else if state == RunState::Running {
            eprintln!("{}: being trained by another process; skipped", run.id);
            outcomes[i] = Some(not_run(run, Fate::Elsewhere, None));
        } else {
            queue.push_back(i);
        }
    }
    let mut free: Vec<bool> = vec![true; slots.len()];
    let mut active: Vec<Active> = Vec::new();
    loop {
        while !crate::faults::interrupted() && !queue.is_empty() {
            let Some(s) = free.iter().position(|f| *f) else {
                break;
            };
            let i = queue.pop_front().expect("not empty");
            let run = &plan.runs[i];
            eprintln!("[{}] {}: starting", slots[s].label, run.id);
            match child.command(run, &slots[s], opts).spawn() {
                Ok(mut c) => {
                    let stderr = c.stderr.take().expect("piped");
                    let label = slots[s].label.clone();
                    let printer = std::thread::spawn(move || {
                        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                            eprintln!("[{label}] {line}");
                        }
                    });
                    free[s] = false;
                    active.push(Active {
                        index: i,
                        slot: s,
                        child: c,
                        printer,
                    });
                }
                Err(e) => {
                    let error = Some(format!("starting {}: {e}", child.exe.display()));
                    outcomes[i] = Some(not_run(run, Fate::Ended(RunStatus::Failed), error));
                }
            }
        }
        if active.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut k = 0;
        while k < active.len() {
            match active[k].child.try_wait() {
                Ok(None) => k += 1,
                done => {
                    let a = active.swap_remove(k);
                    let _ = a.printer.join();
                    free[a.slot] = true;
                    let how = match done {
                        Ok(Some(status)) => format!("{status}"),
                        Err(e) => format!("lost track of it: {e}"),
                        Ok(None) => unreachable!(),
                    };
                    outcomes[a.index] = Some(finished(plan, opts, &plan.runs[a.index], &how));
                }
            }
        }
    }
    plan.runs
        .iter()
        .zip(outcomes)
        .map(|(run, o)| o.unwrap_or_else(|| not_run(run, Fate::NotRun, None)))
        .collect()
}

/// The outcome of a run whose child exited (`how`: its exit status). A child that died
/// without recording how its run ended (killed, out of host memory, a crash in the device
/// driver) leaves `running` or nothing in status.json: that becomes `failed`, naming `how`.
fn finished(plan: &Plan, opts: &SweepOptions, run: &PlannedRun, how: &str) -> Outcome {
    let dir = run_dir(&opts.results, &plan.name, &run.id);
    let recorded = read_status(&dir).filter(|s| s.config_hash == run.config_hash);
    let died = match &recorded {
        None => true,
        Some(s) => s.status == RunStatus::Running,
    };
    if died && !is_running_elsewhere(&opts.results, &plan.name, &run.id) {
        let msg = format!("the worker process died: {how}");
        eprintln!("{}: failed: {msg}", run.id);
        if dir.exists() {
            let _ = write_status(&dir, RunStatus::Failed, &run.config_hash, Some(msg.clone()));
        }
        return not_run(run, Fate::Ended(RunStatus::Failed), Some(msg));
    }
    let fate = match folder_state(&opts.results, &plan.name, run) {
        RunState::Done => Fate::Ended(RunStatus::Completed),
        RunState::Diverged(_) => Fate::Ended(RunStatus::Diverged),
        RunState::Failed(_) => Fate::Ended(RunStatus::Failed),
        RunState::Unfinished => Fate::Ended(RunStatus::Interrupted),
        other => Fate::Skipped(other),
    };
    outcome_from_folder(&opts.results, plan, run, fate)
}
