//! The model: Qwen3 shapes, the training copy of the architecture, the ternary projection,
//! and where weights and tokenizers come from.

pub mod config;
pub mod fused;
pub mod load;
pub mod qwen3;
pub mod ternary;

pub use config::{Preset, Projection, Qwen3Config};
pub use qwen3::{cross_entropy, Params, Qwen3};
pub use ternary::{GroupSize, TernarySpec};
