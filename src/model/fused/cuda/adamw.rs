//! One in-place AdamW step of an f32 or bf16 parameter (see `crate::optim` for the two
//! arithmetics; the kernels reproduce the composed version there to the bit).

use super::*;
use crate::optim::StepConstants;

/// One AdamW step of one parameter, in place: `p`, `m`, `v` (all f32, or all bf16) updated
/// from the gradient `g` (f32, or the parameter's dtype).
pub fn adamw_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    k: &StepConstants,
    bias_correction: bool,
) -> Result<()> {
    let dtype = p.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16) {
        candle_core::bail!(
            "fused AdamW: a {dtype:?} parameter (train.dense_dtype = \"checkpoint\" on an {dtype:?} \
             checkpoint); the CUDA kernels take f32 or bf16: set train.dense_dtype = \"f32\""
        );
    }
    for (t, what) in [(m, "first moment"), (v, "second moment")] {
        if t.dtype() != dtype {
            candle_core::bail!("fused AdamW: the {what} is {:?}, not {dtype:?}", t.dtype());
        }
    }
    // A bf16 gradient widens to f32 exactly; the kernel rounds f32 gradients to bf16 itself.
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let candle_core::Device::Cuda(dev) = p.device() else {
        candle_core::bail!("fused AdamW: the parameter is not on the GPU");
    };
    let n = p.elem_count();
    let f = |x: f64| F32(x as f32);
    let (corr_a, corr_b) = if dtype == DType::F32 {
        (k.scale_m, k.scale_v)
    } else {
        (k.c1, k.c2)
    };
    let args = [
        P(ptr(p)?),
        P(ptr(m)?),
        P(ptr(v)?),
        P(ptr(&g)?),
        I64(n as i64),
        f(k.lr),
        f(k.b1),
        f(k.one_minus_b1),
        f(k.b2),
        f(k.one_minus_b2),
        f(k.eps),
        f(k.decay),
        f(corr_a),
        f(corr_b),
        I32(bias_correction as i32),
    ];
    launch(dev, &kernel("adamw", dtype)?, elementwise(n), &args)
}
