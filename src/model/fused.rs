//! Fused CUDA kernels for the hot spots of a training step, compiled at run time with NVRTC,
//! each beside the composed candle version it replaces. The composed versions run on CPU and
//! Metal and are the reference the GPU tests compare the fused ones against.
//!
//! - `ternary_weight`: one pass from the f32 latent W to W_t in the compute dtype (f32 or
//!   bf16), one warp per group; its backward is the straight-through identity, cast to f32.
//! - `rms_norm`: RMSNorm forward in one kernel (a warp per row), backward in two (dx per row;
//!   dw per column over blocks of 64 rows), instead of ~8 and ~20 composed ops.
//! - `rope`: RoPE forward and backward as one elementwise kernel each (instead of narrow,
//!   negate, concatenate, two products and a sum, and their backward).
//! - `causal_softmax`: scale, causal mask and softmax of attention scores in one kernel (a warp
//!   per row, f32 arithmetic), backward in one, instead of ~8 and ~15 composed ops.
//! - `silu_mul`: the SwiGLU gate `silu(g) * u`, one kernel forward, two backward.
//! - `cross_entropy`: per-row log-sum-exp and loss in one kernel (a block per row), the
//!   logits' gradient in one more, in the logits' dtype: no f32 copy of (N, V) logits.
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

/// RMSNorm of `x` over its last dimension with the f32 weight `w`, in x's dtype; `None` when
/// the fused kernel does not apply (not CUDA, not fused, or a non-contiguous input), for the
/// caller to run the composed version.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && x.device().is_cuda() && x.is_contiguous() {
        return x.apply_op2(w, cuda::RmsNorm { eps: eps as f32 }).map(Some);
    }
    let _ = (x, w, eps, fused);
    Ok(None)
}

/// RoPE of `x` (B, N, L, D), contiguous, with (L, D) f32 tables; `None` where the fused
/// kernel does not apply.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && x.device().is_cuda() && x.is_contiguous() {
        return x
            .apply_op3(cos, sin, cuda::Rope { backward: false })
            .map(Some);
    }
    let _ = (x, cos, sin, fused);
    Ok(None)
}

/// Causal softmax of `scale * scores` over the last dim of (..., L, L), in the scores' dtype
/// (f32 arithmetic); `None` where the fused kernel does not apply.
pub fn causal_softmax(scores: &Tensor, scale: f64, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && scores.device().is_cuda() && scores.is_contiguous() {
        return scores
            .apply_op1(cuda::CausalSoftmax {
                scale: scale as f32,
            })
            .map(Some);
    }
    let _ = (scores, scale, fused);
    Ok(None)
}

/// `silu(g) * u`; `None` where the fused kernel does not apply.
pub fn silu_mul(g: &Tensor, u: &Tensor, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && g.device().is_cuda() && g.is_contiguous() && u.is_contiguous() {
        return g.apply_op2(u, cuda::SiluMul).map(Some);
    }
    let _ = (g, u, fused);
    Ok(None)
}

/// Mean token cross-entropy of logits (N, V) against u32 targets (N), f32 scalar; `None`
/// where the fused kernel does not apply.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, fused: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused && logits.device().is_cuda() && logits.is_contiguous() {
        let rows = logits.apply_op2(&targets.contiguous()?, cuda::CrossEntropy)?;
        return rows.narrow(1, 0, 1)?.mean_all().map(Some);
    }
    let _ = (logits, targets, fused);
    Ok(None)
}

#[cfg(feature = "cuda")]
pub mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{
        CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
    };
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

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const unsigned short* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(unsigned short* p, long i, float v) { p[i] = f32_to_bf16(v); }
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// RMSNorm, one warp per row of d: y = x * rsqrt(mean(x^2) + eps) * w, in f32 arithmetic.
template <typename T>
__device__ void rmsnorm_fwd(const T* x, const float* w, T* y, long rows, int d, float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float v = ld(xr, i); ss += v * v; }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int i = lane; i < d; i += 32) st(y + row * d, i, ld(xr, i) * r * w[i]);
}

// dx_j = r * g_j - r^3 * x_j / d * sum_i g_i x_i, with g = w * dy.
template <typename T>
__device__ void rmsnorm_bwd_x(const T* x, const float* w, const T* dy, T* dx, long rows, int d,
                              float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    float ss = 0.f, gx = 0.f;
    for (int i = lane; i < d; i += 32) {
        float v = ld(xr, i);
        ss += v * v;
        gx += w[i] * ld(gr, i) * v;
    }
    ss = warp_sum(ss);
    gx = warp_sum(gx);
    float r = rsqrtf(ss / d + eps);
    float c = r * r * r * gx / d;
    for (int i = lane; i < d; i += 32) st(dx + row * d, i, r * w[i] * ld(gr, i) - c * ld(xr, i));
}

// dw_j = sum over rows of dy_j * x_j * r_row: a block takes 64 rows, its warps find their r,
// its threads sum their columns, one atomic add per column per block.
template <typename T>
__device__ void rmsnorm_bwd_w(const T* x, const T* dy, float* dw, long rows, int d, float eps) {
    __shared__ float rs[64];
    long first = (long)blockIdx.x * 64;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int k = warp; k < 64; k += warps) {
        long row = first + k;
        float ss = 0.f;
        if (row < rows) for (int i = lane; i < d; i += 32) { float v = ld(x + row * d, i); ss += v * v; }
        ss = warp_sum(ss);
        if (lane == 0) rs[k] = rsqrtf(ss / d + eps);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = 0.f;
        for (int k = 0; k < 64 && first + k < rows; k++) {
            long row = first + k;
            acc += ld(dy + row * d, j) * ld(x + row * d, j) * rs[k];
        }
        atomicAdd(dw + j, acc);
    }
}

#define RMS_KERNELS(SUF, T)                                                                   \
extern "C" __global__ void rmsnorm_fwd_##SUF(const T* x, const float* w, T* y, long rows,     \
                                             int d, float eps) {                              \
    rmsnorm_fwd<T>(x, w, y, rows, d, eps);                                                    \
}                                                                                             \
extern "C" __global__ void rmsnorm_bwd_x_##SUF(const T* x, const float* w, const T* dy,       \
                                               T* dx, long rows, int d, float eps) {          \
    rmsnorm_bwd_x<T>(x, w, dy, dx, rows, d, eps);                                             \
}                                                                                             \
extern "C" __global__ void rmsnorm_bwd_w_##SUF(const T* x, const T* dy, float* dw, long rows, \
                                               int d, float eps) {                            \
    rmsnorm_bwd_w<T>(x, dy, dw, rows, d, eps);                                                \
}
RMS_KERNELS(f32, float)
RMS_KERNELS(bf16, unsigned short)

// RoPE on x (B, N, L, D) with cos, sin (L, D): y = x * cos + rotate_half(x) * sin, where
// rotate_half(x) = (-x[D/2:], x[:D/2]). `sign` = +1 forward; the backward is the transpose:
// dx = dy * cos + unrotate(dy * sin), the same loop with the sin terms moved across.
template <typename T>
__device__ void rope(const T* x, const float* cos, const float* sin, T* y, long n, int l, int d,
                     int backward) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    int i = idx % d;
    int pos = (idx / d) % l;
    int h = d / 2;
    long base = idx - i;
    const float* c = cos + (long)pos * d;
    const float* s = sin + (long)pos * d;
    float v = ld(x, idx) * c[i];
    if (!backward) {
        v += i < h ? -ld(x, base + i + h) * s[i] : ld(x, base + i - h) * s[i];
    } else {
        v += i < h ? ld(x, base + i + h) * s[i + h] : -ld(x, base + i - h) * s[i - h];
    }
    st(y, idx, v);
}

// Causal softmax over the last dim of scores (..., L, L): row r is query position r % L and
// sees keys 0..=r % L; computed in f32. `scale` multiplies the scores first.
template <typename T>
__device__ void causal_softmax(const T* x, T* p, long rows, int l, float scale) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = row % l;
    const T* xr = x + row * l;
    float m = __int_as_float(0xff800000);  // -inf (NVRTC has no math.h)
    for (int j = lane; j <= q; j += 32) m = fmaxf(m, ld(xr, j) * scale);
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    for (int j = lane; j <= q; j += 32) sum += __expf(ld(xr, j) * scale - m);
    sum = warp_sum(sum);
    float inv = 1.f / sum;
    for (int j = lane; j < l; j += 32)
        st(p + row * l, j, j <= q ? __expf(ld(xr, j) * scale - m) * inv : 0.f);
}

// dx = scale * p * (dy - sum(dy * p)) per row.
template <typename T>
__device__ void causal_softmax_bwd(const T* p, const T* dy, T* dx, long rows, int l,
                                   float scale) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* pr = p + row * l;
    const T* gr = dy + row * l;
    float dot = 0.f;
    for (int j = lane; j < l; j += 32) dot += ld(pr, j) * ld(gr, j);
    dot = warp_sum(dot);
    for (int j = lane; j < l; j += 32)
        st(dx + row * l, j, scale * ld(pr, j) * (ld(gr, j) - dot));
}

#define ATTN_KERNELS(SUF, T)                                                                  \
extern "C" __global__ void rope_##SUF(const T* x, const float* c, const float* s, T* y,        \
                                      long n, int l, int d, int backward) {                    \
    rope<T>(x, c, s, y, n, l, d, backward);                                                   \
}                                                                                             \
extern "C" __global__ void causal_softmax_##SUF(const T* x, T* p, long rows, int l,           \
                                                float scale) {                                \
    causal_softmax<T>(x, p, rows, l, scale);                                                  \
}                                                                                             \
extern "C" __global__ void causal_softmax_bwd_##SUF(const T* p, const T* dy, T* dx, long rows,\
                                                    int l, float scale) {                     \
    causal_softmax_bwd<T>(p, dy, dx, rows, l, scale);                                         \
}
ATTN_KERNELS(f32, float)
ATTN_KERNELS(bf16, unsigned short)

// y = silu(g) * u, and its two gradients.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }
template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = ld(g, i);
    st(y, i, a * sigmoid(a) * ld(u, i));
}
template <typename T>
__device__ void silu_mul_bwd_g(const T* g, const T* u, const T* dy, T* dg, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = ld(g, i), sg = sigmoid(a);
    st(dg, i, ld(dy, i) * ld(u, i) * sg * (1.f + a * (1.f - sg)));
}
template <typename T>
__device__ void silu_mul_bwd_u(const T* g, const T* dy, T* du, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = ld(g, i);
    st(du, i, ld(dy, i) * a * sigmoid(a));
}

// Cross-entropy per row of logits (rows, v) against targets, one block per row, online
// log-sum-exp in f32: out[2 r] = lse - x[target], out[2 r + 1] = lse.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == __int_as_float(0xff800000)) return;
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}
template <typename T>
__device__ void cross_entropy(const T* x, const unsigned int* y, float* out, long rows, int v) {
    __shared__ float sm[32], ss[32];
    long row = blockIdx.x;
    const T* xr = x + row * v;
    float m = __int_as_float(0xff800000), s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) merge(m, s, ld(xr, j), 1.f);
    for (int o = 16; o > 0; o /= 2) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = sm[0], S = ss[0];
        for (int w = 1; w < warps; w++) merge(M, S, sm[w], ss[w]);
        float lse = M + __logf(S);
        out[2 * row] = lse - ld(xr, y[row]);
        out[2 * row + 1] = lse;
    }
}
// dx = g_r * (softmax(x) - onehot(target)); lg[2 r] = lse, lg[2 r + 1] = g_r.
template <typename T>
__device__ void cross_entropy_bwd(const T* x, const unsigned int* y, const float* lg, T* dx,
                                  long rows, int v) {
    long row = blockIdx.x;
    float lse = lg[2 * row], g = lg[2 * row + 1];
    unsigned int t = y[row];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = __expf(ld(x + row * v, j) - lse);
        st(dx + row * v, j, g * (p - (j == t ? 1.f : 0.f)));
    }
}

#define MISC_KERNELS(SUF, T)                                                                  \
extern "C" __global__ void silu_mul_##SUF(const T* g, const T* u, T* y, long n) {              \
    silu_mul<T>(g, u, y, n);                                                                  \
}                                                                                             \
extern "C" __global__ void silu_mul_bwd_g_##SUF(const T* g, const T* u, const T* dy, T* dg,   \
                                                long n) {                                     \
    silu_mul_bwd_g<T>(g, u, dy, dg, n);                                                       \
}                                                                                             \
extern "C" __global__ void silu_mul_bwd_u_##SUF(const T* g, const T* dy, T* du, long n) {     \
    silu_mul_bwd_u<T>(g, dy, du, n);                                                          \
}                                                                                             \
extern "C" __global__ void cross_entropy_##SUF(const T* x, const unsigned int* y, float* out, \
                                               long rows, int v) {                            \
    cross_entropy<T>(x, y, out, rows, v);                                                     \
}                                                                                             \
extern "C" __global__ void cross_entropy_bwd_##SUF(const T* x, const unsigned int* y,         \
                                                   const float* lg, T* dx, long rows, int v) { \
    cross_entropy_bwd<T>(x, y, lg, dx, rows, v);                                              \
}
MISC_KERNELS(f32, float)
MISC_KERNELS(bf16, unsigned short)

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

    /// Launch shape for one warp per row.
    fn warp_per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((rows as u64 * 32).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{what}: the fused kernel needs a contiguous tensor");
        };
        Ok(s.as_cuda_slice::<T>()?.slice(start..end))
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            other => candle_core::bail!("fused kernels take f32 or bf16, not {other:?}"),
        }
    }

    /// RMSNorm over the last dimension: (x (..., d) in f32 or bf16, w (d) f32) -> y like x.
    pub struct RmsNorm {
        pub eps: f32,
    }

    impl CustomOp2 for RmsNorm {
        fn name(&self) -> &'static str {
            "rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused RMSNorm runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device().clone();
            let d = wl.shape().elem_count();
            let n = xl.shape().elem_count();
            let rows = (n / d) as i64;
            let w = contiguous::<f32>(ws, wl, "RMSNorm weight")?;
            let (d32, eps) = (d as i32, self.eps);
            let name = format!("rmsnorm_fwd_{}", suffix(xs.dtype())?);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let cfg = warp_per_row(rows as usize);
            macro_rules! run {
                ($t:ty) => {{
                    let x = contiguous::<$t>(xs, xl, "RMSNorm input")?;
                    let y = unsafe { dev.alloc::<$t>(n)? };
                    let mut b = f.builder();
                    b.arg(&x).arg(&w).arg(&y).arg(&rows).arg(&d32).arg(&eps);
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(y, dev.clone())
                }};
            }
            let y = match xs.dtype() {
                DType::F32 => run!(f32),
                _ => run!(half::bf16),
            };
            Ok((y, xl.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let dy = dy.contiguous()?;
            let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBackX { eps: self.eps })?;
            let dw = x.apply_op2_no_bwd(
                &dy,
                &RmsNormBackW {
                    eps: self.eps,
                    d: w.elem_count(),
                },
            )?;
            Ok((Some(dx), Some(dw)))
        }
    }

    /// (x, w, dy) -> dx, like x.
    struct RmsNormBackX {
        eps: f32,
    }

    impl candle_core::CustomOp3 for RmsNormBackX {
        fn name(&self) -> &'static str {
            "rms-norm-backward-x"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused RMSNorm runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device().clone();
            let d = wl.shape().elem_count();
            let n = xl.shape().elem_count();
            let rows = (n / d) as i64;
            let w = contiguous::<f32>(ws, wl, "RMSNorm weight")?;
            let (d32, eps) = (d as i32, self.eps);
            let name = format!("rmsnorm_bwd_x_{}", suffix(xs.dtype())?);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let cfg = warp_per_row(rows as usize);
            macro_rules! run {
                ($t:ty) => {{
                    let x = contiguous::<$t>(xs, xl, "RMSNorm input")?;
                    let g = contiguous::<$t>(gs, gl, "RMSNorm output gradient")?;
                    let dx = unsafe { dev.alloc::<$t>(n)? };
                    let mut b = f.builder();
                    b.arg(&x)
                        .arg(&w)
                        .arg(&g)
                        .arg(&dx)
                        .arg(&rows)
                        .arg(&d32)
                        .arg(&eps);
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(dx, dev.clone())
                }};
            }
            let dx = match xs.dtype() {
                DType::F32 => run!(f32),
                _ => run!(half::bf16),
            };
            Ok((dx, xl.shape().clone()))
        }
    }

    /// (x, dy) -> dw (d), f32.
    struct RmsNormBackW {
        eps: f32,
        d: usize,
    }

    impl CustomOp2 for RmsNormBackW {
        fn name(&self) -> &'static str {
            "rms-norm-backward-w"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused RMSNorm runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device().clone();
            let d = self.d;
            let n = xl.shape().elem_count();
            let rows = (n / d) as i64;
            let (d32, eps) = (d as i32, self.eps);
            let name = format!("rmsnorm_bwd_w_{}", suffix(xs.dtype())?);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let cfg = LaunchConfig {
                grid_dim: ((rows as u64).div_ceil(64) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let dw = dev.alloc_zeros::<f32>(d)?;
            macro_rules! run {
                ($t:ty) => {{
                    let x = contiguous::<$t>(xs, xl, "RMSNorm input")?;
                    let g = contiguous::<$t>(gs, gl, "RMSNorm output gradient")?;
                    let mut b = f.builder();
                    b.arg(&x).arg(&g).arg(&dw).arg(&rows).arg(&d32).arg(&eps);
                    unsafe { b.launch(cfg) }.w()?;
                }};
            }
            match xs.dtype() {
                DType::F32 => run!(f32),
                _ => run!(half::bf16),
            }
            Ok((CudaStorage::wrap_cuda_slice(dw, dev), Shape::from(d)))
        }
    }

    /// Allocates an output like `xs` and launches `kernel` with (input views..., output,
    /// extra args...) for f32 or bf16 storage.
    macro_rules! launch_like {
        ($dev:expr, $dtype:expr, $n:expr, $cfg:expr, $kernel:expr, [$($input:expr),*], [$($arg:expr),*]) => {{
            let f = $dev.get_or_load_custom_func(
                &format!("{}_{}", $kernel, suffix($dtype)?),
                MODULE,
                ptx()?,
            )?;
            macro_rules! go {
                ($t:ty) => {{
                    let out = unsafe { $dev.alloc::<$t>($n)? };
                    let mut b = f.builder();
                    $( let v = $input.view::<$t>()?; b.arg(&v); )*
                    b.arg(&out);
                    $( b.arg(&$arg); )*
                    unsafe { b.launch($cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, $dev.clone())
                }};
            }
            match $dtype {
                DType::F32 => go!(f32),
                _ => go!(half::bf16),
            }
        }};
    }

    /// A storage and its layout, viewed as a contiguous slice of T.
    struct In<'a>(&'a CudaStorage, &'a Layout);

    impl<'a> In<'a> {
        fn view<T: candle_core::cuda_backend::CudaDType>(
            &self,
        ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
            contiguous::<T>(self.0, self.1, "fused kernel input")
        }
    }

    /// RoPE on (B, N, L, D) with f32 cos / sin tables (L, D); backward = the transposed rotation.
    pub struct Rope {
        pub backward: bool,
    }

    impl candle_core::CustomOp3 for Rope {
        fn name(&self) -> &'static str {
            "rope"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused RoPE runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            cs: &CudaStorage,
            cl: &Layout,
            ss: &CudaStorage,
            sl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device().clone();
            let (l, d) = cl.shape().dims2()?;
            let n = xl.shape().elem_count();
            let cos = contiguous::<f32>(cs, cl, "RoPE cos")?;
            let sin = contiguous::<f32>(ss, sl, "RoPE sin")?;
            let (n64, l32, d32, bwd) = (n as i64, l as i32, d as i32, i32::from(self.backward));
            let f = dev.get_or_load_custom_func(
                &format!("rope_{}", suffix(xs.dtype())?),
                MODULE,
                ptx()?,
            )?;
            let cfg = LaunchConfig::for_num_elems(n as u32);
            macro_rules! go {
                ($t:ty) => {{
                    let x = contiguous::<$t>(xs, xl, "RoPE input")?;
                    let y = unsafe { dev.alloc::<$t>(n)? };
                    let mut b = f.builder();
                    b.arg(&x).arg(&cos).arg(&sin).arg(&y);
                    b.arg(&n64).arg(&l32).arg(&d32).arg(&bwd);
                    unsafe { b.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(y, dev.clone())
                }};
            }
            let y = match xs.dtype() {
                DType::F32 => go!(f32),
                _ => go!(half::bf16),
            };
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

    /// Causal softmax of `scale * scores` over the last dim of (..., L, L), in f32 arithmetic,
    /// output in the scores' dtype.
    pub struct CausalSoftmax {
        pub scale: f32,
    }

    impl CustomOp1 for CausalSoftmax {
        fn name(&self) -> &'static str {
            "causal-softmax"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused causal softmax runs on CUDA only")
        }

        fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = xs.device().clone();
            let l = xl.shape().dims().last().copied().unwrap_or(1);
            let n = xl.shape().elem_count();
            let rows = (n / l) as i64;
            let (l32, scale) = (l as i32, self.scale);
            let p = launch_like!(
                dev,
                xs.dtype(),
                n,
                warp_per_row(rows as usize),
                "causal_softmax",
                [In(xs, xl)],
                [rows, l32, scale]
            );
            Ok((p, xl.shape().clone()))
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

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused causal softmax runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            ps: &CudaStorage,
            pl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = ps.device().clone();
            let l = pl.shape().dims().last().copied().unwrap_or(1);
            let n = pl.shape().elem_count();
            let rows = (n / l) as i64;
            let (l32, scale) = (l as i32, self.scale);
            let dx = launch_like!(
                dev,
                ps.dtype(),
                n,
                warp_per_row(rows as usize),
                "causal_softmax_bwd",
                [In(ps, pl), In(gs, gl)],
                [rows, l32, scale]
            );
            Ok((dx, pl.shape().clone()))
        }
    }

    /// `silu(g) * u` (the SwiGLU gate), forward and backward in one elementwise kernel each.
    pub struct SiluMul;

    impl CustomOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "silu-mul"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused SiLU gate runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            gs: &CudaStorage,
            gl: &Layout,
            us: &CudaStorage,
            ul: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = gs.device().clone();
            let n = gl.shape().elem_count();
            let n64 = n as i64;
            let cfg = LaunchConfig::for_num_elems(n as u32);
            let y = launch_like!(
                dev,
                gs.dtype(),
                n,
                cfg,
                "silu_mul",
                [In(gs, gl), In(us, ul)],
                [n64]
            );
            Ok((y, gl.shape().clone()))
        }

        fn bwd(
            &self,
            g: &Tensor,
            u: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let dy = dy.contiguous()?;
            let dg = g.apply_op3_no_bwd(u, &dy, &SiluMulBackG)?;
            let du = g.apply_op2_no_bwd(&dy, &SiluMulBackU)?;
            Ok((Some(dg), Some(du)))
        }
    }

    struct SiluMulBackG;

    impl candle_core::CustomOp3 for SiluMulBackG {
        fn name(&self) -> &'static str {
            "silu-mul-backward-gate"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused SiLU gate runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            gs: &CudaStorage,
            gl: &Layout,
            us: &CudaStorage,
            ul: &Layout,
            ds: &CudaStorage,
            dl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = gs.device().clone();
            let n = gl.shape().elem_count();
            let n64 = n as i64;
            let cfg = LaunchConfig::for_num_elems(n as u32);
            let dg = launch_like!(
                dev,
                gs.dtype(),
                n,
                cfg,
                "silu_mul_bwd_g",
                [In(gs, gl), In(us, ul), In(ds, dl)],
                [n64]
            );
            Ok((dg, gl.shape().clone()))
        }
    }

    struct SiluMulBackU;

    impl CustomOp2 for SiluMulBackU {
        fn name(&self) -> &'static str {
            "silu-mul-backward-up"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused SiLU gate runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            gs: &CudaStorage,
            gl: &Layout,
            ds: &CudaStorage,
            dl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = gs.device().clone();
            let n = gl.shape().elem_count();
            let n64 = n as i64;
            let cfg = LaunchConfig::for_num_elems(n as u32);
            let du = launch_like!(
                dev,
                gs.dtype(),
                n,
                cfg,
                "silu_mul_bwd_u",
                [In(gs, gl), In(ds, dl)],
                [n64]
            );
            Ok((du, gl.shape().clone()))
        }
    }

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

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused cross-entropy runs on CUDA only")
        }

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
            let lg =
                Tensor::cat(&[&out.narrow(1, 1, 1)?, &grad.narrow(1, 0, 1)?], 1)?.contiguous()?;
            let dx = x.apply_op3_no_bwd(y, &lg, &CrossEntropyBack)?;
            Ok((Some(dx), None))
        }
    }

    struct CrossEntropyBack;

    impl candle_core::CustomOp3 for CrossEntropyBack {
        fn name(&self) -> &'static str {
            "cross-entropy-backward"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused cross-entropy runs on CUDA only")
        }

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
