//! The ternary projections a replayed step multiplies by, kept in buffers of their own from one
//! replay to the next. An eager step projects every ternary latent at the start of its forward
//! (`Ctx::weight`): one kernel a projection, which reads the f32 latent that the step's AdamW
//! update has just read and written. A captured step instead multiplies by these buffers, and
//! its AdamW kernel writes the projection of each latent it updates as it updates it
//! (`AdamW::write_projections`): the latents are read once a step, and the projection kernels
//! leave the graph.
//!
//! The buffers hold the projections of the latents as they are only while every update since
//! they were filled was a replayed one: `StepGraph` fills them (`fill`, the eager kernels)
//! before a replay that follows an eager step. A projection is kept here when the 16-byte
//! kernel takes it (`ternary::vector_args`: computed scales, groups of 32 to 512, an f32
//! latent); any other (learned scales, a whole matrix's scale, a dense projection) is made in
//! the step as before.

use super::{gate_up_fused, qkv_fused, Ctx};
use crate::cuda::ternary::{self, VectorArgs};
use crate::model::{Linear, Qwen3};
use crate::optim::Projection;
use candle_core::{DType, Result, Tensor, TensorId};
use std::collections::HashMap;

/// The kept projections of a model's layers.
pub struct Prepared {
    /// by latent: the buffer its projection is kept in (for gate and up, rows of the layer's
    /// fused weight)
    weights: HashMap<TensorId, Tensor>,
    /// by layer: the fused (2F, E) weight of gate then up, where both are kept
    gate_up: Vec<Option<Tensor>>,
    /// by layer: the fused (H * D + 2 * K * D, E) weight of q, k then v, where all are kept
    qkv: Vec<Option<Tensor>>,
}

/// The arguments of the projection of `lin` when it can be kept.
fn args(lin: &Linear) -> Option<VectorArgs> {
    let q = lin.quant?;
    let w = &lin.weight;
    if lin.scale.is_some() || w.dtype() != DType::F32 || !w.is_contiguous() {
        return None;
    }
    ternary::vector_args(w.elem_count(), q, lin.lambda)
}

impl Prepared {
    /// Buffers (in the compute dtype `cd`) for every projection of `model` that can be kept,
    /// the fused ones as the step fuses them (q/k/v only under flash attention, `flash`); None
    /// when there is none.
    pub fn new(
        model: &Qwen3,
        gpu: &crate::cuda::Gpu,
        cd: DType,
        flash: bool,
    ) -> Result<Option<Self>> {
        let mut weights = HashMap::new();
        // Rows of one buffer for `lins` where the step fuses them and each can be kept; else
        // None, and they are left to `alone`.
        let fuse = |weights: &mut HashMap<_, _>, lins: &[&Linear], fused: bool| -> Result<_> {
            if !fused || lins.iter().any(|l| args(l).is_none()) {
                return Ok(None);
            }
            let rows = lins
                .iter()
                .map(|l| l.weight.dim(0))
                .sum::<Result<usize>>()?;
            let w = gpu.empty((rows, lins[0].weight.dim(1)?), cd)?;
            let mut at = 0;
            for lin in lins {
                let r = lin.weight.dim(0)?;
                weights.insert(lin.weight.id(), w.narrow(0, at, r)?);
                at += r;
            }
            Ok(Some(w))
        };
        let (mut gate_up, mut qkv) = (Vec::new(), Vec::new());
        for layer in &model.layers {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            let (gate, up) = (&m.gate_proj, &m.up_proj);
            let d = model.cfg.head_dim;
            let f_qkv = qkv_fused(a, flash, d);
            let f_gu = gate_up_fused(gate, up);
            qkv.push(fuse(
                &mut weights,
                &[&a.q_proj, &a.k_proj, &a.v_proj],
                f_qkv,
            )?);
            gate_up.push(fuse(&mut weights, &[gate, up], f_gu)?);
            let mut alone = vec![&a.o_proj, &m.down_proj];
            if !f_qkv {
                alone.extend([&a.q_proj, &a.k_proj, &a.v_proj]);
            }
            if !f_gu {
                alone.extend([gate, up]);
            }
            for lin in alone {
                if args(lin).is_some() {
                    weights.insert(lin.weight.id(), gpu.empty(lin.weight.shape(), cd)?);
                }
            }
        }
        Ok((!weights.is_empty()).then_some(Self {
            weights,
            gate_up,
            qkv,
        }))
    }

    /// How many projections are kept.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// The kept projection of `lin`, if it is one.
    pub(super) fn weight(&self, lin: &Linear) -> Option<&Tensor> {
        self.weights.get(&lin.weight.id())
    }

    /// Layer `i`'s fused q/k/v weight, if it is kept.
    pub(super) fn qkv(&self, i: usize) -> Option<&Tensor> {
        self.qkv.get(i).and_then(Option::as_ref)
    }

    /// Layer `i`'s fused gate/up weight, if it is kept.
    pub(super) fn gate_up(&self, i: usize) -> Option<&Tensor> {
        self.gate_up.get(i).and_then(Option::as_ref)
    }

    /// Projects every kept latent of `model` (at its lambdas) into its buffer: the eager
    /// kernels, as `Ctx::weight` runs them.
    pub fn fill(&self, model: &Qwen3) -> Result<()> {
        let gpu = crate::cuda::Gpu::of(&model.device)?;
        for lin in linears(model) {
            if let (Some(wt), Some(q)) = (self.weights.get(&lin.weight.id()), lin.quant) {
                ternary::ternarize(&gpu, &lin.weight, wt, q, lin.lambda)?;
            }
        }
        Ok(())
    }

    /// What the AdamW update writes: each kept latent's buffer and its projection's arguments
    /// at `model`'s lambdas (`AdamW::write_projections`).
    pub fn writes(&self, model: &Qwen3) -> Vec<(TensorId, Projection)> {
        linears(model)
            .filter_map(|lin| {
                let wt = self.weights.get(&lin.weight.id())?;
                Some((lin.weight.id(), (wt.clone(), args(lin)?)))
            })
            .collect()
    }
}

/// Every projection of `model`'s layers.
fn linears(model: &Qwen3) -> impl Iterator<Item = &Linear> {
    model.layers.iter().flat_map(|layer| {
        let (a, m) = (layer.self_attn.linears(), layer.mlp.linears());
        a.into_iter().chain(m)
    })
}

impl Ctx {
    /// A kept projection of `lin` where the step has them.
    pub(super) fn kept_weight(&self, lin: &Linear) -> Option<Tensor> {
        self.prepared.as_ref()?.weight(lin).cloned()
    }
}
