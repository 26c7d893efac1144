//! AdamW over all parameters, in either of two arithmetics that the spec chooses:
//!
//! - the seed's (`train.bias_correction = false`, the default): MLX's `optim.AdamW`, which has
//!   no bias correction, `p <- p * (1 - lr * wd) - lr * m / (sqrt(v) + eps)`, with the moments
//!   kept in each parameter's own dtype and, for a bf16 parameter, every operation rounded to
//!   bf16 as MLX does (MLX casts lr, the betas and eps to the gradient's dtype, and the
//!   gradient of a bf16 parameter is bf16);
//! - PyTorch's and candle's (`train.bias_correction = true`): moments divided by
//!   `1 - beta^t`, the arithmetic of `candle_nn::AdamW`, which the transformers parity test
//!   checks against PyTorch's AdamW.
//!
//! Each operation is written in the order the reference writes it, so that f32 results agree
//! to the last bit where the reference's do. The composed version (candle ops) runs on the
//! CPU and Metal and is the reference for the fused CUDA kernel (one launch for all parameters).

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// The hyper-parameters of one step (the learning rate changes every step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction: bool,
}

/// A host scalar as MLX hands it to an operation on `dtype` arrays: rounded to f32 (Python
/// floats become f32 arrays), then to the array's dtype. Returned as f64, exactly.
pub fn scalar_in(x: f64, dtype: DType) -> f64 {
    let x = x as f32;
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f64(),
        DType::F16 => half::f16::from_f32(x).to_f64(),
        _ => x as f64,
    }
}

/// The per-step constants of one parameter's update, as the reference computes them on the
/// host (`1 - beta` in f64, then into the parameter's dtype).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConstants {
    pub lr: f64,
    pub b1: f64,
    pub one_minus_b1: f64,
    pub b2: f64,
    pub one_minus_b2: f64,
    pub eps: f64,
    /// `1 - lr * wd`, the weight decay factor.
    pub decay: f64,
    /// f32 with bias correction: `1 / (1 - beta^t)` for m and v (candle's formula).
    pub scale_m: f64,
    pub scale_v: f64,
    /// Low precision with bias correction (MLX's formula): `lr / (1 - b1^t)` and
    /// `rsqrt(1 - b2^t)` in the parameter's dtype.
    pub c1: f64,
    pub c2: f64,
}

impl StepConstants {
    pub fn new(p: &AdamWParams, step: usize, dtype: DType) -> Self {
        let s = |x| scalar_in(x, dtype);
        let (b1, b2) = (p.beta1, p.beta2);
        let lr = s(p.lr);
        let decay = if dtype == DType::F32 {
            // MLX: 1 - lr * wd in f32 (lr is an f32 array); candle: (1 - lr * wd) in f64, then
            // f32. Both are 1 exactly without weight decay, the seed's case.
            if p.bias_correction {
                s(1.0 - p.lr * p.weight_decay)
            } else {
                let lw = (lr as f32) * (p.weight_decay as f32);
                (1f32 - lw) as f64
            }
        } else {
            let lw = s(lr * s(p.weight_decay));
            s(1.0 - lw)
        };
        let t = step as i32;
        // MLX's `1 - b ** step` is an f32 array (step is an array), so lr / (1 - b1^t) and
        // rsqrt(1 - b2^t) are f32 operations, rounded once into the parameter's dtype.
        let one_minus_pow = |b: f64| 1f32 - (b as f32).powf(t as f32);
        let c1 = s(((lr as f32) / one_minus_pow(b1)) as f64);
        let c2 = s((1f32 / one_minus_pow(b2).sqrt()) as f64);
        Self {
            lr,
            b1: s(b1),
            one_minus_b1: s(1.0 - b1),
            b2: s(b2),
            one_minus_b2: s(1.0 - b2),
            eps: s(p.eps),
            decay,
            scale_m: s(1.0 / (1.0 - b1.powi(t))),
            scale_v: s(1.0 / (1.0 - b2.powi(t))),
            c1,
            c2,
        }
    }
}

/// One parameter with its two moments (in the parameter's dtype).
struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
    /// This parameter's learning rate is `lr_multiplier * lr` (1 for all but learned scales).
    lr_multiplier: f64,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub params: AdamWParams,
    step_t: usize,
    /// One CUDA kernel for all parameters (when the parameters live on a CUDA device).
    fused: bool,
    /// The kernel's table on the device (made at the first fused step).
    #[cfg(feature = "cuda")]
    table: Option<crate::cuda::adamw::MultiTable>,
    /// The gradients' addresses and dtypes of a step captured in a CUDA graph (`record_step`),
    /// which every replay (`replay_step`) updates from.
    #[cfg(feature = "cuda")]
    recorded: Option<Vec<Option<(u64, DType)>>>,
    /// Per parameter, where a replayed update also writes the ternary projection of the
    /// updated latent, and how (`write_projections`).
    #[cfg(feature = "cuda")]
    writes: Vec<Option<Projection>>,
}

/// A buffer that a replayed update writes a latent's ternary projection into, and the
/// projection's arguments (`crate::cuda::ternary::vector_args`).
#[cfg(feature = "cuda")]
pub type Projection = (Tensor, crate::cuda::ternary::VectorArgs);

impl AdamW {
    /// The fused kernels when `fused` and the parameters live on a CUDA device.
    pub fn new(vars: Vec<Var>, params: AdamWParams, fused: bool) -> Result<Self> {
        let fused = fused && cfg!(feature = "cuda") && vars.iter().all(|v| v.device().is_cuda());
        let slots = vars
            .into_iter()
            .map(|var| {
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(Slot {
                    var,
                    m,
                    v,
                    lr_multiplier: 1.0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            params,
            step_t: 0,
            fused,
            #[cfg(feature = "cuda")]
            table: None,
            #[cfg(feature = "cuda")]
            recorded: None,
            #[cfg(feature = "cuda")]
            writes: Vec::new(),
        })
    }

    /// The optimizer of a run: the spec's betas, eps, weight decay and bias correction, the
    /// schedule's lr at step 0.
    pub fn for_run(vars: Vec<Var>, t: &crate::spec::TrainSpec, fused: bool) -> Result<Self> {
        let params = AdamWParams {
            lr: crate::schedule::lr_at(t, 0),
            beta1: t.betas[0],
            beta2: t.betas[1],
            eps: t.eps,
            weight_decay: t.weight_decay,
            bias_correction: t.bias_correction,
        };
        Self::new(vars, params, fused)
    }

    /// An optimizer for `params` with the run's settings, each parameter at its learning-rate
    /// multiplier (`Params::lr_multiplier`).
    pub fn for_params(
        params: &crate::model::Params,
        t: &crate::spec::TrainSpec,
        fused: bool,
    ) -> Result<Self> {
        let mut opt = Self::for_run(params.vars(), t, fused)?;
        for (slot, (name, _)) in opt.slots.iter_mut().zip(&params.named) {
            slot.lr_multiplier = params.lr_multiplier(name);
        }
        Ok(opt)
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// The first and second moments of `var` (for tests), if it is one of the parameters.
    pub fn moments(&self, var: &Var) -> Option<(&Tensor, &Tensor)> {
        self.slots
            .iter()
            .find(|s| s.var.as_tensor().id() == var.as_tensor().id())
            .map(|s| (&s.m, &s.v))
    }

    /// How many updates it has made (`t` of the bias correction).
    pub fn steps_taken(&self) -> usize {
        self.step_t
    }

    /// Every parameter's (m, v), in the order of the parameters it was made with.
    pub fn all_moments(&self) -> Vec<(&Tensor, &Tensor)> {
        self.slots.iter().map(|s| (&s.m, &s.v)).collect()
    }

    /// Continues from a saved state: `steps_taken` updates made, and every parameter's (m, v)
    /// in the order of `all_moments` (each with its parameter's shape, dtype and device).
    pub fn restore(&mut self, steps_taken: usize, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.slots.len() {
            candle_core::bail!(
                "{} saved moment pairs for {} parameters",
                moments.len(),
                self.slots.len()
            );
        }
        for (slot, (m, v)) in self.slots.iter_mut().zip(moments) {
            for t in [&m, &v] {
                let p = slot.var.as_tensor();
                if t.shape() != p.shape() || t.dtype() != p.dtype() {
                    candle_core::bail!(
                        "a saved moment is {:?} {:?}, its parameter {:?} {:?}",
                        t.shape(),
                        t.dtype(),
                        p.shape(),
                        p.dtype()
                    );
                }
            }
            // (the fused kernel updates the moments in place: each needs storage of its own)
            slot.m = m.to_device(slot.var.device())?.copy()?;
            slot.v = v.to_device(slot.var.device())?.copy()?;
        }
        self.step_t = steps_taken;
        Ok(())
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        #[cfg(feature = "cuda")]
        if self.fused {
            // (f32 gradients, or the bf16 ones of the hand-written step's bf16 products, which
            // the kernel widens as it reads them; kept until the kernel is launched)
            let gs = self
                .slots
                .iter()
                .map(|s| {
                    grads
                        .get(s.var.as_tensor())
                        .map(|g| {
                            let g = match g.dtype() {
                                DType::BF16 => g.contiguous()?,
                                _ => g.to_dtype(DType::F32)?.contiguous()?,
                            };
                            // (the kernel reads 16-byte aligned runs: a view that starts
                            // elsewhere is copied)
                            match crate::cuda::AsBuf::buf(&g)?.p % 16 {
                                0 => Ok(g),
                                _ => g.copy(),
                            }
                        })
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            let ptrs = gs
                .iter()
                .map(|g| {
                    g.as_ref()
                        .map(|g| crate::cuda::AsBuf::buf(g).map(|b| (b.p, b.dtype)))
                })
                .map(Option::transpose)
                .collect::<Result<Vec<_>>>()?;
            self.write_table(&ptrs, false)?;
            return self.table()?.launch(None);
        }
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let k = constants(&self.params, self.step_t, slot);
            let (p, m, v) = composed_step(
                slot.var.as_tensor(),
                &slot.m,
                &slot.v,
                g,
                &k,
                self.params.bias_correction,
            )?;
            slot.var.set(&p)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// The kernel's table, made for these parameters the first time.
    #[cfg(feature = "cuda")]
    fn table(&mut self) -> Result<&mut crate::cuda::adamw::MultiTable> {
        if self.table.is_none() {
            let p = self.slots[0].var.as_tensor();
            let gpu = crate::cuda::Gpu::of(p.device())?;
            let sizes: Vec<usize> = self.slots.iter().map(|s| s.var.elem_count()).collect();
            self.table = Some(crate::cuda::adamw::MultiTable::new(&gpu, &sizes)?);
        }
        Ok(self.table.as_mut().expect("made above"))
    }

    /// Writes the table of this step: each parameter with its gradient at `grads[i]` (an
    /// address and its dtype, f32 or bf16; None: no update), and with `projections`, where
    /// `write_projections` said, the buffer its update writes its ternary projection into.
    #[cfg(feature = "cuda")]
    fn write_table(&mut self, grads: &[Option<(u64, DType)>], projections: bool) -> Result<()> {
        use crate::cuda::adamw::{Entry, Scalars};
        use crate::cuda::Buf;
        let bias_correction = self.params.bias_correction;
        let mut entries = Vec::with_capacity(self.slots.len());
        for (i, (slot, g)) in self.slots.iter().zip(grads).enumerate() {
            let p = slot.var.as_tensor();
            let Some((g, g_dtype)) = *g else {
                // (length 0: the kernel leaves it alone)
                entries.push(Entry::default());
                continue;
            };
            let k = constants(&self.params, self.step_t, slot);
            let correction = if p.dtype() == DType::F32 {
                (k.scale_m, k.scale_v)
            } else {
                (k.c1, k.c2)
            };
            let scalars = Scalars {
                lr: k.lr as f32,
                b1: k.b1 as f32,
                one_minus_b1: k.one_minus_b1 as f32,
                b2: k.b2 as f32,
                one_minus_b2: k.one_minus_b2 as f32,
                eps: k.eps as f32,
                decay: k.decay as f32,
                correction: (correction.0 as f32, correction.1 as f32),
                bias_correction,
            };
            let g = Buf {
                p: g,
                dtype: g_dtype,
                dims: p.dims().to_vec(),
            };
            let entry = Entry::new(p, &slot.m, &slot.v, &g, &scalars)?;
            entries.push(match self.writes.get(i) {
                Some(Some((wt, args))) if projections => entry.writing(wt, *args)?,
                _ => entry,
            });
        }
        self.table()?.write(&entries)
    }

    /// From the next replayed update on (`replay_step`; eager steps do not), the update of each
    /// latent named in `writes` (its id) also writes its ternary projection into the buffer
    /// given, as `crate::cuda::ternary::ternarize` at those arguments would make it from the
    /// updated weights (the captured step then multiplies by that buffer instead of projecting
    /// the latent first). Replaces any earlier list; an empty one writes nothing.
    #[cfg(feature = "cuda")]
    pub fn write_projections(
        &mut self,
        writes: Vec<(candle_core::TensorId, Projection)>,
    ) -> Result<()> {
        let mut by_slot = vec![None; self.slots.len()];
        for (id, w) in writes {
            let Some(i) = self.slots.iter().position(|s| s.var.as_tensor().id() == id) else {
                candle_core::bail!("AdamW: a projection to write for a tensor it does not update");
            };
            by_slot[i] = Some(w);
        }
        self.writes = by_slot;
        Ok(())
    }

    /// The update inside a CUDA graph capture: launches the kernel on the table that each
    /// replay writes first (`replay_step`), remembering where the captured step leaves the
    /// gradients (f32 or bf16, contiguous, as the hand-written step makes them); the update
    /// happens only if the f32 at `gate` (the step's loss) is finite. Counts no step.
    #[cfg(feature = "cuda")]
    pub fn record_step(&mut self, grads: &GradStore, gate: u64) -> Result<()> {
        if !self.fused {
            candle_core::bail!("a captured step needs the fused AdamW");
        }
        let mut ptrs = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            ptrs.push(match grads.get(s.var.as_tensor()) {
                None => None,
                Some(g) if matches!(g.dtype(), DType::F32 | DType::BF16) && g.is_contiguous() => {
                    let b = crate::cuda::AsBuf::buf(g)?;
                    Some((b.p, b.dtype))
                }
                Some(g) => candle_core::bail!(
                    "a captured step needs contiguous f32 or bf16 gradients, got {:?}",
                    g.dtype()
                ),
            });
        }
        self.recorded = Some(ptrs);
        self.table()?.launch(Some(gate))
    }

    /// Before a replay of the captured step: counts the step and writes its table (this
    /// step's learning rate, the captured gradients' addresses, the projections to write).
    #[cfg(feature = "cuda")]
    pub fn replay_step(&mut self) -> Result<()> {
        let Some(ptrs) = self.recorded.clone() else {
            candle_core::bail!("no captured AdamW step to replay");
        };
        self.step_t += 1;
        self.write_table(&ptrs, true)
    }
}

/// A parameter's constants at update `step_t` and the current learning rate.
fn constants(params: &AdamWParams, step_t: usize, slot: &Slot) -> StepConstants {
    let mut params = *params;
    params.lr *= slot.lr_multiplier;
    StepConstants::new(&params, step_t, slot.var.dtype())
}

/// One AdamW update as candle ops: returns the new (parameter, m, v). Every operation runs in
/// the parameter's dtype, one rounding each, as the references do (`x.affine(a, 0.)` is one
/// product; adding 0 is exact).
pub fn composed_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    k: &StepConstants,
    bias_correction: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = p.dtype();
    // The gradient in the parameter's dtype (MLX's gradient of a bf16 parameter is bf16).
    let g = g.to_dtype(dtype)?;
    let m = (m.affine(k.b1, 0.)? + g.affine(k.one_minus_b1, 0.)?)?;
    let v = (v.affine(k.b2, 0.)? + g.sqr()?.affine(k.one_minus_b2, 0.)?)?;
    let p = if k.decay == 1.0 {
        p.clone()
    } else {
        p.affine(k.decay, 0.)?
    };
    let update = match (bias_correction, dtype) {
        // candle's AdamW: m_hat / (sqrt(v_hat) + eps) * lr
        (true, DType::F32) => {
            let m_hat = m.affine(k.scale_m, 0.)?;
            let v_hat = v.affine(k.scale_v, 0.)?;
            (m_hat / v_hat.sqrt()?.affine(1., k.eps)?)?.affine(k.lr, 0.)?
        }
        // MLX with bias correction: (c1 * m) / (sqrt(v) * c2 + eps)
        (true, _) => (m.affine(k.c1, 0.)? / v.sqrt()?.affine(k.c2, 0.)?.affine(1., k.eps)?)?,
        // MLX: lr * m / (sqrt(v) + eps)
        (false, _) => (m.affine(k.lr, 0.)? / v.sqrt()?.affine(1., k.eps)?)?,
    };
    Ok(((p - update)?, m, v))
}
