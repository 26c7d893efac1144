//! Where a model comes from: a local Hugging Face directory, a hub repo id resolved through the
//! standard Hugging Face cache (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, the revision) and
//! downloaded from HF_ENDPOINT when missing there, or a built-in preset with seeded random
//! init. Single-file and sharded safetensors; bf16, f16 and f32 checkpoints (the model decides
//! which parameters become f32).

use super::config::Qwen3Config;
use super::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

use super::hub::from_hub;
pub use super::hub::{hub_cache_dir, hub_endpoint, hub_offline, DEFAULT_HUB_ENDPOINT};

/// The files of one checkpoint on local disk.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub safetensors: Vec<PathBuf>,
    /// Where it was found, for reports: a directory or `repo@revision (snapshot path)`.
    pub origin: String,
}

/// Finds a checkpoint: an existing directory, else a hub repo id.
pub fn resolve_checkpoint(source: &str, revision: &str) -> Result<CheckpointFiles> {
    let dir = Path::new(source);
    if dir.is_dir() {
        return from_dir(dir);
    }
    let looks_like_repo = source.split('/').count() == 2
        && !source.starts_with('.')
        && !source.starts_with('/')
        && source.split('/').all(|p| !p.is_empty());
    if !looks_like_repo {
        bail!(
            "model.source = {source:?} is neither an existing directory nor a hub repo id \
             like \"Qwen/Qwen3-0.6B\""
        );
    }
    from_hub(source, revision)
}

fn from_dir(dir: &Path) -> Result<CheckpointFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{}: no config.json in the model directory", dir.display());
    }
    let index = dir.join("model.safetensors.index.json");
    let safetensors = if index.is_file() {
        shard_names(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        files
    };
    if safetensors.is_empty() {
        bail!(
            "{}: no *.safetensors weights in the model directory",
            dir.display()
        );
    }
    for f in &safetensors {
        if !f.is_file() {
            bail!("{}: missing weight shard", f.display());
        }
    }
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(CheckpointFiles {
        config,
        tokenizer,
        safetensors,
        origin: dir.display().to_string(),
    })
}

/// Shard file names listed by a `model.safetensors.index.json`, in order, without repeats.
pub(super) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", index.display()))?;
    let map = json["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Reads every tensor of the checkpoint onto the CPU (dtype as stored).
pub fn read_weights(files: &CheckpointFiles) -> Result<Weights> {
    let mut all = Weights::new();
    for f in &files.safetensors {
        let tensors = candle_core::safetensors::load(f, &Device::Cpu)
            .with_context(|| format!("reading {}", f.display()))?;
        for (name, t) in tensors {
            if all.contains_key(&name) {
                bail!(
                    "{}: tensor {name} also appears in another weight file of the checkpoint",
                    f.display()
                );
            }
            match t.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => bail!("{}: tensor {name} has dtype {other:?}", f.display()),
            }
            all.insert(name, t);
        }
    }
    Ok(all)
}

/// Seeded random init as transformers' Qwen3 `_init_weights`: every matrix N(0, 0.02),
/// every norm weight 1, stored in bf16 as Qwen3 checkpoints ship (so a preset trains like the
/// real model: bf16 embeddings and norms under `train.dense_dtype = "checkpoint"`). Same seed,
/// same weights, on every machine.
pub fn random_weights(cfg: &Qwen3Config, seed: u64) -> Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02).expect("valid std");
    let mut w = Weights::new();
    let mut matrix = |w: &mut Weights, name: String, rows: usize, cols: usize| -> Result<()> {
        let data: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
        w.insert(name, Tensor::from_vec(data, (rows, cols), &Device::Cpu)?);
        Ok(())
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    let (e, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, k, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    matrix(&mut w, "model.embed_tokens.weight".into(), v, e)?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        matrix(&mut w, format!("{p}.self_attn.q_proj.weight"), h * d, e)?;
        matrix(&mut w, format!("{p}.self_attn.k_proj.weight"), k * d, e)?;
        matrix(&mut w, format!("{p}.self_attn.v_proj.weight"), k * d, e)?;
        matrix(&mut w, format!("{p}.self_attn.o_proj.weight"), e, h * d)?;
        matrix(&mut w, format!("{p}.mlp.gate_proj.weight"), f, e)?;
        matrix(&mut w, format!("{p}.mlp.up_proj.weight"), f, e)?;
        matrix(&mut w, format!("{p}.mlp.down_proj.weight"), e, f)?;
        for n in ["self_attn.q_norm", "self_attn.k_norm"] {
            w.insert(format!("{p}.{n}.weight"), ones(d)?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("{p}.{n}.weight"), ones(e)?);
        }
    }
    w.insert("model.norm.weight".into(), ones(e)?);
    if !cfg.tie_word_embeddings {
        matrix(&mut w, "lm_head.weight".into(), v, e)?;
    }
    for t in w.values_mut() {
        *t = t.to_dtype(DType::BF16)?;
    }
    Ok(w)
}
