//! How a training step runs on a model: its forward, mean loss and gradients. Two trainers:
//!
//! - the hand-written CUDA step (`cuda_step`, cuda builds): forward, loss and backward as
//!   explicit kernel and cuBLAS calls, no autograd graph. `Trainer::for_model` chooses it where
//!   the model runs the fused ops (`Ops::Fused`, `run.fused = true`) on a CUDA device;
//! - autograd everywhere else: the model's own `forward` (composed ops, or on CUDA the fused
//!   kernels' own backward passes), the loss, and candle's `backward`.
//!
//! Both compute the same loss: the cross-entropy, plus under distillation (`Distill`) the
//! teacher's KL term. `StepOptions` tune the CUDA step and are ignored by autograd.

use crate::model::ops::{cross_entropy_with, distill_kl};
use crate::model::{Ops, Qwen3};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
pub mod cuda_step;

/// Options of the hand-written CUDA step (ignored by autograd).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepOptions {
    /// The block of query positions in causal attention (None: automatic).
    pub attention_chunk: Option<usize>,
    /// Whether the backward recomputes attention probabilities instead of keeping them
    /// (None: automatic, when keeping them would take over a quarter of the card).
    pub attention_recompute: Option<bool>,
    /// Flash attention (`crate::cuda::flash`) or the blocked scores (None: flash wherever its
    /// kernels run: bf16 compute, head dim 32, 64 or 128, compute capability 8.0 or newer).
    pub flash_attention: Option<bool>,
    /// Flash attention's query gradient from a kernel of its own (true) or added atomically by
    /// the key/value kernel (false); None: by sequence length (`crate::cuda::flash::Flash`).
    pub flash_dq_kernel: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Autograd,
    CudaStep,
}

/// The training step of a run: which trainer, and the CUDA step's options.
#[derive(Clone, Copy, Debug)]
pub struct Trainer {
    kind: Kind,
    options: StepOptions,
}

impl Trainer {
    /// The CUDA step where the model runs the fused ops on a CUDA device (cuda builds), else
    /// autograd.
    pub fn for_model(model: &Qwen3) -> Self {
        let cuda_step =
            cfg!(feature = "cuda") && model.ops() == Ops::Fused && model.device().is_cuda();
        Self {
            kind: if cuda_step {
                Kind::CudaStep
            } else {
                Kind::Autograd
            },
            options: StepOptions::default(),
        }
    }

    /// Candle's autograd through the model's forward, whatever its ops and device.
    pub fn autograd() -> Self {
        Self {
            kind: Kind::Autograd,
            options: StepOptions::default(),
        }
    }

    /// The hand-written CUDA step computes causal attention in blocks of `positions` query
    /// positions, each against the keys up to its end (default: 256 from L = 512 on, else the
    /// whole sequence). Autograd ignores it.
    pub fn with_attention_chunk(mut self, positions: usize) -> Self {
        self.options.attention_chunk = Some(positions);
        self
    }

    /// Whether the hand-written CUDA step recomputes each layer's attention probabilities in
    /// the backward instead of keeping all of them (default: only when keeping them would take
    /// over a quarter of the card's memory). Same values either way. Autograd ignores it.
    pub fn with_attention_recompute(mut self, on: bool) -> Self {
        self.options.attention_recompute = Some(on);
        self
    }

    /// Whether the hand-written CUDA step runs causal attention as flash attention (tensor
    /// cores, no L x L matrix; `crate::cuda::flash`) or by blocks of scores. Default: flash
    /// wherever its kernels run (bf16 compute, head dim 32, 64 or 128, compute capability 8.0 or
    /// newer); `true` where they do not is an error. Autograd ignores it.
    pub fn with_flash_attention(mut self, on: bool) -> Self {
        self.options.flash_attention = Some(on);
        self
    }

    /// Flash attention's query gradient from its own kernel (true) or through atomic adds
    /// (false), at every length.
    pub fn with_flash_dq_kernel(mut self, on: bool) -> Self {
        self.options.flash_dq_kernel = Some(on);
        self
    }

    /// The CUDA step's options.
    pub fn options(&self) -> StepOptions {
        self.options
    }

    /// "cuda-step" (hand-written, CUDA with the fused kernels) or "autograd", as report.json
    /// and the bench write it.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::CudaStep => "cuda-step",
            Kind::Autograd => "autograd",
        }
    }

    /// Forward pass and loss of a training batch: ids and targets (B, L).
    pub fn forward(&self, model: &Qwen3, ids: &Tensor, targets: &Tensor) -> Result<StepForward> {
        self.forward_distilled(model, ids, targets, None)
    }

    /// As `forward`, the loss adding `distill`'s term when given.
    pub fn forward_distilled(
        &self,
        model: &Qwen3,
        ids: &Tensor,
        targets: &Tensor,
        distill: Option<&Distill>,
    ) -> Result<StepForward> {
        #[cfg(feature = "cuda")]
        if self.kind == Kind::CudaStep {
            let (terms, tape) = cuda_step::forward(model, &self.options, ids, targets, distill)?;
            return Ok(StepForward {
                loss: terms.total,
                ce: terms.ce,
                kl: terms.kl,
                tape: Tape::Cuda(Box::new(tape)),
            });
        }
        let logits = model.forward(ids)?;
        let ce = cross_entropy_with(&logits, targets, model.ops())?;
        let (loss, kl) = match distill {
            None => (ce.clone(), None),
            Some(d) => {
                let kl = distill_kl(&logits, d.teacher_logits, d.temperature)?;
                ((&ce + (&kl * d.weight)?)?, Some(kl))
            }
        };
        Ok(StepForward {
            loss,
            ce,
            kl,
            tape: Tape::Autograd,
        })
    }
}

/// Distillation in one step: the frozen teacher's logits for the batch (B, L, V), and the
/// term's weight and temperature (`[distill]`): the loss is
/// `CE + weight * T^2 * KL(teacher || student)`.
pub struct Distill<'a> {
    pub teacher_logits: &'a Tensor,
    pub weight: f64,
    pub temperature: f64,
}

/// The forward half of a training step: the mean loss (f32 scalar), and what the backward
/// needs (the autograd graph behind the loss, or the CUDA step's tape).
pub struct StepForward {
    pub loss: Tensor,
    /// The loss's two terms: the cross-entropy, and the distillation KL (times T^2, before
    /// its weight) when distilling.
    pub ce: Tensor,
    pub kl: Option<Tensor>,
    tape: Tape,
}

enum Tape {
    Autograd,
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda_step::Tape>),
}

impl StepForward {
    /// Gradients of the loss for every parameter (f32), keyed by the parameters' tensors.
    pub fn backward(self, model: &Qwen3) -> Result<GradStore> {
        let _ = model;
        match self.tape {
            Tape::Autograd => self.loss.backward(),
            #[cfg(feature = "cuda")]
            Tape::Cuda(tape) => cuda_step::backward(model, *tape),
        }
    }
}

/// Steps of at most this many tokens replay from CUDA graphs (`TERNLAB_GRAPH_MAX_TOKENS`
/// sets another bound). Graphs pay where the host's launches set the pace (an H100 at 4 x 256:
/// 24.3 ms a step replayed, 27.2 ms launched); at 16 x 1024 the GPU's work hides the launches
/// (an H100: 145.3 and 146.4 ms replayed, 147.2 and 147.0 launched; 4 x 4096 the same), and a
/// graph's memory, reserved beside the eager pool's, is what the eager work between steps
/// (evaluation) would need.
pub const GRAPH_MAX_TOKENS: usize = 8192;

/// The CUDA step replayed from CUDA graphs (`cuda_step::graph`), for the trainer that has one:
/// the hand-written step on CUDA, stepping alone (no distillation, no data-parallel group), of
/// at most `GRAPH_MAX_TOKENS` tokens (or `TERNLAB_GRAPH_MAX_TOKENS`), unless
/// `TERNLAB_CUDA_GRAPH=0` or the per-op profile (`TERNLAB_PROFILE=1`) is on. Elsewhere every
/// step runs eagerly.
pub struct Graphs {
    #[cfg(feature = "cuda")]
    inner: Option<cuda_step::graph::StepGraph>,
}

impl Graphs {
    /// Every step eagerly.
    pub fn off() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            inner: None,
        }
    }

    /// Graphs for `trainer`'s steps of `b` x `l` tokens of `model`, where it has them.
    pub fn for_trainer(trainer: &Trainer, model: &Qwen3, b: usize, l: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let wanted = std::env::var("TERNLAB_CUDA_GRAPH").map_or(true, |v| v != "0")
                && !crate::cuda::launch::profiling();
            let most = match std::env::var("TERNLAB_GRAPH_MAX_TOKENS") {
                Ok(v) => v.trim().parse::<usize>().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "TERNLAB_GRAPH_MAX_TOKENS={v:?}: give the most tokens a step may have \
                         to replay from a CUDA graph, a whole number (default {GRAPH_MAX_TOKENS})"
                    ))
                })?,
                Err(_) => GRAPH_MAX_TOKENS,
            };
            if trainer.kind == Kind::CudaStep && wanted && b * l <= most {
                let g = cuda_step::graph::StepGraph::new(model, trainer.options, b, l)?;
                return Ok(Self { inner: Some(g) });
            }
        }
        let _ = (trainer, model, b, l);
        Ok(Self::off())
    }

    /// How many ternary projections the captured step keeps from replay to replay (written by
    /// its AdamW update; `cuda_step::graph`), 0 before a capture.
    pub fn kept_projections(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.inner {
            return g.kept_projections();
        }
        0
    }

    /// Whether steps may replay from graphs.
    pub fn on(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.inner.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// To hold over each step (not over making its batch) while graphs are on: the eager step
    /// before a capture leaves candle's kernel-parameter buffers where the capture finds them
    /// (`cuda_step::graph::param_cache`).
    pub fn param_cache(&self) -> Option<Box<dyn std::any::Any>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.inner {
            return Some(g.param_cache());
        }
        None
    }

    /// The step of (x, y) replayed from the graph, `opt`'s update included (made only if the
    /// loss is finite): the loss and its CE term. None: nothing was done, run this step eagerly
    /// (`Trainer::forward`, then the backward and `opt.step`).
    pub fn step(
        &mut self,
        model: &Qwen3,
        x: &Tensor,
        y: &Tensor,
        opt: &mut crate::optim::AdamW,
    ) -> Result<Option<[f32; 2]>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.inner.as_mut() {
            return g.step(model, x, y, opt);
        }
        let _ = (model, x, y, opt);
        Ok(None)
    }
}
