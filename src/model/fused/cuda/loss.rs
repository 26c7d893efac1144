//! Cross-entropy over the vocabulary without an f32 copy of the logits.

use super::*;

/// Per-row cross-entropy of logits (rows, V) in f32 or bf16 against u32 targets (rows):
/// out (rows, 2) f32 = [loss, log-sum-exp]. The backward writes the logits' gradient in
/// their dtype in one pass; no f32 copy of the logits is ever made.
pub struct CrossEntropy;

/// One block of 512 threads per row of logits.
pub(super) fn ce_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    cuda_only!(2, "cross-entropy");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (rows, v) = xl.shape().dims2()?;
        let (out, op) = alloc(dev, DType::F32, 2 * rows, true)?;
        let args = [
            P(sptr(xs, xl, "logits")?),
            P(sptr(ys, yl, "cross-entropy targets")?),
            P(op),
            I64(rows as i64),
            I32(v as i32),
        ];
        launch(
            dev,
            &kernel("cross_entropy", xs.dtype())?,
            ce_launch(rows),
            &args,
        )?;
        Ok((out, Shape::from((rows, 2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // (rows, 2) = [lse, d loss_r]: the two per-row numbers the backward kernel needs.
        let lg = Tensor::cat(&[&out.narrow(1, 1, 1)?, &grad.narrow(1, 0, 1)?], 1)?.contiguous()?;
        let dx = x.apply_op3_no_bwd(y, &lg, &CrossEntropyBack)?;
        Ok((Some(dx), None))
    }
}

struct CrossEntropyBack;

impl candle_core::CustomOp3 for CrossEntropyBack {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    cuda_only!(3, "cross-entropy");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        ls: &CudaStorage,
        ll: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (rows, v) = xl.shape().dims2()?;
        let (dx, dxp) = alloc(dev, xs.dtype(), rows * v, false)?;
        let args = [
            P(sptr(xs, xl, "logits")?),
            P(sptr(ys, yl, "cross-entropy targets")?),
            P(sptr(ls, ll, "cross-entropy row terms")?),
            P(dxp),
            I64(rows as i64),
            I32(v as i32),
        ];
        let name = kernel("cross_entropy_bwd", xs.dtype())?;
        launch(dev, &name, ce_launch(rows), &args)?;
        Ok((dx, xl.shape().clone()))
    }
}
