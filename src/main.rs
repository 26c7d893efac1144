//! The `ternlab` command line: parse, run, print the error chain once, exit with a code
//! (0 success, 1 a run failed or diverged, 2 bad input).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use ternlab::spec::{self, BadInput, Override};

#[derive(Parser)]
#[command(name = "ternlab", version, about = "Ternary QAT experiments on Qwen3")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one run of a spec and write results/<name>/<run-id>/.
    Run {
        /// The experiment spec (TOML).
        spec: PathBuf,
        /// Override a spec key, e.g. --set train.lr=1e-3 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<Override>,
        /// Results folder.
        #[arg(long, default_value = "results")]
        results: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { spec, set, results } => {
            let parsed = spec::load(&spec, &set).map_err(|e| BadInput(format!("{e:#}")))?;
            let prepared = ternlab::run::prepare(&parsed, &spec)?;
            let mut progress = ternlab::progress::for_stderr(&prepared.run_id);
            let report = ternlab::run::execute(&prepared, &results, progress.as_mut())?;
            let dir = prepared.run_dir(&results);
            println!(
                "{} {}: final loss {:.4}, last-20 {:.4}, val ppl {:.2}, ternary_ok {}, {:.0} tok/s -> {}",
                report.run_id,
                report.status,
                report.final_loss,
                report.last_20_loss_avg,
                report.val_ppl,
                report.ternary_ok,
                report.tokens_per_s,
                dir.display()
            );
            Ok(if report.status == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
