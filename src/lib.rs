//! ternlab: declarative experiments in ternary (BitNet b1.58 style) quantization-aware training
//! of Qwen3 on candle.
//!
//! spec (TOML + overrides) -> run (resolve, check, results layout) -> train (the loop, eval)
//! -> report (loss.csv, report.json, recovery numbers). Under them: model (the architecture and
//! its ops), quant (what a quantizer is), trainer (autograd or the hand-written CUDA step),
//! cuda (the kernels, by op), optim (AdamW).

pub mod bench;
pub mod checkpoint;
pub mod choice;
pub mod compare;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod dataset;
pub mod device;
pub mod eval;
pub mod export;
pub mod faults;
pub mod generate;
pub mod model;
pub mod numpy_rng;
pub mod optim;
pub mod parallel;
pub mod plan;
pub mod plot;
pub mod pool;
pub mod progress;
pub mod quant;
pub mod recovery;
pub mod report;
pub mod run;
pub mod runner;
pub mod schedule;
pub mod slurm;
pub mod spec;
pub mod train;
pub mod trainer;
