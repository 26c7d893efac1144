//! The `ternlab` command line: parse, run, print the error chain once, exit with a code
//! (0 success, 1 a run failed, diverged or was interrupted, 2 bad input).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use ternlab::compare::{self, Format};
use ternlab::plan::{plan, Plan};
use ternlab::report::RunStatus;
use ternlab::runner::{self, summary_table, Fate, RunState, SweepOptions};
use ternlab::slurm;
use ternlab::spec::{BadInput, Override};

#[derive(Parser)]
#[command(
    name = "ternlab",
    version = ternlab::report::VERSION_LINE,
    about = "Ternary QAT experiments on Qwen3"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SpecArgs {
    /// The experiment spec (TOML).
    spec: PathBuf,
    /// Override a spec key before sweep expansion, e.g. --set train.steps=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Results folder.
    #[arg(long, default_value = "results")]
    results: PathBuf,
}

/// `sweep --slurm` and its options.
#[derive(clap::Args)]
struct SlurmArgs {
    /// Submit the runs not yet done or queued to Slurm as one job array, a task per run (each
    /// `ternlab run-one`), instead of training them here.
    #[arg(long, conflicts_with = "devices")]
    slurm: bool,
    /// The job's partition (default: the cluster's default).
    #[arg(long, requires = "slurm")]
    partition: Option<String>,
    /// GPUs per run (default: 1 when the runs train on CUDA, 0 on the CPU).
    #[arg(long, requires = "slurm", value_name = "G")]
    gpus_per_run: Option<u32>,
    /// CPU cores per run (default: 4 per GPU; 2 for a CPU run).
    #[arg(long, requires = "slurm", value_name = "N")]
    cpus_per_task: Option<u32>,
    /// Time limit of each run, as Slurm takes it.
    #[arg(long, requires = "slurm", value_name = "HH:MM:SS")]
    time: Option<String>,
    /// Only write the job script; print its path and runs.
    #[arg(long, requires = "slurm")]
    dry_run: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Train the one run of a spec (no [sweep]) into <results>/<name>/<run-id>/.
    Run {
        #[command(flatten)]
        args: SpecArgs,
        /// Retrain even if this run has finished before.
        #[arg(long)]
        force: bool,
    },
    /// Check every run of a spec's sweep, then train those not yet done.
    Sweep {
        #[command(flatten)]
        args: SpecArgs,
        /// Retrain finished runs too.
        #[arg(long)]
        force: bool,
        /// Spread the runs over these devices (e.g. cuda:0,cuda:1 or cpu), each run in a
        /// process of its own; a run's crash leaves the others going.
        #[arg(long, value_name = "D1,D2,...")]
        devices: Option<String>,
        /// Runs at a time on each device of --devices.
        #[arg(long, default_value_t = 1, requires = "devices")]
        jobs: usize,
        #[command(flatten)]
        slurm: SlurmArgs,
    },
    /// One rank of a data-parallel run (started by the run itself).
    #[command(hide = true)]
    Rank { run_dir: PathBuf },
    /// Train one run of a spec's sweep, by its id (what `sweep --devices` and Slurm tasks run).
    RunOne {
        /// The experiment spec (TOML).
        spec: PathBuf,
        /// The run's id, as `plan` lists it.
        run_id: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<Override>,
        #[arg(long, default_value = "results")]
        results: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// List the runs a spec would do and their state; trains nothing.
    Plan {
        #[command(flatten)]
        args: SpecArgs,
    },
    /// One row per configuration of an experiment: mean ± std over seeds.
    Compare {
        /// An experiment's results folder, e.g. results/lr.
        dir: PathBuf,
        /// Sort by this metric.
        #[arg(long, default_value = "last_20_loss_avg")]
        metric: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Two runs side by side: config keys that differ, metrics, where the loss curves part.
    Diff {
        /// A run folder, e.g. results/lr/lr=0.001_seed=0_3fa2c9e1.
        a: PathBuf,
        b: PathBuf,
    },
    /// Time training steps of a run's configuration (default: the seed's recipe on the
    /// qwen3-0.6b preset, random init) and write the numbers as JSON.
    Bench {
        /// A spec with one run (default: the built-in qwen3-0.6b benchmark).
        spec: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<Override>,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Where to write the JSON result.
        #[arg(long, default_value = "bench.json")]
        out: PathBuf,
    },
    /// Held-out NLL and perplexity of a model over non-overlapping windows: a run folder
    /// that saved its model (on its own held-out split by default), its ternary.safetensors,
    /// a Hugging Face Qwen3 directory or a hub repo id (with --text or --dataset). Prints JSON.
    Eval {
        /// A run folder, a packed ternary.safetensors, a model directory or a hub repo id.
        model: String,
        /// A UTF-8 text file, tokenized whole (default for a run folder: its held-out split).
        #[arg(long, conflicts_with = "dataset")]
        text: Option<PathBuf>,
        /// A benchmark's test text from the hub, through the hub cache: wikitext-2.
        #[arg(long)]
        dataset: Option<String>,
        /// How windows are cut and scored: gptq (L - 1 predictions a window; the default
        /// with --dataset) or seed (L; the default otherwise, as training evaluates).
        #[arg(long, value_parser = ternlab::choice::from_name::<ternlab::eval::Protocol>)]
        protocol: Option<ternlab::eval::Protocol>,
        /// Tokens per window (default: the run's seq_len, else 2048).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Windows per forward pass (default: the run's batch_size, else 1).
        #[arg(long)]
        batch_size: Option<usize>,
        /// auto, cpu, cuda, cuda:N or metal.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Continue a prompt with a model (as `eval` takes it), with a KV cache: greedy at
    /// temperature 0, else sampled (seeded). Prints the text; speed on stderr.
    Generate {
        /// A run folder, a packed ternary.safetensors, a model directory or a hub repo id.
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 60)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// auto, cpu, cuda, cuda:N or metal.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Forward the whole sequence for every token (the reference for the cache).
        #[arg(long)]
        no_cache: bool,
    },
    /// Loss curves per configuration with a band over seeds, to PNG or SVG.
    Plot {
        /// An experiment's results folder.
        dir: PathBuf,
        /// The picture to write (.png or .svg).
        #[arg(short, long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
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

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { args, force } => {
            let p = plan(&args.spec, &args.set)?;
            if p.runs.len() != 1 {
                return Err(BadInput(format!(
                    "{}: the [sweep] expands to {} runs; use `ternlab sweep` (or pin the \
                     axes with --set)",
                    args.spec.display(),
                    p.runs.len()
                ))
                .into());
            }
            train_plan(&p, args.results, force)
        }
        Command::Sweep {
            args,
            force,
            devices,
            jobs,
            slurm,
        } => match devices {
            _ if slurm.slurm => sweep_on_slurm(args, force, slurm),
            Some(devices) => sweep_on_devices(args, force, &devices, jobs),
            None => {
                let p = plan(&args.spec, &args.set)?;
                train_plan(&p, args.results, force)
            }
        },
        Command::Rank { run_dir } => {
            ternlab::run::execute_rank(&run_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RunOne {
            spec,
            run_id,
            set,
            results,
            force,
        } => {
            let mut p = plan(&spec, &set)?;
            let Some(run) = p.runs.iter().find(|r| r.id == run_id).cloned() else {
                return Err(BadInput(format!(
                    "{}: no run {run_id:?} in its plan of {} runs (`ternlab plan` lists them)",
                    spec.display(),
                    p.runs.len()
                ))
                .into());
            };
            p.runs = vec![run];
            train_plan(&p, results, force)
        }
        Command::Plan { args } => {
            let p = plan(&args.spec, &args.set)?;
            print_plan(&p, &args.results);
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare {
            dir,
            metric,
            format,
        } => {
            let (runs, without) = compare::read_experiment(&dir)?;
            let c = compare::compare(&runs, &metric).map_err(|e| BadInput(format!("{e:#}")))?;
            print!("{}", compare::render(&c, format)?);
            let failed = runs
                .iter()
                .filter(|r| r.report.status != RunStatus::Completed)
                .count();
            if format == Format::Table && failed + without > 0 {
                eprintln!(
                    "({} run(s) not shown: {failed} diverged, {without} without a report)",
                    failed + without
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b } => {
            let (ra, rb) = (compare::read_run(&a)?, compare::read_run(&b)?);
            print!("{}", compare::diff(&ra, &rb));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            spec,
            set,
            steps,
            warmup,
            out,
        } => {
            let p = match &spec {
                Some(f) => plan(f, &set)?,
                None => ternlab::plan::plan_table(
                    std::path::Path::new("<built-in bench spec>"),
                    toml::from_str(ternlab::bench::DEFAULT_SPEC)?,
                    &set,
                )?,
            };
            if p.runs.len() != 1 {
                return Err(BadInput(format!(
                    "{}: bench times one run; this spec has {} (pin the sweep with --set)",
                    p.file.display(),
                    p.runs.len()
                ))
                .into());
            }
            let prepared = ternlab::run::prepare_bench(&p.runs[0], &p.file)?;
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            let r = ternlab::bench::bench(&prepared, steps, warmup)?;
            let json = serde_json::to_string_pretty(&r)?;
            println!("{json}");
            std::fs::write(&out, &json)?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            model,
            text,
            dataset,
            protocol,
            seq_len,
            batch_size,
            device,
        } => {
            let device = device_arg(&device)?;
            let args = ternlab::eval::EvalArgs {
                model,
                text,
                dataset,
                protocol,
                seq_len,
                batch_size,
                device,
            };
            let e = ternlab::eval::eval(&args)?;
            println!("{}", serde_json::to_string_pretty(&e)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            device,
            no_cache,
        } => {
            if !(temperature >= 0.0 && top_p > 0.0 && top_p <= 1.0) {
                return Err(BadInput(
                    "--temperature must be >= 0 and --top-p in (0, 1]".to_string(),
                )
                .into());
            }
            let l = ternlab::eval::load(&model, device_arg(&device)?)?;
            let ids = l
                .tokenizer
                .encode(prompt.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
            let sampler = ternlab::generate::Sampler {
                temperature,
                top_p,
                seed,
            };
            let g = ternlab::generate::generate(
                &l.model,
                ids.get_ids(),
                max_new_tokens,
                &l.eos,
                sampler,
                !no_cache,
            )?;
            let text = l
                .tokenizer
                .decode(&g.tokens, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            println!("{prompt}{text}");
            let n = g.tokens.len();
            eprintln!(
                "{n} new tokens on {}: prompt of {} tokens in {:.3} s, then {:.1} tokens/s",
                l.device,
                ids.get_ids().len(),
                g.prefill_s,
                n.saturating_sub(1) as f64 / g.decode_s.max(1e-9)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { dir, out } => {
            let (runs, _) = compare::read_experiment(&dir)?;
            let c = compare::compare(&runs, "last_20_loss_avg")?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            ternlab::plot::plot(&c, &runs, &name, &out)?;
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--device NAME`, checked against this build.
fn device_arg(name: &str) -> anyhow::Result<ternlab::device::DeviceChoice> {
    let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name);
    let device: ternlab::device::DeviceChoice =
        serde::Deserialize::deserialize(de).map_err(|e| BadInput(format!("--device {e}")))?;
    ternlab::device::check_built(device).map_err(|e| BadInput(format!("--device: {e:#}")))?;
    Ok(device)
}

/// `sweep --devices`: every run checked here, then each trained by a child process on a slot.
fn sweep_on_devices(
    args: SpecArgs,
    force: bool,
    devices: &str,
    jobs: usize,
) -> anyhow::Result<ExitCode> {
    let list = devices
        .split(',')
        .map(|d| device_arg(d.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if list.is_empty() || jobs == 0 {
        return Err(
            BadInput("--devices needs at least one device and --jobs at least 1".into()).into(),
        );
    }
    // (checked as the children will run them: on the first of the devices)
    let mut set = args.set.clone();
    set.push(
        format!("run.device={:?}", list[0].to_string())
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?,
    );
    let p = plan(&args.spec, &set)?;
    ternlab::faults::injected("").map_err(|e| BadInput(format!("{e:#}")))?;
    runner::prepare_all(&p)?;
    ternlab::faults::install_interrupt_handler();
    let opts = SweepOptions {
        results: args.results,
        force,
    };
    let child = ternlab::pool::ChildCommand {
        exe: std::env::current_exe()?,
        spec: args.spec.clone(),
        sets: args
            .set
            .iter()
            .map(|o| format!("{}={}", o.key, o.value))
            .collect(),
    };
    let slots = ternlab::pool::slots(&list, jobs);
    let outcomes = ternlab::pool::sweep(&p, &opts, &slots, &child);
    finish_sweep(&p, &opts, &outcomes)
}

/// `sweep --slurm`: every run checked here, then those that need training submitted as one
/// job array (or, with --dry-run, only its script written).
fn sweep_on_slurm(args: SpecArgs, force: bool, s: SlurmArgs) -> anyhow::Result<ExitCode> {
    let p = plan(&args.spec, &args.set)?;
    runner::prepare_all(&p)?;
    let sets = args
        .set
        .iter()
        .map(|o| format!("{}={}", o.key, o.value))
        .collect();
    let task = slurm::TaskCommand::from_here(&args.spec, &args.results, sets)?;
    let opts = slurm::SlurmOptions {
        partition: s.partition,
        gpus_per_run: s.gpus_per_run,
        cpus_per_task: s.cpus_per_task,
        time: s.time,
        dry_run: s.dry_run,
        force,
    };
    let sub = slurm::submit(&p, &task, &opts)?;
    for (id, why) in &sub.skipped {
        eprintln!("{id}: {why}; not submitted");
    }
    let Some(script) = &sub.script else {
        println!(
            "nothing to submit: none of the {} run(s) is pending (done, queued or being \
             trained; `ternlab plan` shows which)",
            p.runs.len()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let list = || {
        for (i, id) in sub.runs.iter().enumerate() {
            println!("  {i:>3}  {id}");
        }
    };
    match &sub.job_id {
        None => {
            println!("wrote {} (not submitted)", script.display());
            println!("{} run(s), by array index:", sub.runs.len());
            list();
            println!("submit it with: sbatch {}", script.display());
        }
        Some(job) => {
            println!("wrote {}", script.display());
            println!(
                "submitted job {job}: {} run(s) as array tasks 0-{}",
                sub.runs.len(),
                sub.runs.len() - 1
            );
            list();
            println!(
                "output: {}",
                slurm::folder(&task.results, &p.name)
                    .join(format!("{job}_<task>.out"))
                    .display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn train_plan(p: &Plan, results: PathBuf, force: bool) -> anyhow::Result<ExitCode> {
    ternlab::faults::injected("").map_err(|e| BadInput(format!("{e:#}")))?;
    let prepared = runner::prepare_all(p)?;
    ternlab::faults::install_interrupt_handler();
    let opts = SweepOptions { results, force };
    let outcomes = runner::sweep(p, &prepared, &opts);
    finish_sweep(p, &opts, &outcomes)
}

/// The summary table and the exit code of a sweep.
fn finish_sweep(
    p: &Plan,
    opts: &SweepOptions,
    outcomes: &[runner::Outcome],
) -> anyhow::Result<ExitCode> {
    println!("{}", summary_table(outcomes));
    println!("results: {}", opts.results.join(&p.name).display());
    // Elsewhere: another sweep process is training that run.
    let all_ok = outcomes.iter().all(|o| {
        matches!(
            o.fate,
            Fate::Ended(RunStatus::Completed) | Fate::Skipped(RunState::Done) | Fate::Elsewhere
        )
    });
    Ok(if ternlab::faults::interrupted() {
        ExitCode::from(130)
    } else if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_plan(p: &Plan, results: &std::path::Path) {
    let keys: Vec<&String> = p.axes.iter().flat_map(|a| &a.keys).collect();
    println!(
        "{}: {} run(s) of experiment {:?} into {}",
        p.file.display(),
        p.runs.len(),
        p.name,
        results.join(&p.name).display()
    );
    let w = p.runs.iter().map(|r| r.id.len()).max().unwrap_or(3).max(3);
    let mut header = format!("{:<w$}  {:<10}", "run", "state");
    for k in &keys {
        header.push_str(&format!("  {k}"));
    }
    println!("{header}");
    let mut queue = slurm::Queue::new();
    for r in &p.runs {
        let state = slurm::state_with_queue(results, &p.name, r, &mut queue);
        let mut line = format!("{:<w$}  {:<10}", r.id, state.label());
        for (k, v) in &r.swept {
            line.push_str(&format!("  {:>w2$}", v.to_string(), w2 = k.len()));
        }
        if let RunState::Queued(task) = &state {
            line.push_str(&format!("  (Slurm job {task})"));
        }
        if matches!(state, RunState::Unfinished | RunState::Failed(_)) {
            let dir = ternlab::run::run_dir(results, &p.name, &r.id);
            if let Some((_, s)) = ternlab::checkpoint::latest(&dir, &r.config_hash) {
                line.push_str(&format!("  (resumes at step {})", s.step));
            }
        }
        println!("{line}");
    }
}
