//! AdamW over all parameters: the composed candle version (CPU, Metal, and the reference), or
//! one fused CUDA kernel per parameter that updates the weight and both moments in one pass.

use candle_core::backprop::GradStore;
use candle_core::{Result, Var};
use candle_nn::optim::{Optimizer, ParamsAdamW};

pub enum AdamW {
    Composed(candle_nn::AdamW),
    #[cfg(feature = "cuda")]
    Fused(FusedAdamW),
}

impl AdamW {
    /// The fused kernel when `fused` and the parameters live on a CUDA device.
    pub fn new(vars: Vec<Var>, params: ParamsAdamW, fused: bool) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if fused && vars.first().is_some_and(|v| v.device().is_cuda()) {
            return Ok(AdamW::Fused(FusedAdamW::new(vars, params)?));
        }
        let _ = fused;
        Ok(AdamW::Composed(candle_nn::AdamW::new(vars, params)?))
    }

    /// The optimizer of a run: the spec's betas, eps and weight decay, the schedule's lr at
    /// step 0.
    pub fn for_run(vars: Vec<Var>, t: &crate::spec::TrainSpec, fused: bool) -> Result<Self> {
        let params = ParamsAdamW {
            lr: crate::train::lr_at(t, 0),
            beta1: t.betas[0],
            beta2: t.betas[1],
            eps: t.eps,
            weight_decay: t.weight_decay,
        };
        Self::new(vars, params, fused)
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            AdamW::Composed(o) => o.set_learning_rate(lr),
            #[cfg(feature = "cuda")]
            AdamW::Fused(o) => o.params.lr = lr,
        }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            AdamW::Composed(o) => o.step(grads),
            #[cfg(feature = "cuda")]
            AdamW::Fused(o) => o.step(grads),
        }
    }
}

#[cfg(feature = "cuda")]
pub struct FusedAdamW {
    /// (parameter, first moment, second moment)
    state: Vec<(Var, candle_core::Tensor, candle_core::Tensor)>,
    params: ParamsAdamW,
    step_t: usize,
}

#[cfg(feature = "cuda")]
impl FusedAdamW {
    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let state = vars
            .into_iter()
            .map(|v| {
                let m = v.zeros_like()?;
                let s = v.zeros_like()?;
                Ok((v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            state,
            params,
            step_t: 0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        for (var, m, v) in &self.state {
            if let Some(g) = grads.get(var) {
                crate::model::fused::cuda::adamw_step(
                    var.as_tensor(),
                    m,
                    v,
                    g,
                    p.lr,
                    (p.beta1, p.beta2),
                    p.eps,
                    p.weight_decay,
                    self.step_t,
                )?;
            }
        }
        Ok(())
    }
}
