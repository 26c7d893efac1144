// The SwiGLU gate of the MLP, y = silu(g) * u (src/cuda/mlp.rs).

// Rows of f elements, eight neighbouring elements of a row per thread (16-byte accesses of bf16
// when the thread's pieces are 16-byte aligned; a row's last few, or unaligned pieces, one at a
// time). The inputs and input gradients step `si` elements from row to row, the output and its
// gradient `so`: contiguous tensors are one row (si = so = f = n), the fused gate/up
// projection's output (rows of gate then up) has si = 2 * f, u = g + f.
// This thread's row and its first element j there (eight a thread over rows of f); false past
// the last row.
// (In 32 bits: a 64-bit division is a called software routine; the launchers keep the
// threads below 2^32.)
__device__ __forceinline__ bool eight_of_row(long rows, long f, long& row, long& j) {
    const unsigned per_row = (unsigned)((f + 7) / 8);
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned r = t / per_row;
    if (r >= rows) return false;
    row = r;
    j = (long)(t - r * per_row) * 8;
    return true;
}

template <typename T>
__device__ void silu_mul(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                         long rows, long f, long si, long so) {
    long row, j;
    if (!eight_of_row(rows, f, row, j)) return;
    const T* gr = g + row * si + j;
    const T* ur = u + row * si + j;
    T* yr = y + row * so + j;
    if (j + 8 <= f && aligned16(gr, ur, yr)) {
        float a[8], b[8], o[8];
        ld8(gr, 0, a);
        ld8(ur, 0, b);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = a[k] * sigmoid(a[k]) * b[k];
        st8(yr, 0, o);
        return;
    }
    for (long k = 0; k < 8 && j + k < f; k++) {
        float a = ld(gr, k);
        st(yr, k, a * sigmoid(a) * ld(ur, k));
    }
}

// dg and du of one element: dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g),
// du = dy * g * s.
__device__ __forceinline__ void silu_mul_grads(float a, float uu, float d, float& og, float& ou) {
    float sg = sigmoid(a);
    og = d * uu * sg * (1.f + a * (1.f - sg));
    ou = d * a * sg;
}

// Both gradients in one pass, laid out as the forward (dg and du step si, dy so).
template <typename T>
__device__ void silu_mul_bwd(const T* __restrict__ g, const T* __restrict__ u,
                             const T* __restrict__ dy, T* __restrict__ dg, T* __restrict__ du,
                             long rows, long f, long si, long so) {
    long row, j;
    if (!eight_of_row(rows, f, row, j)) return;
    const T* gr = g + row * si + j;
    const T* ur = u + row * si + j;
    const T* dyr = dy + row * so + j;
    T* dgr = dg + row * si + j;
    T* dur = du + row * si + j;
    if (j + 8 <= f && aligned16(gr, ur, dyr, dgr, dur)) {
        float a[8], uu[8], d[8], og[8], ou[8];
        ld8(gr, 0, a);
        ld8(ur, 0, uu);
        ld8(dyr, 0, d);
#pragma unroll
        for (int k = 0; k < 8; k++) silu_mul_grads(a[k], uu[k], d[k], og[k], ou[k]);
        st8(dgr, 0, og);
        st8(dur, 0, ou);
        return;
    }
    for (long k = 0; k < 8 && j + k < f; k++) {
        float og, ou;
        silu_mul_grads(ld(gr, k), ld(ur, k), ld(dyr, k), og, ou);
        st(dgr, k, og);
        st(dur, k, ou);
    }
}

#define MLP(SUF, T)                                                                            \
extern "C" __global__ void silu_mul_##SUF(const T* g, const T* u, T* y, long rows, long f,    \
                                          long si, long so) {                                  \
    silu_mul<T>(g, u, y, rows, f, si, so);                                                     \
}                                                                                              \
extern "C" __global__ void silu_mul_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,     \
                                              T* du, long rows, long f, long si, long so) {    \
    silu_mul_bwd<T>(g, u, dy, dg, du, rows, f, si, so);                                        \
}
INSTANCES(MLP)
