//! `ternlab eval MODEL`: the NLL of a model over non-overlapping windows of `seq_len` tokens.
//! MODEL is a run folder that saved its model (`train.save = "ternary"`: its packed
//! `ternary.safetensors`, so W_t exactly), a packed file itself, an exported or any Hugging Face
//! Qwen3 directory, or a hub repo id. A run folder is evaluated on its own held-out split at
//! its own `seq_len`, batch size and precision unless told otherwise, which gives its report's
//! `val_nll`; everything else needs `--text` or `--dataset` (`crate::dataset`).
//!
//! Two protocols cut and score the windows. `seed`, the training runs' own: windows of L
//! inputs each with the next token as target (L predictions a window). `gptq`, the one GPTQ and
//! the Qwen3 quantization study report wikitext-2 perplexity with: numel / L windows of L
//! tokens, each its own labels (L - 1 predictions, Hugging Face's shifted loss). `gptq` is the
//! default for `--dataset`, `seed` for the rest, so earlier numbers stay what they were.

use crate::choice::{serde_by_name, Choice};
use crate::data::Corpus;
use crate::device::DeviceChoice;
use crate::model::load::{read_weights, resolve_checkpoint};
use crate::model::ops::cross_entropy_with;
use crate::model::{GroupSize, Qwen3, Qwen3Config, TernarySpec, Weights};
use crate::spec::{BadInput, Spec, TrainDtype};
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// How the windows are cut and scored (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Gptq,
    Seed,
}

impl Choice for Protocol {
    const ALL: &'static [Self] = &[Self::Gptq, Self::Seed];
    fn name(self) -> &'static str {
        match self {
            Self::Gptq => "gptq",
            Self::Seed => "seed",
        }
    }
}

serde_by_name!(Protocol);

/// What to evaluate, and on what.
pub struct EvalArgs {
    pub model: String,
    /// A UTF-8 text file, tokenized whole (default for a run folder: its held-out split).
    pub text: Option<PathBuf>,
    /// A known dataset's name (`crate::dataset::DATASETS`); not with `text`.
    pub dataset: Option<String>,
    /// Default: `gptq` with `dataset`, else `seed`.
    pub protocol: Option<Protocol>,
    pub seq_len: Option<usize>,
    pub batch_size: Option<usize>,
    pub device: DeviceChoice,
}

/// The result, as `ternlab eval` prints it (JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    pub model: String,
    /// Where the weights came from.
    pub weights: String,
    /// The text: a file, `held-out split of <data.path>`, or a dataset's name.
    pub text: String,
    /// With `--dataset`: which file of which repo, and where the hub cache keeps it.
    pub dataset: Option<DatasetSource>,
    pub protocol: Protocol,
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    /// Tokens scored: windows x seq_len (`seed`) or windows x (seq_len - 1) (`gptq`).
    pub predictions: usize,
    pub nll: f64,
    pub ppl: f64,
    pub device: String,
}

/// The file a `--dataset` evaluation read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatasetSource {
    pub name: String,
    /// `repo@revision file` of the hub dataset repo.
    pub source: String,
    /// The parquet file in the hub cache (`snapshots/<commit>/...`).
    pub path: PathBuf,
    /// Rows of its text column, joined into the text.
    pub rows: usize,
}

/// A model's weights and what comes with them.
struct Source {
    cfg: Qwen3Config,
    weights: Weights,
    tokenizer: Tokenizer,
    weights_from: String,
    /// The run's spec, for a run folder.
    run: Option<Spec>,
    /// Projections whose inputs were quantized to 8 bits (a run with activation_bits = 8).
    act_quant: Vec<String>,
    /// The directory of config.json (where generation settings are read from); None for a
    /// preset's run.
    dir: Option<PathBuf>,
}

fn bad(what: String) -> anyhow::Error {
    BadInput(what).into()
}

fn tokenizer_at(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| bad(format!("{}: cannot load: {e}", path.display())))
}

/// A packed file with the config and tokenizer of the `ternary/` folder beside it.
fn packed(file: &Path, run: Option<Spec>) -> Result<Source> {
    let dir = file.parent().unwrap_or(Path::new(".")).join("ternary");
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(bad(format!(
            "{}: no {} beside it (a run with train.save = \"ternary\" writes both)",
            file.display(),
            config.display()
        )));
    }
    let (weights, layers) = crate::export::read_packed(file)?;
    let act_quant = layers
        .into_iter()
        .filter(|(_, l)| l.activation_bits == 8)
        .map(|(name, _)| name)
        .collect();
    Ok(Source {
        cfg: Qwen3Config::from_hf_json(&config)?,
        weights,
        tokenizer: tokenizer_at(&dir.join("tokenizer.json"))?,
        weights_from: file.display().to_string(),
        run,
        act_quant,
        dir: Some(dir),
    })
}

/// A run folder that kept only `latent/`: the run's model rebuilt from its config.toml (on the
/// CPU), the latents loaded, and each ternary projection taken at `W_t` (what the packed file
/// would hold), the rest as trained.
fn latent(run: &Path, mut spec: Spec) -> Result<Source> {
    let file = run.join("config.toml");
    let id = run.file_name().map(|n| n.to_string_lossy().to_string());
    spec.run.device = DeviceChoice::Cpu;
    spec.run.devices = 1;
    let planned = crate::plan::PlannedRun {
        config_hash: crate::plan::config_hash(&spec),
        id: id.unwrap_or_default(),
        swept: Vec::new(),
        spec: spec.clone(),
    };
    let p = crate::run::prepare(&planned, &file)?;
    let cpu = candle_core::Device::Cpu;
    let (model, params, _) = p.build_model(&cpu)?;
    let latent = run.join("latent");
    let state = crate::checkpoint::load(&latent, &params, &cpu)?;
    let model = model.at_step(state.step);
    let act_quant = model
        .linears()
        .into_iter()
        .filter(|l| l.quantizes_activations())
        .map(|l| l.name().to_string())
        .collect();
    let dir = match &p.origin {
        crate::run::ModelOrigin::Checkpoint(c) => c.config.parent().map(Path::to_path_buf),
        crate::run::ModelOrigin::Preset(_) => None,
    };
    Ok(Source {
        cfg: p.model_cfg.clone(),
        weights: crate::export::trained_weights(&model, &params)?,
        tokenizer: p.tokenizer.clone(),
        weights_from: latent.display().to_string(),
        run: Some(spec),
        act_quant,
        dir,
    })
}

fn source(model: &str) -> Result<Source> {
    let path = Path::new(model);
    if path.join("config.toml").is_file() {
        let text = std::fs::read_to_string(path.join("config.toml"))?;
        let spec: Spec = toml::from_str(&text)
            .with_context(|| format!("{}", path.join("config.toml").display()))?;
        let file = path.join("ternary.safetensors");
        if file.is_file() {
            return packed(&file, Some(spec));
        }
        if path.join("latent").join("state.json").is_file() {
            return latent(path, spec);
        }
        return Err(bad(format!(
            "{model}: the run saved no model; train it with train.save = \"ternary\", \
             \"latent\" or \"both\""
        )));
    }
    if path.is_file() {
        return packed(path, None);
    }
    let files = resolve_checkpoint(model, "main").map_err(|e| bad(format!("{e:#}")))?;
    let tok = files
        .tokenizer
        .clone()
        .ok_or_else(|| bad(format!("{model}: {} has no tokenizer.json", files.origin)))?;
    Ok(Source {
        cfg: Qwen3Config::from_hf_json(&files.config)?,
        weights: read_weights(&files)?,
        tokenizer: tokenizer_at(&tok)?,
        weights_from: files.origin.clone(),
        run: None,
        act_quant: Vec::new(),
        dir: Some(
            files
                .config
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        ),
    })
}

/// A model loaded for inference: MODEL as `eval` takes it, on `device`, with its tokenizer and
/// the ids generation stops at.
pub struct Loaded {
    pub model: Qwen3,
    pub tokenizer: Tokenizer,
    pub eos: Vec<u32>,
    pub device: String,
    /// Where the weights came from.
    pub weights_from: String,
    /// The run's spec, for a run folder.
    pub run: Option<Spec>,
}

/// Loads `model` (a run folder, packed file, model directory or hub id) for inference.
pub fn load(model: &str, device: DeviceChoice) -> Result<Loaded> {
    let src = source(model)?;
    let (dev, name) = crate::device::open(device)?;
    let run = src.run.as_ref();
    let dtype = run
        .map_or(TrainDtype::Auto, |s| s.train.dtype)
        .resolve(&dev);
    let dense = TernarySpec::new(Vec::new(), GroupSize::Row);
    let (m, _) = Qwen3::new(&src.cfg, src.weights, &dense, &dev)?;
    let mut m = m
        .with_compute_dtype(dtype.select())
        .with_fused(run.is_none_or(|s| s.run.fused));
    for lin in m.linears_mut() {
        lin.act_quant = src.act_quant.iter().any(|n| n == lin.name());
    }
    let eos = crate::train::eos_ids(src.dir.as_deref(), &src.tokenizer)?;
    Ok(Loaded {
        model: m,
        tokenizer: src.tokenizer,
        eos,
        device: name,
        weights_from: src.weights_from,
        run: src.run,
    })
}

/// Text tokenized whole, without special tokens (as GPTQ's `tokenizer(text)` for Qwen3,
/// whose tokenizer adds none).
fn tokenize(tokenizer: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing {what}: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Evaluates `args.model` (see the module doc).
pub fn eval(args: &EvalArgs) -> Result<Evaluation> {
    if args.text.is_some() && args.dataset.is_some() {
        return Err(bad("--text and --dataset: give one".into()));
    }
    // The dataset first: an unknown name or a file that cannot be had fails before the
    // model loads.
    let dataset = match &args.dataset {
        Some(name) => {
            let d = crate::dataset::find(name)?;
            Some((d, d.load()?))
        }
        None => None,
    };
    let l = load(&args.model, args.device)?;
    let run = l.run.as_ref();
    let (tokens, text) = match (&args.text, &dataset, run) {
        (Some(file), _, _) => {
            let t = std::fs::read_to_string(file)
                .map_err(|e| bad(format!("--text {}: {e}", file.display())))?;
            let what = file.display().to_string();
            (tokenize(&l.tokenizer, &t, &what)?, what)
        }
        (None, Some((d, loaded)), _) => (
            tokenize(&l.tokenizer, &loaded.text, d.name)?,
            d.name.to_string(),
        ),
        (None, None, Some(spec)) => {
            let d = &spec.data;
            let corpus = Corpus::load(&d.path, &l.tokenizer, d.val_fraction)
                .map_err(|e| bad(format!("{}: data.path of the run: {e:#}", args.model)))?;
            (
                corpus.val,
                format!("held-out split of {}", d.path.display()),
            )
        }
        (None, None, None) => {
            return Err(bad(format!(
                "{}: not a run folder; say what to evaluate on with --text FILE or \
                 --dataset NAME",
                args.model
            )))
        }
    };
    let protocol = args.protocol.unwrap_or(if dataset.is_some() {
        Protocol::Gptq
    } else {
        Protocol::Seed
    });
    let seq_len = args.seq_len.or(run.map(|s| s.data.seq_len)).unwrap_or(2048);
    let batch = args
        .batch_size
        .or(run.map(|s| s.data.batch_size))
        .unwrap_or(1);
    let model = l.model.frozen()?;
    let (nll, windows, predictions) = match protocol {
        Protocol::Seed => {
            if tokens.len() <= seq_len {
                return Err(bad(format!(
                    "{text}: {} tokens, fewer than one window of --seq-len {seq_len} + 1",
                    tokens.len()
                )));
            }
            let nll = crate::train::heldout_nll(&model, &tokens, seq_len, batch)?;
            let windows = crate::data::eval_starts(tokens.len(), seq_len).len();
            (nll, windows, windows * seq_len)
        }
        Protocol::Gptq => {
            if seq_len < 2 || tokens.len() < seq_len {
                return Err(bad(format!(
                    "{text}: {} tokens; the gptq protocol needs one window of --seq-len \
                     {seq_len} (at least 2)",
                    tokens.len()
                )));
            }
            let windows = tokens.len() / seq_len;
            let nll = gptq_nll(&model, &tokens, seq_len, batch)?;
            (nll, windows, windows * (seq_len - 1))
        }
    };
    Ok(Evaluation {
        model: args.model.clone(),
        weights: l.weights_from,
        text,
        dataset: dataset.map(|(d, loaded)| DatasetSource {
            name: d.name.to_string(),
            source: d.source(),
            path: loaded.path,
            rows: loaded.rows,
        }),
        protocol,
        tokens: tokens.len(),
        windows,
        seq_len,
        predictions,
        nll,
        ppl: nll.exp(),
        device: l.device,
    })
}

/// GPTQ's perplexity (`opt_eval` / `llama_eval` in its repo): numel / L non-overlapping
/// windows of L tokens from the start, the remainder dropped; each window is fed as input and
/// is its own labels, so the model predicts tokens 1..L from 0..L-1 (Hugging Face's shifted
/// loss). The NLL is the mean over windows of each window's mean, which GPTQ writes as
/// `exp(sum(loss * L) / (n * L))`. `batch` windows go through the model at a time.
pub fn gptq_nll(model: &Qwen3, tokens: &[u32], seq_len: usize, batch: usize) -> Result<f64> {
    let n = tokens.len() / seq_len;
    anyhow::ensure!(
        n > 0 && seq_len >= 2,
        "{} tokens: no window of {seq_len} (at least 2) tokens",
        tokens.len()
    );
    let starts: Vec<usize> = (0..n).map(|i| i * seq_len).collect();
    let mut sum = 0.0;
    for chunk in starts.chunks(batch.max(1)) {
        let ids: Vec<u32> = chunk
            .iter()
            .flat_map(|&s| tokens[s..s + seq_len].iter().copied())
            .collect();
        let x = Tensor::from_vec(ids, (chunk.len(), seq_len), model.device())?;
        let logits = model.forward(&x)?.narrow(1, 0, seq_len - 1)?.contiguous()?; // (B, L-1, V)
        let targets = x.narrow(1, 1, seq_len - 1)?; // (B, L-1)
        let mean = cross_entropy_with(&logits, &targets, model.ops())?.to_scalar::<f32>()? as f64;
        // Every window has L - 1 predictions, so the chunk's mean weighs its windows equally.
        sum += mean * chunk.len() as f64;
    }
    Ok(sum / n as f64)
}
