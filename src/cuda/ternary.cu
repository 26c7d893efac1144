// The ternary projection (src/cuda/ternary.rs): from the f32 latent w, per group of g
// consecutive weights, a scale s (absmean: mean |w|; absmax: max |w|; at least `min`, rounded
// to the scale dtype) and W_t = s * [|w / s| > 0.5] * sign(w), stored in T. The arithmetic of
// one value and one group is ternary.cuh's.

// Groups of up to a few thousand weights: one warp per group, both passes.
template <typename T>
__device__ void ternarize(const float* w, T* out, long groups, int g, int absmax, int sdt,
                          float min, float lambda) {
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= groups) return;
    const float* src = w + warp * g;
    float acc = 0.f;
    for (int i = lane; i < g; i += 32) acc = absmax ? fmaxf(acc, fabsf(src[i])) : acc + fabsf(src[i]);
    for (int o = 16; o > 0; o /= 2) {
        float other = __shfl_xor_sync(0xffffffffu, acc, o);
        acc = absmax ? fmaxf(acc, other) : acc + other;
    }
    float s = group_scale(acc, g, absmax, sdt, min);
    for (int i = lane; i < g; i += 32) st(out, warp * g + i, ternary_value(src[i], s, lambda));
}

// The same for groups of 32, 64 or 128 * C weights, four neighbouring weights a lane per 16-byte
// load and every weight in registers between the passes: a warp takes 128 * C consecutive
// weights (n a multiple of that), a group spans g / 4 lanes (the whole warp from g = 128 on).
template <typename T, int C>
__device__ void ternarize_v(const float* __restrict__ w, T* __restrict__ out, long n, int g,
                            int absmax, int sdt, float min, float lambda) {
    long base = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32 * (128 * C);
    int lane = threadIdx.x % 32;
    if (base >= n) return;
    float v[C][4];
    float acc = 0.f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        // (not ldv: its pointer loses __restrict__, and the loads the read-only cache path)
        float4 t = *(const float4*)(w + base + 128 * c + 4 * lane);
        v[c][0] = t.x; v[c][1] = t.y; v[c][2] = t.z; v[c][3] = t.w;
#pragma unroll
        for (int e = 0; e < 4; e++) acc = absmax ? fmaxf(acc, fabsf(v[c][e])) : acc + fabsf(v[c][e]);
    }
    float s = warp_group_scale(acc, g, absmax, sdt, min);
#pragma unroll
    for (int c = 0; c < C; c++) {
        float o[4];
#pragma unroll
        for (int e = 0; e < 4; e++) o[e] = ternary_value(v[c][e], s, lambda);
        stv<4>(out, base + 128 * c + 4 * lane, o);
    }
}

// Large groups (a whole matrix): one block of 1024 threads per group finds its scale...
extern "C" __global__ void ternary_scales(const float* w, float* scales, long groups, long g,
                                          int absmax, int sdt, float min) {
    __shared__ float part[32];
    const float* src = w + (long)blockIdx.x * g;
    float acc = 0.f;
    for (long i = threadIdx.x; i < g; i += blockDim.x)
        acc = absmax ? fmaxf(acc, fabsf(src[i])) : acc + fabsf(src[i]);
    for (int o = 16; o > 0; o /= 2) {
        float other = __shfl_xor_sync(0xffffffffu, acc, o);
        acc = absmax ? fmaxf(acc, other) : acc + other;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = part[0];
        for (int k = 1; k < warps; k++) total = absmax ? fmaxf(total, part[k]) : total + part[k];
        scales[blockIdx.x] = group_scale(total, g, absmax, sdt, min);
    }
}

// ...and one thread per weight applies it (or a learned scale, prepared as used here).
template <typename T>
__device__ void ternary_apply(const float* w, const float* scales, T* out, long n, long g,
                              int sdt, float min, float lambda) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(out, i, ternary_value(w[i], used_scale(scales[i / g], sdt, min), lambda));
}

// LSQ's gradient of learned scales, one block per group: ds = factor * sum over the group of
// dw * (|x| <= 1 ? q - x : q), x = w / s at the used scale, q its ternary level; factor is
// lambda / sqrt(g). dw is the latent's gradient, which the straight-through estimator makes
// W_t's.
extern "C" __global__ void ternary_scale_grad(const float* w, const float* dw, const float* s,
                                              float* ds, long g, int sdt, float min,
                                              float factor) {
    __shared__ float part[32];
    long base = (long)blockIdx.x * g;
    float su = used_scale(s[blockIdx.x], sdt, min);
    float acc = 0.f;
    for (long i = threadIdx.x; i < g; i += blockDim.x) {
        float x = w[base + i] / su;
        float q = ternary_level(w[base + i], su);
        acc += dw[base + i] * (fabsf(x) <= 1.f ? q - x : q);
    }
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int k = 0; k < warps; k++) total += part[k];
        ds[blockIdx.x] = total * factor;
    }
}

// Per-token 8-bit absmax fake quantization of the activations, one warp per row of d:
// s = 127 / max(max |x|, 1e-5), y = clamp(round(x * s), -128, 127) / s (round half away from
// zero, as the composed version's), each operation rounded once.
template <typename T>
__device__ void act_quant(const T* x, T* y, long rows, int d) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    float amax = 0.f;
    for (int i = lane; i < d; i += 32) amax = fmaxf(amax, fabsf(ld(xr, i)));
    for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float s = __fdiv_rn(127.f, fmaxf(amax, 1e-5f));
    for (int i = lane; i < d; i += 32) {
        float q = fminf(fmaxf(roundf(__fmul_rn(ld(xr, i), s)), -128.f), 127.f);
        st(y + row * d, i, __fdiv_rn(q, s));
    }
}

#define TERNARY(SUF, T)                                                                        \
extern "C" __global__ void ternarize_##SUF(const float* w, T* out, long groups, int g,        \
                                           int absmax, int sdt, float min, float lambda) {     \
    ternarize<T>(w, out, groups, g, absmax, sdt, min, lambda);                                 \
}                                                                                              \
extern "C" __global__ void ternarize_v1_##SUF(const float* w, T* out, long n, int g, int absmax, \
                                              int sdt, float min, float lambda) {             \
    ternarize_v<T, 1>(w, out, n, g, absmax, sdt, min, lambda);                                 \
}                                                                                              \
extern "C" __global__ void ternarize_v2_##SUF(const float* w, T* out, long n, int g, int absmax, \
                                              int sdt, float min, float lambda) {             \
    ternarize_v<T, 2>(w, out, n, g, absmax, sdt, min, lambda);                                 \
}                                                                                              \
extern "C" __global__ void ternarize_v4_##SUF(const float* w, T* out, long n, int g, int absmax, \
                                              int sdt, float min, float lambda) {             \
    ternarize_v<T, 4>(w, out, n, g, absmax, sdt, min, lambda);                                 \
}                                                                                              \
extern "C" __global__ void ternary_apply_##SUF(const float* w, const float* scales, T* out,    \
                                               long n, long g, int sdt, float min,             \
                                               float lambda) {                                 \
    ternary_apply<T>(w, scales, out, n, g, sdt, min, lambda);                                  \
}                                                                                              \
extern "C" __global__ void act_quant_##SUF(const T* x, T* y, long rows, int d) {              \
    act_quant<T>(x, y, rows, d);                                                               \
}
INSTANCES(TERNARY)
