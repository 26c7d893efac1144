//! One in-place AdamW step of an f32 parameter.

use super::*;

/// One AdamW step of one f32 parameter, in place: `p`, `m`, `v` updated from `g`.
/// Same arithmetic as candle_nn's AdamW (and PyTorch's), in one pass.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    step: usize,
) -> Result<()> {
    let g = g.contiguous()?;
    let n = p.elem_count();
    for (t, what) in [
        (p, "parameter"),
        (m, "first moment"),
        (v, "second moment"),
        (&g, "gradient"),
    ] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("fused AdamW: the {what} is {:?}, not f32", t.dtype());
        }
    }
    let candle_core::Device::Cuda(dev) = p.device() else {
        candle_core::bail!("fused AdamW: the parameter is not on the GPU");
    };
    let (b1, b2) = betas;
    let scale_m = (1.0 / (1.0 - b1.powi(step as i32))) as f32;
    let scale_v = (1.0 / (1.0 - b2.powi(step as i32))) as f32;
    let decay = (1.0 - lr * weight_decay) as f32;
    let args = [
        P(ptr(p)?),
        P(ptr(m)?),
        P(ptr(v)?),
        P(ptr(&g)?),
        I64(n as i64),
        F32(lr as f32),
        F32(b1 as f32),
        F32(b2 as f32),
        F32(eps as f32),
        F32(decay),
        F32(scale_m),
        F32(scale_v),
    ];
    launch(dev, "adamw_f32", elementwise(n), &args)
}
