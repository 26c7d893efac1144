//! One in-place AdamW step of an f32 or bf16 parameter (`adamw.cu`; the two arithmetics are
//! `crate::optim`'s, which the kernels reproduce to the bit).

use super::launch::{family, per_item, AsBuf, Family, Gpu};
use candle_core::{DType, Result};

static KERNELS: Family = family!("ternlab_adamw", "adamw.cu");

/// The step's scalars, already in the parameter's precision (see `crate::optim::StepConstants`).
pub struct Scalars {
    pub lr: f32,
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
    pub decay: f32,
    /// f32: the bias corrections of m and v (`scale_m`, `scale_v`); bf16: MLX's `c1`, `c2`.
    pub correction: (f32, f32),
    pub bias_correction: bool,
}

/// `adamw_{f32,bf16}(T* p, T* m, T* v, const float* g, long n, float lr, float b1, float omb1,
/// float b2, float omb2, float eps, float decay, float corr_a, float corr_b,
/// int bias_correction)`: p, m, v (all f32, or all bf16) updated in place from the f32 gradient.
pub fn adamw(
    gpu: &Gpu,
    p: &impl AsBuf,
    m: &impl AsBuf,
    v: &impl AsBuf,
    g: &impl AsBuf,
    k: &Scalars,
) -> Result<()> {
    let (p, m, v, g) = (p.buf()?, m.buf()?, v.buf()?, g.buf()?);
    let n = p.n();
    if !matches!(p.dtype, DType::F32 | DType::BF16) {
        candle_core::bail!(
            "fused AdamW: a {:?} parameter (train.dense_dtype = \"checkpoint\" on such a \
             checkpoint); the CUDA kernels take f32 or bf16: set train.dense_dtype = \"f32\"",
            p.dtype
        );
    }
    m.expect("fused AdamW: the first moment", n, p.dtype)?;
    v.expect("fused AdamW: the second moment", n, p.dtype)?;
    g.expect("fused AdamW: the gradient", n, DType::F32)?;
    gpu.kernel(&KERNELS, "adamw", Some(p.dtype), per_item(n))?
        .buf(&p)
        .buf(&m)
        .buf(&v)
        .buf(&g)
        .i64(n)
        .f32(k.lr)
        .f32(k.b1)
        .f32(k.one_minus_b1)
        .f32(k.b2)
        .f32(k.one_minus_b2)
        .f32(k.eps)
        .f32(k.decay)
        .f32(k.correction.0)
        .f32(k.correction.1)
        .i32(usize::from(k.bias_correction))
        .go()
}
