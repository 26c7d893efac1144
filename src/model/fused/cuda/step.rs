//! The training step on CUDA written out by hand (forward, loss and backward), as llm.c does:
//! no autograd graph. candle's backprop allocates a zero tensor and adds into it for every
//! input of every recorded op, and cannot accumulate a matmul into an existing buffer; here
//! every gradient is written once, where it is needed:
//!
//! - weight gradients come out of cuBLAS in f32 directly (bf16 inputs, f32 accumulate and
//!   output), so there is no bf16 gradient to cast, and the ternary STE is free;
//! - the gradients of the q, k and v inputs (and of gate and up) are summed by the GEMMs
//!   themselves (beta = 1); the residual stream's gradient is accumulated in place by the
//!   RMSNorm backward kernel;
//! - q/k RMSNorm, RoPE and the head transpose are one kernel each way;
//! - the cross-entropy kernel overwrites the logits with their gradient (no second (N, V)
//!   buffer), and the embedding gradient is one scatter-add over all tokens.
//!
//! Same arithmetic as the composed graph (`Qwen3::forward` + autograd), which stays the
//! reference: `tests/fused.rs` compares the two, and the parity test runs through this step
//! on a GPU.

use super::*;
use crate::model::qwen3::{Linear, Qwen3, RmsNorm, Rope};
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as bsys};
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CudaDevice, Device, Storage};

/// A kernel argument.
enum Arg {
    P(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}
use Arg::*;

/// The device address of a contiguous CUDA tensor's first element.
fn ptr(t: &Tensor) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        candle_core::bail!("the CUDA training step needs every tensor on the GPU");
    };
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("the CUDA training step needs contiguous tensors");
    };
    let stream = cs.device().cuda_stream();
    let (p, size) = match cs.dtype() {
        DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
        DType::U32 => (cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0, 4),
        other => candle_core::bail!("the CUDA training step does not take {other:?} tensors"),
    };
    Ok(p + (start * size) as u64)
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A row-major matrix operand of a GEMM: its address and whether it is used transposed.
#[derive(Clone, Copy)]
struct M {
    p: u64,
    t: bool,
}

fn m(t: &Tensor) -> Result<M> {
    Ok(M {
        p: ptr(t)?,
        t: false,
    })
}

fn mt(t: &Tensor) -> Result<M> {
    Ok(M {
        p: ptr(t)?,
        t: true,
    })
}

struct Ctx {
    dev: CudaDevice,
    device: Device,
    /// Activations and matmul inputs.
    cd: DType,
}

impl Ctx {
    fn empty(&self, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        // Every buffer made here is written in full before it is read.
        unsafe { Tensor::empty(shape, dtype, &self.device) }
    }

    fn act(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.empty(shape, self.cd)
    }

    fn launch(&self, kernel: &str, dtype: DType, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let name = format!("{kernel}_{}", suffix(dtype)?);
        let f = self.dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let mut b = f.builder();
        for a in args {
            match a {
                P(p) => b.arg(p),
                I64(v) => b.arg(v),
                I32(v) => b.arg(v),
                F32(v) => b.arg(v),
            };
        }
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// Row-major `C (m, n) = op(A) (m, k) @ op(B) (k, n) + beta * C`, `batch` times with the
    /// given element strides. A and B are in the compute dtype; C in f32 when `c_f32` (weight
    /// gradients), else in the compute dtype. f32 accumulation throughout (TF32 for f32 inputs
    /// when `train.dtype = "tf32"` set candle's flag).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (mm, nn, kk): (usize, usize, usize),
        a: M,
        b: M,
        c: &Tensor,
        beta: f32,
        batch: usize,
        (sa, sb, sc): (usize, usize, usize),
    ) -> Result<()> {
        use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let ty = |d: DType| match d {
            DType::BF16 => bsys::cudaDataType_t::CUDA_R_16BF,
            _ => bsys::cudaDataType_t::CUDA_R_32F,
        };
        let compute =
            if self.cd == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            };
        // cuBLAS is column-major: compute C^T (n, m) = op(B)^T @ op(A)^T.
        let (op_b, ldb) = if b.t {
            (CUBLAS_OP_T, kk)
        } else {
            (CUBLAS_OP_N, nn)
        };
        let (op_a, lda) = if a.t {
            (CUBLAS_OP_T, mm)
        } else {
            (CUBLAS_OP_N, kk)
        };
        let (alpha, beta) = (1f32, beta);
        let blas_handle = self.dev.cublas_handle();
        let cp = ptr(c)?;
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas_handle.handle(),
                op_b,
                op_a,
                nn as i32,
                mm as i32,
                kk as i32,
                &alpha as *const f32 as *const _,
                b.p as *const _,
                ty(self.cd),
                ldb as i32,
                sb as i64,
                a.p as *const _,
                ty(self.cd),
                lda as i32,
                sa as i64,
                &beta as *const f32 as *const _,
                cp as *mut _,
                ty(c.dtype()),
                nn as i32,
                sc as i64,
                batch as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS GEMM: {e:?}")))
    }

    /// `x (n, in) @ w^T` with w (out, in): a projection's output, (n, out).
    fn project(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (n, inp) = x.dims2()?;
        let out_dim = w.dim(0)?;
        let y = self.act((n, out_dim))?;
        self.gemm((n, out_dim, inp), m(x)?, mt(w)?, &y, 0., 1, (0, 0, 0))?;
        Ok(y)
    }

    /// `dx (+)= dy (n, out) @ w (out, in)`.
    fn project_back_x(&self, dy: &Tensor, w: &Tensor, dx: &Tensor, beta: f32) -> Result<()> {
        let (n, out_dim) = dy.dims2()?;
        let inp = w.dim(1)?;
        self.gemm((n, inp, out_dim), m(dy)?, m(w)?, dx, beta, 1, (0, 0, 0))
    }

    /// `dw = dy^T (out, n) @ x (n, in)`, in f32.
    fn project_back_w(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (n, out_dim) = dy.dims2()?;
        let inp = x.dim(1)?;
        let dw = self.empty((out_dim, inp), DType::F32)?;
        self.gemm((out_dim, inp, n), mt(dy)?, m(x)?, &dw, 0., 1, (0, 0, 0))?;
        Ok(dw)
    }

    /// The weight a projection multiplies by, in the compute dtype: `W_t` for ternary layers.
    fn weight(&self, lin: &Linear) -> Result<Tensor> {
        let w = lin.weight.detach();
        let Some(g) = lin.ternary_group else {
            return w.to_dtype(self.cd);
        };
        let (out_dim, inp) = w.dims2()?;
        let wt = self.act((out_dim, inp))?;
        let groups = out_dim * inp / g;
        let cfg = LaunchConfig {
            grid_dim: ((groups * 32).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [P(ptr(&w)?), P(ptr(&wt)?), I64(groups as i64), I32(g as i32)];
        self.launch("ternarize", self.cd, cfg, &args)?;
        Ok(wt)
    }

    fn rms_norm(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        let (rows, d) = x.dims2()?;
        let y = self.act((rows, d))?;
        let args = [
            P(ptr(x)?),
            P(ptr(&norm.weight)?),
            P(ptr(&y)?),
            I64(rows as i64),
            I32(d as i32),
            F32(norm.eps as f32),
        ];
        self.launch("rmsnorm_fwd", self.cd, warp_per_row(rows), &args)?;
        Ok(y)
    }

    /// The RMSNorm backward for the input x (rows, d) given dy: written to `dx`, or added to
    /// it when `add`; returns the weight's gradient (d) in f32.
    fn rms_norm_back(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        dy: &Tensor,
        dx: &Tensor,
        add: bool,
    ) -> Result<Tensor> {
        let (rows, d) = x.dims2()?;
        let eps = norm.eps as f32;
        let kernel = if add {
            "rmsnorm_bwd_x_add"
        } else {
            "rmsnorm_bwd_x"
        };
        let args = [
            P(ptr(x)?),
            P(ptr(&norm.weight)?),
            P(ptr(dy)?),
            P(ptr(dx)?),
            I64(rows as i64),
            I32(d as i32),
            F32(eps),
        ];
        self.launch(kernel, self.cd, warp_per_row(rows), &args)?;
        let dw = Tensor::zeros(d, DType::F32, &self.device)?;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            P(ptr(x)?),
            P(ptr(dy)?),
            P(ptr(&dw)?),
            I64(rows as i64),
            I32(d as i32),
            F32(eps),
        ];
        self.launch("rmsnorm_bwd_w", self.cd, cfg, &args)?;
        Ok(dw)
    }
}

/// What one decoder layer keeps for its backward.
struct LayerTape {
    /// q, k, v, o, gate, up, down as multiplied (compute dtype; `W_t` where ternary).
    w: [Tensor; 7],
    x: Tensor,
    xn1: Tensor,
    /// q and k before their norm, (N, heads * D)
    q: Tensor,
    k: Tensor,
    /// after norm + RoPE, (B, heads, L, D)
    qr: Tensor,
    kr: Tensor,
    /// (B, K, L, D)
    vt: Tensor,
    /// (B, H, L, L)
    probs: Tensor,
    /// attention output with heads merged, (N, H * D)
    merged: Tensor,
    h: Tensor,
    xn2: Tensor,
    g: Tensor,
    u: Tensor,
    a: Tensor,
}

/// Everything the backward needs from one forward pass.
pub struct Tape {
    ctx: Ctx,
    ids: Tensor,
    bl: (usize, usize),
    rope: Rope,
    layers: Vec<LayerTape>,
    x_last: Tensor,
    xf: Tensor,
    head: Tensor,
    /// The logits' gradient (N, V), written by the loss kernel over the logits.
    dlogits: Tensor,
}

/// Forward pass and loss of one batch: the mean token cross-entropy (f32 scalar) and the tape
/// for `backward`.
pub fn forward(model: &Qwen3, ids: &Tensor, targets: &Tensor) -> Result<(Tensor, Tape)> {
    let Device::Cuda(dev) = &model.device else {
        candle_core::bail!("the CUDA training step needs a CUDA device");
    };
    let ctx = Ctx {
        dev: dev.clone(),
        device: model.device.clone(),
        cd: model.compute_dtype,
    };
    let cfg = &model.cfg;
    let (b, l) = ids.dims2()?;
    let n = b * l;
    let (e, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let (h, k, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let r = h / k;
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    let rope = Rope::new(cfg, l, &model.device)?;
    let scale = 1.0 / (d as f32).sqrt();

    let mut x = ctx.act((n, e))?;
    let args = [
        P(ptr(&model.embed_tokens)?),
        P(ptr(&ids)?),
        P(ptr(&x)?),
        I64(n as i64),
        I32(e as i32),
    ];
    ctx.launch("embed_fwd", ctx.cd, elementwise(n * e), &args)?;

    let norm_rope = |t: &Tensor, norm: &RmsNorm, heads: usize| -> Result<Tensor> {
        let y = ctx.act((b, heads, l, d))?;
        let args = [
            P(ptr(t)?),
            P(ptr(&norm.weight)?),
            P(ptr(&rope.cos)?),
            P(ptr(&rope.sin)?),
            P(ptr(&y)?),
            I64((n * heads) as i64),
            I32(heads as i32),
            I32(l as i32),
            I32(d as i32),
            F32(norm.eps as f32),
        ];
        ctx.launch("norm_rope", ctx.cd, warp_per_row(n * heads), &args)?;
        Ok(y)
    };

    let mut layers = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        let (at, mlp) = (&layer.self_attn, &layer.mlp);
        let w = [
            ctx.weight(&at.q_proj)?,
            ctx.weight(&at.k_proj)?,
            ctx.weight(&at.v_proj)?,
            ctx.weight(&at.o_proj)?,
            ctx.weight(&mlp.gate_proj)?,
            ctx.weight(&mlp.up_proj)?,
            ctx.weight(&mlp.down_proj)?,
        ];
        let xn1 = ctx.rms_norm(&x, &layer.input_layernorm)?;
        let q = ctx.project(&xn1, &w[0])?;
        let kk = ctx.project(&xn1, &w[1])?;
        let v = ctx.project(&xn1, &w[2])?;
        let qr = norm_rope(&q, &at.q_norm, h)?;
        let kr = norm_rope(&kk, &at.k_norm, k)?;
        let vt = v.reshape((b, l, k, d))?.transpose(1, 2)?.contiguous()?;
        // Grouped-query attention: query heads k*R .. k*R+R share key/value head k, so each
        // (batch, kv head) is one GEMM over R*L query rows.
        let probs = ctx.act((b, h, l, l))?;
        let batch = b * k;
        ctx.gemm(
            (r * l, l, d),
            m(&qr)?,
            mt(&kr)?,
            &probs,
            0.,
            batch,
            (r * l * d, l * d, r * l * l),
        )?;
        let pp = ptr(&probs)?;
        let args = [
            P(pp),
            P(pp),
            I64((b * h * l) as i64),
            I32(l as i32),
            F32(scale),
        ];
        ctx.launch("causal_softmax", ctx.cd, warp_per_row(b * h * l), &args)?;
        let att = ctx.act((b, h, l, d))?;
        ctx.gemm(
            (r * l, d, l),
            m(&probs)?,
            m(&vt)?,
            &att,
            0.,
            batch,
            (r * l * l, l * d, r * l * d),
        )?;
        let merged = att.transpose(1, 2)?.contiguous()?.reshape((n, h * d))?;
        let o = ctx.project(&merged, &w[3])?;
        let hres = (&x + o)?;
        let xn2 = ctx.rms_norm(&hres, &layer.post_attention_layernorm)?;
        let g = ctx.project(&xn2, &w[4])?;
        let u = ctx.project(&xn2, &w[5])?;
        let f = g.dim(1)?;
        let a = ctx.act((n, f))?;
        let args = [P(ptr(&g)?), P(ptr(&u)?), P(ptr(&a)?), I64((n * f) as i64)];
        ctx.launch("silu_mul", ctx.cd, elementwise(n * f), &args)?;
        let down = ctx.project(&a, &w[6])?;
        let next = (&hres + down)?;
        layers.push(LayerTape {
            w,
            x,
            xn1,
            q,
            k: kk,
            qr,
            kr,
            vt,
            probs,
            merged,
            h: hres,
            xn2,
            g,
            u,
            a,
        });
        x = next;
    }
    let xf = ctx.rms_norm(&x, &model.norm)?;
    let head = model
        .lm_head
        .as_ref()
        .unwrap_or(&model.embed_tokens)
        .detach()
        .to_dtype(ctx.cd)?;
    let logits = ctx.act((n, vocab))?;
    ctx.gemm(
        (n, vocab, e),
        m(&xf)?,
        mt(&head)?,
        &logits,
        0.,
        1,
        (0, 0, 0),
    )?;
    let rows = ctx.empty(n, DType::F32)?;
    let args = [
        P(ptr(&logits)?),
        P(ptr(&targets)?),
        P(ptr(&rows)?),
        I64(n as i64),
        I32(vocab as i32),
        F32(1.0 / n as f32),
    ];
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    ctx.launch("cross_entropy_grad", ctx.cd, cfg, &args)?;
    let loss = rows.mean_all()?;
    Ok((
        loss,
        Tape {
            ctx,
            ids,
            bl: (b, l),
            rope,
            layers,
            x_last: x,
            xf,
            head,
            dlogits: logits,
        },
    ))
}

/// The gradient of the mean loss for every parameter of `model` (f32, keyed like autograd's).
pub fn backward(model: &Qwen3, tape: Tape) -> Result<GradStore> {
    let Tape {
        ctx,
        ids,
        bl: (b, l),
        rope,
        mut layers,
        x_last,
        xf,
        head,
        dlogits,
    } = tape;
    let cfg = &model.cfg;
    let n = b * l;
    let (e, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let (h, k, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let r = h / k;
    let scale = 1.0 / (d as f32).sqrt();
    let mut grads = GradStore::default();

    // Output head and final norm.
    let dxf = ctx.act((n, e))?;
    ctx.gemm(
        (n, e, vocab),
        m(&dlogits)?,
        m(&head)?,
        &dxf,
        0.,
        1,
        (0, 0, 0),
    )?;
    let dhead = ctx.empty((vocab, e), DType::F32)?;
    ctx.gemm(
        (vocab, e, n),
        mt(&dlogits)?,
        m(&xf)?,
        &dhead,
        0.,
        1,
        (0, 0, 0),
    )?;
    drop((dlogits, head, xf));
    let dx = ctx.act((n, e))?;
    let dw = ctx.rms_norm_back(&x_last, &model.norm, &dxf, &dx, false)?;
    grads.insert(&model.norm.weight, dw);
    drop((dxf, x_last));

    let rope_back = |dy: &Tensor, heads: usize| -> Result<Tensor> {
        let g = ctx.act((n, heads * d))?;
        let args = [
            P(ptr(dy)?),
            P(ptr(&rope.cos)?),
            P(ptr(&rope.sin)?),
            P(ptr(&g)?),
            I64((n * heads * d) as i64),
            I32(heads as i32),
            I32(l as i32),
            I32(d as i32),
        ];
        ctx.launch(
            "rope_bwd_untranspose",
            ctx.cd,
            elementwise(n * heads * d),
            &args,
        )?;
        Ok(g)
    };

    for layer in model.layers.iter().rev() {
        let t = layers.pop().expect("one tape per layer");
        let (at, mlp) = (&layer.self_attn, &layer.mlp);
        let [wq, wk, wv, wo, wg, wu, wd] = &t.w;
        // MLP: next = h + down(silu(g) * u)
        let f = t.g.dim(1)?;
        let da = ctx.act((n, f))?;
        ctx.project_back_x(&dx, wd, &da, 0.)?;
        grads.insert(&mlp.down_proj.weight, ctx.project_back_w(&dx, &t.a)?);
        let (dg, du) = (ctx.act((n, f))?, ctx.act((n, f))?);
        let args = [
            P(ptr(&t.g)?),
            P(ptr(&t.u)?),
            P(ptr(&da)?),
            P(ptr(&dg)?),
            P(ptr(&du)?),
            I64((n * f) as i64),
        ];
        ctx.launch("silu_mul_bwd", ctx.cd, elementwise(n * f), &args)?;
        drop(da);
        let dxn2 = ctx.act((n, e))?;
        ctx.project_back_x(&dg, wg, &dxn2, 0.)?;
        ctx.project_back_x(&du, wu, &dxn2, 1.)?;
        grads.insert(&mlp.gate_proj.weight, ctx.project_back_w(&dg, &t.xn2)?);
        grads.insert(&mlp.up_proj.weight, ctx.project_back_w(&du, &t.xn2)?);
        drop((dg, du));
        let dw = ctx.rms_norm_back(&t.h, &layer.post_attention_layernorm, &dxn2, &dx, true)?;
        grads.insert(&layer.post_attention_layernorm.weight, dw);
        drop(dxn2);

        // Attention: h = x + o_proj(attention(norm(x)))
        let dmerged = ctx.act((n, h * d))?;
        ctx.project_back_x(&dx, wo, &dmerged, 0.)?;
        grads.insert(&at.o_proj.weight, ctx.project_back_w(&dx, &t.merged)?);
        let datt = dmerged
            .reshape((b, l, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        drop(dmerged);
        let batch = b * k;
        let dp = ctx.act((b, h, l, l))?;
        ctx.gemm(
            (r * l, l, d),
            m(&datt)?,
            mt(&t.vt)?,
            &dp,
            0.,
            batch,
            (r * l * d, l * d, r * l * l),
        )?;
        let dvt = ctx.act((b, k, l, d))?;
        ctx.gemm(
            (l, d, r * l),
            mt(&t.probs)?,
            m(&datt)?,
            &dvt,
            0.,
            batch,
            (r * l * l, r * l * d, l * d),
        )?;
        drop(datt);
        let dpp = ptr(&dp)?;
        let args = [
            P(ptr(&t.probs)?),
            P(dpp),
            P(dpp),
            I64((b * h * l) as i64),
            I32(l as i32),
            F32(scale),
        ];
        ctx.launch("causal_softmax_bwd", ctx.cd, warp_per_row(b * h * l), &args)?;
        let dqr = ctx.act((b, h, l, d))?;
        ctx.gemm(
            (r * l, d, l),
            m(&dp)?,
            m(&t.kr)?,
            &dqr,
            0.,
            batch,
            (r * l * l, l * d, r * l * d),
        )?;
        let dkr = ctx.act((b, k, l, d))?;
        ctx.gemm(
            (l, d, r * l),
            mt(&dp)?,
            m(&t.qr)?,
            &dkr,
            0.,
            batch,
            (r * l * l, r * l * d, l * d),
        )?;
        drop(dp);
        let gq = rope_back(&dqr, h)?;
        let gk = rope_back(&dkr, k)?;
        drop((dqr, dkr));
        let dq = ctx.act((n * h, d))?;
        let dw = ctx.rms_norm_back(
            &t.q.reshape((n * h, d))?,
            &at.q_norm,
            &gq.reshape((n * h, d))?,
            &dq,
            false,
        )?;
        grads.insert(&at.q_norm.weight, dw);
        let dk = ctx.act((n * k, d))?;
        let dw = ctx.rms_norm_back(
            &t.k.reshape((n * k, d))?,
            &at.k_norm,
            &gk.reshape((n * k, d))?,
            &dk,
            false,
        )?;
        grads.insert(&at.k_norm.weight, dw);
        drop((gq, gk));
        let (dq, dk) = (dq.reshape((n, h * d))?, dk.reshape((n, k * d))?);
        let dv = dvt.transpose(1, 2)?.contiguous()?.reshape((n, k * d))?;
        drop(dvt);
        let dxn1 = ctx.act((n, e))?;
        ctx.project_back_x(&dq, wq, &dxn1, 0.)?;
        ctx.project_back_x(&dk, wk, &dxn1, 1.)?;
        ctx.project_back_x(&dv, wv, &dxn1, 1.)?;
        grads.insert(&at.q_proj.weight, ctx.project_back_w(&dq, &t.xn1)?);
        grads.insert(&at.k_proj.weight, ctx.project_back_w(&dk, &t.xn1)?);
        grads.insert(&at.v_proj.weight, ctx.project_back_w(&dv, &t.xn1)?);
        drop((dq, dk, dv));
        let dw = ctx.rms_norm_back(&t.x, &layer.input_layernorm, &dxn1, &dx, true)?;
        grads.insert(&layer.input_layernorm.weight, dw);
    }

    // Embedding: the rows of the tokens seen get their input gradient, added to the head's
    // gradient when the head is tied.
    let demb = match &model.lm_head {
        Some(lm_head) => {
            grads.insert(lm_head, dhead);
            Tensor::zeros((vocab, e), DType::F32, &ctx.device)?
        }
        None => dhead,
    };
    let args = [
        P(ptr(&dx)?),
        P(ptr(&ids)?),
        P(ptr(&demb)?),
        I64(n as i64),
        I32(e as i32),
    ];
    ctx.launch("embed_bwd", ctx.cd, elementwise(n * e), &args)?;
    grads.insert(&model.embed_tokens, demb);
    Ok(grads)
}
