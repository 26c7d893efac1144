//! Fused CUDA kernels for the hot spots of a training step (`kernels.cu`, compiled at run time
//! with NVRTC; the candle ops around them in `cuda/`),
//! each beside the composed candle version it replaces. The composed versions run on CPU and
//! Metal and are the reference the GPU tests compare the fused ones against.
//!
//! - `ternary_weight`: one pass from the f32 latent W to W_t in the compute dtype (f32 or
//!   bf16), one warp per group; its backward is the straight-through identity, cast to f32.
//! - `rms_norm`: RMSNorm forward in one kernel (a warp per row), backward in two (dx per row;
//!   dw per column over blocks of 64 rows), instead of ~8 and ~20 composed ops.
//! - `rope`: RoPE forward and backward as one elementwise kernel each (instead of narrow,
//!   negate, concatenate, two products and a sum, and their backward).
//! - `causal_softmax`: scale, causal mask and softmax of attention scores in one kernel (a warp
//!   per row, f32 arithmetic), backward in one, instead of ~8 and ~15 composed ops.
//! - `silu_mul`: the SwiGLU gate `silu(g) * u`, one kernel forward, two backward.
//! - `cross_entropy`: per-row log-sum-exp and loss in one kernel (a block per row), the
//!   logits' gradient in one more, in the logits' dtype: no f32 copy of (N, V) logits.
//! - `AdamW` (in `crate::optim`) uses `adamw_step`: one kernel per parameter updates the
//!   weight and both moments in place.
//!
//! Training on CUDA goes through `cuda::step`, which calls these ops and kernels of its own
//! directly, with a hand-written backward; the ops' own backward passes serve autograd on a
//! fused model (and the tests that compare each op with its composed version).

use super::ternary::ste_weight;
use candle_core::{DType, Result, Tensor};

/// The weight a ternary layer multiplies by, in `dtype`: `W_t` in value, identity gradient to
/// the f32 latent `w`. Fused on CUDA (when `fused`), composed elsewhere.
pub fn ternary_weight(w: &Tensor, group: usize, dtype: DType, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused && w.device().is_cuda() {
        return w.apply_op1(cuda::TernaryProjection { group, dtype });
    }
    let _ = fused;
    ste_weight(w, group)?.to_dtype(dtype)
}

/// RMSNorm of `x` over its last dimension with the f32 weight `w`, in x's dtype; `None` when
/// the fused kernel does not apply (not CUDA, not fused, or a non-contiguous input), for the
/// caller to run the composed version.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && x.device().is_cuda() && x.is_contiguous() {
        return x.apply_op2(w, cuda::RmsNorm { eps: eps as f32 }).map(Some);
    }
    let _ = (x, w, eps, fused);
    Ok(None)
}

/// RoPE of `x` (B, N, L, D), contiguous, with (L, D) f32 tables; `None` where the fused
/// kernel does not apply.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && x.device().is_cuda() && x.is_contiguous() {
        return x
            .apply_op3(cos, sin, cuda::Rope { backward: false })
            .map(Some);
    }
    let _ = (x, cos, sin, fused);
    Ok(None)
}

/// Causal softmax of `scale * scores` over the last dim of (..., L, L), in the scores' dtype
/// (f32 arithmetic); `None` where the fused kernel does not apply.
pub fn causal_softmax(scores: &Tensor, scale: f64, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && scores.device().is_cuda() && scores.is_contiguous() {
        return scores
            .apply_op1(cuda::CausalSoftmax {
                scale: scale as f32,
            })
            .map(Some);
    }
    let _ = (scores, scale, fused);
    Ok(None)
}

/// `silu(g) * u`; `None` where the fused kernel does not apply.
pub fn silu_mul(g: &Tensor, u: &Tensor, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && g.device().is_cuda() && g.is_contiguous() && u.is_contiguous() {
        return g.apply_op2(u, cuda::SiluMul).map(Some);
    }
    let _ = (g, u, fused);
    Ok(None)
}

/// Mean token cross-entropy of logits (N, V) against u32 targets (N), f32 scalar; `None`
/// where the fused kernel does not apply.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && logits.device().is_cuda() && logits.is_contiguous() {
        let rows = logits.apply_op2(&targets.contiguous()?, cuda::CrossEntropy)?;
        return rows.narrow(1, 0, 1)?.mean_all().map(Some);
    }
    let _ = (logits, targets, fused);
    Ok(None)
}

#[cfg(feature = "cuda")]
pub mod cuda;
