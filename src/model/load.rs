//! Where a model comes from: a local Hugging Face directory, a hub repo id resolved through the
//! standard Hugging Face cache (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, the revision), or a
//! built-in preset with seeded random init. Single-file and sharded safetensors; bf16, f16 and
//! f32 checkpoints (the model decides which parameters become f32).

use super::config::Qwen3Config;
use super::qwen3::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

/// The files of one checkpoint on local disk.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub safetensors: Vec<PathBuf>,
    /// Where it was found, for reports: a directory or `repo@revision (snapshot path)`.
    pub origin: String,
}

/// The hub cache folder, as huggingface_hub decides it.
pub fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
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
fn shard_names(index: &Path) -> Result<Vec<String>> {
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

/// Looks a file up in the hub cache; a `revision` may be a branch / tag (through `refs/`) or a
/// commit hash (a snapshot folder of that name).
fn cached(cache: &Cache, repo_id: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Some(p);
    }
    let snapshot = cache
        .path()
        .join(repo.folder_name())
        .join("snapshots")
        .join(revision)
        .join(file);
    snapshot.is_file().then_some(snapshot)
}

fn from_hub(repo_id: &str, revision: &str) -> Result<CheckpointFiles> {
    let cache = Cache::new(hub_cache_dir());
    let offline = hub_offline();
    let get = |file: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cached(&cache, repo_id, revision, file) {
            return Ok(Some(p));
        }
        if offline {
            return Ok(None);
        }
        let api = ApiBuilder::from_cache(cache.clone())
            .with_progress(true)
            .build()
            .context("starting the hub client")?;
        let repo = api.repo(Repo::with_revision(
            repo_id.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        match repo.get(file) {
            Ok(p) => Ok(Some(p)),
            // A missing optional file (the index of an unsharded model) answers 404.
            Err(e) if e.to_string().contains("404") => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "downloading {repo_id}@{revision}/{file}: {e}"
            )),
        }
    };
    let where_ = || {
        format!(
            "{repo_id}@{revision} (hub cache {}{})",
            cache.path().display(),
            if offline {
                ", HF_HUB_OFFLINE is set"
            } else {
                ""
            }
        )
    };
    let config = get("config.json")?.with_context(|| {
        format!(
            "model.source: config.json of {} not found{}",
            where_(),
            if offline {
                "; download it once with network access, or unset HF_HUB_OFFLINE"
            } else {
                ""
            }
        )
    })?;
    // What the cache already holds decides first, so a fully cached model resolves without
    // asking the network for files it does not have (an unsharded model has no index).
    let cached_single = cached(&cache, repo_id, revision, "model.safetensors");
    let cached_index = cached(&cache, repo_id, revision, "model.safetensors.index.json");
    let index = match (&cached_single, cached_index) {
        (Some(_), _) => None,
        (None, Some(i)) => Some(i),
        (None, None) => get("model.safetensors.index.json")?,
    };
    let safetensors = if let Some(index) = index {
        shard_names(&index)?
            .iter()
            .map(|f| get(f)?.with_context(|| format!("shard {f} of {} not found", where_())))
            .collect::<Result<Vec<_>>>()?
    } else {
        let single = match cached_single {
            Some(p) => Some(p),
            None => get("model.safetensors")?,
        };
        vec![single.with_context(|| format!("model.safetensors of {} not found", where_()))?]
    };
    let tokenizer = get("tokenizer.json")?;
    let origin = format!(
        "{repo_id}@{revision} ({})",
        config.parent().unwrap_or(Path::new("")).display()
    );
    Ok(CheckpointFiles {
        config,
        tokenizer,
        safetensors,
        origin,
    })
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
