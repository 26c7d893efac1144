// The SwiGLU gate of the MLP, y = silu(g) * u (src/cuda/mlp.rs).

// Forward, two neighbouring elements per thread (the last one alone when n is odd).
template <typename T>
__device__ void silu_mul(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                         long n) {
    long i = 2 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (i + 1 == n) {
        float a = ld(g, i);
        st(y, i, a * sigmoid(a) * ld(u, i));
        return;
    }
    float a0, a1, u0, u1;
    ld2(g, i, a0, a1);
    ld2(u, i, u0, u1);
    st2(y, i, a0 * sigmoid(a0) * u0, a1 * sigmoid(a1) * u1);
}

// Both gradients in one pass: dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g),
// du = dy * g * s.
template <typename T>
__device__ void silu_mul_bwd(const T* __restrict__ g, const T* __restrict__ u,
                             const T* __restrict__ dy, T* __restrict__ dg, T* __restrict__ du,
                             long n) {
    long i = 2 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    float a[2], uu[2], d[2], og[2], ou[2];
    bool pair = i + 1 < n;
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

#define MLP(SUF, T)                                                                            \
extern "C" __global__ void silu_mul_##SUF(const T* g, const T* u, T* y, long n) {             \
    silu_mul<T>(g, u, y, n);                                                                   \
}                                                                                              \
extern "C" __global__ void silu_mul_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,     \
                                              T* du, long n) {                                 \
    silu_mul_bwd<T>(g, u, dy, dg, du, n);                                                      \
}
INSTANCES(MLP)
