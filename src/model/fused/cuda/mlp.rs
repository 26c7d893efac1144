//! The SwiGLU gate `silu(g) * u`, forward and backward.

use super::*;

/// `silu(g) * u` (the SwiGLU gate), forward and backward in one elementwise kernel each.
pub struct SiluMul;

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
        let dev = gs.device().clone();
        let n = gl.shape().elem_count();
        let n64 = n as i64;
        let cfg = LaunchConfig::for_num_elems(n as u32);
        let y = launch_like!(
            dev,
            gs.dtype(),
            n,
            cfg,
            "silu_mul",
            [In(gs, gl), In(us, ul)],
            [n64]
        );
        Ok((y, gl.shape().clone()))
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
        let dev = gs.device().clone();
        let n = gl.shape().elem_count();
        let n64 = n as i64;
        let cfg = LaunchConfig::for_num_elems(n as u32);
        let dg = launch_like!(
            dev,
            gs.dtype(),
            n,
            cfg,
            "silu_mul_bwd_g",
            [In(gs, gl), In(us, ul), In(ds, dl)],
            [n64]
        );
        Ok((dg, gl.shape().clone()))
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
        let dev = gs.device().clone();
        let n = gl.shape().elem_count();
        let n64 = n as i64;
        let cfg = LaunchConfig::for_num_elems(n as u32);
        let du = launch_like!(
            dev,
            gs.dtype(),
            n,
            cfg,
            "silu_mul_bwd_u",
            [In(gs, gl), In(ds, dl)],
            [n64]
        );
        Ok((du, gl.shape().clone()))
    }
}
