//! The ternary projection W -> W_t (`ternary.cu`) and its autograd op, whose backward is the
//! straight-through identity.

use super::launch::{alloc, cuda_only, family, warp_per_row, AsBuf, Buf, Family, Gpu};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_ternary", "ternary.cu");

/// `ternarize(const float* w, T* out, long groups, int g)`: `out` (any shape of w's count, f32
/// or bf16) = W_t of the f32 latent `w`, per group of `group` consecutive weights.
pub fn ternarize(gpu: &Gpu, w: &impl AsBuf, out: &impl AsBuf, group: usize) -> Result<()> {
    let (w, out) = (w.buf()?, out.buf()?);
    let n = w.n();
    w.expect("ternarize: latent", n, DType::F32)?;
    out.expect("ternarize: output", n, out.dtype)?;
    if group == 0 || !n.is_multiple_of(group) {
        candle_core::bail!("ternarize: group size {group} does not divide {n} weights");
    }
    let groups = n / group;
    gpu.kernel(&KERNELS, "ternarize", Some(out.dtype), warp_per_row(groups))?
        .buf(&w)
        .buf(&out)
        .i64(groups)
        .i32(group)
        .go()
}

/// W_t of the f32 latent `w` in `dtype`, with the straight-through gradient to `w`.
pub fn ternary_weight(w: &Tensor, group: usize, dtype: DType) -> Result<Tensor> {
    w.apply_op1(TernaryProjection { group, dtype })
}

struct TernaryProjection {
    group: usize,
    dtype: DType,
}

impl CustomOp1 for TernaryProjection {
    fn name(&self) -> &'static str {
        "ternary-projection"
    }

    cuda_only!(1, "ternary projection");

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (out, ob) = alloc(s.device(), self.dtype, l.shape())?;
        ternarize(&Gpu::new(s.device()), &Buf::of(s, l)?, &ob, self.group)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(w.dtype())?))
    }
}
