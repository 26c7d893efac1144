//! The ternary projection W -> W_t with the straight-through backward.

use super::*;

/// W (f32, (out, in)) -> W_t in `dtype`; the backward is the straight-through identity
/// (the incoming gradient, cast to f32), so no `W + (W_t - W).detach()` passes are needed.
pub struct TernaryProjection {
    pub group: usize,
    pub dtype: DType,
}

/// Launches the ternarize kernel: `n` f32 weights at `w` to `W_t` in `dtype` at `out`, one
/// warp per group of `group` weights.
pub(super) fn ternarize(
    dev: &CudaDevice,
    w: u64,
    out: u64,
    n: usize,
    group: usize,
    dtype: DType,
) -> Result<()> {
    if group == 0 || !n.is_multiple_of(group) {
        candle_core::bail!("group size {group} does not divide {n} weights");
    }
    let groups = n / group;
    let args = [P(w), P(out), I64(groups as i64), I32(group as i32)];
    launch(
        dev,
        &kernel("ternarize", dtype)?,
        warp_per_row(groups),
        &args,
    )
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
        let w = sptr(s, l, "ternary projection")?;
        ternarize(dev, w, op, n, self.group, self.dtype)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(w.dtype())?))
    }
}
