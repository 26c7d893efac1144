//! The experiment spec as written in TOML, layered with `--set` overrides and `TERNLAB_*`
//! environment variables (figment), then checked. Unknown keys are errors; every default is
//! the seed's recipe (Qwen3-0.6B, 250 steps of 4 x 256 tokens, lr 5e-4, ...). Keys that take
//! one of a few names (`model.preset`, `data.sampling`, `quant.projections`, `train.dtype`,
//! `run.device`, ...) are enums, so a bad name is refused as the spec is read and the rest of
//! the program never looks at the string.
//!
//! This file is what a spec holds and its defaults; `read.rs` reads, layers and checks it.

use crate::choice::{serde_by_name, Choice};
use crate::data::Sampling;
use crate::device::DeviceChoice;
pub use crate::export::Save;
use crate::model::{Preset, Projection};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

mod read;
pub use read::{
    check_override_key, extract, is_spec_variable, known_keys, layers, load, nearest_key,
    parse_table, read_table, BadInput, Override,
};

pub use crate::quant::{Granularity, GroupSize, ScaleDtype, ScaleRule};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Spec {
    /// Results go to `<results>/<name>/<run-id>/`.
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub quant: QuantSpec,
    pub train: TrainSpec,
    pub eval: EvalSpec,
    pub run: RunSpec,
    /// Distillation from the starting model (left out of a written spec while off).
    #[serde(skip_serializing_if = "is_default")]
    pub distill: DistillSpec,
}

/// `[distill]`: the loss adds `weight * T^2 * KL(teacher || student)` of the logits at
/// temperature `T`, the teacher being the starting model in full precision, frozen (BitDistill's
/// logits term). `weight = 0` (the default) is no distillation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSpec {
    pub weight: f64,
    pub temperature: f64,
}

impl Default for DistillSpec {
    fn default() -> Self {
        Self {
            weight: 0.0,
            temperature: 5.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// Hub repo id (`Qwen/Qwen3-0.6B`) or a local directory with config.json, *.safetensors
    /// and tokenizer.json. Ignored when `preset` is set.
    pub source: String,
    pub revision: String,
    /// Built-in shapes with random init instead of a checkpoint: "tiny" or "qwen3-0.6b".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// tokenizer.json to use instead of the model's (presets default to data/tiny-tokenizer.json).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    pub path: PathBuf,
    pub val_fraction: f64,
    pub seq_len: usize,
    pub batch_size: usize,
    /// "random" (numpy's `default_rng(seed).integers` offsets, the seed's) or "sequential".
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantSpec {
    /// The projections made ternary, by their checkpoint names ("q_proj", ..., "down_proj").
    #[serde(deserialize_with = "projections")]
    pub projections: Vec<Projection>,
    /// Input columns per scale under `granularity = "group"`; "row" is the older spelling of
    /// `granularity = "row"`.
    pub group_size: GroupSize,
    /// Which weights share a scale: "group" (`group_size` input columns, the seed's), "row"
    /// or "tensor" (the whole matrix).
    #[serde(skip_serializing_if = "is_default")]
    pub granularity: Granularity,
    /// How a scale is found: "absmean" (mean |W|, the seed's) or "absmax" (max |W|).
    #[serde(skip_serializing_if = "is_default")]
    pub scale: ScaleRule,
    /// The precision a scale is rounded to before use: "f32" (the seed's), "bf16" or "f16".
    #[serde(skip_serializing_if = "is_default")]
    pub scale_dtype: ScaleDtype,
    /// Decoder layers (0-based) kept in full precision.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude_layers: Vec<usize>,
    /// Steps of the linear quantization warm-up: step t forwards `W + lambda * (W_t - W)` with
    /// `lambda = min(t / N, 1)` (0: none, the seed's).
    #[serde(skip_serializing_if = "is_default")]
    pub lambda_warmup_steps: usize,
    /// 8: each ternary projection's input is fake-quantized to 8 bits per token (absmax, as
    /// BitNet b1.58's activations), straight-through gradient; 0: off (the seed's).
    #[serde(skip_serializing_if = "is_default")]
    pub activation_bits: u32,
    /// Learning-rate multiplier of the learned scales (`scale = "learned"`): they train at
    /// `scale_lr * train.lr` on the same schedule.
    #[serde(skip_serializing_if = "is_one")]
    pub scale_lr: f64,
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

/// Keys added after the seed's recipe are left out of a written spec (and so of the config
/// hash) while they hold their default: runs that do not use them keep their ids.
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Reads `quant.projections` as a list of names, so that a bad one is reported under the key
/// itself (as an element of a list it would be `quant.projections.<index>`).
fn projections<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Projection>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|name| crate::choice::from_name(name).map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Compute precision: "auto" (bf16 on CUDA, f32 elsewhere); "f32"; "tf32" (f32 with TF32
    /// matmuls on CUDA); "bf16" (bf16 activations and matmuls; f32 latents, optimizer state,
    /// ternarization scales, norms, softmax and loss). See bench/RESULTS.md for why.
    pub dtype: TrainDtype,
    /// AdamW's `1 - beta^t` bias correction. false: MLX's `optim.AdamW` as the seed uses it
    /// (`p - lr * m / (sqrt(v) + eps)`); true: PyTorch's and candle's AdamW.
    pub bias_correction: bool,
    /// The dtype of the parameters that are not ternarized (embeddings and a tied head, norms,
    /// projections left out of `quant.projections`), of their AdamW moments and of their update
    /// arithmetic. "checkpoint" (the seed): as stored in the checkpoint (bf16 for Qwen3 and the
    /// presets); "f32": promoted to f32 like the ternary latents (PyTorch-style mixed precision).
    pub dense_dtype: DenseDtype,
    /// What the run keeps of its model when it completes: "none" (the seed's), "ternary"
    /// (`ternary/` in the run folder, a Hugging Face Qwen3 directory with the projections at
    /// `W_t`, and the packed `ternary.safetensors`; see `crate::export`), "latent" (`latent/`:
    /// the latents, optimizer and sampler state; see `crate::checkpoint`) or "both".
    #[serde(skip_serializing_if = "is_default")]
    pub save: Save,
    /// A latent checkpoint every this many steps (0: none), the last two kept under
    /// `checkpoints/`; a rerun of the sweep resumes an unfinished run from the newest. It does
    /// not change the results, so it is not part of the config hash.
    #[serde(skip_serializing_if = "is_default")]
    pub checkpoint_every: usize,
}

/// `train.dtype`: "auto" (chosen by device: `resolve`) or a fixed compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDtype {
    Auto,
    Fixed(ComputeDtype),
}

impl Choice for TrainDtype {
    const ALL: &'static [Self] = &[
        TrainDtype::Auto,
        TrainDtype::Fixed(ComputeDtype::F32),
        TrainDtype::Fixed(ComputeDtype::Tf32),
        TrainDtype::Fixed(ComputeDtype::Bf16),
    ];
    fn name(self) -> &'static str {
        match self {
            TrainDtype::Auto => "auto",
            TrainDtype::Fixed(c) => c.name(),
        }
    }
}

impl TrainDtype {
    /// The precision on `device`: "auto" is bf16 on CUDA (with the fused kernels it trains
    /// like f32 there, at twice the speed) and f32 elsewhere (candle's CPU bf16 is slow and
    /// sums in bf16).
    pub fn resolve(self, device: &candle_core::Device) -> ComputeDtype {
        match (self, device) {
            (TrainDtype::Fixed(c), _) => c,
            (TrainDtype::Auto, candle_core::Device::Cuda(_)) => ComputeDtype::Bf16,
            (TrainDtype::Auto, _) => ComputeDtype::F32,
        }
    }
}

/// A resolved `train.dtype`, the compute precision a run trained in (report.json's `dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    /// f32 activations; CUDA f32 matmuls may use TF32.
    Tf32,
    Bf16,
}

impl Choice for ComputeDtype {
    const ALL: &'static [Self] = &[ComputeDtype::F32, ComputeDtype::Tf32, ComputeDtype::Bf16];
    fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Tf32 => "tf32",
            ComputeDtype::Bf16 => "bf16",
        }
    }
}

impl ComputeDtype {
    /// Selects this precision for the process's matmuls (on CUDA builds, candle's switch that
    /// lets f32 matmuls use TF32: on for tf32, off otherwise) and returns the activations'
    /// dtype.
    pub fn select(self) -> candle_core::DType {
        #[cfg(feature = "cuda")]
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(self == ComputeDtype::Tf32);
        match self {
            ComputeDtype::Bf16 => candle_core::DType::BF16,
            ComputeDtype::F32 | ComputeDtype::Tf32 => candle_core::DType::F32,
        }
    }
}

serde_by_name!(TrainDtype, ComputeDtype);

/// `train.dense_dtype`: see `TrainSpec::dense_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DenseDtype {
    Checkpoint,
    F32,
}

impl<'de> Deserialize<'de> for DenseDtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let want = "expected \"checkpoint\" (the checkpoint's own dtype, as the seed) or \"f32\"";
        match String::deserialize(d) {
            Ok(s) if s == "checkpoint" => Ok(DenseDtype::Checkpoint),
            Ok(s) if s == "f32" => Ok(DenseDtype::F32),
            Ok(s) => Err(serde::de::Error::custom(format!("{s:?}: {want}"))),
            Err(_) => Err(serde::de::Error::custom(want)),
        }
    }
}

impl std::fmt::Display for DenseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DenseDtype::Checkpoint => "checkpoint",
            DenseDtype::F32 => "f32",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    /// Held-out loss every N steps during training (0: only at the end).
    pub every: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// "auto", "cpu", "cuda", "cuda:N" or "metal".
    pub device: DeviceChoice,
    /// Fused CUDA kernels (ternary projection, AdamW) on CUDA; false runs the composed candle
    /// ops everywhere (for comparison). No effect on CPU or Metal.
    pub fused: bool,
    /// GPUs the run trains on, data-parallel (`crate::parallel`): `device` = cuda:k and the
    /// next `devices - 1` cards, the batch split evenly between them.
    #[serde(skip_serializing_if = "is_one_usize")]
    pub devices: usize,
}

fn is_one_usize(v: &usize) -> bool {
    *v == 1
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            name: "baseline".into(),
            model: ModelSpec::default(),
            data: DataSpec::default(),
            quant: QuantSpec::default(),
            train: TrainSpec::default(),
            eval: EvalSpec::default(),
            run: RunSpec::default(),
            distill: DistillSpec::default(),
        }
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            source: "Qwen/Qwen3-0.6B".into(),
            revision: "main".into(),
            preset: None,
            tokenizer: None,
        }
    }
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            path: "data/train_data.txt".into(),
            val_fraction: 0.1,
            seq_len: 256,
            batch_size: 4,
            sampling: Sampling::Random,
        }
    }
}

impl Default for QuantSpec {
    fn default() -> Self {
        Self {
            projections: Projection::ALL.to_vec(),
            group_size: GroupSize::Columns(128),
            granularity: Granularity::Group,
            scale: ScaleRule::Absmean,
            scale_dtype: ScaleDtype::F32,
            exclude_layers: Vec::new(),
            lambda_warmup_steps: 0,
            activation_bits: 0,
            scale_lr: 1.0,
        }
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: 250,
            lr: 5e-4,
            warmup_steps: 30,
            min_lr_ratio: 0.1,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
            seed: 0,
            dtype: TrainDtype::Auto,
            bias_correction: false,
            dense_dtype: DenseDtype::Checkpoint,
            save: Save::None,
            checkpoint_every: 0,
        }
    }
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            prompts: [
                "Open source software has",
                "World War II was",
                "The development of antibiotics",
                "Sleep is essential for",
                "The scientific method is",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            max_new_tokens: 60,
            every: 0,
        }
    }
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            fused: true,
            devices: 1,
        }
    }
}
