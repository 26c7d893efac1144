//! What a run keeps of its model (`train.save`): `ternary/`, a Hugging Face Qwen3 directory
//! (config.json, tokenizer.json, model.safetensors) whose ternary projections hold `W_t` (the
//! ternary values times their scales) and whose other tensors are the trained parameters, all
//! in the checkpoint's dtype, so that transformers (and anything else that reads a Qwen3
//! checkpoint, ternlab included: `model.source = "results/.../ternary"`) loads it as an
//! ordinary Qwen3. A run with no ternary projection saves its trained dense model this way,
//! which is how a study pretrains its own starting model.

use crate::choice::{serde_by_name, Choice};
use crate::model::{Params, Qwen3, Qwen3Config};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// `train.save`: what a run writes of its model when it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Save {
    /// Nothing (the seed's).
    #[default]
    None,
    /// `ternary/`: the Hugging Face directory of the trained model, projections at `W_t`.
    Ternary,
}

impl Choice for Save {
    const ALL: &'static [Self] = &[Save::None, Save::Ternary];
    fn name(self) -> &'static str {
        match self {
            Save::None => "none",
            Save::Ternary => "ternary",
        }
    }
}

serde_by_name!(Save);

/// Where the saved model's config and companion files come from.
pub struct Companions<'a> {
    pub cfg: &'a Qwen3Config,
    /// The starting checkpoint's directory: its config.json, generation_config.json and
    /// tokenizer_config.json are copied (None for a preset: config.json is written from `cfg`).
    pub source_dir: Option<&'a Path>,
    pub tokenizer: &'a Tokenizer,
    /// The dtype the tensors are written in (the checkpoint's; bf16 for the presets).
    pub dtype: DType,
}

/// Writes the trained model as a Hugging Face Qwen3 directory at `dir` (replacing one that is
/// there), atomically: everything goes to `dir.tmp` first, which is then renamed.
pub fn save_hf_dir(dir: &Path, model: &Qwen3, params: &Params, c: &Companions) -> Result<()> {
    let tmp = sibling(dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let tensors = hf_tensors(model, params, c.dtype)?;
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
        .with_context(|| format!("writing {}", tmp.join("model.safetensors").display()))?;
    match c.source_dir.filter(|d| d.join("config.json").is_file()) {
        Some(src) => {
            for name in [
                "config.json",
                "generation_config.json",
                "tokenizer_config.json",
            ] {
                let from = src.join(name);
                if from.is_file() {
                    std::fs::copy(&from, tmp.join(name))
                        .with_context(|| format!("copying {}", from.display()))?;
                }
            }
        }
        None => std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&hf_config(c.cfg, c.dtype))?,
        )?,
    }
    let tok = c
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    std::fs::write(tmp.join("tokenizer.json"), tok)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming to {}", dir.display()))
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The checkpoint's tensors by name, on the CPU in `dtype`: each ternary projection's `W_t`
/// (at the model's current `lambda`), every other parameter as trained.
pub fn hf_tensors(model: &Qwen3, params: &Params, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let frozen = model.frozen()?;
    // (`frozen` keeps the layers' order and names; its ternary layers hold `W_t`)
    let ternary: HashMap<String, Tensor> = frozen
        .linears()
        .into_iter()
        .zip(model.linears())
        .filter(|(_, live)| live.is_ternary())
        .map(|(f, _)| (f.name().to_string(), f.weight().clone()))
        .collect();
    let mut out = HashMap::new();
    for (name, var) in &params.named {
        let t = ternary.get(name).unwrap_or(var.as_tensor());
        out.insert(
            name.clone(),
            t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?,
        );
    }
    Ok(out)
}

/// A transformers Qwen3 config.json for `cfg` (the keys transformers 4.x and 5.x both read).
pub fn hf_config(cfg: &Qwen3Config, dtype: DType) -> serde_json::Value {
    let dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": dtype,
    })
}
