//! ternlab's CUDA code, by op as llm.c's `llmc/` is: each family of kernels is a `.cu` file
//! (compiled at run time with NVRTC behind the shared `common.cuh`) beside one Rust module with
//! a typed launcher per kernel, whose doc comment gives the kernel's signature and whose
//! checks refuse a buffer of the wrong size or dtype before anything runs. Nothing here knows
//! the model: the hand-written training step (`crate::trainer::cuda_step`) and the autograd
//! ops (`crate::model::ops`, on CUDA) are both made of these launchers, so the kernels that
//! train are the kernels the GPU tests (`tests/fused.rs`) compare with the composed candle ops.
//!
//! | module | kernels | autograd op |
//! |---|---|---|
//! | `launch` | (families, `Buf`, `Gpu`, launch shapes, profile) | |
//! | `gemm` | cuBLAS: `gemm`, `linear`, `linear_back_x`, `linear_back_w` | |
//! | `embedding` | `embed`, `embed_bwd` | |
//! | `norm` | `rmsnorm`, `rmsnorm_bwd_x[_add]`, `rmsnorm_bwd_w`, `rmsnorm_bwd_small` | `rms_norm_op` |
//! | `attention` | `norm_rope[{2,4,8}]`, `rope_bwd`, `rope_norm_bwd{2,4,8}` (the vectorized ones take up to two sets of rows: q's and k's), `causal_softmax[_bwd]`, `swap_axes` | `norm_rope_op`, `causal_softmax_op` |
//! | `causal_attention` | (the step's blocked attention: GEMMs + `attention`'s softmax) | |
//! | `flash` | `flash_fwd_d{32,64,128}`, `flash_delta`, `flash_bwd_dq_d*`, `flash_bwd_dkdv[q]_d*`, `flash_bwd_both_w4_d*`, `flash_dq_store` (bf16, tensor cores, sm_80+; on wgmma in the sm_90a build at head dims 64 and 128) | |
//! | `mlp` | `silu_mul`, `silu_mul_bwd` | `silu_mul_op` |
//! | `residual` | `add` | |
//! | `loss` | `cross_entropy` (loss, and the gradient when asked) | `cross_entropy_op` |
//! | `ternary` | `ternarize` (+ `ternary_scales`, `ternary_apply` for whole matrices), `act_quant` | `ternary_weight`, `act_quant_op` (straight-through backward) |
//! | `adamw` | `adamw_multi` (every parameter in one launch; f32 and bf16 arithmetic of `crate::optim`) | |
//!
//! Every kernel but `swap_axes`, `adamw_multi` and `flash`'s has an f32 and a bf16 instance;
//! arithmetic is f32 (`flash`: bf16 products with f32 accumulation, its softmax in f32).

pub mod adamw;
pub mod attention;
pub mod causal_attention;
pub mod embedding;
pub mod flash;
pub mod gemm;
pub mod launch;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod residual;
pub mod side;
pub mod ternary;

pub use launch::{take_profile, AsBuf, Buf, Gpu};
