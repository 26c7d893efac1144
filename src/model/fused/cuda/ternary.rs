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
        if s.dtype() != DType::F32 {
            candle_core::bail!("the ternary projection takes f32 latent weights");
        }
        let dev = s.device();
        let n = l.shape().elem_count();
        let (out, op) = alloc(dev, self.dtype, n, false)?;
        let g = self.group;
        if g == 0 || !n.is_multiple_of(g) {
            candle_core::bail!("group size {g} does not divide {n} weights");
        }
        // One warp per group of g weights.
        let groups = n / g;
        let args = [
            P(sptr(s, l, "ternary projection")?),
            P(op),
            I64(groups as i64),
            I32(g as i32),
        ];
        launch(
            dev,
            &kernel("ternarize", self.dtype)?,
            warp_per_row(groups),
            &args,
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(w.dtype())?))
    }
}
