//! The model: Qwen3's shapes, its architecture, the ops it runs, the ternary projection, and
//! where weights and tokenizers come from.
//!
//! - `config.rs`: the hyper-parameters (`Qwen3Config`, presets, `Projection`).
//! - `qwen3.rs`: the architecture, `Qwen3` (built by `new`, run by `forward`).
//! - `layers.rs`: its blocks (`Linear`, `RmsNorm`, `Rope`, `Attention`, `Mlp`,
//!   `DecoderLayer`), each with a `new(cfg, vb)` constructor.
//! - `ops.rs`: the ops the blocks call, composed candle ops or ternlab's CUDA kernels (`Ops`).
//! - `weights.rs`: checkpoint tensors, trainable parameters, and `WeightSource` (the blocks'
//!   `VarBuilder`).
//! - `ternary.rs`: `W_t`, the straight-through estimator, the group size and `TernarySpec`.
//! - `load.rs`: checkpoints and tokenizers from a directory, or random init; `hub.rs`: from
//!   the Hugging Face hub through its standard cache.
//!
//! How a training step runs on the model is `crate::trainer`'s.

pub mod config;
pub mod hub;
pub mod layers;
pub mod load;
pub mod ops;
pub mod qwen3;
pub mod ternary;
pub mod weights;

pub use config::{Preset, Projection, Qwen3Config};
pub use layers::{Attention, DecoderLayer, KvCache, Linear, Mlp, Pass, RmsNorm, Rope};
pub use ops::{cross_entropy, Ops};
pub use qwen3::Qwen3;
pub use ternary::{Granularity, GroupSize, Quant, ScaleDtype, ScaleRule, TernarySpec};
pub use weights::{Params, WeightSource, Weights};
