//! RMSNorm: forward, and the backward for the input and the weight.

use super::*;

/// RMSNorm over the last dimension: (x (..., d) in f32 or bf16, w (d) f32) -> y like x.
pub struct RmsNorm {
    pub eps: f32,
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
        let dev = xs.device();
        let (n, d) = (xl.shape().elem_count(), wl.shape().elem_count());
        let rows = n / d;
        let (y, yp) = alloc(dev, xs.dtype(), n, false)?;
        let args = [
            P(sptr(xs, xl, "RMSNorm input")?),
            P(sptr(ws, wl, "RMSNorm weight")?),
            P(yp),
            I64(rows as i64),
            I32(d as i32),
            F32(self.eps),
        ];
        let name = kernel("rmsnorm_fwd", xs.dtype())?;
        launch(dev, &name, warp_per_row(rows), &args)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBackX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(
            &dy,
            &RmsNormBackW {
                eps: self.eps,
                d: w.elem_count(),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (x, w, dy) -> dx, like x.
struct RmsNormBackX {
    eps: f32,
}

impl candle_core::CustomOp3 for RmsNormBackX {
    fn name(&self) -> &'static str {
        "rms-norm-backward-x"
    }

    cuda_only!(3, "RMSNorm");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (n, d) = (xl.shape().elem_count(), wl.shape().elem_count());
        let rows = n / d;
        let (dx, dxp) = alloc(dev, xs.dtype(), n, false)?;
        let args = [
            P(sptr(xs, xl, "RMSNorm input")?),
            P(sptr(ws, wl, "RMSNorm weight")?),
            P(sptr(gs, gl, "RMSNorm output gradient")?),
            P(dxp),
            I64(rows as i64),
            I32(d as i32),
            F32(self.eps),
        ];
        // Head-sized rows (q/k norms) keep fewer values per lane in registers.
        let base = if d <= 128 {
            "rmsnorm_bwd_x_small"
        } else {
            "rmsnorm_bwd_x"
        };
        launch(dev, &kernel(base, xs.dtype())?, warp_per_row(rows), &args)?;
        Ok((dx, xl.shape().clone()))
    }
}

/// The weight gradient's launch: a block per 64 rows, a thread per column up to 256.
fn rms_norm_bwd_w_launch(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(64) as u32, 1, 1),
        block_dim: (d.next_multiple_of(32).min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// (x, dy) -> dw (d), f32.
pub(super) struct RmsNormBackW {
    pub eps: f32,
    pub d: usize,
}

impl CustomOp2 for RmsNormBackW {
    fn name(&self) -> &'static str {
        "rms-norm-backward-w"
    }

    cuda_only!(2, "RMSNorm");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let d = self.d;
        let rows = xl.shape().elem_count() / d;
        let (dw, dwp) = alloc(dev, DType::F32, d, true)?;
        let args = [
            P(sptr(xs, xl, "RMSNorm input")?),
            P(sptr(gs, gl, "RMSNorm output gradient")?),
            P(dwp),
            I64(rows as i64),
            I32(d as i32),
            F32(self.eps),
        ];
        let name = kernel("rmsnorm_bwd_w", xs.dtype())?;
        launch(dev, &name, rms_norm_bwd_w_launch(rows, d), &args)?;
        Ok((dw, Shape::from(d)))
    }
}
