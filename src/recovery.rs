//! What quantization-aware training recovered, as ternary-LLM papers report it: the held-out
//! NLL of the full-precision starting model, of that model naively rounded to ternary before
//! any training, and of the trained model, and the fraction of the gap between the first two
//! that training closed; and the ternary weights themselves: the share at -1, 0 and +1 at the
//! end, and how many changed level during training, per projection type.

use crate::model::ternary::levels_with;
use crate::model::{Linear, Qwen3};
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The report's `recovery`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// Held-out NLL of the starting model in full precision (every projection dense).
    #[serde(deserialize_with = "crate::report::f64_or_nan")]
    pub nll_dense_start: f64,
    /// Held-out NLL of the starting model quantized as the run quantizes it, before training.
    #[serde(deserialize_with = "crate::report::f64_or_nan")]
    pub nll_ternary_start: f64,
    /// Held-out NLL after training (the report's `val_nll`).
    #[serde(deserialize_with = "crate::report::f64_or_nan")]
    pub nll_trained: f64,
    /// `(nll_ternary_start - nll_trained) / (nll_ternary_start - nll_dense_start)`: 1 closes
    /// the gap, 0 is no better than rounding, above 1 beats the starting model; NaN (null in
    /// JSON) when rounding did not raise the held-out loss (nothing to recover, as from a
    /// preset's random init).
    #[serde(deserialize_with = "crate::report::f64_or_nan")]
    pub gap_recovered: f64,
    /// Per projection type (`q_proj`, ...) and `all`: the ternary levels at the end.
    pub levels: BTreeMap<String, Levels>,
}

/// The ternary weights of one projection type (all layers) at the end of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Levels {
    pub weights: usize,
    /// Shares of the weights at -1, 0 and +1.
    pub minus: f64,
    pub zero: f64,
    pub plus: f64,
    /// Share of the weights whose level differs from the start's.
    pub changed: f64,
}

/// The levels (-1, 0, +1 as 0, 1, 2) of a ternary layer's weights, u8 (out, in) on the layer's
/// device (kept there and counted there: copying a Qwen3-0.6B's 440M levels to the host and
/// counting them one by one took most of a second).
fn levels_of(lin: &Linear) -> Result<Tensor> {
    let q = lin.quant().expect("a ternary layer has a quantizer");
    let l = (levels_with(lin.weight(), q, &lin.group_scales()?)? + 1.0)?;
    Ok(l.to_dtype(DType::U8)?)
}

/// How many of the (out, in) `t`'s entries are true (u8 0 or 1), summed on its device by rows
/// first (candle sums a whole tensor to one value in one block).
fn count(t: &Tensor) -> Result<usize> {
    Ok(t.to_dtype(DType::U32)?
        .sum(1)?
        .sum_all()?
        .to_scalar::<u32>()? as usize)
}

/// The projection type of a layer, from its checkpoint name (`...self_attn.q_proj.weight`).
fn projection_of(lin: &Linear) -> String {
    let parts: Vec<&str> = lin.name().split('.').collect();
    parts[parts.len().saturating_sub(2)].to_string()
}

/// The fraction of the rounding gap that training closed (see `Recovery::gap_recovered`).
pub fn gap_recovered(dense: f64, ternary: f64, trained: f64) -> f64 {
    let gap = ternary - dense;
    if gap > 0.0 {
        (ternary - trained) / gap
    } else {
        f64::NAN
    }
}

/// What a run measures before it trains.
pub struct Start {
    nll_dense: f64,
    nll_ternary: f64,
    /// Every ternary layer's levels, in `Qwen3::ternary_linears` order.
    levels: Vec<Tensor>,
}

impl Start {
    /// Measures `model` before training: `nll` evaluates a frozen model on the held-out split.
    pub fn measure(model: &Qwen3, nll: &dyn Fn(&Qwen3) -> Result<f64>) -> Result<Self> {
        let nll_dense = nll(&model.frozen_dense()?)?;
        let nll_ternary = nll(&model.frozen()?)?;
        let levels = model
            .ternary_linears()
            .into_iter()
            .map(levels_of)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            nll_dense,
            nll_ternary,
            levels,
        })
    }

    /// The recovery numbers of the trained `model` whose held-out NLL is `nll_trained`.
    pub fn finish(&self, model: &Qwen3, nll_trained: f64) -> Result<Recovery> {
        #[derive(Default)]
        struct Count {
            n: usize,
            by_level: [usize; 3],
            changed: usize,
        }
        let mut counts: BTreeMap<String, Count> = BTreeMap::new();
        for (lin, start) in model.ternary_linears().into_iter().zip(&self.levels) {
            let end = levels_of(lin)?;
            let (minus, zero) = (count(&end.eq(0f64)?)?, count(&end.eq(1f64)?)?);
            let by_level = [minus, zero, end.elem_count() - minus - zero];
            let changed = count(&end.ne(start)?)?;
            for key in [projection_of(lin), "all".to_string()] {
                let c = counts.entry(key).or_default();
                c.n += end.elem_count();
                for (i, b) in by_level.iter().enumerate() {
                    c.by_level[i] += b;
                }
                c.changed += changed;
            }
        }
        let share = |x: usize, n: usize| x as f64 / n.max(1) as f64;
        let levels = counts
            .into_iter()
            .map(|(k, c)| {
                let l = Levels {
                    weights: c.n,
                    minus: share(c.by_level[0], c.n),
                    zero: share(c.by_level[1], c.n),
                    plus: share(c.by_level[2], c.n),
                    changed: share(c.changed, c.n),
                };
                (k, l)
            })
            .collect();
        Ok(Recovery {
            nll_dense_start: self.nll_dense,
            nll_ternary_start: self.nll_ternary,
            nll_trained,
            gap_recovered: gap_recovered(self.nll_dense, self.nll_ternary, nll_trained),
            levels,
        })
    }
}
