//! The ternary projection W -> W_t (`ternary.cu`) under a `Quant` (group, scale rule, scale
//! dtype), and its autograd op, whose backward is the straight-through identity.

use super::launch::{
    alloc, blocks, cuda_only, family, per_item, warp_per_row, AsBuf, Buf, Family, Gpu,
};
use crate::quant::{Quant, ScaleDtype, ScaleRule};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_ternary", ["ternary.cuh", "ternary.cu"]);

/// Groups up to this many weights take one warp each; larger ones (a whole matrix) a block to
/// find the scale and a thread per weight to apply it.
const WARP_GROUP_MAX: usize = 8192;

/// The scale dtype as the kernels take it (0 f32, 1 bf16, 2 f16) and the smallest scale.
fn scale_args(q: Quant) -> (usize, f32) {
    let sdt = match q.scale_dtype {
        ScaleDtype::F32 => 0,
        ScaleDtype::Bf16 => 1,
        ScaleDtype::F16 => 2,
    };
    (sdt, q.scale_dtype.min_scale() as f32)
}

/// The number of groups of `n` weights under `q`, which must divide them.
fn groups_of(kernel: &str, n: usize, q: Quant) -> Result<usize> {
    let g = q.group;
    if g == 0 || !n.is_multiple_of(g) {
        candle_core::bail!("{kernel}: group size {g} does not divide {n} weights");
    }
    Ok(n / g)
}

/// The arguments of the 16-byte kernels `ternarize_v{C}` after `n` and in their order (`adamw.cu`
/// takes them too): groups of `g` = 32, 64 or 128 * C weights (C = 1, 2, 4), the scale rule
/// (absmax or absmean), the scale dtype and smallest scale, the warm-up's lambda.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VectorArgs {
    g: i32,
    c: i32,
    absmax: i32,
    sdt: i32,
    min: f32,
    lambda: f32,
}

impl VectorArgs {
    /// The weights a warp takes at a time (128 * C), which a tensor must be whole spans of.
    pub fn span(&self) -> usize {
        128 * self.c as usize
    }
}

/// The 16-byte kernels' arguments for `n` weights under `q` at `lambda`, where they take them:
/// a group of 32, 64, 128, 256 or 512 and whole warps' spans (buffers 16-byte aligned besides).
pub fn vector_args(n: usize, q: Quant, lambda: f32) -> Option<VectorArgs> {
    let g = q.group;
    let c = if g <= 128 { 1 } else { g / 128 };
    if q.scale == ScaleRule::Learned
        || !matches!(g, 32 | 64 | 128 | 256 | 512)
        || !n.is_multiple_of(128 * c)
    {
        return None;
    }
    let (sdt, min) = scale_args(q);
    Some(VectorArgs {
        g: g as i32,
        c: c as i32,
        absmax: i32::from(q.scale == ScaleRule::Absmax),
        sdt: sdt as i32,
        min,
        lambda,
    })
}

/// `ternarize_v{C}(const float* w, T* out, long n, int g, int absmax, int sdt, float min,
/// float lambda)` for groups of 32, 64 or 128 * C (C = 1, 2, 4), else `ternarize(const float*
/// w, T* out, long groups, int g, int absmax, int sdt, float min, float lambda)`, or for groups over `WARP_GROUP_MAX` `ternary_scales(const float* w, float*
/// scales, long groups, long g, int absmax, int sdt, float min)` then `ternary_apply(const
/// float* w, const float* scales, T* out, long n, long g, int sdt, float min, float lambda)`:
/// `out` (w's count, f32 or bf16) = W_t of the f32 latent `w` under `q`, or
/// `w + lambda * (W_t - w)` for lambda < 1. For `learned` scales see `ternarize_learned`.
pub fn ternarize(gpu: &Gpu, w: &impl AsBuf, out: &impl AsBuf, q: Quant, lambda: f32) -> Result<()> {
    let (w, out) = (w.buf()?, out.buf()?);
    let n = w.n();
    w.expect("ternarize: latent", n, DType::F32)?;
    out.expect("ternarize: output", n, out.dtype)?;
    if q.scale == ScaleRule::Learned {
        candle_core::bail!("ternarize: a learned scale is the layer's own (ternarize_learned)");
    }
    let g = q.group;
    let groups = groups_of("ternarize", n, q)?;
    let absmax = usize::from(q.scale == ScaleRule::Absmax);
    let (sdt, min) = scale_args(q);
    // 16-byte loads (`ternarize_v{c}`, warps of 128 * c weights, counted in weights) where
    // `vector_args` allows and the buffers are 16-byte aligned; else a warp a group
    // (`ternarize`, counted in groups) up to WARP_GROUP_MAX
    let aligned = w.p.is_multiple_of(16) && out.p.is_multiple_of(16);
    let warp_kernel = match vector_args(n, q, lambda) {
        Some(v) if aligned => Some((format!("ternarize_v{}", v.c), n / v.span(), n)),
        _ if g <= WARP_GROUP_MAX => Some(("ternarize".to_string(), groups, groups)),
        _ => None,
    };
    if let Some((name, warps, count)) = warp_kernel {
        return gpu
            .kernel(&KERNELS, &name, Some(out.dtype), warp_per_row(warps))?
            .buf(&w)
            .buf(&out)
            .i64(count)
            .i32(g)
            .i32(absmax)
            .i32(sdt)
            .f32(min)
            .f32(lambda)
            .go();
    }
    let scales = gpu.empty(groups, DType::F32)?.buf()?;
    gpu.kernel(&KERNELS, "ternary_scales", None, blocks(groups, 1024))?
        .buf(&w)
        .buf(&scales)
        .i64(groups)
        .i64(g)
        .i32(absmax)
        .i32(sdt)
        .f32(min)
        .go()?;
    apply(gpu, &w, &scales, &out, q, lambda)
}

fn apply(gpu: &Gpu, w: &Buf, scales: &Buf, out: &Buf, q: Quant, lambda: f32) -> Result<()> {
    let (sdt, min) = scale_args(q);
    gpu.kernel(&KERNELS, "ternary_apply", Some(out.dtype), per_item(w.n()))?
        .buf(w)
        .buf(scales)
        .buf(out)
        .i64(w.n())
        .i64(q.group)
        .i32(sdt)
        .f32(min)
        .f32(lambda)
        .go()
}

/// `ternary_apply` with a layer's learned `scales` (f32, one per group; used at least the
/// minimum and rounded to the scale dtype, as `crate::model::ternary::used_scales`): `out` =
/// W_t of `w`, or `w + lambda * (W_t - w)`.
pub fn ternarize_learned(
    gpu: &Gpu,
    w: &impl AsBuf,
    scales: &impl AsBuf,
    out: &impl AsBuf,
    q: Quant,
    lambda: f32,
) -> Result<()> {
    let (w, scales, out) = (w.buf()?, scales.buf()?, out.buf()?);
    let n = w.n();
    w.expect("ternarize_learned: latent", n, DType::F32)?;
    out.expect("ternarize_learned: output", n, out.dtype)?;
    let groups = groups_of("ternarize_learned", n, q)?;
    scales.expect("ternarize_learned: scales", groups, DType::F32)?;
    apply(gpu, &w, &scales, &out, q, lambda)
}

/// `ternary_scale_grad(const float* w, const float* dw, const float* s, float* ds, long g, int
/// sdt, float min, float factor)`: `ds` (one per group, f32) = LSQ's gradient of the learned
/// scales `s` from the latent's gradient `dw` (see
/// `crate::model::ternary::ste_weight_learned`), at quantization strength `lambda`.
pub fn scale_grad(
    gpu: &Gpu,
    w: &impl AsBuf,
    dw: &impl AsBuf,
    s: &impl AsBuf,
    ds: &impl AsBuf,
    q: Quant,
    lambda: f32,
) -> Result<()> {
    let (w, dw, s, ds) = (w.buf()?, dw.buf()?, s.buf()?, ds.buf()?);
    let n = w.n();
    w.expect("ternary_scale_grad: w", n, DType::F32)?;
    dw.expect("ternary_scale_grad: dw", n, DType::F32)?;
    let groups = groups_of("ternary_scale_grad", n, q)?;
    s.expect("ternary_scale_grad: s", groups, DType::F32)?;
    ds.expect("ternary_scale_grad: ds", groups, DType::F32)?;
    let (sdt, min) = scale_args(q);
    let factor = (lambda as f64 / (q.group as f64).sqrt()) as f32;
    gpu.kernel(&KERNELS, "ternary_scale_grad", None, blocks(groups, 256))?
        .buf(&w)
        .buf(&dw)
        .buf(&s)
        .buf(&ds)
        .i64(q.group)
        .i32(sdt)
        .f32(min)
        .f32(factor)
        .go()
}

/// W_t of the f32 latent `w` under `q` (`W + lambda * (W_t - W)` for lambda < 1), in
/// `dtype`, with the straight-through gradient to `w`.
pub fn ternary_weight(w: &Tensor, q: Quant, lambda: f32, dtype: DType) -> Result<Tensor> {
    w.apply_op1(TernaryProjection { q, lambda, dtype })
}

/// `act_quant(const T* x, T* y, long rows, int d)`: y = x fake-quantized to 8 bits per row
/// of d (x's last dimension; see `crate::model::ternary::act_quant`), like x.
pub fn act_quant(gpu: &Gpu, x: &impl AsBuf, y: &impl AsBuf) -> Result<()> {
    let (x, y) = (x.buf()?, y.buf()?);
    let d = x.last();
    let rows = x.n() / d;
    y.expect("act_quant: y", x.n(), x.dtype)?;
    gpu.kernel(&KERNELS, "act_quant", Some(x.dtype), warp_per_row(rows))?
        .buf(&x)
        .buf(&y)
        .i64(rows)
        .i32(d)
        .go()
}

/// `x` (..., d), contiguous, fake-quantized to 8 bits per row, with the straight-through
/// gradient.
pub fn act_quant_op(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(ActQuant)
}

struct ActQuant;

impl CustomOp1 for ActQuant {
    fn name(&self) -> &'static str {
        "act-quant"
    }

    cuda_only!(1, "activation quantization");

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (y, yb) = alloc(s.device(), s.dtype(), l.shape())?;
        act_quant(&Gpu::new(s.device()), &Buf::of(s, l)?, &yb)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

struct TernaryProjection {
    q: Quant,
    lambda: f32,
    dtype: DType,
}

impl CustomOp1 for TernaryProjection {
    fn name(&self) -> &'static str {
        "ternary-projection"
    }

    cuda_only!(1, "ternary projection");

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (out, ob) = alloc(s.device(), self.dtype, l.shape())?;
        let gpu = Gpu::new(s.device());
        ternarize(&gpu, &Buf::of(s, l)?, &ob, self.q, self.lambda)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(w.dtype())?))
    }
}
