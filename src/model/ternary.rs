//! Group-wise ternary projection (BitNet b1.58 style) and its straight-through estimator.
//!
//! For a weight `W` of shape (out, in) and a group size `G` dividing `in`:
//! `s = max(mean(|W|) over each group of G input columns, 1e-8)` and
//! `W_t = clip(round(W / s), -1, 1) * s`. The forward pass multiplies by `W_t`; the backward
//! pass treats the projection as the identity (`W + stop_grad(W_t - W)`), so the latent fp32
//! weight receives exactly the gradient that a dense layer at `W_t` would.

use super::config::Projection;
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// Which projections are ternary, and with which group size.
#[derive(Debug, Clone)]
pub struct TernarySpec {
    pub projections: Vec<Projection>,
    pub group_size: GroupSize,
}

impl TernarySpec {
    /// The group size of `projection` with input width `width`, if it is ternary.
    pub fn group_for(&self, projection: Projection, width: usize) -> Option<usize> {
        self.projections
            .contains(&projection)
            .then_some(self.group_size.for_width(width))
    }
}

/// `quant.group_size`: a number of input columns, or `"row"` (the whole input width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    Columns(usize),
    Row,
}

impl GroupSize {
    /// The group size of a projection whose input width is `width`.
    pub fn for_width(self, width: usize) -> usize {
        match self {
            GroupSize::Columns(g) => g,
            GroupSize::Row => width,
        }
    }
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSize::Columns(g) => write!(f, "{g}"),
            GroupSize::Row => f.write_str("row"),
        }
    }
}

impl Serialize for GroupSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GroupSize::Columns(g) => s.serialize_u64(*g as u64),
            GroupSize::Row => s.serialize_str("row"),
        }
    }
}

impl<'de> Deserialize<'de> for GroupSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        let want = "a positive number of input columns (32, 128, ...) or \"row\"";
        match Raw::deserialize(d) {
            Ok(Raw::Int(g)) if g > 0 => Ok(GroupSize::Columns(g as usize)),
            Ok(Raw::Str(s)) if s == "row" => Ok(GroupSize::Row),
            Ok(Raw::Int(g)) => Err(serde::de::Error::custom(format!("{g}: expected {want}"))),
            Ok(Raw::Str(s)) => Err(serde::de::Error::custom(format!("{s:?}: expected {want}"))),
            Err(_) => Err(serde::de::Error::custom(format!("expected {want}"))),
        }
    }
}

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
