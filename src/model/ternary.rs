//! Ternary projection (BitNet b1.58 style) and its straight-through estimator.
//!
//! For a weight `W` of shape (out, in), split into groups of consecutive entries (a group of
//! G input columns, a whole row, or the whole matrix: `Granularity`), each group gets a scale
//! `s = max(mean |W|, 1e-8)` (the seed's absmean; or `max |W|`, `ScaleRule`), rounded to the
//! scale's dtype (`ScaleDtype`, f32 by default), and `W_t = clip(round(W / s), -1, 1) * s`.
//! The forward pass multiplies by `W_t`; the backward pass treats the projection as the
//! identity (`W + stop_grad(W_t - W)`), so the latent fp32 weight receives exactly the
//! gradient that a dense layer at `W_t` would.

use super::config::Projection;
pub use crate::quant::{Granularity, GroupSize, Quant, ScaleDtype, ScaleRule, MIN_SCALE};
use candle_core::{DType, Result, Tensor, D};

/// Which projections of which layers are ternary, and how they are quantized.
#[derive(Debug, Clone)]
pub struct TernarySpec {
    pub projections: Vec<Projection>,
    pub group_size: GroupSize,
    pub granularity: Granularity,
    pub scale: ScaleRule,
    pub scale_dtype: ScaleDtype,
    /// Decoder layers kept in full precision.
    pub exclude_layers: Vec<usize>,
    /// Steps of the linear quantization warm-up (0: none).
    pub lambda_warmup_steps: usize,
    /// 8: the input of every ternary projection is fake-quantized to 8 bits per token
    /// (`act_quant`); 0: off.
    pub activation_bits: u32,
    /// Learning-rate multiplier of learned scales (`ScaleRule::Learned`).
    pub scale_lr: f64,
}

impl TernarySpec {
    /// The seed's quantizer (groups of `group_size` columns, absmean scales in f32) on
    /// `projections` of every layer.
    pub fn new(projections: Vec<Projection>, group_size: GroupSize) -> Self {
        Self {
            projections,
            group_size,
            granularity: Granularity::Group,
            scale: ScaleRule::Absmean,
            scale_dtype: ScaleDtype::F32,
            exclude_layers: Vec::new(),
            lambda_warmup_steps: 0,
            activation_bits: 0,
            scale_lr: 1.0,
        }
    }

    /// How `projection` of decoder layer `layer`, shape (out, in), is quantized, if it is.
    pub fn quant_for(
        &self,
        layer: usize,
        projection: Projection,
        (out, inp): (usize, usize),
    ) -> Option<Quant> {
        if !self.projections.contains(&projection) || self.exclude_layers.contains(&layer) {
            return None;
        }
        let group = match self.granularity() {
            Granularity::Group => self.group_size.for_width(inp),
            Granularity::Row => inp,
            Granularity::Tensor => out * inp,
        };
        Some(Quant {
            group,
            scale: self.scale,
            scale_dtype: self.scale_dtype,
        })
    }

    /// The granularity in effect: `group_size = "row"` (the older spelling) is row granularity.
    pub fn granularity(&self) -> Granularity {
        match (self.granularity, self.group_size) {
            (Granularity::Group, GroupSize::Row) => Granularity::Row,
            (g, _) => g,
        }
    }
}

/// The scales of `w`'s groups, (groups, 1) f32: by `q.scale`, at least the minimum, rounded
/// to `q.scale_dtype` (and the minimum again, so that no scale rounds to 0). Under a learned
/// scale these are its initial values (the absmean's); the layer's own are `used_scales`.
pub fn group_scales(w: &Tensor, q: Quant) -> Result<Tensor> {
    let wg = w.to_dtype(DType::F32)?.reshape(((), q.group))?;
    scales_of(&wg, q)
}

fn scales_of(wg: &Tensor, q: Quant) -> Result<Tensor> {
    let a = wg.abs()?;
    let s = match q.scale {
        ScaleRule::Absmean | ScaleRule::Learned => a.mean_keepdim(D::Minus1)?,
        ScaleRule::Absmax => a.max_keepdim(D::Minus1)?,
    };
    round_scales(&s, q)
}

/// The shape a learned scale of a (out, in) weight is kept in: (out, in / group) for groups
/// within a row, (groups, 1) for larger ones (one scale per matrix: (1, 1)).
pub fn scale_shape(q: Quant, (out, inp): (usize, usize)) -> (usize, usize) {
    if q.group <= inp {
        (out, inp / q.group)
    } else {
        (out * inp / q.group, 1)
    }
}

/// The scales a learned-scale layer multiplies by, (groups, 1) f32, without a gradient: its
/// parameter at least the minimum, rounded to the scale dtype (as `group_scales`).
pub fn used_scales(s: &Tensor, q: Quant) -> Result<Tensor> {
    round_scales(&s.detach().reshape(((), 1))?, q)
}

/// `s` at least the minimum, rounded to `q.scale_dtype`, at least the minimum again.
fn round_scales(s: &Tensor, q: Quant) -> Result<Tensor> {
    let min = q.scale_dtype.min_scale();
    let s = s.maximum(min)?;
    if q.scale_dtype == ScaleDtype::F32 {
        return Ok(s);
    }
    s.to_dtype(q.scale_dtype.dtype())?
        .to_dtype(DType::F32)?
        .maximum(min)
}

/// `round(x)` clipped to [-1, 1], with ties to even as in PyTorch and MLX: |x| = 0.5 maps to 0.
fn ternary_levels(x: &Tensor) -> Result<Tensor> {
    let keep = x.abs()?.gt(0.5)?.to_dtype(x.dtype())?;
    x.sign()? * keep
}

/// The ternary levels (-1, 0 or +1, f32, w's shape) of `w` at the group scales `s`
/// (groups, 1): `W_t = levels * s`. No gradient.
pub fn levels_with(w: &Tensor, q: Quant, s: &Tensor) -> Result<Tensor> {
    let wg = w.detach().to_dtype(DType::F32)?.reshape(((), q.group))?;
    ternary_levels(&wg.broadcast_div(s)?)?.reshape(w.shape())
}

/// `W_t`, the ternary projection of `w` (any float dtype in, f32 out) with the scales `q.scale`
/// finds (`learned`: the initial ones). No gradient.
pub fn ternarize(w: &Tensor, q: Quant) -> Result<Tensor> {
    let wg = w.detach().to_dtype(DType::F32)?.reshape(((), q.group))?;
    ternarize_with(w, q, &scales_of(&wg, q)?)
}

/// `W_t` of `w` with the given group scales (groups, 1), as `group_scales` or `used_scales`
/// make them. No gradient.
pub fn ternarize_with(w: &Tensor, q: Quant, s: &Tensor) -> Result<Tensor> {
    let shape = w.shape().clone();
    let wg = w.detach().to_dtype(DType::F32)?.reshape(((), q.group))?;
    let levels = ternary_levels(&wg.broadcast_div(s)?)?;
    levels.broadcast_mul(s)?.reshape(shape)
}

/// The weight a ternary layer multiplies by: equal to `W_t` in value, with the gradient of
/// the identity with respect to `w` (the straight-through estimator). Under a quantization
/// warm-up (`lambda < 1`) the value is `W + lambda * (W_t - W)`, with the same gradient
/// (`lambda = 0` is the dense weight exactly).
pub fn ste_weight(w: &Tensor, q: Quant, lambda: f32) -> Result<Tensor> {
    blend(w, &ternarize(w, q)?, lambda)
}

/// `w + stop_grad(lambda * (wt - w))` (no multiplication at lambda 1).
fn blend(w: &Tensor, wt: &Tensor, lambda: f32) -> Result<Tensor> {
    if lambda >= 1.0 {
        return w + (wt - w)?.detach();
    }
    w + ((wt - w)? * lambda as f64)?.detach()
}

/// `ste_weight` with a learned scale `s` (shape `scale_shape`): the value is `W_t` at the
/// scales `used_scales(s)` (or the warm-up's blend), `w`'s gradient is the straight-through
/// identity, and `s` gets LSQ's gradient (Esser et al. 2020; ParetoQ trains its scales so):
/// that of `s * round(clip(w / s, -1, 1))` with the rounding passed straight through, i.e. per
/// weight `dW_t * (q - w / s)` inside the clip range and `dW_t * q` outside, summed over the
/// group, times `lambda` and LSQ's gradient scale `1 / sqrt(group)` (Q_p = 1). The scale's
/// rounding to its dtype is passed straight through as well.
pub fn ste_weight_learned(w: &Tensor, s: &Tensor, q: Quant, lambda: f32) -> Result<Tensor> {
    let used = used_scales(s, q)?;
    let value = blend(w, &ternarize_with(w, q, &used)?, lambda)?;
    let gs = 1.0 / (q.group as f64).sqrt();
    let s_lin = (s.reshape(((), 1))? * gs)?;
    // `used` in value (to rounding), gradient `gs`
    let s_g = (&s_lin + (&used - &s_lin)?.detach())?;
    let wg = w.detach().to_dtype(DType::F32)?.reshape(((), q.group))?;
    let exact = wg.broadcast_div(&used)?;
    let levels = ternary_levels(&exact)?;
    // w / s inside the clip range (decided at the used scales), 0 outside, where clip's
    // gradient is 0
    let inside = exact.abs()?.le(1.0)?.to_dtype(DType::F32)?;
    let x = (wg.broadcast_div(&s_g)? * inside)?;
    let rounded = (&x + (levels - &x)?.detach())?;
    let term = rounded.broadcast_mul(&s_g)?;
    // zero in value: it only carries the scale's gradient
    let grad_only = ((&term - term.detach())? * lambda as f64)?.reshape(w.shape())?;
    value + grad_only
}

/// The value of `ste_weight` (or `ste_weight_learned` with the learned scale `s`), without a
/// gradient: `W_t`, or `W + lambda * (W_t - W)`.
pub fn ternarize_at(w: &Tensor, q: Quant, s: Option<&Tensor>, lambda: f32) -> Result<Tensor> {
    let wt = match s {
        Some(s) => ternarize_with(w, q, &used_scales(s, q)?)?,
        None => ternarize(w, q)?,
    };
    if lambda >= 1.0 {
        return Ok(wt);
    }
    Ok(blend(&w.detach().to_dtype(DType::F32)?, &wt, lambda)?.detach())
}

/// Per-token absmax fake quantization to 8 bits (BitNet b1.58's activations): each row of `x`
/// (its last dimension) scaled by `s = 127 / max(max |x|, 1e-5)`, rounded (half away from
/// zero), clipped to [-128, 127] and scaled back, so at most 255 distinct values per row. The
/// gradient is the straight-through identity. Computed in f32, returned in x's dtype.
pub fn act_quant(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let amax = xf
        .detach()
        .abs()?
        .max_keepdim(D::Minus1)?
        .maximum(ACT_MIN_AMAX)?;
    let scale = (amax.ones_like()? * 127.0)?.div(&amax)?;
    let q = xf
        .detach()
        .broadcast_mul(&scale)?
        .round()?
        .clamp(-128f32, 127f32)?
        .broadcast_div(&scale)?;
    // (q - x is exact here, so x + (q - x) is q to the bit)
    (&xf + (q - &xf)?.detach())?.to_dtype(dtype)
}

/// The smallest absmax `act_quant` divides by (BitNet's).
pub const ACT_MIN_AMAX: f64 = 1e-5;

/// The seed's check of one ternary weight: recompute `W_t`, divide each group by the scale of
/// the latent weight and measure the distance of every entry to {-1, 0, +1}.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TernaryCheck {
    /// Entries further than 1e-5 from {-1, 0, +1}.
    pub bad: usize,
    pub total: usize,
    pub max_err: f64,
}

pub fn check_ternary(w: &Tensor, q: Quant) -> Result<TernaryCheck> {
    check_ternary_with(w, q, &group_scales(w, q)?)
}

/// `check_ternary` at the given group scales (a learned scale's `used_scales`).
pub fn check_ternary_with(w: &Tensor, q: Quant, s: &Tensor) -> Result<TernaryCheck> {
    let total = w.elem_count();
    let wt = ternarize_with(w, q, s)?.reshape(((), q.group))?;
    let q = wt.broadcast_div(s)?;
    let nearest = q.round()?.clamp(-1f32, 1f32)?;
    // (G, group); reduced by groups first: candle reduces a whole tensor to one value in one
    // block, which took ~1 ms for a Qwen3-0.6B projection
    let err = (q - nearest)?.abs()?;
    let max_err = err.max(1)?.max(0)?.to_scalar::<f32>()? as f64;
    let bad = err
        .gt(1e-5)?
        .to_dtype(DType::U32)?
        .sum(1)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok(TernaryCheck {
        bad,
        total,
        max_err,
    })
}
