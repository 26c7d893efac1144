//! Cross-entropy over the vocabulary (`loss.cu`): the typed launcher and the autograd op,
//! both through the one kernel the step uses.

use super::launch::{alloc, blocks, cuda_only, family, AsBuf, Buf, Family, Gpu};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_loss", "loss.cu");

/// The gradient `cross_entropy` writes: where (`dx`, which may be the logits themselves),
/// times `scale`, times each row's `row_grad` when given, plus `plus` (another term's
/// gradient, like the logits) when given.
pub struct Grad<'a> {
    pub dx: &'a Buf,
    pub scale: f32,
    pub row_grad: Option<&'a Buf>,
    pub plus: Option<&'a Buf>,
}

/// `cross_entropy(const T* x, const unsigned* y, float* loss, T* dx, const float* row_grad,
/// const T* plus, long rows, int v, float scale)`: per-row loss (rows, f32) of logits
/// (rows, v) against u32 targets; with `grad`, also dx = scale * g_r * (softmax(x_r) -
/// onehot(t_r)) + plus_r.
pub fn cross_entropy(
    gpu: &Gpu,
    logits: &impl AsBuf,
    targets: &impl AsBuf,
    loss: &impl AsBuf,
    grad: Option<Grad>,
) -> Result<()> {
    let (x, t, loss) = (logits.buf()?, targets.buf()?, loss.buf()?);
    let v = x.last();
    let rows = x.n() / v;
    t.expect("cross_entropy: targets", rows, DType::U32)?;
    loss.expect("cross_entropy: loss", rows, DType::F32)?;
    if let Some(g) = &grad {
        g.dx.expect("cross_entropy: dx", x.n(), x.dtype)?;
        if let Some(r) = g.row_grad {
            r.expect("cross_entropy: row_grad", rows, DType::F32)?;
        }
        if let Some(p) = g.plus {
            p.expect("cross_entropy: plus", x.n(), x.dtype)?;
        }
    }
    // One block of 512 threads per row.
    gpu.kernel(&KERNELS, "cross_entropy", Some(x.dtype), blocks(rows, 512))?
        .buf(&x)
        .buf(&t)
        .buf(&loss)
        .opt(grad.as_ref().map(|g| g.dx))
        .opt(grad.as_ref().and_then(|g| g.row_grad))
        .opt(grad.as_ref().and_then(|g| g.plus))
        .i64(rows)
        .i32(v)
        .f32(grad.as_ref().map_or(1.0, |g| g.scale))
        .go()
}

/// `distill_kl(const T* x, T* teacher, float* kl, long rows, int v, float inv_t, float t2,
/// float gscale)`: per-row `T^2 * KL(softmax(teacher / T) || softmax(x / T))` (rows, f32) of
/// the student's logits `x` (rows, v) and the teacher's, whose buffer is overwritten with the
/// term's gradient for the student, `weight * T * (softmax(x / T) - softmax(teacher / T)) /
/// rows` (the gradient of `weight` times the rows' mean).
pub fn distill_kl(
    gpu: &Gpu,
    x: &impl AsBuf,
    teacher: &impl AsBuf,
    kl: &impl AsBuf,
    temperature: f64,
    weight: f64,
) -> Result<()> {
    let (x, t, kl) = (x.buf()?, teacher.buf()?, kl.buf()?);
    let v = x.last();
    let rows = x.n() / v;
    t.expect("distill_kl: teacher", x.n(), x.dtype)?;
    kl.expect("distill_kl: kl", rows, DType::F32)?;
    gpu.kernel(&KERNELS, "distill_kl", Some(x.dtype), blocks(rows, 512))?
        .buf(&x)
        .buf(&t)
        .buf(&kl)
        .i64(rows)
        .i32(v)
        .f32((1.0 / temperature) as f32)
        .f32((temperature * temperature) as f32)
        .f32((weight * temperature / rows as f64) as f32)
        .go()
}

/// Mean token cross-entropy (f32 scalar) of contiguous logits (N, V), f32 or bf16, against
/// u32 targets (N), with the logits' gradient in their dtype.
pub fn cross_entropy_op(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.apply_op2(targets, CrossEntropy)?.mean_all()
}

/// Per-row losses (N) f32.
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    cuda_only!(2, "cross-entropy");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let rows = xl.shape().dims2()?.0;
        let shape = Shape::from(rows);
        let (loss, lb) = alloc(xs.device(), DType::F32, &shape)?;
        let gpu = Gpu::new(xs.device());
        cross_entropy(&gpu, &Buf::of(xs, xl)?, &Buf::of(ys, yl)?, &lb, None)?;
        Ok((loss, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gpu = Gpu::of(x.device())?;
        let dx = gpu.empty(x.shape(), x.dtype())?;
        let scratch = gpu.empty(x.dim(0)?, DType::F32)?;
        // (kept alive until the kernel has been queued: a Buf is only an address)
        let row_grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let g = Grad {
            dx: &dx.buf()?,
            scale: 1.0,
            row_grad: Some(&row_grad.buf()?),
            plus: None,
        };
        cross_entropy(&gpu, x, y, &scratch, Some(g))?;
        Ok((Some(dx), None))
    }
}
