//! The SwiGLU gate `silu(g) * u` (`mlp.cu`): typed launchers and the autograd op, whose
//! backward is the step's kernel.

use super::launch::{alloc, cuda_only, family, per_item_u32, AsBuf, Buf, Family, Gpu};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_mlp", "mlp.cu");

/// Where a layout of the gate's inputs starts and how its rows step: `rows` rows of `f`, the
/// inputs (and their gradients) `si` elements apart, the output (and its gradient) `so`.
#[derive(Clone, Copy)]
struct Rows {
    rows: usize,
    f: usize,
    si: usize,
    so: usize,
}

/// `silu_mul(const T* g, const T* u, T* y, long rows, long f, long si, long so)`: y = silu(g) *
/// u, eight elements a thread.
fn silu_mul_rows(gpu: &Gpu, g: &Buf, u: &Buf, y: &Buf, r: Rows) -> Result<()> {
    let threads = per_item_u32("silu_mul", r.rows * r.f.div_ceil(8))?;
    gpu.kernel(&KERNELS, "silu_mul", Some(g.dtype), threads)?
        .buf(g)
        .buf(u)
        .buf(y)
        .i64(r.rows)
        .i64(r.f)
        .i64(r.si)
        .i64(r.so)
        .go()
}

/// `silu_mul_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, long rows, long f, long si,
/// long so)`: both inputs' gradients from the output's.
fn silu_mul_back_rows(gpu: &Gpu, [g, u, dy, dg, du]: [&Buf; 5], r: Rows) -> Result<()> {
    let threads = per_item_u32("silu_mul_bwd", r.rows * r.f.div_ceil(8))?;
    gpu.kernel(&KERNELS, "silu_mul_bwd", Some(g.dtype), threads)?
        .buf(g)
        .buf(u)
        .buf(dy)
        .buf(dg)
        .buf(du)
        .i64(r.rows)
        .i64(r.f)
        .i64(r.si)
        .i64(r.so)
        .go()
}

/// One contiguous row of n.
fn flat(n: usize) -> Rows {
    Rows {
        rows: 1,
        f: n,
        si: n,
        so: n,
    }
}

/// y = silu(g) * u, all alike and contiguous.
pub fn silu_mul(gpu: &Gpu, g: &impl AsBuf, u: &impl AsBuf, y: &impl AsBuf) -> Result<()> {
    let (g, u, y) = (g.buf()?, u.buf()?, y.buf()?);
    let n = g.n();
    u.expect("silu_mul: u", n, g.dtype)?;
    y.expect("silu_mul: y", n, g.dtype)?;
    silu_mul_rows(gpu, &g, &u, &y, flat(n))
}

/// Both inputs' gradients from the output's, all alike and contiguous.
pub fn silu_mul_back(
    gpu: &Gpu,
    g: &impl AsBuf,
    u: &impl AsBuf,
    dy: &impl AsBuf,
    dg: &impl AsBuf,
    du: &impl AsBuf,
) -> Result<()> {
    let (g, u, dy, dg, du) = (g.buf()?, u.buf()?, dy.buf()?, dg.buf()?, du.buf()?);
    let n = g.n();
    for (b, what) in [(&u, "u"), (&dy, "dy"), (&dg, "dg"), (&du, "du")] {
        b.expect(&format!("silu_mul_bwd: {what}"), n, g.dtype)?;
    }
    silu_mul_back_rows(gpu, [&g, &u, &dy, &dg, &du], flat(n))
}

/// The two halves of rows of `gu` (rows, 2f): gate's f values then up's, as the fused gate/up
/// projection writes them.
fn halves(what: &str, gu: &Buf) -> Result<(Buf, Buf, usize, usize)> {
    let two_f = gu.last();
    if gu.dims.len() != 2 || two_f == 0 || !two_f.is_multiple_of(2) {
        candle_core::bail!("{what}: {:?} is not rows of gate then up", gu.dims);
    }
    let (rows, f) = (gu.n() / two_f, two_f / 2);
    let g = Buf {
        dims: vec![rows, f],
        ..gu.clone()
    };
    let u = Buf {
        p: gu.p + (f * gu.dtype.size_in_bytes()) as u64,
        ..g.clone()
    };
    Ok((g, u, rows, f))
}

/// y (rows, f) = silu(g) * u for `gu` (rows, 2f) holding each row's g then u.
pub fn silu_mul_halves(gpu: &Gpu, gu: &impl AsBuf, y: &impl AsBuf) -> Result<()> {
    let (gu, y) = (gu.buf()?, y.buf()?);
    let (g, u, rows, f) = halves("silu_mul_halves", &gu)?;
    y.expect("silu_mul_halves: y", rows * f, gu.dtype)?;
    let r = Rows {
        rows,
        f,
        si: 2 * f,
        so: f,
    };
    silu_mul_rows(gpu, &g, &u, &y, r)
}

/// `silu_mul_halves`' backward: dgu (rows, 2f) = each row's dg then du, from dy (rows, f).
pub fn silu_mul_halves_back(
    gpu: &Gpu,
    gu: &impl AsBuf,
    dy: &impl AsBuf,
    dgu: &impl AsBuf,
) -> Result<()> {
    let (gu, dy, dgu) = (gu.buf()?, dy.buf()?, dgu.buf()?);
    let (g, u, rows, f) = halves("silu_mul_halves_bwd", &gu)?;
    dy.expect("silu_mul_halves_bwd: dy", rows * f, gu.dtype)?;
    dgu.expect("silu_mul_halves_bwd: dgu", gu.n(), gu.dtype)?;
    let (dg, du, _, _) = halves("silu_mul_halves_bwd", &dgu)?;
    let r = Rows {
        rows,
        f,
        si: 2 * f,
        so: f,
    };
    silu_mul_back_rows(gpu, [&g, &u, &dy, &dg, &du], r)
}

/// `silu(g) * u` of two contiguous tensors alike, with its gradient to both.
pub fn silu_mul_op(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.apply_op2(u, SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    cuda_only!(2, "SiLU gate");

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (y, yb) = alloc(gs.device(), gs.dtype(), gl.shape())?;
        silu_mul(
            &Gpu::new(gs.device()),
            &Buf::of(gs, gl)?,
            &Buf::of(us, ul)?,
            &yb,
        )?;
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gpu = Gpu::of(g.device())?;
        let (dg, du) = (
            gpu.empty(g.shape(), g.dtype())?,
            gpu.empty(g.shape(), g.dtype())?,
        );
        silu_mul_back(&gpu, g, u, &dy.contiguous()?, &dg, &du)?;
        Ok((Some(dg), Some(du)))
    }
}
