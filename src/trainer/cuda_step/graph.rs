//! The step replayed from a CUDA graph. At Qwen3-0.6B shapes a step is ~1,700 launches (GEMMs
//! and kernels); at the seed's 4 x 256 most of them take a few microseconds on the GPU, so the
//! host's launch work sets the pace. The whole step (forward, loss, backward, AdamW update) is
//! captured once into one graph and replayed:
//!
//! - the loss and its CE term land in a buffer of the graph's own, read after the replay; the
//!   AdamW kernel reads the loss first and updates nothing unless it is finite, so a step whose
//!   loss is not finite changes nothing, as in the eager loop (which reads the loss before the
//!   backward);
//! - the AdamW kernel reads its scalars (this step's learning rate and bias correction) from a
//!   table written before each replay (`AdamW::replay_step`);
//! - the step multiplies by ternary projections kept from the previous replay, which its AdamW
//!   kernel writes as it updates their latents (`prepared`: filled by the projection kernels
//!   before a replay that follows an eager step; `TERNLAB_KEPT_PROJECTIONS=0` makes them in
//!   the step instead, as an eager step does).
//!
//! Every buffer a captured step uses stays where it was: the batch is copied into two buffers
//! of the graph's own, the rotary tables are made beforehand, and the activations and
//! gradients are allocated and freed by the graph itself (CUDA graph memory nodes). What a
//! kernel takes as an argument is fixed at capture: the batch shape and the quantization
//! warm-up's lambda, so a step whose lambda differs from the captured one runs eagerly and the
//! graph is captured again once lambda stays put (after `quant.lambda_warmup_steps`).
//! Distillation and data parallelism step eagerly. The arithmetic is the eager step's, kernel
//! for kernel.
//!
//! Some of candle's kernels take their shapes and strides from a small buffer copied from the
//! host at each launch, which a capture must not do. While `param_cache` lives, candle keeps
//! those buffers on the device by content; the eager step before a capture runs under it, so
//! the capture finds every one it needs (and a miss fails the capture, which then falls back
//! to eager steps, rather than capturing a copy from freed host memory).

use super::backward::backward;
use super::forward::{forward_with, recompute_attention, uses_flash};
use super::prepared::Prepared;
use crate::cuda::{AsBuf, Gpu};
use crate::model::{Qwen3, Rope};
use crate::optim::AdamW;
use crate::trainer::StepOptions;
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaGraph, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// Keeps candle's kernel-parameter buffers on the device while it lives (see above). Not
/// around anything that copies data from the host (batches): those would be kept too.
pub fn param_cache(gpu: &Gpu) -> Box<dyn std::any::Any> {
    Box::new(gpu.dev.enable_cuda_graph_htod_cache())
}

/// What a captured step assumes besides its buffers: the batch shape and every projection's
/// lambda (kernel arguments).
#[derive(Clone, PartialEq, Debug)]
struct Key {
    b: usize,
    l: usize,
    lambdas: Vec<u32>,
}

impl Key {
    fn of(model: &Qwen3, x: &Tensor) -> Result<Self> {
        let (b, l) = x.dims2()?;
        let lambdas = model
            .layers
            .iter()
            .flat_map(|layer| {
                let (a, m) = (layer.self_attn.linears(), layer.mlp.linears());
                a.into_iter().chain(m).map(|lin| lin.lambda.to_bits())
            })
            .collect();
        Ok(Self { b, l, lambdas })
    }
}

struct Captured {
    key: Key,
    graph: CudaGraph,
}

/// The graph of a run's step and the buffers it reads.
pub struct StepGraph {
    gpu: Gpu,
    stream: Arc<CudaStream>,
    opts: StepOptions,
    /// the batch, (B, L) u32 ids and targets
    ids: Tensor,
    targets: Tensor,
    /// the loss and its CE term, f32 (2)
    terms: Tensor,
    rope: Rope,
    captured: Option<Captured>,
    /// the key of the last step that ran eagerly: the next step with the same is captured
    last_eager: Option<Key>,
    /// capturing failed (said once): every step runs eagerly
    off: bool,
    /// the projections the captured step multiplies by, and whether they are those of the
    /// latents as they are (false after an eager step)
    prepared: Option<Arc<Prepared>>,
    prepared_fresh: bool,
}

/// Whether a captured step keeps its ternary projections from replay to replay (see above).
fn keep_projections() -> bool {
    std::env::var("TERNLAB_KEPT_PROJECTIONS").map_or(true, |v| v != "0")
}

impl StepGraph {
    /// Graphs for steps of `b` x `l` tokens of `model` with `opts`.
    pub fn new(model: &Qwen3, opts: StepOptions, b: usize, l: usize) -> Result<Self> {
        let gpu = Gpu::of(&model.device)?;
        let mut opts = opts;
        // (the card's memory is asked now: nothing may ask the driver inside a capture)
        opts.attention_recompute = Some(
            opts.attention_recompute
                .unwrap_or_else(|| recompute_attention(model, &gpu, b, l)),
        );
        Ok(Self {
            gpu: gpu.clone(),
            stream: gpu.dev.cuda_stream(),
            opts,
            ids: gpu.zeros((b, l), DType::U32)?,
            targets: gpu.zeros((b, l), DType::U32)?,
            terms: gpu.zeros(2, DType::F32)?,
            rope: Rope::new(&model.cfg, l, &model.device)?,
            captured: None,
            last_eager: None,
            off: false,
            prepared: None,
            prepared_fresh: false,
        })
    }

    /// How many ternary projections the captured step keeps (0 before a capture).
    pub fn kept_projections(&self) -> usize {
        self.prepared.as_ref().map_or(0, |p| p.len())
    }

    /// `param_cache` on this graph's GPU.
    pub fn param_cache(&self) -> Box<dyn std::any::Any> {
        param_cache(&self.gpu)
    }

    /// The step of batch (x, y) replayed from the graph, captured first when the previous step
    /// ran eagerly with the same key: its loss and CE term, `opt`'s update made (if the loss
    /// is finite). None: this step runs eagerly, nothing done (the first step, a lambda still
    /// warming up, or capturing failed).
    pub fn step(
        &mut self,
        model: &Qwen3,
        x: &Tensor,
        y: &Tensor,
        opt: &mut AdamW,
    ) -> Result<Option<[f32; 2]>> {
        let key = Key::of(model, x)?;
        if self.captured.as_ref().is_some_and(|c| c.key != key) {
            self.captured = None;
        }
        if self.captured.is_none() {
            let now = !self.off
                && self.last_eager.as_ref() == Some(&key)
                && (key.b, key.l) == self.ids.dims2()?;
            if !now {
                self.last_eager = Some(key);
                // (this step updates the latents eagerly: the kept projections go stale)
                self.prepared_fresh = false;
                return Ok(None);
            }
            match self.capture(model, opt) {
                Ok(graph) => self.captured = Some(Captured { key, graph }),
                Err(e) => {
                    eprintln!(
                        "note: the training step could not be captured in a CUDA graph ({e}); \
                         it runs launch by launch"
                    );
                    self.off = true;
                    self.prepared = None;
                    opt.write_projections(Vec::new())?;
                    self.last_eager = Some(key);
                    return Ok(None);
                }
            }
        }
        self.copy_batch(x, y)?;
        if let Some(p) = self.prepared.as_ref().filter(|_| !self.prepared_fresh) {
            // The captured key holds this step's lambdas: the projections the capture assumed.
            p.fill(model)?;
        }
        // (a replay leaves them fresh: its update writes them, or, with a loss that is not
        // finite, changes neither them nor the latents)
        self.prepared_fresh = true;
        opt.replay_step()?;
        let c = self.captured.as_ref().expect("captured above");
        c.graph.launch().w()?;
        let t = self.terms.to_vec1::<f32>()?;
        Ok(Some([t[0], t[1]]))
    }

    /// Copies the batch into the graph's buffers (stream-ordered, before the replay).
    fn copy_batch(&self, x: &Tensor, y: &Tensor) -> Result<()> {
        for (src, dst) in [(x, &self.ids), (y, &self.targets)] {
            let src = src.to_dtype(DType::U32)?.contiguous()?;
            let (s, d) = (src.buf()?, dst.buf()?);
            if s.n() != d.n() {
                candle_core::bail!("a batch of {:?} for a step graph of {:?}", s.dims, d.dims);
            }
            // SAFETY: both buffers hold s.n() u32 on this device; the copy is stream-ordered.
            unsafe {
                result::memcpy_dtod_async(d.p, s.p, 4 * s.n(), self.stream.cu_stream()).w()?;
            }
        }
        Ok(())
    }

    /// Captures the step: forward, the loss terms into `terms`, backward, `opt`'s update.
    fn capture(&mut self, model: &Qwen3, opt: &mut AdamW) -> Result<CudaGraph> {
        // The kept projections' buffers are the run's (made outside the capture, once), filled
        // before the first replay; the update writes them at the captured lambdas.
        if self.prepared.is_none() && keep_projections() {
            let flash = uses_flash(model, &self.opts, &self.gpu)?;
            let cd = model.compute_dtype;
            self.prepared = Prepared::new(model, &self.gpu, cd, flash)?.map(Arc::new);
        }
        self.prepared_fresh = false;
        opt.write_projections(match &self.prepared {
            Some(p) => p.writes(model),
            None => Vec::new(),
        })?;
        crate::device::trim_memory_pool(&model.device);
        let _cache = param_cache(&self.gpu);
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let mut run = || -> Result<()> {
            let (ids, targets, rope) = (&self.ids, &self.targets, self.rope.clone());
            let prepared = self.prepared.clone();
            let (terms, tape) =
                forward_with(model, &self.opts, ids, targets, None, rope, prepared)?;
            let out = self.terms.buf()?;
            for (i, t) in [&terms.total, &terms.ce].into_iter().enumerate() {
                // SAFETY: f32 scalars into the 2-element f32 buffer; stream-ordered.
                unsafe {
                    result::memcpy_dtod_async(
                        out.p + 4 * i as u64,
                        t.buf()?.p,
                        4,
                        self.stream.cu_stream(),
                    )
                    .w()?;
                }
            }
            drop(terms);
            let grads = backward(model, tape)?;
            opt.record_step(&grads, out.p)
        };
        let recorded = run();
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .w();
        match (recorded, graph) {
            (Ok(()), Ok(Some(g))) => Ok(g),
            (Err(e), _) | (_, Err(e)) => Err(e),
            (_, Ok(None)) => candle_core::bail!("the capture made no graph"),
        }
    }
}
