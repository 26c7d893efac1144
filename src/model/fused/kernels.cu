// ternlab's fused CUDA kernels, compiled at run time with NVRTC (no headers: bf16 is handled
// as its 16 bits). Rust side: src/model/fused/cuda/.

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

// One row of the RMSNorm backward, held by a warp: loads x and dy (their first 32 * NPL
// entries into registers, zeros past d) and finds r = rsqrt(mean(x^2) + eps) and
// c = r^3 / d * sum_i w_i dy_i x_i, so that dx_i = r * w_i * dy_i - c * x_i.
template <typename T, int NPL>
__device__ void rms_row_back(const T* xr, const float* w, const T* gr, int d, float eps,
                             int lane, float (&xv)[NPL], float (&gv)[NPL], float& r,
                             float& c) {
    float ss = 0.f, gx = 0.f;
#pragma unroll
    for (int t = 0; t < NPL; t++) {
        int i = lane + 32 * t;
        xv[t] = 0.f;
        gv[t] = 0.f;
        if (i < d) {
            xv[t] = ld(xr, i);
            gv[t] = ld(gr, i);
            ss += xv[t] * xv[t];
            gx += w[i] * gv[t] * xv[t];
        }
    }
    for (int i = lane + 32 * NPL; i < d; i += 32) {
        float a = ld(xr, i);
        ss += a * a;
        gx += w[i] * ld(gr, i) * a;
    }
    ss = warp_sum(ss);
    gx = warp_sum(gx);
    r = rsqrtf(ss / d + eps);
    c = r * r * r * gx / d;
}

// dx (rows, d), written, or added to when ADD (the residual stream's gradient); one warp per
// row (NPL = 4 for head-sized rows, 32 for hidden-sized ones).
template <typename T, bool ADD, int NPL>
__device__ void rmsnorm_bwd_x_rows(const T* __restrict__ x, const float* __restrict__ w,
                                   const T* __restrict__ dy, T* __restrict__ dx, long rows,
                                   int d, float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    T* out = dx + row * d;
    float xv[NPL], gv[NPL], r, c;
    rms_row_back<T, NPL>(xr, w, gr, d, eps, lane, xv, gv, r, c);
#pragma unroll
    for (int t = 0; t < NPL; t++) {
        int i = lane + 32 * t;
        if (i < d) {
            float v = r * (w[i] * gv[t]) - c * xv[t];
            st(out, i, ADD ? ld(out, i) + v : v);
        }
    }
    for (int i = lane + 32 * NPL; i < d; i += 32) {
        float v = r * w[i] * ld(gr, i) - c * ld(xr, i);
        st(out, i, ADD ? ld(out, i) + v : v);
    }
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
    rmsnorm_bwd_x_rows<T, false, 32>(x, w, dy, dx, rows, d, eps);                             \
}                                                                                             \
extern "C" __global__ void rmsnorm_bwd_x_small_##SUF(const T* x, const float* w, const T* dy, \
                                                     T* dx, long rows, int d, float eps) {    \
    rmsnorm_bwd_x_rows<T, false, 4>(x, w, dy, dx, rows, d, eps);                              \
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
    // p is 0 above the diagonal, so only keys 0..=q are read; the rest of dx is 0.
    int q = row % l;
    const T* pr = p + row * l;
    const T* gr = dy + row * l;
    float dot = 0.f;
    for (int j = lane; j <= q; j += 32) dot += ld(pr, j) * ld(gr, j);
    dot = warp_sum(dot);
    for (int j = lane; j < l; j += 32)
        st(dx + row * l, j, j <= q ? scale * ld(pr, j) * (ld(gr, j) - dot) : 0.f);
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

// The two gradients of y = silu(g) * u (the forward is silu_mul2 below).
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }
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
// (m, s) <- the log-sum-exp state of (m, s) and (m2, s2), with one exponential.
__device__ __forceinline__ void merge1(float& m, float& s, float m2, float s2) {
    if (m2 <= m) {
        s += s2 * __expf(m2 - m);
    } else {
        s = s * __expf(m - m2) + s2;
        m = m2;
    }
}

// The log-sum-exp of the (m, s) states of a block's threads, returned to every thread.
__device__ float block_lse(float m, float s) {
    __shared__ float sm[32], ss[32], lse;
    for (int o = 16; o > 0; o /= 2) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge1(m, s, m2, s2);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = sm[0], S = ss[0];
        for (int w = 1; w < warps; w++) merge1(M, S, sm[w], ss[w]);
        lse = M + __logf(S);
    }
    __syncthreads();
    return lse;
}

template <typename T>
__device__ void cross_entropy(const T* x, const unsigned int* y, float* out, long rows, int v) {
    long row = blockIdx.x;
    const T* xr = x + row * v;
    float m = -3.0e38f, s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) merge1(m, s, ld(xr, j), 1.f);
    float lse = block_lse(m, s);
    if (threadIdx.x == 0) {
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

// AdamW, one thread per entry, each operation in the reference's order and rounded once (the
// _rn intrinsics keep NVRTC from contracting them into fused multiply-adds), so the result is
// the composed version's (src/optim.rs) to the bit. Without bias correction MLX's
// p * decay - (lr * m) / (sqrt(v) + eps); with it candle's p * decay - (m_hat / (sqrt(v_hat)
// + eps)) * lr. The scalars come from the host already in the parameter's precision.
extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, long n,
                                     float lr, float b1, float omb1, float b2, float omb2,
                                     float eps, float decay, float scale_m, float scale_v,
                                     int bias_correction) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, omb1));
    float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
    m[i] = mi;
    v[i] = vi;
    float pi = decay == 1.f ? p[i] : __fmul_rn(p[i], decay);
    float upd;
    if (bias_correction) {
        float mh = __fmul_rn(mi, scale_m), vh = __fmul_rn(vi, scale_v);
        upd = __fmul_rn(__fdiv_rn(mh, __fadd_rn(__fsqrt_rn(vh), eps)), lr);
    } else {
        upd = __fdiv_rn(__fmul_rn(mi, lr), __fadd_rn(__fsqrt_rn(vi), eps));
    }
    p[i] = __fsub_rn(pi, upd);
}

// A float rounded to bf16 and widened back: one bf16 operation's result.
__device__ __forceinline__ float bfr(float x) {
    return __uint_as_float(((unsigned int)f32_to_bf16(x)) << 16);
}

// AdamW on a bf16 parameter with bf16 moments, as MLX computes it: the gradient rounded to
// bf16, then every operation in f32 and rounded to bf16. Without bias correction
// p * decay - (lr * m) / (sqrt(v) + eps); with it MLX's (c1 * m) / (sqrt(v) * c2 + eps).
extern "C" __global__ void adamw_bf16(unsigned short* p, unsigned short* m, unsigned short* v,
                                      const float* g, long n, float lr, float b1, float omb1,
                                      float b2, float omb2, float eps, float decay, float c1,
                                      float c2, int bias_correction) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = bfr(g[i]);
    float mi = bfr(__fadd_rn(bfr(__fmul_rn(ld(m, i), b1)), bfr(__fmul_rn(gi, omb1))));
    float sq = bfr(__fmul_rn(gi, gi));
    float vi = bfr(__fadd_rn(bfr(__fmul_rn(ld(v, i), b2)), bfr(__fmul_rn(sq, omb2))));
    st(m, i, mi);
    st(v, i, vi);
    float pi = decay == 1.f ? ld(p, i) : bfr(__fmul_rn(ld(p, i), decay));
    float root = bfr(__fsqrt_rn(vi));
    float upd;
    if (bias_correction) {
        float den = bfr(__fadd_rn(bfr(__fmul_rn(root, c2)), eps));
        upd = bfr(__fdiv_rn(bfr(__fmul_rn(mi, c1)), den));
    } else {
        upd = bfr(__fdiv_rn(bfr(__fmul_rn(mi, lr)), bfr(__fadd_rn(root, eps))));
    }
    st(p, i, __fsub_rn(pi, upd));
}

// ---- The hand-written training step (src/model/fused/cuda/step.rs) ----

// Embedding gather with the cast to the compute dtype: out (n, e) = emb[ids] (f32).
template <typename T>
__device__ void embed_fwd(const float* emb, const unsigned int* ids, T* out, long n, int e) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * e) return;
    long t = i / e;
    st(out, i, emb[(long)ids[t] * e + i % e]);
}

// Embedding backward: demb[ids[t]] += dx[t] (f32 atomics, every token at once).
template <typename T>
__device__ void embed_bwd(const T* dx, const unsigned int* ids, float* demb, long n, int e) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * e) return;
    long t = i / e;
    atomicAdd(demb + (long)ids[t] * e + i % e, ld(dx, i));
}

// q/k RMSNorm, RoPE and the head transpose in one pass, one warp per row of d:
// x (B, L, heads, d) -> y (B, heads / group, L, group, d) = rope(x * rsqrt(mean(x^2) + eps) * w):
// the query heads that share a key/value head (group of them) sit together, position-major.
template <typename T>
__device__ void norm_rope(const T* x, const float* w, const float* cos, const float* sin, T* y,
                          long rows, int heads, int group, int l, int d, float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long bl = row / heads;
    int hh = row % heads, pos = bl % l;
    long b = bl / l;
    const T* xr = x + row * d;
    // Head hh = kv * group + r goes to row ((b, kv), pos, r) of (B, heads / group, L, group, d).
    long out_row = ((b * (heads / group) + hh / group) * l + pos) * group + hh % group;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float v = ld(xr, i); ss += v * v; }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    T* yr = y + out_row * d;
    const float* c = cos + (long)pos * d;
    const float* s = sin + (long)pos * d;
    int h = d / 2;
    for (int i = lane; i < h; i += 32) {
        float a = ld(xr, i) * r * w[i], z = ld(xr, i + h) * r * w[i + h];
        st(yr, i, a * c[i] - z * s[i]);
        st(yr, i + h, z * c[i + h] + a * s[i + h]);
    }
}

// The transpose of RoPE and of the head transpose, one warp per row of d:
// dy (B, heads / group, L, group, d) -> g (B, L, heads, d).
template <typename T>
__device__ void rope_bwd_untranspose(const T* __restrict__ dy, const float* __restrict__ cos,
                                     const float* __restrict__ sin, T* __restrict__ g,
                                     long rows, int heads, int group, int l, int d) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;  // (b, pos, hh)
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int hh = row % heads;
    long bl = row / heads;
    int pos = bl % l;
    long b = bl / l;
    long in_row = ((b * (heads / group) + hh / group) * l + pos) * group + hh % group;
    const T* dr = dy + in_row * d;
    const float* c = cos + (long)pos * d;
    const float* s = sin + (long)pos * d;
    T* out = g + row * d;
    int h = d / 2;
    for (int i = lane; i < h; i += 32) {
        float lo = ld(dr, i), hi = ld(dr, i + h);
        st(out, i, lo * c[i] + hi * s[i + h]);
        st(out, i + h, hi * c[i + h] - lo * s[i]);
    }
}

// Two neighbouring values at an even index (one 4- or 8-byte access).
__device__ __forceinline__ void ld2(const float* p, long i, float& a, float& b) {
    float2 v = *(const float2*)(p + i);
    a = v.x;
    b = v.y;
}
__device__ __forceinline__ void ld2(const unsigned short* p, long i, float& a, float& b) {
    unsigned int v = *(const unsigned int*)(p + i);
    a = __uint_as_float(v << 16);
    b = __uint_as_float(v & 0xffff0000u);
}
__device__ __forceinline__ void st2(float* p, long i, float a, float b) {
    *(float2*)(p + i) = make_float2(a, b);
}
__device__ __forceinline__ void st2(unsigned short* p, long i, float a, float b) {
    *(unsigned int*)(p + i) = (unsigned int)f32_to_bf16(a) | ((unsigned int)f32_to_bf16(b) << 16);
}

// Elementwise kernels over pairs: thread i takes elements 2i and 2i+1 (n even).
template <typename T>
__device__ void silu_mul2(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                          long n) {
    long i = 2 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (i + 1 == n) {  // odd n: the last element alone
        float a = ld(g, i);
        st(y, i, a * sigmoid(a) * ld(u, i));
        return;
    }
    float a0, a1, u0, u1;
    ld2(g, i, a0, a1);
    ld2(u, i, u0, u1);
    st2(y, i, a0 * sigmoid(a0) * u0, a1 * sigmoid(a1) * u1);
}

// y = a + b (the residual stream), two elements per thread.
template <typename T>
__device__ void add2(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                     long n) {
    long i = 2 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (i + 1 == n) {
        st(y, i, ld(a, i) + ld(b, i));
        return;
    }
    float a0, a1, b0, b1;
    ld2(a, i, a0, a1);
    ld2(b, i, b0, b1);
    st2(y, i, a0 + b0, a1 + b1);
}

// Both SwiGLU gradients in one pass.
template <typename T>
__device__ void silu_mul_bwd(const T* __restrict__ g, const T* __restrict__ u,
                             const T* __restrict__ dy, T* __restrict__ dg, T* __restrict__ du,
                             long n) {
    long i = 2 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    float a[2], uu[2], d[2], og[2], ou[2];
    bool pair = i + 1 < n;  // odd n: the last element alone
    if (pair) {
        ld2(g, i, a[0], a[1]);
        ld2(u, i, uu[0], uu[1]);
        ld2(dy, i, d[0], d[1]);
    } else {
        a[0] = ld(g, i), uu[0] = ld(u, i), d[0] = ld(dy, i);
        a[1] = uu[1] = d[1] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < 2; k++) {
        float sg = sigmoid(a[k]);
        og[k] = d[k] * uu[k] * sg * (1.f + a[k] * (1.f - sg));
        ou[k] = d[k] * a[k] * sg;
    }
    if (pair) {
        st2(dg, i, og[0], og[1]);
        st2(du, i, ou[0], ou[1]);
    } else {
        st(dg, i, og[0]);
        st(du, i, ou[0]);
    }
}

// Cross-entropy forward and backward in one kernel, one block per row (v even): loss[r] =
// lse - x[t], then the row of logits is overwritten by its gradient,
// scale * (softmax(x) - onehot(t)).
template <typename T>
__device__ void cross_entropy_grad(T* x, const unsigned int* y, float* loss, long rows, int v,
                                   float scale) {
    long row = blockIdx.x;
    T* xr = x + row * v;
    float m = -3.0e38f, s = 0.f;
    // Pairs of logits per access where every row starts at an even element (v even).
    bool pairs = (v % 2) == 0;
    if (pairs) {
        for (int j = 2 * threadIdx.x; j < v; j += 2 * blockDim.x) {
            float a, b;
            ld2(xr, j, a, b);
            float hi = fmaxf(a, b);
            merge1(m, s, hi, 1.f + __expf(fminf(a, b) - hi));
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x) merge1(m, s, ld(xr, j), 1.f);
    }
    float lse = block_lse(m, s);
    unsigned int t = y[row];
    if (threadIdx.x == 0) loss[row] = lse - ld(xr, t);
    __syncthreads();  // x[t] is read before any thread overwrites the row
    if (pairs) {
        for (int j = 2 * threadIdx.x; j < v; j += 2 * blockDim.x) {
            float a, b;
            ld2(xr, j, a, b);
            float ga = scale * (__expf(a - lse) - (j == t ? 1.f : 0.f));
            float gb = scale * (__expf(b - lse) - (j + 1 == t ? 1.f : 0.f));
            st2(xr, j, ga, gb);
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x)
            st(xr, j, scale * (__expf(ld(xr, j) - lse) - (j == t ? 1.f : 0.f)));
    }
}

// Causal softmax of attention scores laid out ((b, kv), pos, r) x keys, in place allowed: row
// `row` is query position (row / group) % l and sees keys 0..=pos. Scores were computed only
// up to the end of the position's block of `chunk` positions, so only that much is written
// (zeros past the diagonal).
template <typename T>
__device__ void attn_softmax(const T* x, T* p, long rows, int l, int group, int chunk,
                             float scale) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = (row / group) % l;
    int end = min(l, (q / chunk + 1) * chunk);
    const T* xr = x + row * l;
    float m = -3.0e38f;
    for (int j = lane; j <= q; j += 32) m = fmaxf(m, ld(xr, j) * scale);
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    for (int j = lane; j <= q; j += 32) sum += __expf(ld(xr, j) * scale - m);
    float inv = 1.f / warp_sum(sum);
    for (int j = lane; j < end; j += 32)
        st(p + row * l, j, j <= q ? __expf(ld(xr, j) * scale - m) * inv : 0.f);
}

// dx = scale * p * (dy - sum(dy * p)) per row, over the same causal part as attn_softmax.
template <typename T>
__device__ void attn_softmax_bwd(const T* p, const T* dy, T* dx, long rows, int l, int group,
                                 int chunk, float scale) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int q = (row / group) % l;
    int end = min(l, (q / chunk + 1) * chunk);
    const T* pr = p + row * l;
    const T* gr = dy + row * l;
    float dot = 0.f;
    for (int j = lane; j <= q; j += 32) dot += ld(pr, j) * ld(gr, j);
    dot = warp_sum(dot);
    for (int j = lane; j < end; j += 32)
        st(dx + row * l, j, j <= q ? scale * ld(pr, j) * (ld(gr, j) - dot) : 0.f);
}

// The whole RMSNorm backward in one pass over x and dy, for rows of d <= 32 * NPL (used for the
// head-sized q/k norms): dx and dw (f32, zeroed by the caller). A block of 8 warps takes `per_block`
// rows, a warp one row at a time with the row in registers; each lane sums dy * x * r over its
// warp's rows for its columns, the warps' sums meet in shared memory, one atomic add per column
// per block.
template <typename T, int NPL>
__device__ void rmsnorm_bwd_fused(const T* __restrict__ x, const float* __restrict__ w,
                                  const T* __restrict__ dy, T* __restrict__ dx,
                                  float* __restrict__ dw, long rows, int d, float eps,
                                  int per_block) {
    __shared__ float part[8][32 * NPL];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[NPL];
#pragma unroll
    for (int t = 0; t < NPL; t++) acc[t] = 0.f;
    long first = (long)blockIdx.x * per_block;
    for (int k = warp; k < per_block; k += 8) {
        long row = first + k;
        if (row >= rows) break;
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        T* out = dx + row * d;
        float xv[NPL], gv[NPL], r, c;
        rms_row_back<T, NPL>(xr, w, gr, d, eps, lane, xv, gv, r, c);
#pragma unroll
        for (int t = 0; t < NPL; t++) {
            int i = lane + 32 * t;
            if (i < d) {
                float v = r * w[i] * gv[t] - c * xv[t];
                st(out, i, v);
                acc[t] += gv[t] * xv[t] * r;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NPL; t++) part[warp][lane + 32 * t] = acc[t];
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float sum = 0.f;
        for (int k = 0; k < 8; k++) sum += part[k][j];
        atomicAdd(dw + j, sum);
    }
}

// (A, B, C, row) -> (A, C, B, row): swaps two middle axes of rows of `words` 4-byte words
// (the head transposes), one word per thread.
extern "C" __global__ void swap_axes(const unsigned int* __restrict__ x,
                                     unsigned int* __restrict__ y, unsigned int total, int words,
                                     int nb, int nc) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    unsigned int w = i % words, r = i / words;
    unsigned int c = r % nc, ab = r / nc;
    unsigned int b = ab % nb, a = ab / nb;
    y[((a * nc + c) * nb + b) * (unsigned int)words + w] = x[i];
}

#define STEP_KERNELS(SUF, T)                                                                   \
extern "C" __global__ void embed_fwd_##SUF(const float* emb, const unsigned int* ids, T* out,  \
                                           long n, int e) {                                    \
    embed_fwd<T>(emb, ids, out, n, e);                                                         \
}                                                                                              \
extern "C" __global__ void embed_bwd_##SUF(const T* dx, const unsigned int* ids, float* demb,  \
                                           long n, int e) {                                    \
    embed_bwd<T>(dx, ids, demb, n, e);                                                         \
}                                                                                              \
extern "C" __global__ void norm_rope_##SUF(const T* x, const float* w, const float* c,         \
                                           const float* s, T* y, long rows, int heads,         \
                                           int group, int l, int d, float eps) {               \
    norm_rope<T>(x, w, c, s, y, rows, heads, group, l, d, eps);                                \
}                                                                                              \
extern "C" __global__ void rope_bwd_untranspose_##SUF(const T* dy, const float* c,             \
                                                      const float* s, T* g, long rows,         \
                                                      int heads, int group, int l, int d) {    \
    rope_bwd_untranspose<T>(dy, c, s, g, rows, heads, group, l, d);                            \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_fused_small_##SUF(const T* x, const float* w,           \
                                                         const T* dy, T* dx, float* dw,        \
                                                         long rows, int d, float eps,          \
                                                         int per_block) {                      \
    rmsnorm_bwd_fused<T, 4>(x, w, dy, dx, dw, rows, d, eps, per_block);                        \
}                                                                                              \
extern "C" __global__ void attn_softmax_##SUF(const T* x, T* p, long rows, int l, int group,   \
                                              int chunk, float scale) {                        \
    attn_softmax<T>(x, p, rows, l, group, chunk, scale);                                       \
}                                                                                              \
extern "C" __global__ void attn_softmax_bwd_##SUF(const T* p, const T* dy, T* dx, long rows,   \
                                                  int l, int group, int chunk, float scale) {  \
    attn_softmax_bwd<T>(p, dy, dx, rows, l, group, chunk, scale);                              \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_x_add_##SUF(const T* x, const float* w, const T* dy,    \
                                                   T* dx, long rows, int d, float eps) {       \
    rmsnorm_bwd_x_rows<T, true, 32>(x, w, dy, dx, rows, d, eps);                                \
}                                                                                              \
extern "C" __global__ void add2_##SUF(const T* a, const T* b, T* y, long n) {                \
    add2<T>(a, b, y, n);                                                                       \
}                                                                                              \
extern "C" __global__ void silu_mul2_##SUF(const T* g, const T* u, T* y, long n) {             \
    silu_mul2<T>(g, u, y, n);                                                                  \
}                                                                                              \
extern "C" __global__ void silu_mul_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,      \
                                              T* du, long n) {                                 \
    silu_mul_bwd<T>(g, u, dy, dg, du, n);                                                      \
}                                                                                              \
extern "C" __global__ void cross_entropy_grad_##SUF(T* x, const unsigned int* y, float* loss,  \
                                                    long rows, int v, float scale) {           \
    cross_entropy_grad<T>(x, y, loss, rows, v, scale);                                         \
}
STEP_KERNELS(f32, float)
STEP_KERNELS(bf16, unsigned short)
