//! The ops the architecture calls (as candle-nn's `ops.rs`), each either ternlab's fused CUDA
//! kernel (`crate::cuda`, cuda builds) or the composed candle version. The composed versions
//! run everywhere: on CPU and Metal, on CUDA under `Ops::Composed`, and on CUDA under
//! `Ops::Fused` where a kernel does not apply (a non-contiguous input). They are also the
//! reference the GPU tests compare the kernels against. Every composed op is differentiable
//! (candle's own fused `rms_norm`, `rope` and `softmax_last_dim` record no backward and would
//! silently freeze the decoder); the kernels have backward passes of their own.

use super::layers::Rope;
use super::ternary::{ste_weight, ste_weight_learned, Quant};
use candle_core::{DType, Device, Result, Tensor, D};

/// Which implementation of the ops a model's forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ops {
    /// Composed candle ops, on every device.
    Composed,
    /// ternlab's CUDA kernels where the tensors are on a CUDA device (cuda builds), the
    /// composed ops elsewhere.
    Fused,
}

/// Whether the fused kernel runs for a tensor on `device`: `Ops::Fused` on CUDA.
fn fused_on(ops: Ops, device: &Device) -> bool {
    ops == Ops::Fused && device.is_cuda()
}

/// The weight a ternary layer multiplies by, in `dtype`: `W_t` in value (`W + lambda * (W_t -
/// W)` under a quantization warm-up), identity gradient to the f32 latent `w` (the
/// straight-through estimator); with a learned `scale`, LSQ's gradient to it
/// (`ternary::ste_weight_learned`).
pub fn ternary_weight(
    w: &Tensor,
    q: Quant,
    scale: Option<&Tensor>,
    lambda: f32,
    dtype: DType,
    ops: Ops,
) -> Result<Tensor> {
    if let Some(s) = scale {
        // (composed on every device: the hand-written CUDA step has its own kernels for it)
        return ste_weight_learned(w, s, q, lambda)?.to_dtype(dtype);
    }
    #[cfg(feature = "cuda")]
    if fused_on(ops, w.device()) {
        return crate::cuda::ternary::ternary_weight(w, q, lambda, dtype);
    }
    let _ = ops;
    ste_weight(w, q, lambda)?.to_dtype(dtype)
}

/// Per-token 8-bit absmax fake quantization of `x` (..., d) with the straight-through gradient
/// (see `ternary::act_quant`). One kernel on CUDA under `Ops::Fused`.
pub fn act_quant(x: &Tensor, ops: Ops) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_on(ops, x.device()) && x.is_contiguous() {
        return crate::cuda::ternary::act_quant_op(x);
    }
    let _ = ops;
    super::ternary::act_quant(x)
}

/// The logits distillation term: `T^2 * KL(teacher || student)` of the softmaxes at
/// temperature `t`, mean over tokens, in f32 (BitDistill's; scaled by T^2 so that its
/// gradient does not shrink with T). `teacher` (..., V) gets no gradient.
pub fn distill_kl(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let v = student.dim(D::Minus1)?;
    let s = (student.reshape(((), v))?.to_dtype(DType::F32)? * (1.0 / t))?;
    let te = (teacher.detach().reshape(((), v))?.to_dtype(DType::F32)? * (1.0 / t))?;
    let ls = candle_nn::ops::log_softmax(&s, D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(&te, D::Minus1)?;
    let kl = (lt.exp()? * (lt - ls)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (t * t)
}

/// RMSNorm of `x` over its last dimension, in x's dtype (see `rms_norm_composed`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, ops: Ops) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_on(ops, x.device()) && x.is_contiguous() {
        return crate::cuda::norm::rms_norm_op(x, &weight.to_dtype(DType::F32)?, eps);
    }
    let _ = ops;
    rms_norm_composed(x, weight, eps)
}

/// RMSNorm as composed candle ops, as transformers' Qwen3RMSNorm (the fused kernel's
/// reference). Normalises in f32. An f32 input is scaled by the weight in f32. A bf16 input
/// with a bf16 weight (the first layer's input under the seed's bf16 embedding, see
/// `Qwen3::forward`) is rounded to bf16 and then scaled with one more rounding, as MLX and
/// transformers compute it (the product is formed in f32, exactly, so that the weight's
/// gradient sums in f32). A bf16 input with an f32 weight is scaled in f32 and rounded once.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    let w = weight.to_dtype(DType::F32)?;
    if dtype == DType::F32 {
        x.broadcast_mul(&w)
    } else if weight.dtype() == dtype {
        x.to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&w)?
            .to_dtype(dtype)
    } else {
        x.broadcast_mul(&w)?.to_dtype(dtype)
    }
}

/// The per-head q (or k) norm and RoPE of attention: x (B, L, N, D) -> RMSNorm over D with
/// `weight` -> heads first (B, N, L, D), contiguous -> rotated by `rope`. One kernel on CUDA
/// under `Ops::Fused` (norm, RoPE and the transpose in one pass).
pub fn qk_norm_rope(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    rope: &Rope,
    ops: Ops,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_on(ops, x.device()) && x.is_contiguous() {
        return crate::cuda::attention::norm_rope_op(
            x,
            &weight.to_dtype(DType::F32)?,
            eps,
            &rope.cos,
            &rope.sin,
        );
    }
    let _ = ops;
    let x = rms_norm_composed(x, weight, eps)?
        .transpose(1, 2)?
        .contiguous()?;
    rope_composed(&x, rope)
}

/// `qk_norm_rope` with each sequence at positions of its own: rotary tables (B, 1, L, D)
/// (`Pass::rows`). On CUDA under `Ops::Fused` the one kernel takes the batch as one sequence of
/// B * L tokens, each with its own table row, so every row's values are those of its sequence
/// alone; elsewhere composed ops, which broadcast the tables.
pub fn qk_norm_rope_rows(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    rope: &Rope,
    ops: Ops,
) -> Result<Tensor> {
    if !(fused_on(ops, x.device()) && x.is_contiguous()) {
        return qk_norm_rope(x, weight, eps, rope, Ops::Composed);
    }
    let (b, l, n, d) = x.dims4()?;
    let rows = Rope {
        cos: rope.cos.reshape((b * l, d))?,
        sin: rope.sin.reshape((b * l, d))?,
    };
    let y = qk_norm_rope(&x.reshape((1, b * l, n, d))?, weight, eps, &rows, ops)?;
    // (1, N, B*L, D) -> (B, N, L, D)
    y.reshape((n, b, l, d))?.transpose(0, 1)?.contiguous()
}

/// RoPE as composed candle ops: `x * cos + rotate_half(x) * sin` for x of shape (B, N, L, D).
pub fn rope_composed(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = rope.cos.to_dtype(x.dtype())?;
    let sin = rope.sin.to_dtype(x.dtype())?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Attention probabilities from raw scores `q k^T` (B, H, L, L): scaled by `scale`, causally
/// masked with `mask` (see `causal_mask`), softmax in f32, returned in the scores' dtype.
/// One kernel on CUDA under `Ops::Fused` (which needs no mask).
pub fn causal_softmax(scores: &Tensor, scale: f64, mask: &Tensor, ops: Ops) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_on(ops, scores.device()) && scores.is_contiguous() {
        return crate::cuda::attention::causal_softmax_op(scores, scale);
    }
    let _ = ops;
    let s = (scores * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?;
    candle_nn::ops::softmax(&s, D::Minus1)?.to_dtype(scores.dtype())
}

/// (L, L) additive causal mask: 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

/// The SwiGLU gate `silu(g) * u`.
pub fn silu_mul(g: &Tensor, u: &Tensor, ops: Ops) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_on(ops, g.device()) && g.is_contiguous() && u.is_contiguous() {
        return crate::cuda::mlp::silu_mul_op(g, u);
    }
    let _ = ops;
    g.silu()? * u
}

/// Mean token cross-entropy in f32: logits (B, L, V), targets (B, L) -> scalar, as composed
/// candle ops (see `cross_entropy_with`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_with(logits, targets, Ops::Composed)
}

/// Mean token cross-entropy in f32 of logits (..., V) against targets (...) -> scalar. One
/// kernel on CUDA under `Ops::Fused`, in the logits' dtype (no f32 copy of the logits).
pub fn cross_entropy_with(logits: &Tensor, targets: &Tensor, ops: Ops) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let targets = targets.flatten_all()?;
    #[cfg(feature = "cuda")]
    if fused_on(ops, logits.device()) && logits.is_contiguous() {
        return crate::cuda::loss::cross_entropy_op(
            &logits,
            &targets.to_dtype(DType::U32)?.contiguous()?,
        );
    }
    let _ = ops;
    candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)
}
