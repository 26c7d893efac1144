//! Cross-entropy over the vocabulary without an f32 copy of the logits.

use super::*;

/// Per-row cross-entropy of logits (rows, V) in f32 or bf16 against u32 targets (rows):
/// out (rows, 2) f32 = [loss, log-sum-exp]. The backward writes the logits' gradient in
/// their dtype in one pass; no f32 copy of the logits is ever made.
pub struct CrossEntropy;

fn ce_launch(rows: usize) -> LaunchConfig {
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
        let dev = xs.device().clone();
        let (rows, v) = xl.shape().dims2()?;
        let (rows64, v32) = (rows as i64, v as i32);
        let y = contiguous::<u32>(ys, yl, "cross-entropy targets")?;
        let out = dev.alloc_zeros::<f32>(2 * rows)?;
        let f = dev.get_or_load_custom_func(
            &format!("cross_entropy_{}", suffix(xs.dtype())?),
            MODULE,
            ptx()?,
        )?;
        macro_rules! go {
            ($t:ty) => {{
                let x = contiguous::<$t>(xs, xl, "logits")?;
                let mut b = f.builder();
                b.arg(&x).arg(&y).arg(&out).arg(&rows64).arg(&v32);
                unsafe { b.launch(ce_launch(rows)) }.w()?;
            }};
        }
        match xs.dtype() {
            DType::F32 => go!(f32),
            _ => go!(half::bf16),
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, 2)),
        ))
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
        let dev = xs.device().clone();
        let (rows, v) = xl.shape().dims2()?;
        let (rows64, v32) = (rows as i64, v as i32);
        let y = contiguous::<u32>(ys, yl, "cross-entropy targets")?;
        let lg = contiguous::<f32>(ls, ll, "cross-entropy row terms")?;
        let f = dev.get_or_load_custom_func(
            &format!("cross_entropy_bwd_{}", suffix(xs.dtype())?),
            MODULE,
            ptx()?,
        )?;
        macro_rules! go {
            ($t:ty) => {{
                let x = contiguous::<$t>(xs, xl, "logits")?;
                let dx = unsafe { dev.alloc::<$t>(rows * v)? };
                let mut b = f.builder();
                b.arg(&x).arg(&y).arg(&lg).arg(&dx).arg(&rows64).arg(&v32);
                unsafe { b.launch(ce_launch(rows)) }.w()?;
                CudaStorage::wrap_cuda_slice(dx, dev.clone())
            }};
        }
        let dx = match xs.dtype() {
            DType::F32 => go!(f32),
            _ => go!(half::bf16),
        };
        Ok((dx, xl.shape().clone()))
    }
}
