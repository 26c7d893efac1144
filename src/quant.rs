//! The description of a ternary quantizer, shared by the model (`crate::model::ternary`, the
//! composed arithmetic), the CUDA kernels (`crate::cuda::ternary`) and the spec: which weights
//! share a scale, how the scale is found, and its precision.

use crate::choice::{serde_by_name, Choice};
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// Smallest scale, as in the seed: keeps all-zero groups finite.
pub const MIN_SCALE: f64 = 1e-8;

/// How one layer's weight is ternarized: groups of `group` consecutive entries of the
/// row-major (out, in) matrix (G input columns, a row, or all of it), each with one scale by
/// `scale`, rounded to `scale_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quant {
    pub group: usize,
    pub scale: ScaleRule,
    pub scale_dtype: ScaleDtype,
}

impl Quant {
    /// The seed's quantizer with groups of `group` entries.
    pub fn absmean(group: usize) -> Self {
        Self {
            group,
            scale: ScaleRule::Absmean,
            scale_dtype: ScaleDtype::F32,
        }
    }
}

/// `quant.granularity`: which entries share a scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Granularity {
    /// `quant.group_size` consecutive input columns (the seed's, 128).
    #[default]
    Group,
    /// A whole row (one output's weights).
    Row,
    /// The whole matrix (BitNet b1.58's one absmean per matrix).
    Tensor,
}

impl Choice for Granularity {
    const ALL: &'static [Self] = &[Self::Group, Self::Row, Self::Tensor];
    fn name(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Row => "row",
            Self::Tensor => "tensor",
        }
    }
}

/// `quant.scale`: how a group's scale is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleRule {
    /// mean |W| (the seed's, BitNet b1.58's)
    #[default]
    Absmean,
    /// max |W|
    Absmax,
    /// A trainable scale per group, initialised from the absmean and trained with the LSQ
    /// gradient (ParetoQ's learned scale); see `crate::model::ternary::ste_weight_learned`.
    Learned,
}

impl Choice for ScaleRule {
    const ALL: &'static [Self] = &[Self::Absmean, Self::Absmax, Self::Learned];
    fn name(self) -> &'static str {
        match self {
            Self::Absmean => "absmean",
            Self::Absmax => "absmax",
            Self::Learned => "learned",
        }
    }
}

/// `quant.scale_dtype`: the precision a scale is rounded to before use (what an export
/// stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Choice for ScaleDtype {
    const ALL: &'static [Self] = &[Self::F32, Self::Bf16, Self::F16];
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl ScaleDtype {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The smallest scale: the seed's 1e-8, or the dtype's smallest positive value where
    /// 1e-8 would round to 0 (f16: 2^-24).
    pub fn min_scale(self) -> f64 {
        match self {
            Self::F16 => MIN_SCALE.max(2f64.powi(-24)),
            _ => MIN_SCALE,
        }
    }
}

serde_by_name!(Granularity, ScaleRule, ScaleDtype);

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
