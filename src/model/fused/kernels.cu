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
// x (B, L, heads, d) -> y (B, heads, L, d) = rope(x * rsqrt(mean(x^2) + eps) * w).
template <typename T>
__device__ void norm_rope(const T* x, const float* w, const float* cos, const float* sin, T* y,
                          long rows, int heads, int l, int d, float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long bl = row / heads;
    int hh = row % heads, pos = bl % l;
    long b = bl / l;
    const T* xr = x + row * d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float v = ld(xr, i); ss += v * v; }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    T* yr = y + ((b * heads + hh) * l + pos) * d;
    const float* c = cos + (long)pos * d;
    const float* s = sin + (long)pos * d;
    int h = d / 2;
    for (int i = lane; i < h; i += 32) {
        float a = ld(xr, i) * r * w[i], z = ld(xr, i + h) * r * w[i + h];
        st(yr, i, a * c[i] - z * s[i]);
        st(yr, i + h, z * c[i + h] + a * s[i + h]);
    }
}

// The transpose of RoPE and of the head transpose: dy (B, heads, L, d) -> g (B, L, heads, d).
template <typename T>
__device__ void rope_bwd_untranspose(const T* dy, const float* cos, const float* sin, T* g,
                                     long n, int heads, int l, int d) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    int i = idx % d;
    long row = idx / d;  // (b, pos, hh)
    int hh = row % heads;
    long bl = row / heads;
    int pos = bl % l;
    long b = bl / l;
    const T* dr = dy + ((b * heads + hh) * l + pos) * d;
    const float* c = cos + (long)pos * d;
    const float* s = sin + (long)pos * d;
    int h = d / 2;
    float v = ld(dr, i) * c[i];
    v += i < h ? ld(dr, i + h) * s[i + h] : -ld(dr, i - h) * s[i - h];
    st(g, idx, v);
}

// dx += the RMSNorm input gradient (the residual stream's gradient, accumulated in place).
template <typename T>
__device__ void rmsnorm_bwd_x_add(const T* x, const float* w, const T* dy, T* dx, long rows,
                                  int d, float eps) {
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
    T* out = dx + row * d;
    for (int i = lane; i < d; i += 32) st(out, i, ld(out, i) + r * w[i] * ld(gr, i) - c * ld(xr, i));
}

// Both SwiGLU gradients in one pass.
template <typename T>
__device__ void silu_mul_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = ld(g, i), sg = sigmoid(a), d = ld(dy, i);
    st(dg, i, d * ld(u, i) * sg * (1.f + a * (1.f - sg)));
    st(du, i, d * a * sg);
}

// Cross-entropy forward and backward in one kernel, one block per row: loss[r] = lse - x[t],
// then the row of logits is overwritten by its gradient, scale * (softmax(x) - onehot(t)).
template <typename T>
__device__ void cross_entropy_grad(T* x, const unsigned int* y, float* loss, long rows, int v,
                                   float scale) {
    __shared__ float sm[32], ss[32];
    __shared__ float lse_s;
    long row = blockIdx.x;
    T* xr = x + row * v;
    float m = __int_as_float(0xff800000), s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) merge(m, s, ld(xr, j), 1.f);
    for (int o = 16; o > 0; o /= 2) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    unsigned int t = y[row];
    if (threadIdx.x == 0) {
        float M = sm[0], S = ss[0];
        for (int w = 1; w < warps; w++) merge(M, S, sm[w], ss[w]);
        float lse = M + __logf(S);
        loss[row] = lse - ld(xr, t);
        lse_s = lse;
    }
    __syncthreads();
    float lse = lse_s;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = __expf(ld(xr, j) - lse);
        st(xr, j, scale * (p - (j == t ? 1.f : 0.f)));
    }
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
                                           const float* s, T* y, long rows, int heads, int l,  \
                                           int d, float eps) {                                 \
    norm_rope<T>(x, w, c, s, y, rows, heads, l, d, eps);                                       \
}                                                                                              \
extern "C" __global__ void rope_bwd_untranspose_##SUF(const T* dy, const float* c,             \
                                                      const float* s, T* g, long n, int heads, \
                                                      int l, int d) {                          \
    rope_bwd_untranspose<T>(dy, c, s, g, n, heads, l, d);                                      \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_x_add_##SUF(const T* x, const float* w, const T* dy,    \
                                                   T* dx, long rows, int d, float eps) {       \
    rmsnorm_bwd_x_add<T>(x, w, dy, dx, rows, d, eps);                                          \
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
