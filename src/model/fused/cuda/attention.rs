//! RoPE and the causal softmax of attention scores, forward and backward.

use super::*;

/// RoPE on (B, N, L, D) with f32 cos / sin tables (L, D); backward = the transposed rotation.
pub struct Rope {
    pub backward: bool,
}

impl candle_core::CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    cuda_only!(3, "RoPE");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let (l, d) = cl.shape().dims2()?;
        let n = xl.shape().elem_count();
        let cos = contiguous::<f32>(cs, cl, "RoPE cos")?;
        let sin = contiguous::<f32>(ss, sl, "RoPE sin")?;
        let (n64, l32, d32, bwd) = (n as i64, l as i32, d as i32, i32::from(self.backward));
        let f =
            dev.get_or_load_custom_func(&format!("rope_{}", suffix(xs.dtype())?), MODULE, ptx()?)?;
        let cfg = LaunchConfig::for_num_elems(n as u32);
        macro_rules! go {
            ($t:ty) => {{
                let x = contiguous::<$t>(xs, xl, "RoPE input")?;
                let y = unsafe { dev.alloc::<$t>(n)? };
                let mut b = f.builder();
                b.arg(&x).arg(&cos).arg(&sin).arg(&y);
                b.arg(&n64).arg(&l32).arg(&d32).arg(&bwd);
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let y = match xs.dtype() {
            DType::F32 => go!(f32),
            _ => go!(half::bf16),
        };
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { backward: true })?;
        Ok((Some(dx), None, None))
    }
}

/// Causal softmax of `scale * scores` over the last dim of (..., L, L), in f32 arithmetic,
/// output in the scores' dtype.
pub struct CausalSoftmax {
    pub scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    cuda_only!(1, "causal softmax");

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let l = xl.shape().dims().last().copied().unwrap_or(1);
        let n = xl.shape().elem_count();
        let rows = (n / l) as i64;
        let (l32, scale) = (l as i32, self.scale);
        let p = launch_like!(
            dev,
            xs.dtype(),
            n,
            warp_per_row(rows as usize),
            "causal_softmax",
            [In(xs, xl)],
            [rows, l32, scale]
        );
        Ok((p, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        let dp = dp.contiguous()?;
        Ok(Some(p.apply_op2_no_bwd(
            &dp,
            &CausalSoftmaxBack { scale: self.scale },
        )?))
    }
}

struct CausalSoftmaxBack {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBack {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    cuda_only!(2, "causal softmax");

    fn cuda_fwd(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = ps.device().clone();
        let l = pl.shape().dims().last().copied().unwrap_or(1);
        let n = pl.shape().elem_count();
        let rows = (n / l) as i64;
        let (l32, scale) = (l as i32, self.scale);
        let dx = launch_like!(
            dev,
            ps.dtype(),
            n,
            warp_per_row(rows as usize),
            "causal_softmax_bwd",
            [In(ps, pl), In(gs, gl)],
            [rows, l32, scale]
        );
        Ok((dx, pl.shape().clone()))
    }
}
