//! Group-wise ternary projection (BitNet b1.58 style) and its straight-through estimator.
//!
//! For a weight `W` of shape (out, in) and a group size `G` dividing `in`:
//! `s = max(mean(|W|) over each group of G input columns, 1e-8)` and
//! `W_t = clip(round(W / s), -1, 1) * s`. The forward pass multiplies by `W_t`; the backward
//! pass treats the projection as the identity (`W + stop_grad(W_t - W)`), so the latent fp32
//! weight receives exactly the gradient that a dense layer at `W_t` would.

use candle_core::{DType, Result, Tensor, D};

/// Smallest scale, as in the seed: keeps all-zero groups finite.
pub const MIN_SCALE: f64 = 1e-8;

/// Per-group scales `s`, shape (out, in / G, 1), computed in f32.
pub fn group_scales(w: &Tensor, group_size: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let wg = w
        .to_dtype(DType::F32)?
        .reshape((out, inp / group_size, group_size))?;
    wg.abs()?.mean_keepdim(D::Minus1)?.maximum(MIN_SCALE)
}

/// `round(x)` clipped to [-1, 1], with ties to even as in PyTorch and MLX: |x| = 0.5 maps to 0.
fn ternary_levels(x: &Tensor) -> Result<Tensor> {
    let keep = x.abs()?.gt(0.5)?.to_dtype(x.dtype())?;
    x.sign()? * keep
}

/// `W_t`, the ternary projection of `w` (any float dtype in, f32 out). No gradient.
pub fn ternarize(w: &Tensor, group_size: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let wg = w
        .detach()
        .to_dtype(DType::F32)?
        .reshape((out, inp / group_size, group_size))?;
    let s = wg.abs()?.mean_keepdim(D::Minus1)?.maximum(MIN_SCALE)?;
    let q = ternary_levels(&wg.broadcast_div(&s)?)?;
    q.broadcast_mul(&s)?.reshape((out, inp))
}

/// The weight a ternary layer multiplies by: equal to `W_t` in value, with the gradient of
/// the identity with respect to `w` (the straight-through estimator).
pub fn ste_weight(w: &Tensor, group_size: usize) -> Result<Tensor> {
    let wt = ternarize(w, group_size)?;
    w + (wt - w)?.detach()
}

/// The seed's check of one ternary weight: recompute `W_t`, divide each group by the scale of
/// the latent weight and measure the distance of every entry to {-1, 0, +1}.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TernaryCheck {
    /// Entries further than 1e-5 from {-1, 0, +1}.
    pub bad: usize,
    pub total: usize,
    pub max_err: f64,
}

pub fn check_ternary(w: &Tensor, group_size: usize) -> Result<TernaryCheck> {
    let (out, inp) = w.dims2()?;
    let wt = ternarize(w, group_size)?.reshape((out, inp / group_size, group_size))?;
    let s = group_scales(w, group_size)?;
    let q = wt.broadcast_div(&s)?;
    let nearest = q.round()?.clamp(-1f32, 1f32)?;
    let err = (q - nearest)?.abs()?.flatten_all()?;
    let max_err = err.max(0)?.to_scalar::<f32>()? as f64;
    let bad = err
        .gt(1e-5)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok(TernaryCheck {
        bad,
        total: out * inp,
        max_err,
    })
}
