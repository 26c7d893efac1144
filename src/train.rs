//! The training loop and the seed's post-training evaluation: AdamW on the learning-rate
//! schedule of src/schedule.rs, one loss value per step recorded before the update; then the
//! ternary check, held-out NLL / perplexity over non-overlapping windows, and greedy
//! generations.

use crate::checkpoint::{Resume, Saver, Snapshot, SnapshotAt};
use crate::data::{eval_starts, windows, Batcher};
use crate::faults::{self, Fault, FaultKind};
use crate::model::ops::cross_entropy_with;
use crate::model::ternary::check_ternary_with;
use crate::model::{Ops, Params, Qwen3};
use crate::optim::AdamW;
use crate::parallel::Group;
use crate::schedule::lr_at;
use crate::spec::TrainSpec;
use crate::trainer::{Distill, Graphs, StepForward, Trainer};
use anyhow::Result;
use std::path::Path;
use std::time::Instant;
use tokenizers::Tokenizer;

/// One line of the loss curve.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub tokens_seen: usize,
    pub elapsed_s: f64,
    pub val_loss: Option<f64>,
}

/// How a training loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    /// The loss was NaN or infinite at this step; the curve holds the steps before it.
    Diverged {
        step: usize,
        loss: f64,
    },
    /// Ctrl-C: stopped before this step.
    Interrupted {
        step: usize,
    },
}

pub struct TrainResult {
    pub losses: Vec<f64>,
    /// Under distillation, each step's two loss terms (the cross-entropy, and the KL times
    /// T^2 before its weight); empty otherwise.
    pub ce_terms: Vec<f64>,
    pub kl_terms: Vec<f64>,
    pub outcome: Outcome,
    pub train_seconds: f64,
}

/// Held-out evaluation during training: every `every` steps (and never when 0).
pub struct ValDuringTraining<'a> {
    pub tokens: &'a [u32],
    pub seq_len: usize,
    pub batch_size: usize,
    pub every: usize,
}

/// A run's distillation teacher (`Qwen3::teacher`) and its term's weight and temperature.
pub struct Teacher {
    pub model: Qwen3,
    pub weight: f64,
    pub temperature: f64,
}

/// Saving the training state (`crate::checkpoint`), and where training resumes.
pub struct Checkpointing<'a> {
    /// A checkpoint every this many steps and when interrupted (0: neither).
    pub every: usize,
    /// `latent/` after the last step.
    pub save_latent: bool,
    /// Where these go (None: nowhere).
    pub saver: Option<&'a Saver>,
    /// The state to continue from: parameters already loaded, the rest here.
    pub resume: Option<Resume>,
}

impl Checkpointing<'_> {
    /// Nothing saved, from the start.
    pub fn none() -> Checkpointing<'static> {
        Checkpointing {
            every: 0,
            save_latent: false,
            saver: None,
            resume: None,
        }
    }
}

/// Trains `steps` steps, distilling from `teacher` when given. `on_step` sees every record as
/// soon as it exists (for the CSV and the progress display); `ckpt` says when to hand out
/// snapshots and where to resume from; `group`, when given, is the data-parallel group this
/// process trains in (`crate::parallel`).
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Qwen3,
    params: &Params,
    batcher: &mut Batcher,
    t: &TrainSpec,
    val: &ValDuringTraining,
    teacher: Option<&Teacher>,
    fault: Option<Fault>,
    on_step: &mut dyn FnMut(&StepRecord) -> Result<()>,
    ckpt: Checkpointing,
    group: Option<&Group>,
) -> Result<TrainResult> {
    let device = model.device().clone();
    let trainer = Trainer::for_model(model);
    let mut opt = AdamW::for_params(params, t, model.ops() == Ops::Fused)?;
    let (b, l) = (val.batch_size, val.seq_len);
    // (steps replay from CUDA graphs where they can: alone, not distilling)
    let mut graphs = if teacher.is_none() && group.is_none() {
        Graphs::for_trainer(&trainer, model, b, l)?
    } else {
        Graphs::off()
    };
    let start = Instant::now();
    let mut losses = Vec::with_capacity(t.steps);
    let (mut ce_terms, mut kl_terms) = (Vec::new(), Vec::new());
    let (mut first, mut seconds_before) = (0, 0.0);
    if let Some(r) = ckpt.resume {
        opt.restore(r.optimizer_steps, r.moments)?;
        batcher.restore(&r.sampler)?;
        (losses, ce_terms, kl_terms) = (r.losses, r.ce_terms, r.kl_terms);
        (first, seconds_before) = (r.step, r.train_seconds);
    }
    let elapsed = || seconds_before + start.elapsed().as_secs_f64();
    let saver = ckpt.saver;
    let snapshot = |step: usize,
                    at: SnapshotAt,
                    opt: &AdamW,
                    batcher: &Batcher,
                    losses: &[f64],
                    ce_terms: &[f64],
                    kl_terms: &[f64]|
     -> Result<()> {
        let Some(saver) = saver else {
            return Ok(());
        };
        saver.save(
            &Snapshot {
                step,
                params,
                optimizer: opt,
                sampler: batcher.state(),
                lambda: model.quant_lambda(step) as f64,
                losses,
                ce_terms,
                kl_terms,
                train_seconds: elapsed(),
            },
            at,
        )
    };
    let mut last_snapshot = first;
    // (the order every rank of a data-parallel group averages the gradients in)
    let vars = params.vars();
    for step in first..t.steps {
        let fault_now = fault.filter(|f| f.step == step).map(|f| f.kind);
        if fault_now == Some(FaultKind::Interrupt) {
            faults::interrupt();
        }
        if faults::interrupted() {
            if ckpt.every > 0 && step > last_snapshot {
                let at = SnapshotAt::Interrupted;
                snapshot(step, at, &opt, batcher, &losses, &ce_terms, &kl_terms)?;
            }
            saver.map(Saver::wait).transpose()?;
            return Ok(TrainResult {
                losses,
                ce_terms,
                kl_terms,
                outcome: Outcome::Interrupted { step },
                train_seconds: elapsed(),
            });
        }
        match fault_now {
            Some(FaultKind::Error) => anyhow::bail!("injected error at step {step}"),
            Some(FaultKind::Panic) => panic!("injected panic at step {step}"),
            Some(FaultKind::Exit) => {
                // (after the checkpoint in flight is on disk, so that a test knows what is)
                saver.map(Saver::wait).transpose()?;
                eprintln!("injected exit at step {step}");
                std::process::exit(137)
            }
            _ => {}
        }
        let lr = lr_at(t, step);
        opt.set_learning_rate(lr);
        let (x, y) = batcher.next_batch(&device)?;
        let (x, y) = match group {
            Some(g) => (g.shard(&x)?, g.shard(&y)?),
            None => (x, y),
        };
        // The same parameters, at this step's quantization warm-up (`quant.lambda_warmup_steps`).
        let model = &model.at_step(step);
        let cache = graphs.param_cache();
        // The loss is read before the update (the step's one host sync), so that a step whose
        // loss is not finite changes nothing (a replayed step checks it on the device).
        let (mut loss_value, update) = match graphs.step(model, &x, &y, &mut opt)? {
            // (replayed, the update made unless the loss is not finite)
            Some([loss, _]) => (loss as f64, None),
            None => {
                let (loss, grads) = eager_step(model, &trainer, &x, &y, teacher, group)?;
                if let Some([ce, kl]) = loss.terms {
                    ce_terms.push(ce);
                    kl_terms.push(kl);
                }
                (loss.value, Some(grads))
            }
        };
        if fault_now == Some(FaultKind::Nan) {
            loss_value = f64::NAN;
        }
        if !loss_value.is_finite() {
            saver.map(Saver::wait).transpose()?;
            return Ok(TrainResult {
                losses,
                ce_terms,
                kl_terms,
                outcome: Outcome::Diverged {
                    step,
                    loss: loss_value,
                },
                train_seconds: elapsed(),
            });
        }
        if let Some(backward) = update {
            let mut grads = backward.backward(model)?;
            if let Some(g) = group {
                g.average_grads(&mut grads, &vars)?;
            }
            opt.step(&grads)?;
        }
        drop(cache);
        losses.push(loss_value);
        let last = step + 1 == t.steps;
        let val_loss = if val.every > 0 && ((step + 1) % val.every == 0 || last) {
            Some(heldout_nll(&model.frozen()?, val.tokens, l, b)?)
        } else {
            None
        };
        on_step(&StepRecord {
            step,
            lr,
            loss: loss_value,
            tokens_seen: (step + 1) * b * l,
            elapsed_s: elapsed(),
            val_loss,
        })?;
        let done = step + 1;
        let periodic = ckpt.every > 0 && done % ckpt.every == 0;
        let end = ckpt.save_latent && done == t.steps;
        for (wanted, at) in [(periodic, SnapshotAt::Checkpoint), (end, SnapshotAt::End)] {
            if wanted {
                snapshot(done, at, &opt, batcher, &losses, &ce_terms, &kl_terms)?;
                last_snapshot = done;
            }
        }
    }
    if ckpt.save_latent && first == t.steps {
        // (resumed from a checkpoint of the last step: nothing left to train)
        let at = SnapshotAt::End;
        snapshot(first, at, &opt, batcher, &losses, &ce_terms, &kl_terms)?;
    }
    saver.map(Saver::wait).transpose()?;
    Ok(TrainResult {
        losses,
        ce_terms,
        kl_terms,
        outcome: Outcome::Completed,
        train_seconds: elapsed(),
    })
}

/// The loss of an eagerly run step as read on the host, with its CE and KL terms when
/// distilling.
struct StepLoss {
    value: f64,
    terms: Option<[f64; 2]>,
}

/// The forward and loss of one step, launch by launch (the teacher's logits first when
/// distilling); the loss averaged over the ranks of a data-parallel group.
fn eager_step(
    model: &Qwen3,
    trainer: &Trainer,
    x: &candle_core::Tensor,
    y: &candle_core::Tensor,
    teacher: Option<&Teacher>,
    group: Option<&Group>,
) -> Result<(StepLoss, StepForward)> {
    let teacher_logits = teacher.map(|t| t.model.forward(x)).transpose()?;
    let distill = teacher
        .zip(teacher_logits.as_ref())
        .map(|(t, logits)| Distill {
            teacher_logits: logits,
            weight: t.weight,
            temperature: t.temperature,
        });
    let fwd = trainer.forward_distilled(model, x, y, distill.as_ref())?;
    // (the values, averaged over the ranks of a data-parallel group: copies, since the graph
    // keeps the originals)
    let (mut loss, mut ce, mut kl) = (fwd.loss.clone(), fwd.ce.clone(), fwd.kl.clone());
    if let Some(g) = group {
        loss = loss.copy()?;
        ce = ce.copy()?;
        kl = kl.map(|k| k.copy()).transpose()?;
        let mut all = vec![&loss, &ce];
        all.extend(kl.as_ref());
        g.average(&all)?;
    }
    let terms = match &kl {
        Some(kl) => Some([ce.to_scalar::<f32>()? as f64, kl.to_scalar::<f32>()? as f64]),
        None => None,
    };
    let value = loss.to_scalar::<f32>()? as f64;
    Ok((StepLoss { value, terms }, fwd))
}

/// Mean token NLL over the seed's non-overlapping held-out windows, `batch` windows at a time.
pub fn heldout_nll(model: &Qwen3, tokens: &[u32], seq_len: usize, batch: usize) -> Result<f64> {
    let starts = eval_starts(tokens.len(), seq_len);
    anyhow::ensure!(
        !starts.is_empty(),
        "the held-out split has {} tokens, fewer than one window of seq_len + 1 = {}",
        tokens.len(),
        seq_len + 1
    );
    let mut nll_sum = 0.0;
    let mut count = 0usize;
    for chunk in starts.chunks(batch.max(1)) {
        let (x, y) = windows(tokens, chunk, seq_len, model.device())?;
        let logits = model.forward(&x)?;
        let mean = cross_entropy_with(&logits, &y, model.ops())?.to_scalar::<f32>()? as f64;
        let n = chunk.len() * seq_len;
        nll_sum += mean * n as f64;
        count += n;
    }
    Ok(nll_sum / count as f64)
}

/// The seed's verification over all ternary layers.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryVerification {
    pub bad: usize,
    pub total: usize,
    pub max_err: f64,
    pub ok: bool,
}

pub fn verify_ternary(model: &Qwen3) -> Result<TernaryVerification> {
    let (mut bad, mut total, mut max_err) = (0, 0, 0f64);
    for lin in model.ternary_linears() {
        let q = lin.quant().expect("a ternary layer has a quantizer");
        let c = check_ternary_with(lin.weight(), q, &lin.group_scales()?)?;
        bad += c.bad;
        total += c.total;
        max_err = max_err.max(c.max_err);
    }
    Ok(TernaryVerification {
        bad,
        total,
        max_err,
        ok: bad == 0 && max_err < 1e-4,
    })
}

/// Where greedy generation stops, as mlx_lm decides it for the seed: the `eos_token_id` of
/// the checkpoint's config.json (one id or a list), replaced by generation_config.json's when
/// that has one, plus the id of tokenizer_config.json's `eos_token`. Without any of these (the
/// presets), whichever of the usual Qwen / generic end markers the tokenizer knows.
pub fn eos_ids(model_dir: Option<&Path>, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let read = |name: &str| -> Result<Option<serde_json::Value>> {
        let Some(path) = model_dir.map(|d| d.join(name)).filter(|p| p.is_file()) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&path)?;
        let v = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
        Ok(Some(v))
    };
    let ids_of = |v: &serde_json::Value| -> Vec<u32> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().map(|i| i as u32).into_iter().collect(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|i| i as u32)
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut ids = Vec::new();
    if let Some(cfg) = read("config.json")? {
        ids = ids_of(&cfg["eos_token_id"]);
    }
    if let Some(gen) = read("generation_config.json")? {
        let from_gen = ids_of(&gen["eos_token_id"]);
        if !from_gen.is_empty() {
            ids = from_gen;
        }
    }
    let mut tokenizer_eos = None;
    if let Some(tc) = read("tokenizer_config.json")? {
        let eos = &tc["eos_token"];
        let content = eos.as_str().or_else(|| eos["content"].as_str());
        tokenizer_eos = content.and_then(|t| tokenizer.token_to_id(t));
    }
    if ids.is_empty() && tokenizer_eos.is_none() && model_dir.is_none() {
        ids = ["<|endoftext|>", "<|im_end|>", "</s>", "<eos>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
    }
    ids.extend(tokenizer_eos);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Greedy continuation of `prompt`: the generated text after the prompt, stopping before the
/// first id of `eos` or after `max_new_tokens` tokens, decoded as mlx_lm's `generate` returns
/// it (its streaming detokenizer for byte-level BPE drops one leading space of the
/// generation).
pub fn generate_greedy(
    model: &Qwen3,
    tokenizer: &Tokenizer,
    eos: &[u32],
    prompt: &str,
    max_new_tokens: usize,
) -> Result<String> {
    let prompts = [prompt.to_string()];
    let mut texts = generate_greedy_batch(model, tokenizer, eos, &prompts, max_new_tokens)?;
    Ok(texts.remove(0))
}

/// `generate_greedy` of every prompt, in one batch (`crate::generate::generate_greedy_batch`).
pub fn generate_greedy_batch(
    model: &Qwen3,
    tokenizer: &Tokenizer,
    eos: &[u32],
    prompts: &[String],
    max_new_tokens: usize,
) -> Result<Vec<String>> {
    let ids = prompts
        .iter()
        .map(|prompt| {
            let enc = tokenizer
                .encode(prompt.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing prompt {prompt:?}: {e}"))?;
            let ids: Vec<u32> = enc.get_ids().to_vec();
            anyhow::ensure!(!ids.is_empty(), "prompt {prompt:?} tokenizes to nothing");
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let generated = crate::generate::generate_greedy_batch(model, &ids, max_new_tokens, eos)?;
    let byte_level = matches!(
        tokenizer.get_decoder(),
        Some(tokenizers::DecoderWrapper::ByteLevel(_))
    );
    generated
        .iter()
        .map(|tokens| {
            let text = tokenizer
                .decode(tokens, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            Ok(match text.strip_prefix(' ') {
                Some(rest) if byte_level => rest.to_string(),
                _ => text,
            })
        })
        .collect()
}
