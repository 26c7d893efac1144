//! The SwiGLU gate `silu(g) * u` (`mlp.cu`): typed launchers and the autograd op, whose
//! backward is the step's kernel.

use super::launch::{alloc, cuda_only, family, per_item, AsBuf, Buf, Family, Gpu};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_mlp", "mlp.cu");

/// `silu_mul(const T* g, const T* u, T* y, long n)`: y = silu(g) * u, all alike.
pub fn silu_mul(gpu: &Gpu, g: &impl AsBuf, u: &impl AsBuf, y: &impl AsBuf) -> Result<()> {
    let (g, u, y) = (g.buf()?, u.buf()?, y.buf()?);
    let n = g.n();
    u.expect("silu_mul: u", n, g.dtype)?;
    y.expect("silu_mul: y", n, g.dtype)?;
    // Eight neighbouring elements per thread.
    gpu.kernel(&KERNELS, "silu_mul", Some(g.dtype), per_item(n.div_ceil(8)))?
        .buf(&g)
        .buf(&u)
        .buf(&y)
        .i64(n)
        .go()
}

/// `silu_mul_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, long n)`: both inputs'
/// gradients from the output's, all alike.
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
    gpu.kernel(
        &KERNELS,
        "silu_mul_bwd",
        Some(g.dtype),
        per_item(n.div_ceil(8)),
    )?
    .buf(&g)
    .buf(&u)
    .buf(&dy)
    .buf(&dg)
    .buf(&du)
    .i64(n)
    .go()
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
