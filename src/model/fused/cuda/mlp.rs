//! The SwiGLU gate `silu(g) * u`, forward and backward.

use super::*;

/// `silu(g) * u` (the SwiGLU gate), forward and backward in one elementwise kernel each.
pub struct SiluMul;

/// Runs the elementwise kernel `base` over the inputs into a new tensor like the first, with
/// each thread taking `per_thread` consecutive elements.
fn map(
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    per_thread: usize,
) -> Result<(CudaStorage, Shape)> {
    let (s0, l0) = inputs[0];
    let dev = s0.device();
    let n = l0.shape().elem_count();
    let (y, yp) = alloc(dev, s0.dtype(), n, false)?;
    let mut args = inputs
        .iter()
        .map(|(s, l)| Ok(P(sptr(s, l, "SiLU gate input")?)))
        .collect::<Result<Vec<_>>>()?;
    args.extend([P(yp), I64(n as i64)]);
    let cfg = elementwise(n.div_ceil(per_thread));
    launch(dev, &kernel(base, s0.dtype())?, cfg, &args)?;
    Ok((y, l0.shape().clone()))
}

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
        // Two neighbouring values per thread.
        map("silu_mul2", &[(gs, gl), (us, ul)], 2)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &dy, &SiluMulBackG)?;
        let du = g.apply_op2_no_bwd(&dy, &SiluMulBackU)?;
        Ok((Some(dg), Some(du)))
    }
}

struct SiluMulBackG;

impl candle_core::CustomOp3 for SiluMulBackG {
    fn name(&self) -> &'static str {
        "silu-mul-backward-gate"
    }

    cuda_only!(3, "SiLU gate");

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        map("silu_mul_bwd_g", &[(gs, gl), (us, ul), (ds, dl)], 1)
    }
}

struct SiluMulBackU;

impl CustomOp2 for SiluMulBackU {
    fn name(&self) -> &'static str {
        "silu-mul-backward-up"
    }

    cuda_only!(2, "SiLU gate");

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        map("silu_mul_bwd_u", &[(gs, gl), (ds, dl)], 1)
    }
}
