// The SwiGLU gate of the MLP, y = silu(g) * u (src/cuda/mlp.rs).

// Forward, eight neighbouring elements per thread (16-byte accesses of bf16 when every buffer
// is 16-byte aligned; the last few, or unaligned buffers, one at a time).
template <typename T>
__device__ void silu_mul(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                         long n) {
    long i = 8 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (i + 8 <= n && aligned16(g, u, y)) {
        float a[8], b[8], o[8];
        ld8(g, i, a);
        ld8(u, i, b);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = a[k] * sigmoid(a[k]) * b[k];
        st8(y, i, o);
        return;
    }
    for (long j = i; j < n && j < i + 8; j++) {
        float a = ld(g, j);
        st(y, j, a * sigmoid(a) * ld(u, j));
    }
}

// dg and du of one element: dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g),
// du = dy * g * s.
__device__ __forceinline__ void silu_mul_grads(float a, float uu, float d, float& og, float& ou) {
    float sg = sigmoid(a);
    og = d * uu * sg * (1.f + a * (1.f - sg));
    ou = d * a * sg;
}

// Both gradients in one pass, eight elements per thread as the forward.
template <typename T>
__device__ void silu_mul_bwd(const T* __restrict__ g, const T* __restrict__ u,
                             const T* __restrict__ dy, T* __restrict__ dg, T* __restrict__ du,
                             long n) {
    long i = 8 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (i + 8 <= n && aligned16(g, u, dy, dg, du)) {
        float a[8], uu[8], d[8], og[8], ou[8];
        ld8(g, i, a);
        ld8(u, i, uu);
        ld8(dy, i, d);
#pragma unroll
        for (int k = 0; k < 8; k++) silu_mul_grads(a[k], uu[k], d[k], og[k], ou[k]);
        st8(dg, i, og);
        st8(du, i, ou);
        return;
    }
    for (long j = i; j < n && j < i + 8; j++) {
        float og, ou;
        silu_mul_grads(ld(g, j), ld(u, j), ld(dy, j), og, ou);
        st(dg, j, og);
        st(du, j, ou);
    }
}

#define MLP(SUF, T)                                                                            \
extern "C" __global__ void silu_mul_##SUF(const T* g, const T* u, T* y, long n) {             \
    silu_mul<T>(g, u, y, n);                                                                   \
}                                                                                              \
extern "C" __global__ void silu_mul_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,     \
                                              T* du, long n) {                                 \
    silu_mul_bwd<T>(g, u, dy, dg, du, n);                                                      \
}
INSTANCES(MLP)
