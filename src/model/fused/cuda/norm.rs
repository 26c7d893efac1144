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
        let dev = xs.device().clone();
        let d = wl.shape().elem_count();
        let n = xl.shape().elem_count();
        let rows = (n / d) as i64;
        let w = contiguous::<f32>(ws, wl, "RMSNorm weight")?;
        let (d32, eps) = (d as i32, self.eps);
        let name = format!("rmsnorm_fwd_{}", suffix(xs.dtype())?);
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let cfg = warp_per_row(rows as usize);
        macro_rules! run {
            ($t:ty) => {{
                let x = contiguous::<$t>(xs, xl, "RMSNorm input")?;
                let y = unsafe { dev.alloc::<$t>(n)? };
                let mut b = f.builder();
                b.arg(&x).arg(&w).arg(&y).arg(&rows).arg(&d32).arg(&eps);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let y = match xs.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
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
        let dev = xs.device().clone();
        let d = wl.shape().elem_count();
        let n = xl.shape().elem_count();
        let rows = (n / d) as i64;
        let w = contiguous::<f32>(ws, wl, "RMSNorm weight")?;
        let (d32, eps) = (d as i32, self.eps);
        // Head-sized rows (q/k norms) keep fewer values per lane in registers.
        let small = if d <= 128 { "_small" } else { "" };
        let name = format!("rmsnorm_bwd_x{small}_{}", suffix(xs.dtype())?);
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let cfg = warp_per_row(rows as usize);
        macro_rules! run {
            ($t:ty) => {{
                let x = contiguous::<$t>(xs, xl, "RMSNorm input")?;
                let g = contiguous::<$t>(gs, gl, "RMSNorm output gradient")?;
                let dx = unsafe { dev.alloc::<$t>(n)? };
                let mut b = f.builder();
                b.arg(&x)
                    .arg(&w)
                    .arg(&g)
                    .arg(&dx)
                    .arg(&rows)
                    .arg(&d32)
                    .arg(&eps);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(dx, dev.clone())
            }};
        }
        let dx = match xs.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
        Ok((dx, xl.shape().clone()))
    }
}

/// The weight gradient's launch: a block per 64 rows, a thread per column up to 256.
pub(super) fn rms_norm_bwd_w_launch(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(64) as u32, 1, 1),
        block_dim: (d.next_multiple_of(32).min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// (x, dy) -> dw (d), f32.
struct RmsNormBackW {
    eps: f32,
    d: usize,
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
        let dev = xs.device().clone();
        let d = self.d;
        let n = xl.shape().elem_count();
        let rows = (n / d) as i64;
        let (d32, eps) = (d as i32, self.eps);
        let name = format!("rmsnorm_bwd_w_{}", suffix(xs.dtype())?);
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let cfg = rms_norm_bwd_w_launch(rows as usize, d);
        let dw = dev.alloc_zeros::<f32>(d)?;
        macro_rules! run {
            ($t:ty) => {{
                let x = contiguous::<$t>(xs, xl, "RMSNorm input")?;
                let g = contiguous::<$t>(gs, gl, "RMSNorm output gradient")?;
                let mut b = f.builder();
                b.arg(&x).arg(&g).arg(&dw).arg(&rows).arg(&d32).arg(&eps);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match xs.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        }
        Ok((CudaStorage::wrap_cuda_slice(dw, dev), Shape::from(d)))
    }
}
