//! The ternary projection W -> W_t with the straight-through backward.

use super::*;

/// W (f32, (out, in)) -> W_t in `dtype`; the backward is the straight-through identity
/// (the incoming gradient, cast to f32), so no `W + (W_t - W).detach()` passes are needed.
pub struct TernaryProjection {
    pub group: usize,
    pub dtype: DType,
}

impl CustomOp1 for TernaryProjection {
    fn name(&self) -> &'static str {
        "ternary-projection"
    }

    cuda_only!(1, "ternary projection");

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let w = contiguous_f32(s, l, "ternary projection")?;
        let n = l.shape().elem_count();
        let g = self.group;
        if g == 0 || !n.is_multiple_of(g) {
            candle_core::bail!("group size {g} does not divide {n} weights");
        }
        let groups = (n / g) as i64;
        let threads = 256u32;
        let cfg = LaunchConfig {
            grid_dim: ((groups as u64 * 32).div_ceil(threads as u64) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let g32 = g as i32;
        let out = match self.dtype {
            DType::F32 => {
                let out = unsafe { dev.alloc::<f32>(n)? };
                let f = dev.get_or_load_custom_func("ternarize_f32", MODULE, ptx()?)?;
                let mut b = f.builder();
                b.arg(&w).arg(&out).arg(&groups).arg(&g32);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            DType::BF16 => {
                let out = unsafe { dev.alloc::<half::bf16>(n)? };
                let f = dev.get_or_load_custom_func("ternarize_bf16", MODULE, ptx()?)?;
                let mut b = f.builder();
                b.arg(&w).arg(&out).arg(&groups).arg(&g32);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            other => candle_core::bail!("ternary projection to {other:?} is not supported"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(w.dtype())?))
    }
}
