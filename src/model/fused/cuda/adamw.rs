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
    let n = p.elem_count() as i64;
    let (ps, pl) = p.storage_and_layout();
    let (ms, ml) = m.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    fn cuda(s: &candle_core::Storage) -> Result<&CudaStorage> {
        match s {
            candle_core::Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("fused AdamW: a tensor is not on the GPU"),
        }
    }
    let (ps, ms, vs, gs) = (cuda(&ps)?, cuda(&ms)?, cuda(&vs)?, cuda(&gs)?);
    let dev = ps.device().clone();
    let (pv, mv, vv, gv) = (
        contiguous_f32(ps, pl, "AdamW parameter")?,
        contiguous_f32(ms, ml, "AdamW first moment")?,
        contiguous_f32(vs, vl, "AdamW second moment")?,
        contiguous_f32(gs, gl, "AdamW gradient")?,
    );
    let (b1, b2) = betas;
    let scale_m = (1.0 / (1.0 - b1.powi(step as i32))) as f32;
    let scale_v = (1.0 / (1.0 - b2.powi(step as i32))) as f32;
    let (lr32, b1, b2, eps) = (lr as f32, b1 as f32, b2 as f32, eps as f32);
    let decay = (1.0 - lr * weight_decay) as f32;
    let f = dev.get_or_load_custom_func("adamw_f32", MODULE, ptx()?)?;
    let mut b = f.builder();
    b.arg(&pv).arg(&mv).arg(&vv).arg(&gv).arg(&n);
    b.arg(&lr32)
        .arg(&b1)
        .arg(&b2)
        .arg(&eps)
        .arg(&decay)
        .arg(&scale_m)
        .arg(&scale_v);
    unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
    Ok(())
}
