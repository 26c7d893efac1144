//! Fused CUDA kernels for the hot spots of a training step, compiled at run time with NVRTC,
//! each beside the composed candle version it replaces. The composed versions run on CPU and
//! Metal and are the reference the GPU tests compare the fused ones against.
//!
//! - `ternary_weight`: one pass from the f32 latent W to W_t in the compute dtype (f32 or
//!   bf16), one warp per group; its backward is the straight-through identity, cast to f32.
//! - `AdamW` (in `crate::optim`) uses `adamw_step`: one kernel per parameter updates the
//!   weight and both moments in place.

use super::ternary::ste_weight;
use candle_core::{DType, Result, Tensor};

/// The weight a ternary layer multiplies by, in `dtype`: `W_t` in value, identity gradient to
/// the f32 latent `w`. Fused on CUDA (when `fused`), composed elsewhere.
pub fn ternary_weight(w: &Tensor, group: usize, dtype: DType, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused && w.device().is_cuda() {
        return w.apply_op1(cuda::TernaryProjection { group, dtype });
    }
    let _ = fused;
    ste_weight(w, group)?.to_dtype(dtype)
}

#[cfg(feature = "cuda")]
pub mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
    use std::sync::OnceLock;

    const SOURCE: &str = r#"
__device__ __forceinline__ unsigned short f32_to_bf16(float v) {
    unsigned int u = __float_as_uint(v);
    u += 0x7fffu + ((u >> 16) & 1u);   // round to nearest even
    return (unsigned short)(u >> 16);
}

// One warp per group of g input columns: s = max(mean|w|, 1e-8), W_t = s * [|w/s| > 0.5] * sign(w).
#define TERNARIZE(NAME, OUT_T, STORE)                                                        \
extern "C" __global__ void NAME(const float* w, OUT_T* out, long groups, int g) {            \
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;                           \
    int lane = threadIdx.x % 32;                                                              \
    if (warp >= groups) return;                                                               \
    const float* src = w + warp * g;                                                          \
    float acc = 0.f;                                                                          \
    for (int i = lane; i < g; i += 32) acc += fabsf(src[i]);                                  \
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);              \
    float s = fmaxf(acc / (float)g, 1e-8f);                                                   \
    for (int i = lane; i < g; i += 32) {                                                      \
        float x = src[i] / s;                                                                 \
        float q = fabsf(x) > 0.5f ? (x > 0.f ? 1.f : -1.f) : 0.f;                             \
        out[warp * g + i] = STORE(q * s);                                                     \
    }                                                                                         \
}
#define ID(v) (v)
TERNARIZE(ternarize_f32, float, ID)
TERNARIZE(ternarize_bf16, unsigned short, f32_to_bf16)

extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, long n,
                                     float lr, float b1, float b2, float eps, float decay,
                                     float scale_m, float scale_v) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = b1 * m[i] + (1.f - b1) * gi;
    float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - lr * (mi * scale_m) / (sqrtf(vi * scale_v) + eps);
}
"#;

    const MODULE: &str = "ternlab_fused";

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling ternlab's CUDA kernels with NVRTC: {e}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    fn contiguous_f32<'a>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{what}: the fused kernel needs a contiguous tensor");
        };
        Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
    }

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

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused ternary projection runs on CUDA only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device().clone();
            let w = contiguous_f32(s, l, "ternary projection")?;
            let n = l.shape().elem_count();
            let g = self.group;
            if g == 0 || !n.is_multiple_of(g) {
                candle_core::bail!("group size {g} does not divide {n} weights");
            }
            let groups = (n / g) as i64;
            let threads = 256u32;
            let cfg = LaunchConfig {
                grid_dim: ((groups as u64 * 32).div_ceil(threads as u64) as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let g32 = g as i32;
            let out = match self.dtype {
                DType::F32 => {
                    let out = unsafe { dev.alloc::<f32>(n)? };
                    let f = dev.get_or_load_custom_func("ternarize_f32", MODULE, ptx()?)?;
                    let mut b = f.builder();
                    b.arg(&w).arg(&out).arg(&groups).arg(&g32);
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev)
                }
                DType::BF16 => {
                    let out = unsafe { dev.alloc::<half::bf16>(n)? };
                    let f = dev.get_or_load_custom_func("ternarize_bf16", MODULE, ptx()?)?;
                    let mut b = f.builder();
                    b.arg(&w).arg(&out).arg(&groups).arg(&g32);
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev)
                }
                other => candle_core::bail!("ternary projection to {other:?} is not supported"),
            };
            Ok((out, l.shape().clone()))
        }

        fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(grad.to_dtype(w.dtype())?))
        }
    }

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
}
