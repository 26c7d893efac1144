//! The training step on CUDA written out by hand (forward, loss and backward), as llm.c's
//! `train_gpt2.cu` is: no autograd graph, only the typed launchers of `crate::cuda`. candle's
//! backprop allocates a zero tensor and adds into it for every input of every recorded op, and
//! cannot accumulate a matmul into an existing buffer; here every gradient is written once,
//! where it is needed:
//!
//! - weight gradients come out of cuBLAS in the products' dtype, rounded once from f32 sums
//!   (autograd's gradient of a bf16 product's weight is bf16 too; the fused AdamW widens it
//!   as it reads it), so there is no gradient to cast, and the ternary STE is free;
//! - projections that share their input run as one GEMM each way: q, k and v under flash
//!   attention (`qkv_fused`; the norm + RoPE and attention kernels read their columns of the
//!   output, and write their gradients' columns, in place), gate and up (`gate_up_fused`);
//!   each weight's gradient is its rows of the fused one. Otherwise the input gradients are
//!   summed by the GEMMs themselves (beta = 1). The residual stream's gradient is accumulated
//!   in place by the RMSNorm backward kernel;
//! - a step replayed from a CUDA graph multiplies by ternary projections that the previous
//!   replay's AdamW kernel wrote as it updated their latents (`prepared`);
//! - q/k RMSNorm, RoPE and the head transpose are one kernel each way;
//! - causal attention in bf16 is flash attention (`crate::cuda::flash`: tensor cores, the L x L
//!   matrix never written, q, k, v, the output and their gradients read and written in the
//!   layouts around it); otherwise (f32, or a card or head dim its kernels do not take) it runs
//!   by blocks of query positions (`crate::cuda::causal_attention`) and recomputes its
//!   probabilities in the backward when keeping every layer's would take over a quarter of the
//!   card;
//! - the cross-entropy kernel overwrites the logits with their gradient (no second (N, V)
//!   buffer). A bf16 embedding under bf16 compute gets a bf16 gradient, as autograd's: each
//!   token's rows summed in f32 in position order and added once to its row of the tied head's
//!   gradient (the same bits every run); otherwise one scatter-add of f32 atomics over all
//!   tokens.
//!
//! `forward.rs` and `backward.rs` are the two passes, `graph.rs` replays a whole step (with the
//! AdamW update) from a CUDA graph; this file holds what they share. Shapes:
//! B batch, L positions, N = B * L tokens, E hidden, H query heads, K key/value heads,
//! R = H / K, D head dim, F intermediate, V vocabulary.
//!
//! Same arithmetic as the composed graph (`Qwen3::forward` + autograd), which stays the
//! reference: `tests/fused.rs` compares the two, and the parity test runs through this step
//! on a GPU.

use crate::cuda::causal_attention::CausalAttention;
use crate::cuda::flash::Flash;
use crate::cuda::{norm, ternary, Gpu};
use crate::model::{Linear, RmsNorm, Rope};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Shape, Tensor};

mod backward;
mod forward;
pub mod graph;
mod prepared;

pub use backward::backward;
pub use forward::forward;

/// The step's sizes (see the legend above).
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    l: usize,
    n: usize,
    e: usize,
    vocab: usize,
    h: usize,
    k: usize,
    d: usize,
    r: usize,
}

impl Dims {
    fn new(cfg: &crate::model::Qwen3Config, b: usize, l: usize) -> Self {
        let (h, k) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Self {
            b,
            l,
            n: b * l,
            e: cfg.hidden_size,
            vocab: cfg.vocab_size,
            h,
            k,
            d: cfg.head_dim,
            r: h / k,
        }
    }
}

/// What both passes share: the GPU, the compute dtype of activations and matmul inputs, and
/// the norm weights widened to f32 for the kernels that need it (bf16 weights under
/// `train.dense_dtype = "checkpoint"`; the vectorized norm kernels read them as they are), made
/// once per step.
struct Ctx {
    gpu: Gpu,
    cd: DType,
    norm_f32: std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, Tensor>>,
    /// the ternary projections kept from step to step, which a replayed step multiplies by
    prepared: Option<std::sync::Arc<prepared::Prepared>>,
}

/// Whether a layer's gate and up projections run as one GEMM each way: they take the same
/// input unless only one of them quantizes its activations.
fn gate_up_fused(gate: &Linear, up: &Linear) -> bool {
    gate.act_quant == up.act_quant && up.weight.dims() == gate.weight.dims()
}

/// Whether a layer's q, k and v projections run as one GEMM each way (their output one (N,
/// H * D + 2 * K * D) matrix that the q/k norm + RoPE kernels and flash attention read in
/// place, their gradient one that those kernels write into): under flash attention, for a
/// head dim the vectorized norm + RoPE kernels take (64 or 128), where the three take the same
/// input (none or all quantize their activations). `TERNLAB_QKV_FUSED=0` keeps them apart (to
/// measure the difference).
fn qkv_fused(at: &crate::model::Attention, flash: bool, d: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("TERNLAB_QKV_FUSED").map_or(true, |v| v != "0"));
    let [q, k, v, _] = at.linears();
    let input = q.weight.dim(1).ok();
    on && flash
        && crate::cuda::attention::takes_bf16_weight(d)
        && q.act_quant == k.act_quant
        && k.act_quant == v.act_quant
        && k.weight.dim(1).ok() == input
        && v.weight.dim(1).ok() == input
}

impl Ctx {
    /// A new activation (or activation gradient) in the compute dtype, written in full later.
    fn act(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.gpu.empty(shape, self.cd)
    }

    /// The weight a projection multiplies by, in the compute dtype: `W_t` for ternary layers.
    fn weight(&self, lin: &Linear) -> Result<Tensor> {
        if let Some(kept) = self.kept_weight(lin) {
            return Ok(kept);
        }
        let Some(q) = lin.quant else {
            return self
                .gpu
                .timed("cast weight", || lin.weight.detach().to_dtype(self.cd));
        };
        let wt = self.act(lin.weight.shape())?;
        match &lin.scale {
            Some(s) => ternary::ternarize_learned(&self.gpu, &lin.weight, s, &wt, q, lin.lambda)?,
            None => ternary::ternarize(&self.gpu, &lin.weight, &wt, q, lin.lambda)?,
        }
        Ok(wt)
    }

    /// Writes the weight `lin` multiplies by (as `weight` makes it) into rows `at..` of `into`,
    /// the weight of a fused projection.
    fn weight_into(&self, lin: &Linear, into: &Tensor, at: usize) -> Result<()> {
        let Some(q) = lin.quant else {
            let w = self
                .gpu
                .timed("cast weight", || lin.weight.detach().to_dtype(self.cd))?;
            return into.slice_set(&w, 0, at);
        };
        let wt = into.narrow(0, at, lin.weight.dim(0)?)?;
        match &lin.scale {
            Some(s) => ternary::ternarize_learned(&self.gpu, &lin.weight, s, &wt, q, lin.lambda),
            None => ternary::ternarize(&self.gpu, &lin.weight, &wt, q, lin.lambda),
        }
    }

    /// Records a projection's weight gradient `dw` (f32, or bf16 from bf16 products), and the
    /// gradient of its learned scales where it has them (LSQ's, from `dw`).
    fn weight_grad(&self, grads: &mut GradStore, lin: &Linear, dw: Tensor) -> Result<()> {
        if let (Some(s), Some(q)) = (&lin.scale, lin.quant) {
            let ds = self.gpu.empty(s.shape(), DType::F32)?;
            // (from the gradient as kept: a bf16 one widened, as autograd's cast does)
            let dwf = dw.to_dtype(DType::F32)?;
            ternary::scale_grad(&self.gpu, &lin.weight, &dwf, s, &ds, q, lin.lambda)?;
            grads.insert(s, ds);
        }
        grads.insert(&lin.weight, dw);
        Ok(())
    }

    /// A norm's weight in f32, as the kernels read it.
    fn norm_weight(&self, norm: &RmsNorm) -> Result<Tensor> {
        let w = &norm.weight;
        if w.dtype() == DType::F32 {
            return Ok(w.clone());
        }
        let mut cache = self.norm_f32.borrow_mut();
        if let Some(t) = cache.get(&w.id()) {
            return Ok(t.clone());
        }
        let t = self
            .gpu
            .timed("cast norm weight", || w.detach().to_dtype(DType::F32))?;
        cache.insert(w.id(), t.clone());
        Ok(t)
    }

    /// A norm's weight as its kernels take it: the parameter itself where it is f32, or where
    /// it is bf16 and `raw_bf16` (the vectorized kernels read bf16 weights); else `norm_weight`.
    fn norm_weight_for(&self, norm: &RmsNorm, raw_bf16: bool) -> Result<Tensor> {
        if raw_bf16 && norm.weight.dtype() == DType::BF16 {
            return Ok(norm.weight.detach());
        }
        self.norm_weight(norm)
    }

    /// A hidden-sized norm's weight for `norm::rmsnorm` and `norm::backward`.
    fn hidden_norm_weight(&self, n: &RmsNorm) -> Result<Tensor> {
        self.norm_weight_for(n, norm::takes_bf16_weight(n.weight.elem_count()))
    }

    /// RMSNorm of the rows of `x`, in x's dtype.
    fn rms_norm(&self, x: &Tensor, n: &RmsNorm) -> Result<Tensor> {
        let y = self.gpu.empty(x.shape(), x.dtype())?;
        norm::rmsnorm(&self.gpu, x, &self.hidden_norm_weight(n)?, &y, n.eps as f32)?;
        Ok(y)
    }

    /// The residual stream's sum a + b and its RMSNorm (one kernel where it takes the rows).
    fn add_rms_norm(&self, a: &Tensor, b: &Tensor, n: &RmsNorm) -> Result<(Tensor, Tensor)> {
        let h = self.gpu.empty(a.shape(), a.dtype())?;
        let y = self.gpu.empty(a.shape(), a.dtype())?;
        let w = self.hidden_norm_weight(n)?;
        norm::add_rmsnorm(&self.gpu, a, b, &h, &w, &y, n.eps as f32)?;
        Ok((h, y))
    }

    /// The RMSNorm backward of the rows x: the input gradient written to `dx` (added to it
    /// when `add`), the weight's gradient added into the zeroed `dw` and returned (f32).
    fn rms_norm_back(
        &self,
        x: &Tensor,
        n: &RmsNorm,
        (dy, dx): (&Tensor, &Tensor),
        add: bool,
        dw: Tensor,
    ) -> Result<Tensor> {
        let w = self.hidden_norm_weight(n)?;
        norm::backward(&self.gpu, x, &w, dy, dx, n.eps as f32, add, Some(dw))
    }

    /// y (a, nc, nb, row) = x (a, nb, nc, row): the head transposes.
    fn swap_axes(&self, x: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
        let (a, nb, nc, row) = dims;
        let y = self.gpu.empty((a, nc, nb, row), x.dtype())?;
        crate::cuda::attention::swap_axes(&self.gpu, x, &y, dims)?;
        Ok(y)
    }
}

/// The input of one or more projections, and its 8-bit fake-quantized copy where one of them
/// quantizes its activations (`quant.activation_bits = 8`; straight-through: the input's
/// gradient is the quantized copy's).
struct Input {
    x: Tensor,
    q: Option<Tensor>,
}

impl Input {
    /// What `lin` multiplies.
    fn of(&self, lin: &Linear) -> &Tensor {
        match (&self.q, lin.act_quant) {
            (Some(q), true) => q,
            _ => &self.x,
        }
    }
}

impl Ctx {
    /// `x` as the input of `lins`.
    fn input(&self, x: Tensor, lins: &[&Linear]) -> Result<Input> {
        if !lins.iter().any(|l| l.act_quant) {
            return Ok(Input { x, q: None });
        }
        let q = self.gpu.empty(x.shape(), x.dtype())?;
        ternary::act_quant(&self.gpu, &x, &q)?;
        Ok(Input { x, q: Some(q) })
    }
}

/// What one decoder layer keeps for its backward.
struct LayerTape {
    /// q, k, v, o, gate, up, down as multiplied (compute dtype; `W_t` where ternary)
    w: [Tensor; 7],
    /// the layer's input (N, E): compute dtype, or f32 rows of the seed's bf16 first norm
    x: Tensor,
    /// input norm (N, E): the q, k and v projections' input
    xn1: Input,
    /// q, k and v as projected (q and k before their norm)
    proj: Qkv,
    /// after norm + RoPE: q (B*K, L*R, D), k (B*K, L, D); see `CausalAttention`
    qr: Tensor,
    kr: Tensor,
    /// what attention's backward needs besides qr and kr
    kept: Kept,
    /// attention output with heads merged, (N, H * D): o's input
    merged: Input,
    /// the residual stream after attention, (N, E), and its norm (gate's and up's input)
    h: Tensor,
    xn2: Input,
    /// the gate and up projections, and silu(g) * u (N, F): down's input
    gate: Gate,
    a: Input,
}

/// The q, k and v projections of a layer as its forward made them.
enum Qkv {
    /// as one GEMM: (N, qd + 2 kd), the columns of q, k, then v, by the weight (qd + 2 kd, E)
    /// of their rows
    Fused {
        qkv: Tensor,
        w: Tensor,
        qd: usize,
        kd: usize,
    },
    /// as three: q (N, H * D), k and v (N, K * D); v only under flash attention (the blocked
    /// one keeps its own transpose)
    Split {
        q: Tensor,
        k: Tensor,
        v: Option<Tensor>,
    },
}

impl Qkv {
    fn part(&self, i: usize) -> Result<crate::cuda::attention::TokenRows> {
        use crate::cuda::attention::TokenRows;
        match self {
            Self::Fused { qkv, qd, kd, .. } => {
                let (at, width) = [(0, *qd), (*qd, *kd), (qd + kd, *kd)][i];
                TokenRows::columns(qkv, at, width)
            }
            Self::Split { q, k, v } => {
                let t = match i {
                    0 => q,
                    1 => k,
                    _ => v
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg("v not kept".into()))?,
                };
                Ok(TokenRows::packed(crate::cuda::AsBuf::buf(t)?, t.dim(1)?))
            }
        }
    }

    /// q's rows (before its norm), k's, v's: where they lie.
    fn q_rows(&self) -> Result<crate::cuda::attention::TokenRows> {
        self.part(0)
    }

    fn k_rows(&self) -> Result<crate::cuda::attention::TokenRows> {
        self.part(1)
    }

    fn v_rows(&self) -> Result<crate::cuda::attention::TokenRows> {
        self.part(2)
    }
}

/// The gate and up projections of a layer as its forward made them.
enum Gate {
    /// as one GEMM: rows of g then u (N, 2F), by the weight (2F, E) of gate's rows then up's
    Fused { gu: Tensor, w: Tensor },
    /// as two (their inputs differ: one of them quantizes its activations): (N, F) each
    Split { g: Tensor, u: Tensor },
}

/// How the step runs causal attention.
enum Attention {
    Flash(Flash),
    Blocked(CausalAttention),
}

/// What one layer's attention keeps for the backward.
enum Kept {
    /// each query row's log-sum-exp (B*K, L*R) f32 (v is the layer's `Qkv`)
    Flash { lse: Tensor },
    /// v with heads first (B*K, L, D), and the probabilities (B*K, L*R, L), None when the
    /// backward recomputes them
    Blocked { vt: Tensor, probs: Option<Tensor> },
}

/// The loss of a step and its terms (f32 scalars): see `trainer::StepForward`.
pub struct Terms {
    pub total: Tensor,
    pub ce: Tensor,
    pub kl: Option<Tensor>,
}

/// Everything the backward needs from one forward pass.
pub struct Tape {
    ctx: Ctx,
    dims: Dims,
    /// token ids (N), u32
    ids: Tensor,
    attn: Attention,
    rope: Rope,
    layers: Vec<LayerTape>,
    /// the last layer's output (N, E), its final norm, the head (V, E) as multiplied
    x_last: Tensor,
    xf: Tensor,
    head: Tensor,
    /// the logits' gradient (N, V), written by the loss kernel over the logits
    dlogits: Tensor,
}
