// RMSNorm, forward and backward (src/cuda/norm.rs). Rows of d in T, the weight in f32,
// arithmetic in f32: y = x * r * w with r = rsqrt(mean(x^2) + eps).

// Forward, one warp per row.
template <typename T>
__device__ void rmsnorm(const T* x, const float* w, T* y, long rows, int d, float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) { float v = ld(xr, i); ss += v * v; }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int i = lane; i < d; i += 32) st(y + row * d, i, ld(xr, i) * r * w[i]);
}

// One row of the backward, held by a warp: loads x and dy (their first 32 * NPL entries into
// registers, zeros past d) and finds r and c = r^3 / d * sum_i w_i dy_i x_i, so that
// dx_i = r * w_i * dy_i - c * x_i.
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

// One row's input gradient, held by a warp: dx_i = r * w_i * dy_i - c * x_i written to `out`
// (added to it when ADD); leaves the row's first 32 * NPL entries of x and dy, and r, in the
// registers for a caller that also wants the weight's gradient.
template <typename T, bool ADD, int NPL>
__device__ void rms_row_dx(const T* xr, const float* w, const T* gr, T* out, int d, float eps,
                           int lane, float (&xv)[NPL], float (&gv)[NPL], float& r) {
    float c;
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

// dx (rows, d), written, or added to when ADD (the residual stream's gradient); one warp per
// row, 32 values per lane in registers (hidden-sized rows; longer rows loop).
template <typename T, bool ADD>
__device__ void rmsnorm_bwd_x(const T* __restrict__ x, const float* __restrict__ w,
                              const T* __restrict__ dy, T* __restrict__ dx, long rows, int d,
                              float eps) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (row >= rows) return;
    float xv[32], gv[32], r;
    rms_row_dx<T, ADD, 32>(x + row * d, w, dy + row * d, dx + row * d, d, eps,
                           threadIdx.x % 32, xv, gv, r);
}

// dw_j = sum over rows of dy_j * x_j * r_row into dw (f32, zeroed by the caller): a block takes
// `per_block` rows (at most 64) and blockDim.x columns (grid y: the column tiles), its warps
// find their rows' r, its threads sum their columns, one atomic add per column per block.
template <typename T>
__device__ void rmsnorm_bwd_w(const T* x, const T* dy, float* dw, long rows, int d, float eps,
                              int per_block) {
    __shared__ float rs[64];
    long first = (long)blockIdx.x * per_block;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int k = warp; k < per_block; k += warps) {
        long row = first + k;
        float ss = 0.f;
        if (row < rows) for (int i = lane; i < d; i += 32) { float v = ld(x + row * d, i); ss += v * v; }
        ss = warp_sum(ss);
        if (lane == 0) rs[k] = rsqrtf(ss / d + eps);
    }
    __syncthreads();
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.f;
    for (int k = 0; k < per_block && first + k < rows; k++) {
        long row = first + k;
        acc += ld(dy + row * d, j) * ld(x + row * d, j) * rs[k];
    }
    atomicAdd(dw + j, acc);
}

// The whole backward in one pass for rows of d <= 128 (the head-sized q/k norms): dx, and dw
// (f32, zeroed by the caller). A block of 8 warps takes `per_block` rows, a warp one row at a
// time with the row in registers; each lane sums dy * x * r over its warp's rows for its
// columns, the warps' sums meet in shared memory, one atomic add per column per block.
template <typename T>
__device__ void rmsnorm_bwd_small(const T* __restrict__ x, const float* __restrict__ w,
                                  const T* __restrict__ dy, T* __restrict__ dx,
                                  float* __restrict__ dw, long rows, int d, float eps,
                                  int per_block) {
    const int NPL = 4;
    __shared__ float part[8][32 * NPL];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[NPL];
#pragma unroll
    for (int t = 0; t < NPL; t++) acc[t] = 0.f;
    long first = (long)blockIdx.x * per_block;
    for (int k = warp; k < per_block; k += 8) {
        long row = first + k;
        if (row >= rows) break;
        float xv[NPL], gv[NPL], r;
        rms_row_dx<T, false, NPL>(x + row * d, w, dy + row * d, dx + row * d, d, eps, lane, xv,
                                  gv, r);
#pragma unroll
        for (int t = 0; t < NPL; t++) acc[t] += gv[t] * xv[t] * r;
    }
#pragma unroll
    for (int t = 0; t < NPL; t++) part[warp][lane + 32 * t] = acc[t];
    add_warp_sums(part, d, dw);
}

// The norm of one row held by a warp as rmsnorm_v (below) holds it, lane `lane`'s values in
// xv, written to that row of y: rmsnorm_v's and add_rmsnorm_v's last step.
template <typename T, typename W, int V>
__device__ __forceinline__ void rmsnorm_v_row(const float* xv, const W* __restrict__ w,
                                              T* __restrict__ y, int lane, float eps) {
    constexpr int d = 32 * V;
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < V; i++) ss += xv[i] * xv[i];
    float r = rsqrtf(warp_sum(ss) / d + eps);
#pragma unroll
    for (int t = 0; t < V / 8; t++) {
        float wv[8], o[8];
        ld8(w, 8 * (32 * t + lane), wv);
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = xv[8 * t + e] * r * wv[e];
        st8(y, 8 * (32 * t + lane), o);
    }
}

// The forward for rows of d = 32 * V (V a multiple of 8), one warp per row held in registers: lane
// `lane` has the eight values from column 8 * (32 * t + lane) for t < V / 8 (each load of the
// warp is 512 contiguous bytes of bf16). The weight is f32 or bf16 (W: widened as it is read,
// the same values as a cast to f32 beforehand).
template <typename T, typename W, int V>
__device__ void rmsnorm_v(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                          long rows, float eps) {
    constexpr int d = 32 * V;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float xv[V];
#pragma unroll
    for (int t = 0; t < V / 8; t++) ld8(x + row * d, 8 * (32 * t + lane), xv + 8 * t);
    rmsnorm_v_row<T, W, V>(xv, w, y + row * d, lane, eps);
}

// The residual stream's sum and the RMSNorm that follows it, in one pass: h = a + b in f32,
// stored in T (residual.cu's add), and y = rmsnorm(h) as rmsnorm_v computes it from those
// stored values, so h and y have the bits of the two kernels one after the other.
template <typename T, typename W, int V>
__device__ void add_rmsnorm_v(const T* __restrict__ a, const T* __restrict__ b,
                              T* __restrict__ h, const W* __restrict__ w, T* __restrict__ y,
                              long rows, float eps) {
    constexpr int d = 32 * V;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float xv[V];
#pragma unroll
    for (int t = 0; t < V / 8; t++) {
        float bv[8];
        ld8(a + row * d, 8 * (32 * t + lane), xv + 8 * t);
        ld8(b + row * d, 8 * (32 * t + lane), bv);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float s = xv[8 * t + e] + bv[e];
            xv[8 * t + e] = sizeof(T) == 2 ? bfr(s) : s;
        }
        st8(h + row * d, 8 * (32 * t + lane), xv + 8 * t);
    }
    rmsnorm_v_row<T, W, V>(xv, w, y + row * d, lane, eps);
}

// The whole backward in one pass for rows of d = 32 * V (V a multiple of 8; the hidden-sized
// norms), laid out as in rmsnorm_v: dx written (added to when ADD, the residual stream's
// gradient), and dw (f32, zeroed by the caller) as in rmsnorm_bwd_small: a block of 8 warps
// takes `per_block` rows, each lane sums dy * x * r over its warp's rows for its columns, the
// warps' sums meet in shared memory, one atomic add per column per block.
template <typename T, typename W, bool ADD, int V>
__device__ void rmsnorm_bwd_v(const T* __restrict__ x, const W* __restrict__ w,
                              const T* __restrict__ dy, T* __restrict__ dx,
                              float* __restrict__ dw, long rows, float eps, int per_block) {
    constexpr int d = 32 * V;
    __shared__ float part[8][d];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; i++) acc[i] = 0.f;
    long first = (long)blockIdx.x * per_block;
    for (int k = warp; k < per_block; k += 8) {
        long row = first + k;
        if (row >= rows) break;
        float xv[V], gv[V];
        float ss = 0.f, gx = 0.f;
#pragma unroll
        for (int t = 0; t < V / 8; t++) {
            float wv[8];
            ld8(x + row * d, 8 * (32 * t + lane), xv + 8 * t);
            ld8(dy + row * d, 8 * (32 * t + lane), gv + 8 * t);
            ld8(w, 8 * (32 * t + lane), wv);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                ss += xv[8 * t + e] * xv[8 * t + e];
                gx += wv[e] * gv[8 * t + e] * xv[8 * t + e];
            }
        }
        ss = warp_sum(ss);
        gx = warp_sum(gx);
        const float r = rsqrtf(ss / d + eps);
        const float c = r * r * r * gx / d;
#pragma unroll
        for (int t = 0; t < V / 8; t++) {
            const long at = row * d + 8 * (32 * t + lane);
            float wv[8], o[8], old[8];
            ld8(w, 8 * (32 * t + lane), wv);
            if (ADD) ld8(dx, at, old);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float v = r * (wv[e] * gv[8 * t + e]) - c * xv[8 * t + e];
                o[e] = ADD ? old[e] + v : v;
                acc[8 * t + e] += gv[8 * t + e] * xv[8 * t + e] * r;
            }
            st8(dx, at, o);
        }
    }
#pragma unroll
    for (int t = 0; t < V / 8; t++)
#pragma unroll
        for (int e = 0; e < 8; e++) part[warp][8 * (32 * t + lane) + e] = acc[8 * t + e];
    add_warp_sums(part, d, dw);
}

// WS names the weight's type in the kernel's name: nothing for f32, _wb for bf16.
#define NORM_V(SUF, T, V, WS, W)                                                               \
extern "C" __global__ void rmsnorm_v##V##WS##_##SUF(const T* x, const W* w, T* y, long rows,  \
                                                   float eps) {                               \
    rmsnorm_v<T, W, V>(x, w, y, rows, eps);                                                    \
}                                                                                              \
extern "C" __global__ void add_rmsnorm_v##V##WS##_##SUF(const T* a, const T* b, T* h,       \
                                                       const W* w, T* y, long rows,           \
                                                       float eps) {                           \
    add_rmsnorm_v<T, W, V>(a, b, h, w, y, rows, eps);                                          \
}                                                                                              \
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_v##V##WS##_##SUF(               \
    const T* x, const W* w, const T* dy, T* dx, float* dw, long rows, float eps,               \
    int per_block) {                                                                           \
    rmsnorm_bwd_v<T, W, false, V>(x, w, dy, dx, dw, rows, eps, per_block);                     \
}                                                                                              \
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_add_v##V##WS##_##SUF(           \
    const T* x, const W* w, const T* dy, T* dx, float* dw, long rows, float eps,               \
    int per_block) {                                                                           \
    rmsnorm_bwd_v<T, W, true, V>(x, w, dy, dx, dw, rows, eps, per_block);                      \
}
#define NORMS_V(SUF, T)                                                                        \
    NORM_V(SUF, T, 8, , float) NORM_V(SUF, T, 16, , float) NORM_V(SUF, T, 32, , float)         \
    NORM_V(SUF, T, 8, _wb, unsigned short) NORM_V(SUF, T, 16, _wb, unsigned short)             \
    NORM_V(SUF, T, 32, _wb, unsigned short)
INSTANCES(NORMS_V)

#define NORM(SUF, T)                                                                           \
extern "C" __global__ void rmsnorm_##SUF(const T* x, const float* w, T* y, long rows, int d,  \
                                         float eps) {                                          \
    rmsnorm<T>(x, w, y, rows, d, eps);                                                         \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_x_##SUF(const T* x, const float* w, const T* dy,       \
                                               T* dx, long rows, int d, float eps) {           \
    rmsnorm_bwd_x<T, false>(x, w, dy, dx, rows, d, eps);                                       \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_x_add_##SUF(const T* x, const float* w, const T* dy,   \
                                                   T* dx, long rows, int d, float eps) {       \
    rmsnorm_bwd_x<T, true>(x, w, dy, dx, rows, d, eps);                                        \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_w_##SUF(const T* x, const T* dy, float* dw, long rows, \
                                               int d, float eps, int per_block) {              \
    rmsnorm_bwd_w<T>(x, dy, dw, rows, d, eps, per_block);                                      \
}                                                                                              \
extern "C" __global__ void rmsnorm_bwd_small_##SUF(const T* x, const float* w, const T* dy,   \
                                                   T* dx, float* dw, long rows, int d,         \
                                                   float eps, int per_block) {                 \
    rmsnorm_bwd_small<T>(x, w, dy, dx, dw, rows, d, eps, per_block);                           \
}
INSTANCES(NORM)
