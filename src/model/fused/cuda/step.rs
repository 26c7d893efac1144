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
//! - causal attention runs by blocks of query positions against the keys up to each block's
//!   end (`Attn`), and recomputes its probabilities in the backward when keeping every
//!   layer's would take over a quarter of the card;
//! - the cross-entropy kernel overwrites the logits with their gradient (no second (N, V)
//!   buffer), and the embedding gradient is one scatter-add over all tokens (f32 atomics, so
//!   GPU runs are not bitwise reproducible).
//!
//! `TERNLAB_PROFILE=1` times every op alone (see `take_profile`).
//!
//! Same arithmetic as the composed graph (`Qwen3::forward` + autograd), which stays the
//! reference: `tests/fused.rs` compares the two, and the parity test runs through this step
//! on a GPU.

use super::*;
use crate::model::qwen3::{Linear, Qwen3, RmsNorm, Rope};
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as bsys};
use candle_core::Device;

/// `TERNLAB_PROFILE=1`: every kernel, GEMM and copy of the step runs alone (a device sync
/// before and after) and its time is added to a table by name; `ternlab bench` prints it.
fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TERNLAB_PROFILE").is_ok_and(|v| v == "1"))
}

type Profile = std::collections::BTreeMap<String, (f64, usize)>;
static PROFILE: std::sync::Mutex<Profile> = std::sync::Mutex::new(Profile::new());

/// The profile so far (name -> (seconds, calls)), emptied.
pub fn take_profile() -> Vec<(String, f64, usize)> {
    let mut p = PROFILE.lock().expect("profile lock");
    std::mem::take(&mut *p)
        .into_iter()
        .map(|(k, (s, n))| (k, s, n))
        .collect()
}

/// A row-major matrix operand of a GEMM: its address, whether it is used transposed, and its
/// row stride in elements (0: packed).
#[derive(Clone, Copy)]
struct M {
    p: u64,
    t: bool,
    ld: usize,
}

impl M {
    /// The same matrix `rows` rows and `cols` columns further on (a block of a bigger one).
    fn at(self, elems: usize, dtype: DType) -> Self {
        Self {
            p: self.p + (elems * dtype.size_in_bytes()) as u64,
            ..self
        }
    }

    fn ld(self, ld: usize) -> Self {
        Self { ld, ..self }
    }
}

fn m(t: &Tensor) -> Result<M> {
    Ok(M {
        p: ptr(t)?,
        t: false,
        ld: 0,
    })
}

fn mt(t: &Tensor) -> Result<M> {
    Ok(M {
        p: ptr(t)?,
        t: true,
        ld: 0,
    })
}

/// A GEMM's output: address, row stride (0: packed) and dtype.
#[derive(Clone, Copy)]
struct Out {
    p: u64,
    ld: usize,
    dtype: DType,
}

fn out(t: &Tensor) -> Result<Out> {
    Ok(Out {
        p: ptr(t)?,
        ld: 0,
        dtype: t.dtype(),
    })
}

impl Out {
    fn at(self, elems: usize) -> Self {
        Self {
            p: self.p + (elems * self.dtype.size_in_bytes()) as u64,
            ..self
        }
    }

    fn ld(self, ld: usize) -> Self {
        Self { ld, ..self }
    }
}

struct Ctx {
    dev: CudaDevice,
    device: Device,
    /// Activations and matmul inputs.
    cd: DType,
    /// The norm weights widened to f32 for the kernels, by parameter (bf16 weights under
    /// `train.dense_dtype = "checkpoint"`), made once per step.
    norm_f32: std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, Tensor>>,
}

impl Ctx {
    fn empty(&self, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        // Every buffer made here is written in full before it is read.
        unsafe { Tensor::empty(shape, dtype, &self.device) }
    }

    /// Runs `f`, timed alone under `name` when profiling.
    fn timed<R>(&self, name: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if !profiling() {
            return f();
        }
        self.device.synchronize()?;
        let start = std::time::Instant::now();
        let r = f()?;
        self.device.synchronize()?;
        let dt = start.elapsed().as_secs_f64();
        let mut p = PROFILE.lock().expect("profile lock");
        let e = p.entry(name.to_string()).or_default();
        e.0 += dt;
        e.1 += 1;
        Ok(r)
    }

    fn act(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.empty(shape, self.cd)
    }

    fn launch(&self, base: &str, dtype: DType, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        self.launch_named(&kernel(base, dtype)?, cfg, args)
    }

    fn launch_named(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        self.timed(name, || launch(&self.dev, name, cfg, args))
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
        c: Out,
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
        // A row-major matrix with row stride ld is, column-major, its transpose with the same
        // leading dimension.
        let or = |ld: usize, packed: usize| if ld == 0 { packed } else { ld };
        let (op_b, ldb) = if b.t {
            (CUBLAS_OP_T, or(b.ld, kk))
        } else {
            (CUBLAS_OP_N, or(b.ld, nn))
        };
        let (op_a, lda) = if a.t {
            (CUBLAS_OP_T, or(a.ld, mm))
        } else {
            (CUBLAS_OP_N, or(a.ld, kk))
        };
        let ldc = or(c.ld, nn);
        let (alpha, beta) = (1f32, beta);
        let blas_handle = self.dev.cublas_handle();
        let cp = c.p;
        let name = if profiling() {
            let t = |x: bool| if x { "T" } else { "" };
            format!(
                "gemm {mm}x{nn}x{kk}{}{} x{batch}{}",
                t(a.t),
                t(b.t),
                if c.dtype == DType::F32 { " ->f32" } else { "" }
            )
        } else {
            String::new()
        };
        self.timed(&name, || {
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
                    ty(c.dtype),
                    ldc as i32,
                    sc as i64,
                    batch as i32,
                    compute,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .map_err(|e| candle_core::Error::Msg(format!("cuBLAS GEMM: {e:?}")))
        })
    }

    /// a + b, same shape (the residual stream).
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let y = self.empty(a.shape(), a.dtype())?;
        let n = a.elem_count();
        let args = [P(ptr(a)?), P(ptr(b)?), P(ptr(&y)?), I64(n as i64)];
        self.launch("add2", a.dtype(), elementwise(n.div_ceil(2)), &args)?;
        Ok(y)
    }

    /// x (a, nb, nc, row) -> (a, nc, nb, row), contiguous: the head transposes.
    fn swap_axes(
        &self,
        x: &Tensor,
        (a, nb, nc, row): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let y = self.empty((a, nc, nb, row), x.dtype())?;
        let bytes = row * x.dtype().size_in_bytes();
        if !bytes.is_multiple_of(4) || a * nb * nc * bytes / 4 > u32::MAX as usize {
            candle_core::bail!("head transpose of rows of {bytes} bytes: needs whole 4-byte words");
        }
        let (words, total) = (bytes / 4, a * nb * nc * bytes / 4);
        let args = [
            P(ptr(x)?),
            P(ptr(&y)?),
            U32(total as u32),
            I32(words as i32),
            I32(nb as i32),
            I32(nc as i32),
        ];
        self.launch_named("swap_axes", elementwise(total), &args)?;
        Ok(y)
    }

    /// `x (n, in) @ w^T` with w (out, in): a projection's output, (n, out).
    fn project(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (n, inp) = x.dims2()?;
        let out_dim = w.dim(0)?;
        let y = self.act((n, out_dim))?;
        self.gemm((n, out_dim, inp), m(x)?, mt(w)?, out(&y)?, 0., 1, (0, 0, 0))?;
        Ok(y)
    }

    /// `dx (+)= dy (n, out) @ w (out, in)`.
    fn project_back_x(&self, dy: &Tensor, w: &Tensor, dx: &Tensor, beta: f32) -> Result<()> {
        let (n, out_dim) = dy.dims2()?;
        let inp = w.dim(1)?;
        self.gemm(
            (n, inp, out_dim),
            m(dy)?,
            m(w)?,
            out(dx)?,
            beta,
            1,
            (0, 0, 0),
        )
    }

    /// `dw = dy^T (out, n) @ x (n, in)`, in f32.
    fn project_back_w(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (n, out_dim) = dy.dims2()?;
        let inp = x.dim(1)?;
        let dw = self.empty((out_dim, inp), DType::F32)?;
        self.gemm(
            (out_dim, inp, n),
            mt(dy)?,
            m(x)?,
            out(&dw)?,
            0.,
            1,
            (0, 0, 0),
        )?;
        Ok(dw)
    }

    /// The weight a projection multiplies by, in the compute dtype: `W_t` for ternary layers.
    fn weight(&self, lin: &Linear) -> Result<Tensor> {
        let w = lin.weight.detach();
        let Some(g) = lin.ternary_group else {
            return self.timed("cast weight", || w.to_dtype(self.cd));
        };
        let op = TernaryProjection {
            group: g,
            dtype: self.cd,
        };
        let name = kernel("ternarize", self.cd)?;
        self.timed(&name, || w.apply_op1_no_bwd(&op))
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
        let t = self.timed("cast norm weight", || w.detach().to_dtype(DType::F32))?;
        cache.insert(w.id(), t.clone());
        Ok(t)
    }

    /// RMSNorm forward: the fused op, recording nothing.
    fn rms_norm(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        let op = super::RmsNorm {
            eps: norm.eps as f32,
        };
        let w = self.norm_weight(norm)?;
        let name = kernel("rmsnorm_fwd", self.cd)?;
        self.timed(&name, || x.apply_op2_no_bwd(&w, &op))
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
        let w = self.norm_weight(norm)?;
        if d <= 128 && !add {
            // Head-sized rows (the q/k norms): one kernel for dx and dw. (For hidden-sized rows
            // the one-kernel version measured slower than these two on an H200.)
            let per_block = 64;
            let dw = self.timed("zeros", || Tensor::zeros(d, DType::F32, &self.device))?;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(per_block) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = [
                P(ptr(x)?),
                P(ptr(&w)?),
                P(ptr(dy)?),
                P(ptr(dx)?),
                P(ptr(&dw)?),
                I64(rows as i64),
                I32(d as i32),
                F32(eps),
                I32(per_block as i32),
            ];
            self.launch("rmsnorm_bwd_fused_small", self.cd, cfg, &args)?;
            return Ok(dw);
        }
        // The input gradient written to dx or added to it (the residual stream's gradient),
        // then the weight gradient by the fused op's own backward kernel.
        self.rms_norm_back_x(x, &w, eps, dy, dx, add)?;
        let name = kernel("rmsnorm_bwd_w", self.cd)?;
        self.timed(&name, || x.apply_op2_no_bwd(dy, &RmsNormBackW { eps, d }))
    }

    /// The RMSNorm input gradient for the f32 weight `w`, written to `dx` or added to it.
    fn rms_norm_back_x(
        &self,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
        dy: &Tensor,
        dx: &Tensor,
        add: bool,
    ) -> Result<()> {
        let (rows, d) = x.dims2()?;
        let base = if add {
            "rmsnorm_bwd_x_add"
        } else {
            "rmsnorm_bwd_x"
        };
        let args = [
            P(ptr(x)?),
            P(ptr(w)?),
            P(ptr(dy)?),
            P(ptr(dx)?),
            I64(rows as i64),
            I32(d as i32),
            F32(eps),
        ];
        self.launch(base, self.cd, warp_per_row(rows), &args)
    }

    /// `x * rsqrt(mean(x^2) + eps)` of f32 rows, without a weight.
    fn normalized(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        let ones = Tensor::ones(x.dim(1)?, DType::F32, &self.device)?;
        let op = super::RmsNorm { eps: eps as f32 };
        self.timed("rmsnorm_fwd_f32", || x.apply_op2_no_bwd(&ones, &op))
    }

    /// The first input norm of the seed under f32 compute (a bf16 embedding's rows with a bf16
    /// weight, see `rms_norm_composed`): normalised in f32, rounded to bf16, scaled by the
    /// weight and rounded again; returned in f32.
    fn rms_norm_bf16_rounded(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        let n = self.normalized(x, norm.eps)?;
        let w = self.norm_weight(norm)?;
        self.timed("seed first norm", || {
            n.to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&w)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)
        })
    }

    /// The backward of `rms_norm_bf16_rounded`, as autograd takes it through the roundings:
    /// the output's gradient rounded to bf16, the weight's gradient summed in f32, the
    /// normalised rows' gradient rounded to bf16; the input gradient added to `dx`.
    fn rms_norm_bf16_rounded_back(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        dy: &Tensor,
        dx: &Tensor,
    ) -> Result<Tensor> {
        let w = self.norm_weight(norm)?;
        let round = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let ct = round(dy.clone())?;
        let n = round(self.normalized(x, norm.eps)?)?;
        let dw = (&ct * &n)?.sum(0)?;
        let dn = round(ct.broadcast_mul(&w)?)?;
        let ones = Tensor::ones(w.dim(0)?, DType::F32, &self.device)?;
        self.rms_norm_back_x(x, &ones, norm.eps as f32, &dn, dx, true)?;
        Ok(dw)
    }
}

/// Causal grouped-query attention, by (batch, key/value head) group: the R = H / K query heads
/// of a group sit together position-major, q as (B, K, L, R, D), so that a block of query
/// positions is one block of rows for every head of the group. Scores (B, K, L * R, L) are
/// computed block by block of `chunk` positions, each against the keys up to the block's end
/// only: from L = 512 on, blocks of 256 positions skip 3/8 of the square's GEMM work (L = 1024)
/// and its memory traffic.
struct Attn {
    b: usize,
    k: usize,
    r: usize,
    l: usize,
    d: usize,
    chunk: usize,
    scale: f32,
    /// Keep no probabilities between the passes: the backward recomputes each layer's.
    recompute: bool,
}

impl Attn {
    fn new(model: &Qwen3, b: usize, l: usize) -> Self {
        let cfg = &model.cfg;
        let (h, k, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let chunk = model
            .attention_chunk
            .unwrap_or(if l >= 512 { 256 } else { l })
            .clamp(1, l.max(1));
        // Every layer's probabilities, kept for the backward, may take a quarter of the card;
        // past that, each layer's are recomputed in the backward (one more score GEMM and
        // softmax per layer, the same values).
        let stored = model.layers.len() * b * h * l * l * model.compute_dtype.size_in_bytes();
        let recompute = model.attention_recompute.unwrap_or_else(|| {
            let total = match &model.device {
                Device::Cuda(dev) => dev.cuda_stream().context().mem_get_info().map(|m| m.1),
                _ => Ok(usize::MAX),
            };
            stored > total.unwrap_or(usize::MAX) / 4
        });
        Self {
            b,
            k,
            r: h / k,
            l,
            d,
            chunk,
            scale: 1.0 / (d as f32).sqrt(),
            recompute,
        }
    }

    /// (first position, positions) of each block.
    fn blocks(&self) -> Vec<(usize, usize)> {
        (0..self.l)
            .step_by(self.chunk)
            .map(|c0| (c0, self.chunk.min(self.l - c0)))
            .collect()
    }

    fn softmax_args(&self, p: u64, g: Option<u64>, out: u64) -> Vec<Arg> {
        let mut args = vec![P(p)];
        args.extend(g.map(P));
        args.extend([
            P(out),
            I64((self.b * self.k * self.l * self.r) as i64),
            I32(self.l as i32),
            I32(self.r as i32),
            I32(self.chunk as i32),
            F32(self.scale),
        ]);
        args
    }

    /// Scores of query-major rows against keys, block by block: a (B*K, L*R, D) and keys
    /// (B*K, L, D) -> (B*K, L*R, L), each block's rows filled up to its last key.
    fn scores(&self, ctx: &Ctx, a: &Tensor, keys: &Tensor) -> Result<Tensor> {
        let (r, l, d, batch) = (self.r, self.l, self.d, self.b * self.k);
        let s = ctx.act((batch, l * r, l))?;
        for (c0, cn) in self.blocks() {
            ctx.gemm(
                (cn * r, c0 + cn, d),
                m(a)?.at(c0 * r * d, ctx.cd),
                mt(keys)?,
                out(&s)?.at(c0 * r * l).ld(l),
                0.,
                batch,
                (l * r * d, l * d, l * r * l),
            )?;
        }
        Ok(s)
    }

    /// Rows of weights over keys times per-key values, block by block: p (B*K, L*R, L) and
    /// values (B*K, L, D) -> (B*K, L*R, D).
    fn mix(&self, ctx: &Ctx, p: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (r, l, d, batch) = (self.r, self.l, self.d, self.b * self.k);
        let y = ctx.act((batch, l * r, d))?;
        for (c0, cn) in self.blocks() {
            ctx.gemm(
                (cn * r, d, c0 + cn),
                m(p)?.at(c0 * r * l, ctx.cd).ld(l),
                m(values)?,
                out(&y)?.at(c0 * r * d),
                0.,
                batch,
                (l * r * l, l * d, l * r * d),
            )?;
        }
        Ok(y)
    }

    /// The per-key sum `p^T @ g` over all query rows: p (B*K, L*R, L), g (B*K, L*R, D) ->
    /// (B*K, L, D). The last block sees every key, so it goes first and sets the result; the
    /// others add to their leading keys.
    fn per_key(&self, ctx: &Ctx, p: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (r, l, d, batch) = (self.r, self.l, self.d, self.b * self.k);
        let y = ctx.act((batch, l, d))?;
        for (i, (c0, cn)) in self.blocks().into_iter().rev().enumerate() {
            ctx.gemm(
                (c0 + cn, d, cn * r),
                mt(p)?.at(c0 * r * l, ctx.cd).ld(l),
                m(g)?.at(c0 * r * d, ctx.cd),
                out(&y)?,
                if i == 0 { 0. } else { 1. },
                batch,
                (l * r * l, l * r * d, l * d),
            )?;
        }
        Ok(y)
    }

    fn rows(&self) -> usize {
        self.b * self.k * self.l * self.r
    }

    /// (probabilities (B*K, L*R, L), output (B*K, L*R, D)) from qr (B*K, L*R, D) and kr, vt
    /// (B*K, L, D).
    fn forward(
        &self,
        ctx: &Ctx,
        qr: &Tensor,
        kr: &Tensor,
        vt: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let probs = self.probs(ctx, qr, kr)?;
        let att = self.mix(ctx, &probs, vt)?;
        Ok((probs, att))
    }

    /// The attention probabilities (B*K, L*R, L).
    fn probs(&self, ctx: &Ctx, qr: &Tensor, kr: &Tensor) -> Result<Tensor> {
        let probs = self.scores(ctx, qr, kr)?;
        let pp = ptr(&probs)?;
        let args = self.softmax_args(pp, None, pp);
        ctx.launch("attn_softmax", ctx.cd, warp_per_row(self.rows()), &args)?;
        Ok(probs)
    }

    /// (dqr, dkr, dvt) from the output's gradient datt (B*K, L*R, D).
    fn backward(
        &self,
        ctx: &Ctx,
        qr: &Tensor,
        kr: &Tensor,
        vt: &Tensor,
        probs: &Tensor,
        datt: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dp = self.scores(ctx, datt, vt)?;
        let dvt = self.per_key(ctx, probs, datt)?;
        // The softmax backward overwrites dP with the scores' gradient dS.
        let dpp = ptr(&dp)?;
        let args = self.softmax_args(ptr(probs)?, Some(dpp), dpp);
        ctx.launch("attn_softmax_bwd", ctx.cd, warp_per_row(self.rows()), &args)?;
        let dqr = self.mix(ctx, &dp, kr)?;
        let dkr = self.per_key(ctx, &dp, qr)?;
        Ok((dqr, dkr, dvt))
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
    /// after norm + RoPE: q (B*K, L*R, D), k (B*K, L, D); see `Attn`
    qr: Tensor,
    kr: Tensor,
    /// (B*K, L, D)
    vt: Tensor,
    /// (B*K, L*R, L); None when the backward recomputes them
    probs: Option<Tensor>,
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
    /// The step's attention: shape, blocks, and whether probabilities are recomputed.
    attn: Attn,
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
        norm_f32: Default::default(),
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
    let attn = Attn::new(model, b, l);

    let emb = &model.embed_tokens;
    // Under f32 compute a bf16 embedding's rows enter the first layer in bf16, as in the seed
    // (MLX): its input norm rounds to bf16 (see `rms_norm_composed`).
    let seed_first_norm = ctx.cd == DType::F32 && emb.dtype() == DType::BF16;
    let mut x = if emb.dtype() == DType::F32 {
        let x = ctx.act((n, e))?;
        let args = [
            P(ptr(emb)?),
            P(ptr(&ids)?),
            P(ptr(&x)?),
            I64(n as i64),
            I32(e as i32),
        ];
        ctx.launch("embed_fwd", ctx.cd, elementwise(n * e), &args)?;
        x
    } else {
        // A bf16 embedding (the checkpoint's): gather its rows, then the compute dtype.
        ctx.timed("embed gather", || {
            emb.detach().index_select(&ids, 0)?.to_dtype(ctx.cd)
        })?
    };

    // q as (B, K, L, R, D), k as (B, K, L, D): see `Attn`.
    let norm_rope = |t: &Tensor, norm: &RmsNorm, heads: usize, group: usize| -> Result<Tensor> {
        let y = ctx.act((b * heads / group, l * group, d))?;
        let w = ctx.norm_weight(norm)?;
        let args = [
            P(ptr(t)?),
            P(ptr(&w)?),
            P(ptr(&rope.cos)?),
            P(ptr(&rope.sin)?),
            P(ptr(&y)?),
            I64((n * heads) as i64),
            I32(heads as i32),
            I32(group as i32),
            I32(l as i32),
            I32(d as i32),
            F32(norm.eps as f32),
        ];
        ctx.launch("norm_rope", ctx.cd, warp_per_row(n * heads), &args)?;
        Ok(y)
    };

    let mut layers = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate() {
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
        let xn1 = if i == 0 && seed_first_norm {
            ctx.rms_norm_bf16_rounded(&x, &layer.input_layernorm)?
        } else {
            ctx.rms_norm(&x, &layer.input_layernorm)?
        };
        let q = ctx.project(&xn1, &w[0])?;
        let kk = ctx.project(&xn1, &w[1])?;
        let v = ctx.project(&xn1, &w[2])?;
        let qr = norm_rope(&q, &at.q_norm, h, r)?;
        let kr = norm_rope(&kk, &at.k_norm, k, 1)?;
        let vt = ctx.swap_axes(&v, (b, l, k, d))?;
        let (probs, att) = attn.forward(&ctx, &qr, &kr, &vt)?;
        let merged = ctx.swap_axes(&att, (b, k, l, r * d))?.reshape((n, h * d))?;
        drop(att);
        let o = ctx.project(&merged, &w[3])?;
        let hres = ctx.add(&x, &o)?;
        let xn2 = ctx.rms_norm(&hres, &layer.post_attention_layernorm)?;
        let g = ctx.project(&xn2, &w[4])?;
        let u = ctx.project(&xn2, &w[5])?;
        let a = ctx.timed("silu_mul", || g.apply_op2_no_bwd(&u, &SiluMul))?;
        let down = ctx.project(&a, &w[6])?;
        let next = ctx.add(&hres, &down)?;
        layers.push(LayerTape {
            w,
            x,
            xn1,
            q,
            k: kk,
            qr,
            kr,
            vt,
            probs: (!attn.recompute).then_some(probs),
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
        .detach();
    let head = ctx.timed("cast head", || head.to_dtype(ctx.cd))?;
    let logits = ctx.act((n, vocab))?;
    ctx.gemm(
        (n, vocab, e),
        m(&xf)?,
        mt(&head)?,
        out(&logits)?,
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
    ctx.launch("cross_entropy_grad", ctx.cd, loss::ce_launch(n), &args)?;
    let loss = ctx.timed("loss mean", || rows.mean_all())?;
    Ok((
        loss,
        Tape {
            ctx,
            ids,
            attn,
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
        attn,
        rope,
        mut layers,
        x_last,
        xf,
        head,
        dlogits,
    } = tape;
    let cfg = &model.cfg;
    let (b, l) = (attn.b, attn.l);
    let n = b * l;
    let (e, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let (h, k, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let r = h / k;
    let seed_first_norm = ctx.cd == DType::F32 && model.embed_tokens.dtype() == DType::BF16;
    let mut grads = GradStore::default();

    // Output head and final norm.
    let dxf = ctx.act((n, e))?;
    ctx.gemm(
        (n, e, vocab),
        m(&dlogits)?,
        m(&head)?,
        out(&dxf)?,
        0.,
        1,
        (0, 0, 0),
    )?;
    let dhead = ctx.empty((vocab, e), DType::F32)?;
    ctx.gemm(
        (vocab, e, n),
        mt(&dlogits)?,
        m(&xf)?,
        out(&dhead)?,
        0.,
        1,
        (0, 0, 0),
    )?;
    drop((dlogits, head, xf));
    let dx = ctx.act((n, e))?;
    let dw = ctx.rms_norm_back(&x_last, &model.norm, &dxf, &dx, false)?;
    grads.insert(&model.norm.weight, dw);
    drop((dxf, x_last));

    let rope_back = |dy: &Tensor, heads: usize, group: usize| -> Result<Tensor> {
        let g = ctx.act((n, heads * d))?;
        let args = [
            P(ptr(dy)?),
            P(ptr(&rope.cos)?),
            P(ptr(&rope.sin)?),
            P(ptr(&g)?),
            I64((n * heads) as i64),
            I32(heads as i32),
            I32(group as i32),
            I32(l as i32),
            I32(d as i32),
        ];
        ctx.launch(
            "rope_bwd_untranspose",
            ctx.cd,
            warp_per_row(n * heads),
            &args,
        )?;
        Ok(g)
    };

    for (i, layer) in model.layers.iter().enumerate().rev() {
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
        ctx.launch(
            "silu_mul_bwd",
            ctx.cd,
            elementwise((n * f).div_ceil(2)),
            &args,
        )?;
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
        let datt = ctx.swap_axes(&dmerged, (b, l, k, r * d))?;
        drop(dmerged);
        let probs = match &t.probs {
            Some(p) => p.clone(),
            None => attn.probs(&ctx, &t.qr, &t.kr)?,
        };
        let (dqr, dkr, dvt) = attn.backward(&ctx, &t.qr, &t.kr, &t.vt, &probs, &datt)?;
        drop(probs);
        drop(datt);
        let gq = rope_back(&dqr, h, r)?;
        let gk = rope_back(&dkr, k, 1)?;
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
        let dv = ctx.swap_axes(&dvt, (b, k, l, d))?.reshape((n, k * d))?;
        drop(dvt);
        let dxn1 = ctx.act((n, e))?;
        ctx.project_back_x(&dq, wq, &dxn1, 0.)?;
        ctx.project_back_x(&dk, wk, &dxn1, 1.)?;
        ctx.project_back_x(&dv, wv, &dxn1, 1.)?;
        grads.insert(&at.q_proj.weight, ctx.project_back_w(&dq, &t.xn1)?);
        grads.insert(&at.k_proj.weight, ctx.project_back_w(&dk, &t.xn1)?);
        grads.insert(&at.v_proj.weight, ctx.project_back_w(&dv, &t.xn1)?);
        drop((dq, dk, dv));
        let dw = if i == 0 && seed_first_norm {
            ctx.rms_norm_bf16_rounded_back(&t.x, &layer.input_layernorm, &dxn1, &dx)?
        } else {
            ctx.rms_norm_back(&t.x, &layer.input_layernorm, &dxn1, &dx, true)?
        };
        grads.insert(&layer.input_layernorm.weight, dw);
    }

    // Embedding: the rows of the tokens seen get their input gradient, added to the head's
    // gradient when the head is tied.
    let demb = match &model.lm_head {
        Some(lm_head) => {
            grads.insert(lm_head, dhead);
            ctx.timed("zeros", || {
                Tensor::zeros((vocab, e), DType::F32, &ctx.device)
            })?
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
