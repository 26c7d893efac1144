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
        let dev = xs.device();
        let (l, d) = cl.shape().dims2()?;
        let n = xl.shape().elem_count();
        let (y, yp) = alloc(dev, xs.dtype(), n, false)?;
        let args = [
            P(sptr(xs, xl, "RoPE input")?),
            P(sptr(cs, cl, "RoPE cos")?),
            P(sptr(ss, sl, "RoPE sin")?),
            P(yp),
            I64(n as i64),
            I32(l as i32),
            I32(d as i32),
            I32(i32::from(self.backward)),
        ];
        launch(dev, &kernel("rope", xs.dtype())?, elementwise(n), &args)?;
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

/// Runs a causal-softmax kernel (one warp per row of the last dim L of the first input) into a
/// new tensor like the first input.
fn softmax_rows(
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (s0, l0) = inputs[0];
    let dev = s0.device();
    let l = l0.shape().dims().last().copied().unwrap_or(1);
    let n = l0.shape().elem_count();
    let rows = n / l;
    let (y, yp) = alloc(dev, s0.dtype(), n, false)?;
    let mut args = inputs
        .iter()
        .map(|(s, lay)| Ok(P(sptr(s, lay, "attention scores")?)))
        .collect::<Result<Vec<_>>>()?;
    args.extend([P(yp), I64(rows as i64), I32(l as i32), F32(scale)]);
    launch(dev, &kernel(base, s0.dtype())?, warp_per_row(rows), &args)?;
    Ok((y, l0.shape().clone()))
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
        softmax_rows("causal_softmax", &[(xs, xl)], self.scale)
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
        softmax_rows("causal_softmax_bwd", &[(ps, pl), (gs, gl)], self.scale)
    }
}
