//! `ternlab eval MODEL`: the held-out NLL of a model over non-overlapping windows of
//! `seq_len` tokens (the protocol GPTQ and the Qwen3 quantization study report perplexity
//! with). MODEL is a run folder that saved its model (`train.save = "ternary"`: its packed
//! `ternary.safetensors`, so W_t exactly), a packed file itself, an exported or any Hugging Face
//! Qwen3 directory, or a hub repo id. A run folder is evaluated on its own held-out split at
//! its own `seq_len`, batch size and precision unless told otherwise, which gives its report's
//! `val_nll`; everything else needs `--text`.

use crate::data::Corpus;
use crate::device::DeviceChoice;
use crate::model::load::{read_weights, resolve_checkpoint};
use crate::model::{GroupSize, Qwen3, Qwen3Config, TernarySpec, Weights};
use crate::spec::{BadInput, Spec, TrainDtype};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// What to evaluate, and on what.
pub struct EvalArgs {
    pub model: String,
    /// A UTF-8 text file, tokenized whole (default for a run folder: its held-out split).
    pub text: Option<PathBuf>,
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
    /// The text: a file, or `held-out split of <data.path>`.
    pub text: String,
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub nll: f64,
    pub ppl: f64,
    pub device: String,
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
    /// The directory of config.json (where generation settings are read from).
    dir: PathBuf,
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
        if !file.is_file() {
            return Err(bad(format!(
                "{model}: the run saved no ternary model; train it with train.save = \"ternary\" \
                 or \"both\""
            )));
        }
        return packed(&file, Some(spec));
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
        dir: files
            .config
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf(),
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
    let eos = crate::train::eos_ids(Some(&src.dir), &src.tokenizer)?;
    Ok(Loaded {
        model: m,
        tokenizer: src.tokenizer,
        eos,
        device: name,
        weights_from: src.weights_from,
        run: src.run,
    })
}

/// Evaluates `args.model` (see the module doc).
pub fn eval(args: &EvalArgs) -> Result<Evaluation> {
    let l = load(&args.model, args.device)?;
    let run = l.run.as_ref();
    let (tokens, text) = match (&args.text, run) {
        (Some(file), _) => {
            let t = std::fs::read_to_string(file)
                .map_err(|e| bad(format!("--text {}: {e}", file.display())))?;
            let enc = l
                .tokenizer
                .encode(t.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", file.display()))?;
            (enc.get_ids().to_vec(), file.display().to_string())
        }
        (None, Some(spec)) => {
            let d = &spec.data;
            let corpus = Corpus::load(&d.path, &l.tokenizer, d.val_fraction)
                .map_err(|e| bad(format!("{}: data.path of the run: {e:#}", args.model)))?;
            (
                corpus.val,
                format!("held-out split of {}", d.path.display()),
            )
        }
        (None, None) => {
            return Err(bad(format!(
                "{}: not a run folder; say what to evaluate on with --text FILE",
                args.model
            )))
        }
    };
    let seq_len = args.seq_len.or(run.map(|s| s.data.seq_len)).unwrap_or(2048);
    let batch = args
        .batch_size
        .or(run.map(|s| s.data.batch_size))
        .unwrap_or(1);
    if tokens.len() <= seq_len {
        return Err(bad(format!(
            "{text}: {} tokens, fewer than one window of --seq-len {seq_len} + 1",
            tokens.len()
        )));
    }
    let nll = crate::train::heldout_nll(&l.model.frozen()?, &tokens, seq_len, batch)?;
    Ok(Evaluation {
        model: args.model.clone(),
        weights: l.weights_from,
        text,
        tokens: tokens.len(),
        windows: crate::data::eval_starts(tokens.len(), seq_len).len(),
        seq_len,
        nll,
        ppl: nll.exp(),
        device: l.device,
    })
}
