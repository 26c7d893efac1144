// Causal grouped-query attention's own kernels (src/cuda/attention.rs): q/k norm + RoPE + head
// transpose, the causal softmax of the scores, and the head transposes. The score and mixing
// products are cuBLAS GEMMs (src/cuda/gemm.rs, src/cuda/causal_attention.rs).
//
// Layout: the `group` query heads that share a key/value head sit together, position-major:
// q as (B, heads / group, L, group, D); keys and values as (B, K, L, D) (group = 1).

// The row indices below divide in 32 bits: a 64-bit division is a long software sequence on
// the GPU, and these kernels work out three or four for every row of 32 * V values, which made
// the q/k norm + RoPE kernels bound by instructions rather than memory. Their launchers check
// that the rows fit (`rows < 2^32`).

// Row `row` = (b, pos, hh) of x (B, L, heads, d) and of the grouped (B, heads / group, L,
// group, d), and the rows after it one `next()` at a time: t = b * l + pos, hh = kv * group + g.
struct RopeWalk {
    unsigned t, p, kv, g, heads, group, l;
    __device__ __forceinline__ RopeWalk(long row, int heads_, int group_, int l_)
        : heads(heads_), group(group_), l(l_) {
        const unsigned r = (unsigned)row, hh = r % heads;
        t = r / heads;
        p = t % l;
        kv = hh / group;
        g = hh - kv * group;
    }
    __device__ __forceinline__ void next() {
        if (++g < group) return;
        g = 0;
        if ((++kv) * group < heads) return;
        kv = 0;
        ++t;
        if (++p == l) p = 0;
    }
    // Where the row starts in x when x's tokens are `xs` elements apart.
    __device__ __forceinline__ long x_at(int d, long xs) const {
        return (long)t * xs + (long)(kv * group + g) * d;
    }
    // Where it starts in the grouped layout.
    __device__ __forceinline__ long grouped_at(int d) const {
        const long kvs = heads / group;
        return (((long)(t - p) * kvs + (long)kv * l + p) * group + g) * d;
    }
};

// q/k RMSNorm, RoPE and the head transpose in one pass, one warp per row of d:
// x (B, L, heads, d; tokens xs apart) -> y (B, heads / group, L, group, d)
// = rope(x * rsqrt(mean(x^2) + eps) * w), with rope(z) = z * cos + rotate_half(z) * sin,
// rotate_half(z) = (-z[d/2:], z[:d/2]).
template <typename T>
__device__ void norm_rope(const T* x, const float* w, const float* cos, const float* sin, T* y,
                          long rows, int heads, int group, int l, int d, float eps, long xs) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    // Head hh = kv * group + g goes to row ((b, kv), pos, g).
    const RopeWalk at(row, heads, group, l);
    const unsigned pos = at.p;
    const T* xr = x + at.x_at(d, xs);
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float v = ld(xr, i); ss += v * v; }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    T* yr = y + at.grouped_at(d);
    const float* c = cos + (long)pos * d;
    const float* s = sin + (long)pos * d;
    int h = d / 2;
    for (int i = lane; i < h; i += 32) {
        float a = ld(xr, i) * r * w[i], z = ld(xr, i + h) * r * w[i + h];
        st(yr, i, a * c[i] - z * s[i]);
        st(yr, i + h, z * c[i + h] + a * s[i + h]);
    }
}

// The transpose of RoPE and of the head transpose (the norm's backward is norm.cu's), one
// warp per row of d: dy (B, heads / group, L, group, d) -> g (B, L, heads, d).
template <typename T>
__device__ void rope_bwd(const T* __restrict__ dy, const float* __restrict__ cos,
                         const float* __restrict__ sin, T* __restrict__ g, long rows, int heads,
                         int group, int l, int d) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;  // (b, pos, hh)
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const RopeWalk at(row, heads, group, l);
    const unsigned pos = at.p;
    const T* dr = dy + at.grouped_at(d);
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

// The same two, vectorized, for rows of d = 32 * V (head dims 32, 64, 128, 256): lane j holds
// the V neighbouring values from V * j, so RoPE's partner of each (index +- d / 2) sits in lane
// j ^ 16. Arithmetic as above, per value.

// `v` as the storage type T rounds it (what a value read back after `st` would be).
__device__ __forceinline__ float as_stored(const float*, float v) { return v; }
__device__ __forceinline__ float as_stored(const unsigned short*, float v) { return bfr(v); }

// A warp takes NR consecutive rows, every row's values loaded before any is used (more bytes in
// flight than a row of 64 to 512 bytes a warp). It divides to place the first row and steps to
// the next ones (`RopeWalk`), and loads the tables once for rows of one position (all NR where
// heads % NR == 0): the kernel was bound by the instructions each row took.
template <typename T, typename W, int V, int NR>
__device__ void norm_rope_v(const T* __restrict__ x, const W* __restrict__ w,
                            const float* __restrict__ cos, const float* __restrict__ sin,
                            T* __restrict__ y, long rows, int heads, int group, int l,
                            float eps, long xs, long bx) {
    const int d = 32 * V;
    long row0 = (bx * blockDim.x + threadIdx.x) / 32 * NR;
    int lane = threadIdx.x % 32;
    if (row0 >= rows) return;
    int e0 = V * lane;
    float v[NR][V], wv[V];
    long yo[NR];
    unsigned pk[NR];
    RopeWalk at(row0, heads, group, l);
#pragma unroll
    for (int k = 0; k < NR; k++) {
        if (row0 + k < rows) ldv<V>(x + at.x_at(d, xs), e0, v[k]);
        yo[k] = at.grouped_at(d);
        pk[k] = at.p;
        at.next();
    }
    ldv<V>(w, e0, wv);
    unsigned pos = pk[0];
    float c[V], s[V];
    ldv<V>(cos + (long)pos * d, e0, c);
    ldv<V>(sin + (long)pos * d, e0, s);
    float sign = lane < 16 ? -1.f : 1.f;
#pragma unroll
    for (int k = 0; k < NR; k++) {
        if (row0 + k >= rows) break;
        if (pk[k] != pos) {
            pos = pk[k];
            ldv<V>(cos + (long)pos * d, e0, c);
            ldv<V>(sin + (long)pos * d, e0, s);
        }
        float ss = 0.f;
#pragma unroll
        for (int t = 0; t < V; t++) ss += v[k][t] * v[k][t];
        float r = rsqrtf(warp_sum(ss) / d + eps);
        float o[V];
#pragma unroll
        for (int t = 0; t < V; t++) {
            float n = v[k][t] * r * wv[t];
            float p = __shfl_xor_sync(0xffffffffu, n, 16);
            o[t] = n * c[t] + sign * (p * s[t]);
        }
        stv<V>(y + yo[k], e0, o);
    }
}

// RoPE's and the head transpose's backward followed by the q/k norm's (norm.cu's
// rmsnorm_bwd_small, on the rotated-back gradient as the two kernels stored it between them):
// dy (B, heads / group, L, group, d) -> dx (B, L, heads, d; tokens dxs apart, x's xs), written,
// and the weight's gradient
// added into dw (f32, zeroed by the caller). A block of 8 warps takes `per_block` rows, a warp
// one row at a time; the warps' sums of dw meet in shared memory, one atomic add per column
// per block.
template <typename T, typename W, int V>
__device__ void rope_norm_bwd_v(const T* __restrict__ dy, const T* __restrict__ x,
                                const W* __restrict__ w, const float* __restrict__ cos,
                                const float* __restrict__ sin, T* __restrict__ dx,
                                float* __restrict__ dw, long rows, int heads, int group, int l,
                                float eps, int per_block, long xs, long dxs, long bx) {
    const int d = 32 * V;
    __shared__ float part[8][d];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, e0 = V * lane;
    float sign = lane < 16 ? 1.f : -1.f, acc[V], wv[V];
    ldv<V>(w, e0, wv);
#pragma unroll
    for (int t = 0; t < V; t++) acc[t] = 0.f;
    long first = bx * per_block;
    for (int k = warp; k < per_block; k += 8) {
        long row = first + k;
        if (row >= rows) break;
        const RopeWalk at(row, heads, group, l);
        const unsigned pos = at.p;
        float c[V], s[V], g[V], xv[V], ss = 0.f, gx = 0.f;
        ldv<V>(dy + at.grouped_at(d), e0, g);
        ldv<V>(x + at.x_at(d, xs), e0, xv);
        ldv<V>(cos + (long)pos * d, e0, c);
        ldv<V>(sin + (long)pos * d, e0, s);
#pragma unroll
        for (int t = 0; t < V; t++) {
            float p = __shfl_xor_sync(0xffffffffu, g[t] * s[t], 16);
            g[t] = as_stored(dy, g[t] * c[t] + sign * p);
            ss += xv[t] * xv[t];
            gx += wv[t] * g[t] * xv[t];
        }
        ss = warp_sum(ss);
        gx = warp_sum(gx);
        float r = rsqrtf(ss / d + eps);
        float cc = r * r * r * gx / d, o[V];
#pragma unroll
        for (int t = 0; t < V; t++) {
            o[t] = r * (wv[t] * g[t]) - cc * xv[t];
            acc[t] += g[t] * xv[t] * r;
        }
        stv<V>(dx + at.x_at(d, dxs), e0, o);
    }
#pragma unroll
    for (int t = 0; t < V; t++) part[warp][e0 + t] = acc[t];
    add_warp_sums(part, d, dw);
}

// Causal softmax of `scale * scores` over rows of l keys, one warp per row, in place allowed:
// row `row` is query position (row / group) % l and sees keys 0..=pos. With blocks of `chunk`
// positions (src/cuda/causal_attention.rs) the scores exist only up to the end of the row's
// block, so only that much is written (zeros past the diagonal); chunk = l writes whole rows.
template <typename T>
__device__ void causal_softmax(const T* x, T* p, long rows, int l, int group, int chunk,
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

// Its backward, in place allowed: dx = scale * p * (dy - sum(dy * p)) per row, over the same
// causal part.
template <typename T>
__device__ void causal_softmax_bwd(const T* p, const T* dy, T* dx, long rows, int l, int group,
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

// (A, B, C, row) -> (A, C, B, row): swaps the two middle axes of rows of `words` 4-byte words
// (the head transposes), one word per thread; any dtype.
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

#define ATTENTION(SUF, T)                                                                      \
extern "C" __global__ void norm_rope_##SUF(const T* x, const float* w, const float* c,        \
                                           const float* s, T* y, long rows, int heads,         \
                                           int group, int l, int d, float eps, long xs) {      \
    norm_rope<T>(x, w, c, s, y, rows, heads, group, l, d, eps, xs);                            \
}                                                                                              \
extern "C" __global__ void rope_bwd_##SUF(const T* dy, const float* c, const float* s, T* g,  \
                                          long rows, int heads, int group, int l, int d) {     \
    rope_bwd<T>(dy, c, s, g, rows, heads, group, l, d);                                        \
}                                                                                              \
extern "C" __global__ void causal_softmax_##SUF(const T* x, T* p, long rows, int l, int group,\
                                                int chunk, float scale) {                      \
    causal_softmax<T>(x, p, rows, l, group, chunk, scale);                                     \
}                                                                                              \
extern "C" __global__ void causal_softmax_bwd_##SUF(const T* p, const T* dy, T* dx, long rows,\
                                                    int l, int group, int chunk,               \
                                                    float scale) {                             \
    causal_softmax_bwd<T>(p, dy, dx, rows, l, group, chunk, scale);                            \
}
INSTANCES(ATTENTION)

// WS names the weight's type in the kernel's name: nothing for f32, _wb for bf16. Each kernel
// takes up to two sets of rows in one launch (q's and k's of a layer; `src/cuda/attention.rs`):
// the first `nb0` blocks work on set 0, the rest on set 1, with the same tables.
#define ROPE_V(SUF, T, V, WS, W)                                                               \
extern "C" __global__ void norm_rope##V##WS##_##SUF(                                           \
    const T* x0, const W* w0, T* y0, long rows0, int heads0, int group0, float eps0, long xs0, \
    const T* x1, const W* w1, T* y1, long rows1, int heads1, int group1, float eps1, long xs1, \
    const float* c, const float* s, int l, int nb0) {                                          \
    const long b = blockIdx.x;                                                                 \
    if (b < nb0)                                                                               \
        norm_rope_v<T, W, V, 4>(x0, w0, c, s, y0, rows0, heads0, group0, l, eps0, xs0, b);     \
    else                                                                                       \
        norm_rope_v<T, W, V, 4>(x1, w1, c, s, y1, rows1, heads1, group1, l, eps1, xs1,         \
                                b - nb0);                                                      \
}                                                                                              \
extern "C" __global__ void rope_norm_bwd##V##WS##_##SUF(                                       \
    const T* dy0, const T* x0, const W* w0, T* dx0, float* dw0, long rows0, int heads0,        \
    int group0, float eps0, int per_block0, long xs0, long dxs0, const T* dy1, const T* x1,    \
    const W* w1, T* dx1, float* dw1, long rows1, int heads1, int group1, float eps1,           \
    int per_block1, long xs1, long dxs1, const float* c, const float* s, int l, int nb0) {     \
    const long b = blockIdx.x;                                                                 \
    if (b < nb0)                                                                               \
        rope_norm_bwd_v<T, W, V>(dy0, x0, w0, c, s, dx0, dw0, rows0, heads0, group0, l, eps0,  \
                                 per_block0, xs0, dxs0, b);                                    \
    else                                                                                       \
        rope_norm_bwd_v<T, W, V>(dy1, x1, w1, c, s, dx1, dw1, rows1, heads1, group1, l, eps1,  \
                                 per_block1, xs1, dxs1, b - nb0);                              \
}
#define ROPE_VS(SUF, T)                                                                        \
    ROPE_V(SUF, T, 2, , float) ROPE_V(SUF, T, 4, , float) ROPE_V(SUF, T, 8, , float)           \
    ROPE_V(SUF, T, 2, _wb, unsigned short) ROPE_V(SUF, T, 4, _wb, unsigned short)              \
    ROPE_V(SUF, T, 8, _wb, unsigned short)
INSTANCES(ROPE_VS)
