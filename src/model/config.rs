//! The Qwen3 architecture hyper-parameters: read from a Hugging Face `config.json`
//! (as written by older and current transformers releases) or taken from a built-in preset.

use crate::choice::{serde_by_name, Choice};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything the training model needs to know about its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

/// `config.json` as transformers writes it. Releases before 5 put `rope_theta` at the top
/// level and the dtype under `torch_dtype`; 5.x nests it as `rope_parameters.rope_theta` and
/// writes `dtype`. Keys we do not need are ignored, as transformers itself does.
#[derive(Debug, Deserialize)]
struct HfConfigJson {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

impl Qwen3Config {
    /// Reads and checks a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        Self::from_hf_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_hf_str(text: &str) -> anyhow::Result<Self> {
        let raw: HfConfigJson = serde_json::from_str(text)?;
        if let Some(t) = &raw.model_type {
            anyhow::ensure!(
                t == "qwen3",
                "model_type is {t:?}; ternlab trains Qwen3 models (model_type \"qwen3\")"
            );
        }
        if let Some(act) = &raw.hidden_act {
            anyhow::ensure!(act == "silu", "hidden_act is {act:?}; Qwen3 uses \"silu\"");
        }
        anyhow::ensure!(
            !raw.attention_bias.unwrap_or(false),
            "attention_bias = true is not supported (Qwen3 checkpoints have none)"
        );
        let rope_type = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.clone());
        let scaled = raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null());
        anyhow::ensure!(
            !scaled && rope_type.as_deref().unwrap_or("default") == "default",
            "only the default RoPE is supported (rope_scaling / rope_type other than \"default\")"
        );
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let cfg = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            // transformers' Qwen3Config default; every Qwen3 checkpoint writes it anyway.
            head_dim: raw.head_dim.unwrap_or(128),
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            // transformers' Qwen3Config defaults to untied; Qwen3-0.6B says true explicitly.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(40_960),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Shape consistency that the model code relies on.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0
                && self.num_key_value_heads > 0
                && self
                    .num_attention_heads
                    .is_multiple_of(self.num_key_value_heads),
            "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.num_key_value_heads
        );
        anyhow::ensure!(
            self.head_dim.is_multiple_of(2) && self.head_dim > 0,
            "head_dim ({}) must be even for RoPE",
            self.head_dim
        );
        Ok(())
    }

    /// Built-in shapes for runs without a checkpoint (random init). `tiny` and `small` take
    /// the tokenizer's vocabulary size; `qwen3-0.6b` has Qwen3-0.6B's own.
    pub fn preset(preset: Preset, vocab_size: usize) -> Self {
        match preset {
            // Small enough to train on two CPU cores in a minute or two.
            Preset::Tiny => Self {
                vocab_size,
                hidden_size: 128,
                intermediate_size: 384,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 32,
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: true,
                max_position_embeddings: 4096,
            },
            // A small model for studies on a GPU (about 25M parameters besides the
            // embedding): Qwen3-0.6B's proportions (head_dim 64, 2 query heads per key/value
            // head, intermediate 3x hidden) at a twentieth of its size.
            Preset::Small => Self {
                vocab_size,
                hidden_size: 512,
                intermediate_size: 1536,
                num_hidden_layers: 8,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                head_dim: 64,
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: true,
                max_position_embeddings: 4096,
            },
            // The shapes of Qwen/Qwen3-0.6B (its config.json), for benchmarks.
            Preset::Qwen3_0_6B => Self {
                vocab_size: 151_936,
                hidden_size: 1024,
                intermediate_size: 3072,
                num_hidden_layers: 28,
                num_attention_heads: 16,
                num_key_value_heads: 8,
                head_dim: 128,
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: true,
                max_position_embeddings: 40_960,
            },
        }
    }

    /// Input width of each ternarizable projection (what `group_size` must divide).
    pub fn projection_in_features(&self, projection: Projection) -> usize {
        match projection {
            Projection::Q | Projection::K | Projection::V | Projection::Gate | Projection::Up => {
                self.hidden_size
            }
            Projection::O => self.num_attention_heads * self.head_dim,
            Projection::Down => self.intermediate_size,
        }
    }
}

/// `model.preset`: the built-in shapes, trained from seeded random init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// "tiny": 4 layers, hidden 128, the bundled tokenizer.
    Tiny,
    /// "small": 8 layers, hidden 512, the tokenizer's vocabulary (for studies on a GPU).
    Small,
    /// "qwen3-0.6b": Qwen3-0.6B's shapes.
    Qwen3_0_6B,
}

impl Choice for Preset {
    const ALL: &'static [Self] = &[Preset::Tiny, Preset::Small, Preset::Qwen3_0_6B];
    fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Qwen3_0_6B => "qwen3-0.6b",
        }
    }
}

serde_by_name!(Preset);

/// A linear layer of a decoder block, the ones `quant.projections` can make ternary, named as
/// in the checkpoint (`q_proj`, ..., `down_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Choice for Projection {
    const ALL: &'static [Self] = &[
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];
    fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }
}

serde_by_name!(Projection);
