//! Interruption and injected faults.
//!
//! Ctrl-C sets a flag that the training loop reads between steps: the current run stops as
//! `interrupted` (its curve so far kept) and the sweep exits. A second Ctrl-C exits at once.
//!
//! `TERNLAB_INJECT=KIND@STEP[:PART]` makes runs whose id contains PART (every run without it)
//! meet a fault at training step STEP, so that tests can exercise what happens next:
//! KIND is `error` (the step fails), `panic` (the step panics), `nan` (the loss is NaN),
//! `exit` (the process ends at once, as if killed: nothing recorded, no unwinding) or
//! `interrupt` (as Ctrl-C before the step).

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (once per process).
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted twice: exiting now");
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping after this step (Ctrl-C again to exit now)");
    });
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// What Ctrl-C does, for the `interrupt` fault.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Error,
    Panic,
    Nan,
    Exit,
    Interrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub step: usize,
}

pub const INJECT_VAR: &str = "TERNLAB_INJECT";

/// The fault `TERNLAB_INJECT` asks for in run `run_id`, if any.
pub fn injected(run_id: &str) -> anyhow::Result<Option<Fault>> {
    match std::env::var(INJECT_VAR) {
        Ok(v) => parse(&v, run_id),
        Err(_) => Ok(None),
    }
}

fn parse(v: &str, run_id: &str) -> anyhow::Result<Option<Fault>> {
    let bad = || {
        anyhow::anyhow!(
            "{INJECT_VAR}={v:?}: expected KIND@STEP[:RUN_ID_PART], KIND one of error, panic, nan, \
             exit, interrupt"
        )
    };
    let (spec, part) = match v.split_once(':') {
        Some((s, p)) => (s, Some(p)),
        None => (v, None),
    };
    let (kind, step) = spec.split_once('@').ok_or_else(bad)?;
    let kind = match kind {
        "error" => FaultKind::Error,
        "panic" => FaultKind::Panic,
        "nan" => FaultKind::Nan,
        "exit" => FaultKind::Exit,
        "interrupt" => FaultKind::Interrupt,
        _ => return Err(bad()),
    };
    let step = step.parse().map_err(|_| bad())?;
    Ok(match part {
        Some(p) if !run_id.contains(p) => None,
        _ => Some(Fault { kind, step }),
    })
}
