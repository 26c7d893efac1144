//! RMSNorm (`norm.cu`): typed launchers, the one backward both trainers use, and the autograd
//! op. Rows of d = the weight's length, in f32 or bf16; the weight in f32.

use super::launch::{alloc, blocks, cuda_only, family, warp_per_row, AsBuf, Buf, Family, Gpu};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_norm", "norm.cu");

/// The values per lane of the vectorized kernels (`rmsnorm_v{V}`, `rmsnorm_bwd{,_add}_v{V}`) for
/// rows of `d`, if they take it: d = 32 * V for V = 8, 16 or 32 (rows of 256, 512 or 1,024),
/// every buffer aligned for 16-byte accesses.
fn vector_width(d: usize, bufs: &[&Buf]) -> Option<usize> {
    let aligned = bufs.iter().all(|b| b.p.is_multiple_of(16));
    let v = d / 32;
    (d.is_multiple_of(32) && matches!(v, 8 | 16 | 32) && aligned).then_some(v)
}

/// The rows of `x` for a weight of `d`, checking that `x` holds whole rows.
fn rows(what: &str, x: &Buf, d: usize) -> Result<usize> {
    if d == 0 || !x.n().is_multiple_of(d) {
        candle_core::bail!("{what}: {:?} is not rows of the weight's {d}", x.dims);
    }
    Ok(x.n() / d)
}

/// The rows the vectorized kernels take.
const SIZES: &str = "256, 512 or 1,024";

/// Whether the vectorized kernels take rows of `d` (256, 512 or 1,024), so a bf16 weight can go
/// to them as it is (given 16-byte aligned buffers).
pub fn takes_bf16_weight(d: usize) -> bool {
    d.is_multiple_of(32) && matches!(d / 32, 8 | 16 | 32)
}

/// The kernel-name part for the weight's dtype: the vectorized kernels (of rows of `sizes`)
/// read an f32 weight or, as `..._wb`, a bf16 one; the others take f32 only.
pub(crate) fn weight_kind(
    what: &str,
    w: &Buf,
    d: usize,
    vectorized: bool,
    sizes: &str,
) -> Result<&'static str> {
    match w.dtype {
        DType::BF16 if vectorized => {
            w.expect(&format!("{what}: w"), d, DType::BF16)?;
            Ok("_wb")
        }
        DType::BF16 => candle_core::bail!(
            "{what}: w is bf16, which only the vectorized kernels take (rows of {sizes}, \
             aligned buffers); widen it to f32"
        ),
        _ => {
            w.expect(&format!("{what}: w"), d, DType::F32)?;
            Ok("")
        }
    }
}

/// `rmsnorm(const T* x, const float* w, T* y, long rows, int d, float eps)`: y = x * r * w;
/// `rmsnorm_v{V}[_wb](x, w, y, rows, eps)` where `vector_width` allows (`_wb`: w in bf16).
pub fn rmsnorm(gpu: &Gpu, x: &impl AsBuf, w: &impl AsBuf, y: &impl AsBuf, eps: f32) -> Result<()> {
    let (x, w, y) = (x.buf()?, w.buf()?, y.buf()?);
    let d = w.n();
    let rows = rows("rmsnorm", &x, d)?;
    y.expect("rmsnorm: y", x.n(), x.dtype)?;
    let vector = vector_width(d, &[&x, &w, &y]);
    let wk = weight_kind("rmsnorm", &w, d, vector.is_some(), SIZES)?;
    if let Some(v) = vector {
        return gpu
            .kernel(
                &KERNELS,
                &format!("rmsnorm_v{v}{wk}"),
                Some(x.dtype),
                warp_per_row(rows),
            )?
            .buf(&x)
            .buf(&w)
            .buf(&y)
            .i64(rows)
            .f32(eps)
            .go();
    }
    gpu.kernel(&KERNELS, "rmsnorm", Some(x.dtype), warp_per_row(rows))?
        .buf(&x)
        .buf(&w)
        .buf(&y)
        .i64(rows)
        .i32(d)
        .f32(eps)
        .go()
}

/// The residual stream's sum and the RMSNorm after it: h = a + b, y = rmsnorm(h) with weight `w`.
/// One pass (`add_rmsnorm_v{V}[_wb](a, b, h, w, y, rows, eps)`) where the vectorized kernels
/// take the rows, else `residual::add` then `rmsnorm`: the same values either way.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm(
    gpu: &Gpu,
    a: &impl AsBuf,
    b: &impl AsBuf,
    h: &impl AsBuf,
    w: &impl AsBuf,
    y: &impl AsBuf,
    eps: f32,
) -> Result<()> {
    let (ab, bb, hb, wb, yb) = (a.buf()?, b.buf()?, h.buf()?, w.buf()?, y.buf()?);
    let d = wb.n();
    let rows = rows("add_rmsnorm", &ab, d)?;
    for (what, t) in [("b", &bb), ("h", &hb), ("y", &yb)] {
        t.expect(&format!("add_rmsnorm: {what}"), ab.n(), ab.dtype)?;
    }
    let Some(v) = vector_width(d, &[&ab, &bb, &hb, &wb, &yb]) else {
        super::residual::add(gpu, a, b, h)?;
        return rmsnorm(gpu, h, w, y, eps);
    };
    let wk = weight_kind("add_rmsnorm", &wb, d, true, SIZES)?;
    gpu.kernel(
        &KERNELS,
        &format!("add_rmsnorm_v{v}{wk}"),
        Some(ab.dtype),
        warp_per_row(rows),
    )?
    .buf(&ab)
    .buf(&bb)
    .buf(&hb)
    .buf(&wb)
    .buf(&yb)
    .i64(rows)
    .f32(eps)
    .go()
}

/// `rmsnorm_bwd_x[_add](const T* x, const float* w, const T* dy, T* dx, long rows, int d,
/// float eps)`: the input gradient, written to dx, or added to it when `add`.
pub fn rmsnorm_back_x(
    gpu: &Gpu,
    x: &impl AsBuf,
    w: &impl AsBuf,
    dy: &impl AsBuf,
    dx: &impl AsBuf,
    eps: f32,
    add: bool,
) -> Result<()> {
    let (x, w, dy, dx) = (x.buf()?, w.buf()?, dy.buf()?, dx.buf()?);
    let d = w.n();
    let rows = rows("rmsnorm_bwd_x", &x, d)?;
    w.expect("rmsnorm_bwd_x: w", d, DType::F32)?;
    dy.expect("rmsnorm_bwd_x: dy", x.n(), x.dtype)?;
    dx.expect("rmsnorm_bwd_x: dx", x.n(), x.dtype)?;
    let base = if add {
        "rmsnorm_bwd_x_add"
    } else {
        "rmsnorm_bwd_x"
    };
    gpu.kernel(&KERNELS, base, Some(x.dtype), warp_per_row(rows))?
        .buf(&x)
        .buf(&w)
        .buf(&dy)
        .buf(&dx)
        .i64(rows)
        .i32(d)
        .f32(eps)
        .go()
}

/// `rmsnorm_bwd_w(const T* x, const T* dy, float* dw, long rows, int d, float eps,
/// int per_block)`: the weight's gradient added into the f32 `dw` (d), zeroed by the caller.
pub fn rmsnorm_back_w(
    gpu: &Gpu,
    x: &impl AsBuf,
    dy: &impl AsBuf,
    dw: &impl AsBuf,
    eps: f32,
) -> Result<()> {
    let (x, dy, dw) = (x.buf()?, dy.buf()?, dw.buf()?);
    let d = dw.n();
    let rows = rows("rmsnorm_bwd_w", &x, d)?;
    dy.expect("rmsnorm_bwd_w: dy", x.n(), x.dtype)?;
    dw.expect("rmsnorm_bwd_w: dw", d, DType::F32)?;
    // A thread per column (up to 256 a block, the rest in more blocks along y), and rows per
    // block such that there are some 512 blocks (a few per SM), from 8 to 64 rows each: at
    // 1,024 rows of 1,024 a block of 64 rows left most of an H100's SMs idle.
    let threads = d.next_multiple_of(32).min(256);
    let tiles = d.div_ceil(threads);
    let per_block = (rows * tiles / 512).clamp(8, 64);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(per_block) as u32, tiles as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.kernel(&KERNELS, "rmsnorm_bwd_w", Some(x.dtype), cfg)?
        .buf(&x)
        .buf(&dy)
        .buf(&dw)
        .i64(rows)
        .i32(d)
        .f32(eps)
        .i32(per_block)
        .go()
}

/// `rmsnorm_bwd_small(const T* x, const float* w, const T* dy, T* dx, float* dw, long rows,
/// int d, float eps, int per_block)`: both gradients in one pass, for d <= 128; dx written,
/// dw (f32, zeroed by the caller) added into.
pub fn rmsnorm_back_small(
    gpu: &Gpu,
    x: &impl AsBuf,
    w: &impl AsBuf,
    dy: &impl AsBuf,
    dx: &impl AsBuf,
    dw: &impl AsBuf,
    eps: f32,
) -> Result<()> {
    let (x, w, dy, dx, dw) = (x.buf()?, w.buf()?, dy.buf()?, dx.buf()?, dw.buf()?);
    let d = w.n();
    let rows = rows("rmsnorm_bwd_small", &x, d)?;
    if d > 128 {
        candle_core::bail!("rmsnorm_bwd_small: rows of {d} > 128");
    }
    w.expect("rmsnorm_bwd_small: w", d, DType::F32)?;
    dy.expect("rmsnorm_bwd_small: dy", x.n(), x.dtype)?;
    dx.expect("rmsnorm_bwd_small: dx", x.n(), x.dtype)?;
    dw.expect("rmsnorm_bwd_small: dw", d, DType::F32)?;
    let per_block = 64;
    gpu.kernel(
        &KERNELS,
        "rmsnorm_bwd_small",
        Some(x.dtype),
        blocks(rows.div_ceil(per_block), 256),
    )?
    .buf(&x)
    .buf(&w)
    .buf(&dy)
    .buf(&dx)
    .buf(&dw)
    .i64(rows)
    .i32(d)
    .f32(eps)
    .i32(per_block)
    .go()
}

/// The RMSNorm backward for input `x` (rows of d), f32 weight `w` and output gradient `dy`:
/// the input gradient written to `dx` (or added to it when `add`: the residual stream's
/// gradient); returns the weight's gradient (d, f32). The hand-written step and the autograd
/// op both take this. Where `vector_width` allows, one kernel, `rmsnorm_bwd[_add]_v{V}(const T*
/// x, const float* w, const T* dy, T* dx, float* dw, long rows, float eps, int per_block)`.
/// The weight's gradient is added into `dw` where given (f32 of d, zeroed by the caller: the
/// step zeroes every norm's at once), else into a new zeroed buffer.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    eps: f32,
    add: bool,
    dw: Option<Tensor>,
) -> Result<Tensor> {
    let d = w.elem_count();
    let dw = match dw {
        Some(dw) => dw,
        None => gpu.zeros(d, DType::F32)?,
    };
    let bufs = [x.buf()?, w.buf()?, dy.buf()?, dx.buf()?];
    let vector = vector_width(d, &bufs.iter().collect::<Vec<_>>());
    if vector.is_none() && w.dtype() == DType::BF16 {
        // (the other kernels take an f32 weight)
        let w = w.to_dtype(DType::F32)?;
        return backward(gpu, x, &w, dy, dx, eps, add, Some(dw));
    }
    if let Some(v) = vector {
        let [x, w, dy, dx] = &bufs;
        let rows = rows("rmsnorm_bwd_v", x, d)?;
        let wk = weight_kind("rmsnorm_bwd_v", w, d, true, SIZES)?;
        dy.expect("rmsnorm_bwd_v: dy", x.n(), x.dtype)?;
        dx.expect("rmsnorm_bwd_v: dx", x.n(), x.dtype)?;
        // ~512 blocks where there are rows for them (a warp's rows run one after another; each
        // block adds d columns atomically), at least a row a warp
        let per_block = rows.div_ceil(512).next_multiple_of(8).clamp(8, 256);
        let name = format!("rmsnorm_bwd{}_v{v}{wk}", if add { "_add" } else { "" });
        gpu.kernel(
            &KERNELS,
            &name,
            Some(x.dtype),
            blocks(rows.div_ceil(per_block), 256),
        )?
        .buf(x)
        .buf(w)
        .buf(dy)
        .buf(dx)
        .buf(&dw.buf()?)
        .i64(rows)
        .f32(eps)
        .i32(per_block)
        .go()?;
        return Ok(dw);
    }
    if d <= 128 && !add {
        // Head-sized rows (the q/k norms): one kernel for dx and dw. (For hidden-sized rows
        // the one-kernel version measured slower than these two on an H200.)
        rmsnorm_back_small(gpu, x, w, dy, dx, &dw, eps)?;
    } else {
        rmsnorm_back_x(gpu, x, w, dy, dx, eps, add)?;
        rmsnorm_back_w(gpu, x, dy, &dw, eps)?;
    }
    Ok(dw)
}

/// `x * rsqrt(mean(x^2) + eps)` of f32 rows of d, without a weight.
fn normalized(gpu: &Gpu, x: &Tensor, eps: f32) -> Result<Tensor> {
    let ones = Tensor::ones(x.dim(candle_core::D::Minus1)?, DType::F32, gpu.device())?;
    let y = gpu.empty(x.shape(), DType::F32)?;
    rmsnorm(gpu, x, &ones, &y, eps)?;
    Ok(y)
}

/// The seed's first input norm under f32 compute (a bf16 embedding's rows, a bf16 weight, see
/// `model::ops::rms_norm_composed`): f32 rows normalised, rounded to bf16, scaled by the weight
/// (`w`, widened to f32) and rounded again; returned in f32.
pub fn bf16_rounded(gpu: &Gpu, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let n = normalized(gpu, x, eps)?;
    gpu.timed("seed first norm", || {
        n.to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?
            .broadcast_mul(w)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)
    })
}

/// The backward of `bf16_rounded`, as autograd takes it through the roundings: the output's
/// gradient rounded to bf16, the weight's gradient summed in f32 (returned), the normalised
/// rows' gradient rounded to bf16; the input gradient added to `dx`.
pub fn bf16_rounded_back(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<Tensor> {
    let round = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let ct = round(dy.clone())?;
    let n = round(normalized(gpu, x, eps)?)?;
    let dw = (&ct * &n)?.sum(0)?;
    let dn = round(ct.broadcast_mul(w)?)?;
    let ones = Tensor::ones(w.dim(0)?, DType::F32, gpu.device())?;
    rmsnorm_back_x(gpu, x, &ones, &dn, dx, eps, true)?;
    Ok(dw)
}

/// RMSNorm of `x` (..., d), contiguous, with the f32 weight `w` (d), in x's dtype; its
/// backward is `backward`.
pub fn rms_norm_op(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op2(w, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    cuda_only!(2, "RMSNorm");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (y, yb) = alloc(xs.device(), xs.dtype(), xl.shape())?;
        let gpu = Gpu::new(xs.device());
        rmsnorm(&gpu, &Buf::of(xs, xl)?, &Buf::of(ws, wl)?, &yb, self.eps)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gpu = Gpu::of(x.device())?;
        let dx = gpu.empty(x.shape(), x.dtype())?;
        let dw = backward(&gpu, x, w, &dy.contiguous()?, &dx, self.eps, false, None)?;
        Ok((Some(dx), Some(dw)))
    }
}
