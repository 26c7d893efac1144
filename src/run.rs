//! One run, end to end: resolve and check everything (model, tokenizer, data, device) before
//! anything is written; then `<results>/<name>/<run-id>/config.toml` first, `loss.csv` while
//! training, and `report.json` at the end.

use crate::choice::Choice;
use crate::data::{Batcher, Corpus};
use crate::model::load::{random_weights, read_weights, resolve_checkpoint, CheckpointFiles};
use crate::model::{Preset, Qwen3, Qwen3Config, TernarySpec};
use crate::parallel::{Group, Ranks};
use crate::plan::PlannedRun;
use crate::progress::Progress;
use crate::quant::Granularity;
use crate::report::{
    head_mean, tail_mean, write_atomic, write_json_atomic, DistillReport, LossCurveWriter, Report,
    RunStatus, Sample, Versions,
};
use crate::spec::{BadInput, DenseDtype, Spec};
use crate::train::{self, Outcome, ValDuringTraining};
use crate::trainer::Trainer;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// The tokenizer of the built-in presets: byte-level BPE, 4096 entries, trained on the bundled
/// corpus by `cargo run --example make_tiny_tokenizer`.
pub const TINY_TOKENIZER: &[u8] = include_bytes!("../data/tiny-tokenizer.json");

/// Where the initial weights come from.
pub enum ModelOrigin {
    Preset(Preset),
    Checkpoint(CheckpointFiles),
}

/// Everything a run needs, resolved and checked; nothing written yet.
pub struct PreparedRun {
    pub spec: Spec,
    pub model_cfg: Qwen3Config,
    pub origin: ModelOrigin,
    pub tokenizer: Tokenizer,
    pub corpus: std::sync::Arc<Corpus>,
    pub config_hash: String,
    pub run_id: String,
    /// Where greedy generation stops (see `train::eos_ids`).
    pub eos_ids: Vec<u32>,
}

fn load_tokenizer(
    spec: &Spec,
    file: &Path,
    checkpoint: Option<&CheckpointFiles>,
) -> Result<Tokenizer> {
    let from_file = |p: &Path, key: &str| {
        Tokenizer::from_file(p).map_err(|e| {
            BadInput(format!(
                "{}: key `{key}`: cannot load tokenizer {}: {e}",
                file.display(),
                p.display()
            ))
            .into()
        })
    };
    if let Some(p) = &spec.model.tokenizer {
        return from_file(p, "model.tokenizer");
    }
    match checkpoint {
        Some(c) => match &c.tokenizer {
            Some(p) => from_file(p, "model.source"),
            None => Err(BadInput(format!(
                "{}: key `model.source`: {} has no tokenizer.json; set model.tokenizer",
                file.display(),
                c.origin
            ))
            .into()),
        },
        None => Tokenizer::from_bytes(TINY_TOKENIZER)
            .map_err(|e| anyhow::anyhow!("the bundled tokenizer does not load: {e}")),
    }
}

/// Resolves and checks a planned run against the model and the data, writing nothing.
pub fn prepare(planned: &PlannedRun, file: &Path) -> Result<PreparedRun> {
    prepare_with(planned, file, true)
}

/// `prepare` for `ternlab bench`, which times training steps only: the held-out split may be
/// shorter than one window (the bundled text's 10% is, from seq_len = 2,092 on).
pub fn prepare_bench(planned: &PlannedRun, file: &Path) -> Result<PreparedRun> {
    prepare_with(planned, file, false)
}

fn prepare_with(planned: &PlannedRun, file: &Path, held_out: bool) -> Result<PreparedRun> {
    let spec = &planned.spec;
    spec.check(file)?;
    let bad = |key: &str, msg: String| -> anyhow::Error {
        BadInput(format!("{}: key `{key}`: {msg}", file.display())).into()
    };
    let origin = match &spec.model.preset {
        Some(p) => ModelOrigin::Preset(*p),
        None => ModelOrigin::Checkpoint(
            resolve_checkpoint(&spec.model.source, &spec.model.revision)
                .map_err(|e| bad("model.source", format!("{e:#}")))?,
        ),
    };
    let checkpoint = match &origin {
        ModelOrigin::Checkpoint(c) => Some(c),
        ModelOrigin::Preset(_) => None,
    };
    let tokenizer = load_tokenizer(spec, file, checkpoint)?;
    let model_cfg = match &origin {
        ModelOrigin::Preset(p) => Qwen3Config::preset(*p, tokenizer.get_vocab_size(true)),
        ModelOrigin::Checkpoint(c) => Qwen3Config::from_hf_json(&c.config)
            .map_err(|e| bad("model.source", format!("{e:#}")))?,
    };
    if tokenizer.get_vocab_size(true) > model_cfg.vocab_size {
        return Err(bad(
            "model.tokenizer",
            format!(
                "the tokenizer has {} entries, more than the model's vocab_size {}",
                tokenizer.get_vocab_size(true),
                model_cfg.vocab_size
            ),
        ));
    }
    let ternary = ternary_spec(spec);
    for p in &spec.quant.projections {
        let width = model_cfg.projection_in_features(*p);
        let g = spec.quant.group_size.for_width(width);
        if ternary.granularity() == Granularity::Group && width % g != 0 {
            return Err(bad(
                "quant.group_size",
                format!(
                    "{g} does not divide the input width {width} of {}; use a divisor of {width}",
                    p.name()
                ),
            ));
        }
    }
    let layers = model_cfg.num_hidden_layers;
    if let Some(l) = spec.quant.exclude_layers.iter().find(|&&l| l >= layers) {
        return Err(bad(
            "quant.exclude_layers",
            format!(
                "layer {l} does not exist: the model has layers 0 to {}",
                layers - 1
            ),
        ));
    }
    let data_path = &spec.data.path;
    if !data_path.is_file() {
        return Err(bad(
            "data.path",
            format!("{} does not exist or is not a file", data_path.display()),
        ));
    }
    let corpus = Corpus::load_shared(data_path, &tokenizer, spec.data.val_fraction)
        .map_err(|e| bad("data.path", format!("{e:#}")))?;
    let need = spec.data.seq_len + 2;
    if corpus.train.len() < need {
        return Err(bad(
            "data.seq_len",
            format!(
                "the training split of {} has {} tokens; seq_len = {} needs at least {need}",
                data_path.display(),
                corpus.train.len(),
                spec.data.seq_len
            ),
        ));
    }
    if held_out && corpus.val.len() <= spec.data.seq_len {
        return Err(bad(
            "data.val_fraction",
            format!(
                "the held-out split of {} has {} tokens, fewer than one window of seq_len + 1 = {}",
                data_path.display(),
                corpus.val.len(),
                spec.data.seq_len + 1
            ),
        ));
    }
    let model_dir = checkpoint.and_then(|c| c.config.parent());
    let eos_ids =
        train::eos_ids(model_dir, &tokenizer).map_err(|e| bad("model.source", format!("{e:#}")))?;
    crate::device::check_built(spec.run.device).map_err(|e| bad("run.device", format!("{e:#}")))?;
    Ok(PreparedRun {
        spec: spec.clone(),
        model_cfg,
        origin,
        tokenizer,
        corpus,
        config_hash: planned.config_hash.clone(),
        run_id: planned.id.clone(),
        eos_ids,
    })
}

/// A run's folder: `<results>/<name>/<run-id>/`.
pub fn run_dir(results: &Path, name: &str, id: &str) -> PathBuf {
    results.join(name).join(id)
}

impl PreparedRun {
    pub fn run_dir(&self, results: &Path) -> PathBuf {
        run_dir(results, &self.spec.name, &self.run_id)
    }

    /// Builds the model with its initial weights on `device`; also returns the dtype the
    /// checkpoint stores them in (that of its embedding; bf16 for the presets).
    pub fn build_model(
        &self,
        device: &candle_core::Device,
    ) -> Result<(Qwen3, crate::model::Params, candle_core::DType)> {
        let mut weights = match &self.origin {
            ModelOrigin::Preset(_) => random_weights(&self.model_cfg, self.spec.train.seed)?,
            ModelOrigin::Checkpoint(c) => read_weights(c)?,
        };
        let stored = weights
            .get("model.embed_tokens.weight")
            .map_or(candle_core::DType::BF16, |t| t.dtype());
        if self.spec.train.dense_dtype == DenseDtype::F32 {
            for t in weights.values_mut() {
                *t = t.to_dtype(candle_core::DType::F32)?;
            }
        }
        let ternary = ternary_spec(&self.spec);
        let (model, params) = Qwen3::new(&self.model_cfg, weights, &ternary, device)?;
        Ok((
            model
                .with_compute_dtype(self.spec.train.dtype.resolve(device).select())
                .with_fused(self.spec.run.fused),
            params,
            stored,
        ))
    }

    /// The run's distillation teacher, its starting `model` frozen (None without
    /// distillation). Made before any training or resume changes `model`.
    pub fn teacher(&self, model: &Qwen3) -> Result<Option<train::Teacher>> {
        let ds = &self.spec.distill;
        if ds.weight <= 0.0 {
            return Ok(None);
        }
        Ok(Some(train::Teacher {
            model: model.teacher()?,
            weight: ds.weight,
            temperature: ds.temperature,
        }))
    }

    /// The run's training batches from its first step (the seed's sampler).
    pub fn batcher(&self) -> Result<Batcher<'_>> {
        let (d, t) = (&self.spec.data, &self.spec.train);
        Batcher::new(
            &self.corpus.train,
            d.seq_len,
            d.batch_size,
            d.sampling,
            t.seed,
        )
    }

    fn origin_name(&self) -> String {
        match &self.origin {
            ModelOrigin::Preset(p) => format!("preset:{}", p.name()),
            ModelOrigin::Checkpoint(c) => c.origin.clone(),
        }
    }
}

/// Which reference a run's optimizer and parameter precision follow (report.json's
/// `semantics`).
/// The model's quantizer as the spec's `[quant]` describes it.
fn ternary_spec(spec: &Spec) -> TernarySpec {
    let q = &spec.quant;
    TernarySpec {
        projections: q.projections.clone(),
        group_size: q.group_size,
        granularity: q.granularity,
        scale: q.scale,
        scale_dtype: q.scale_dtype,
        exclude_layers: q.exclude_layers.clone(),
        lambda_warmup_steps: q.lambda_warmup_steps,
        activation_bits: q.activation_bits,
        scale_lr: q.scale_lr,
    }
}

pub fn semantics(t: &crate::spec::TrainSpec) -> &'static str {
    match (t.bias_correction, t.dense_dtype) {
        (false, DenseDtype::Checkpoint) => "seed",
        (true, DenseDtype::F32) => "pytorch",
        _ => "mixed",
    }
}

/// A dtype as reports spell it.
pub fn dtype_name(d: candle_core::DType) -> &'static str {
    match d {
        candle_core::DType::F32 => "f32",
        candle_core::DType::BF16 => "bf16",
        candle_core::DType::F16 => "f16",
        _ => "other",
    }
}

/// Trains a prepared run into `<results>/<name>/<run-id>/` and returns its report.
pub fn execute(p: &PreparedRun, results: &Path, progress: &mut dyn Progress) -> Result<Report> {
    let wall = Instant::now();
    let dir = p.run_dir(results);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(
        &dir.join("config.toml"),
        toml::to_string(&p.spec)?.as_bytes(),
    )?;
    let resume_from = crate::checkpoint::latest(&dir, &p.config_hash);
    let mut curve = match &resume_from {
        Some((_, state)) => LossCurveWriter::resume(&dir.join("loss.csv"), state.step)?,
        None => LossCurveWriter::create(&dir.join("loss.csv"))?,
    };

    let mut laps = crate::report::Laps::start();
    let (device, device_name) = crate::device::open(p.spec.run.device)?;
    progress.message(&format!(
        "{}: building the model on {device_name}",
        p.run_id
    ));
    let (model, params, stored_dtype) = p.build_model(&device)?;
    let build_s = laps.lap(&device);
    let world = p.spec.run.devices;
    let (group, mut ranks) = if world > 1 {
        progress.message(&format!(
            "{}: starting {} more ranks (data-parallel over {world} GPUs)",
            p.run_id,
            world - 1
        ));
        let first = match p.spec.run.device {
            crate::device::DeviceChoice::Cuda(n) => n.unwrap_or(0),
            other => anyhow::bail!("data parallelism runs on CUDA GPUs, not {other}"),
        };
        crate::parallel::check_cards(first, world)?;
        let id = Group::new_id()?;
        let resume_dir = resume_from.as_ref().map(|(d, _)| d.as_path());
        let mut ranks = Ranks::spawn(&dir, world, &id, resume_dir)?;
        let group = ranks.join(&id, world, &device)?;
        ranks.watch(&group);
        progress.message(&format!("{}: rank 0 of {world} joined", p.run_id));
        (Some(group), Some(ranks))
    } else {
        (None, None)
    };
    let device_name = match world {
        1 => device_name,
        n => format!("{device_name} x {n} (data-parallel)"),
    };
    let (t, d) = (&p.spec.train, &p.spec.data);
    let heldout = |m: &Qwen3| train::heldout_nll(m, &p.corpus.val, d.seq_len, d.batch_size);
    progress.message(&format!(
        "{}: held-out loss of the starting model, dense and ternary",
        p.run_id
    ));
    let start = crate::recovery::Start::measure(&model, &heldout)?;
    let start_nll_s = laps.lap(&device);
    crate::device::reset_peak_memory(&device);
    let mut batcher = p.batcher()?;
    let val = ValDuringTraining {
        tokens: &p.corpus.val,
        seq_len: d.seq_len,
        batch_size: d.batch_size,
        every: p.spec.eval.every,
    };
    let fault = crate::faults::injected(&p.run_id)?;
    let teacher = p.teacher(&model)?;
    let teacher = teacher.as_ref();
    // (after the start was measured and the teacher copied: both are the starting model)
    let resume = match &resume_from {
        Some((ckpt, state)) => {
            progress.message(&format!(
                "{}: resuming from step {} ({})",
                p.run_id,
                state.step,
                ckpt.display()
            ));
            Some(crate::checkpoint::load(ckpt, &params, &device)?)
        }
        None => None,
    };
    let saver = crate::checkpoint::Saver::new(&dir, &p.config_hash);
    let ckpt = train::Checkpointing {
        every: t.checkpoint_every,
        save_latent: t.save.latent(),
        saver: Some(&saver),
        resume,
    };
    let result = train::train(
        &model,
        &params,
        &mut batcher,
        t,
        &val,
        teacher,
        fault,
        &mut |r| {
            progress.step(r, t.steps);
            curve.write(r)
        },
        ckpt,
        group.as_ref(),
    );
    let result = match (result, ranks.as_ref().and_then(Ranks::died)) {
        (Err(e), Some(why)) => return Err(e.context(why)),
        (r, _) => r?,
    };
    if let Some(r) = ranks.take() {
        r.finish(result.outcome == Outcome::Completed)?;
    }
    progress.finish();
    let train_s = laps.lap(&device);

    let losses = &result.losses;
    let (status, error) = match &result.outcome {
        Outcome::Completed => (RunStatus::Completed, None),
        Outcome::Diverged { step, loss } => (
            RunStatus::Diverged,
            Some(format!("loss became {loss} at step {step}")),
        ),
        Outcome::Interrupted { step } => (
            RunStatus::Interrupted,
            Some(format!("interrupted before step {step}")),
        ),
    };
    let verification = train::verify_ternary(&model)?;
    let (mut final_nll_s, mut samples_s) = (0.0, 0.0);
    let (val_nll, samples) = if result.outcome == Outcome::Completed {
        progress.message(&format!("{}: held-out loss and samples", p.run_id));
        let frozen = model.frozen()?;
        let nll = heldout(&frozen)?;
        final_nll_s = laps.lap(&device);
        let prompts = &p.spec.eval.prompts;
        let texts = train::generate_greedy_batch(
            &frozen,
            &p.tokenizer,
            &p.eos_ids,
            prompts,
            p.spec.eval.max_new_tokens,
        )?;
        let samples: Vec<Sample> = prompts
            .iter()
            .zip(texts)
            .map(|(prompt, generation)| Sample {
                prompt: prompt.clone(),
                generation,
            })
            .collect();
        samples_s = laps.lap(&device);
        (nll, samples)
    } else {
        (f64::NAN, Vec::new())
    };
    let recovery = if result.outcome == Outcome::Completed {
        Some(start.finish(&model, val_nll)?)
    } else {
        None
    };
    let mut packed_max_err = None;
    if result.outcome == Outcome::Completed && t.save.ternary() {
        progress.message(&format!(
            "{}: saving ternary/ and ternary.safetensors",
            p.run_id
        ));
        let source_dir = match &p.origin {
            ModelOrigin::Checkpoint(c) => c.config.parent(),
            ModelOrigin::Preset(_) => None,
        };
        crate::export::save_hf_dir(
            &dir.join("ternary"),
            &model,
            &params,
            &crate::export::Companions {
                cfg: &p.model_cfg,
                source_dir,
                tokenizer: &p.tokenizer,
                dtype: stored_dtype,
            },
        )?;
        let packed = dir.join("ternary.safetensors");
        crate::export::save_packed(&packed, &model, &params)?;
        let n = d.seq_len.min(p.corpus.val.len());
        let ids = candle_core::Tensor::new(&p.corpus.val[..n], &device)?.unsqueeze(0)?;
        packed_max_err = Some(crate::export::check_packed(&packed, &model, &ids)?);
    }
    let save_s = laps.lap(&device);
    let ternary = model.ternary_linears();
    let tokens_trained = losses.len() * d.batch_size * d.seq_len;
    let report = Report {
        first_5_loss_avg: head_mean(losses, 5),
        last_20_loss_avg: tail_mean(losses, 20),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        ternary_ok: verification.ok,
        ternary_max_err: verification.max_err,
        val_nll,
        val_ppl: val_nll.exp(),
        num_steps: t.steps,
        batch_size: d.batch_size,
        seq_len: d.seq_len,
        lr_peak: t.lr,
        group_size: p.spec.quant.group_size,
        granularity: ternary_spec(&p.spec).granularity(),
        scale: p.spec.quant.scale,
        scale_dtype: p.spec.quant.scale_dtype,
        exclude_layers: p.spec.quant.exclude_layers.clone(),
        lambda_warmup_steps: p.spec.quant.lambda_warmup_steps,
        activation_bits: p.spec.quant.activation_bits,
        recovery,
        distill: teacher.map(|tc| DistillReport {
            weight: tc.weight,
            temperature: tc.temperature,
            last_20_ce_avg: tail_mean(&result.ce_terms, 20),
            last_20_kl_avg: tail_mean(&result.kl_terms, 20),
            final_ce: result.ce_terms.last().copied().unwrap_or(f64::NAN),
            final_kl: result.kl_terms.last().copied().unwrap_or(f64::NAN),
        }),
        packed_max_err,
        packed_ok: packed_max_err.map(|e| e == 0.0),
        n_ternary_layers: ternary.len(),
        n_ternary_params: ternary.iter().map(|l| l.weight().elem_count()).sum(),
        samples,
        loss_curve: losses.clone(),
        status,
        error,
        run_id: p.run_id.clone(),
        experiment: p.spec.name.clone(),
        config_hash: p.config_hash.clone(),
        config: serde_json::to_value(&p.spec)?,
        seed: t.seed,
        device: device_name,
        dtype: t.dtype.resolve(&device),
        trainer: Trainer::for_model(&model).name().into(),
        semantics: semantics(t).into(),
        dense_dtype: dtype_name(model.dense_dtype()).into(),
        model_origin: p.origin_name(),
        n_params: params.num_elements(),
        ternary_bad: verification.bad,
        train_tokens: p.corpus.train.len(),
        val_tokens: p.corpus.val.len(),
        wall_time_s: wall.elapsed().as_secs_f64(),
        phases: Some(crate::report::PhaseTimes {
            build_s,
            start_nll_s,
            train_s,
            final_nll_s,
            samples_s,
            save_s,
        }),
        train_time_s: result.train_seconds,
        tokens_per_s: tokens_trained as f64 / result.train_seconds.max(1e-9),
        peak_memory_bytes: crate::device::peak_memory_bytes(&device),
        graph_memory_bytes: crate::device::graph_memory_bytes(&device).filter(|&b| b > 0),
        resumed_from_step: resume_from.as_ref().map(|(_, s)| s.step),
        saves: Some(saver.stats()).filter(|s| s.count > 0),
        versions: Versions::current(),
    };
    write_json_atomic(&dir.join("report.json"), &report)?;
    Ok(report)
}

/// One child rank of a data-parallel run (`ternlab rank <run folder>`, started by rank 0 with
/// its place in the environment, `crate::parallel`): the run's model on `cuda:k+rank`, its share
/// of every batch, gradients averaged with the other ranks; nothing written.
pub fn execute_rank(run_dir: &Path) -> Result<()> {
    let (rank, world, id) = crate::parallel::from_env()?
        .context("`ternlab rank` runs inside a data-parallel run, started by its rank 0")?;
    // Ctrl-C reaches every process of the terminal: rank 0 decides when the run stops, and
    // ends the other ranks then.
    let _ = ctrlc::set_handler(|| {});
    crate::parallel::exit_with_parent();
    let file = run_dir.join("config.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let spec: Spec = toml::from_str(&text).with_context(|| format!("{}", file.display()))?;
    let planned = PlannedRun {
        config_hash: crate::plan::config_hash(&spec),
        id: run_dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        swept: Vec::new(),
        spec,
    };
    let p = prepare(&planned, &file)?;
    let base = match p.spec.run.device {
        crate::device::DeviceChoice::Cuda(n) => n.unwrap_or(0),
        other => anyhow::bail!("data parallelism runs on CUDA GPUs, not {other}"),
    };
    let (device, _) = crate::device::open(crate::device::DeviceChoice::Cuda(Some(base + rank)))?;
    let (model, params, _) = p.build_model(&device)?;
    let group = Group::join(&id, rank, world, &device)?;
    eprintln!(
        "{}: rank {rank} of {world} joined on cuda:{}",
        p.run_id,
        base + rank
    );
    let (t, d) = (&p.spec.train, &p.spec.data);
    let teacher = p.teacher(&model)?;
    let resume = match std::env::var_os(crate::parallel::RESUME_VAR) {
        Some(dir) => Some(crate::checkpoint::load(Path::new(&dir), &params, &device)?),
        None => None,
    };
    let mut batcher = p.batcher()?;
    let val = ValDuringTraining {
        tokens: &p.corpus.val,
        seq_len: d.seq_len,
        batch_size: d.batch_size,
        every: 0,
    };
    let ckpt = train::Checkpointing {
        resume,
        ..train::Checkpointing::none()
    };
    // (`TERNLAB_INJECT=KIND@STEP:#rank1` reaches rank 1 alone: its id is the run's plus this)
    let fault = crate::faults::injected(&format!("{}#rank{rank}", p.run_id))?;
    train::train(
        &model,
        &params,
        &mut batcher,
        t,
        &val,
        teacher.as_ref(),
        fault,
        &mut |_| Ok(()),
        ckpt,
        Some(&group),
    )?;
    Ok(())
}
