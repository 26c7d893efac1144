//! Progress of a run: an indicatif bar on a terminal; plain log lines otherwise (CI, files).
//! `run::execute` reports to a `Progress` and `runner` picks one, so both depend on this
//! module and it depends on neither.

use crate::train::StepRecord;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// Shows a run's progress: a bar on a terminal, plain lines (every 10 steps) otherwise.
pub trait Progress {
    fn step(&mut self, r: &StepRecord, total: usize);
    fn message(&mut self, msg: &str);
    fn finish(&mut self);
}

pub fn for_stderr(label: &str) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar::new(label))
    } else {
        Box::new(Lines {
            label: label.to_string(),
        })
    }
}

/// Seconds left at the current pace.
fn eta(r: &StepRecord, total: usize) -> f64 {
    r.elapsed_s / (r.step + 1) as f64 * (total - r.step - 1) as f64
}

fn tokens_per_s(r: &StepRecord) -> f64 {
    r.tokens_seen as f64 / r.elapsed_s.max(1e-9)
}

pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new(label: &str) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(label.to_string());
        Self { bar }
    }
}

impl Progress for Bar {
    fn step(&mut self, r: &StepRecord, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(r.step as u64 + 1);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s {:.0}s left",
            r.loss,
            r.lr,
            tokens_per_s(r),
            eta(r, total)
        ));
    }

    fn message(&mut self, msg: &str) {
        self.bar.println(msg);
    }

    fn finish(&mut self) {
        self.bar.finish();
    }
}

pub struct Lines {
    label: String,
}

impl Progress for Lines {
    fn step(&mut self, r: &StepRecord, total: usize) {
        if r.step.is_multiple_of(10) || r.step + 1 == total || r.val_loss.is_some() {
            let val = r
                .val_loss
                .map(|v| format!(" val_loss={v:.4}"))
                .unwrap_or_default();
            eprintln!(
                "{} step {:4}/{total} loss={:.4} lr={:.2e} {:.0} tok/s ({:.0}s, {:.0}s left){val}",
                self.label,
                r.step,
                r.loss,
                r.lr,
                tokens_per_s(r),
                r.elapsed_s,
                eta(r, total)
            );
        }
    }

    fn message(&mut self, msg: &str) {
        eprintln!("{msg}");
    }

    fn finish(&mut self) {}
}
