// The residual stream's sum (src/cuda/residual.rs).

// y = a + b, eight neighbouring elements per thread (16-byte accesses of bf16 when every buffer
// is 16-byte aligned; the last few, or unaligned buffers, one at a time).
template <typename T>
__device__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long n) {
    long i = 8 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (i + 8 <= n && aligned16(a, b, y)) {
        float x[8], z[8];
        ld8(a, i, x);
        ld8(b, i, z);
#pragma unroll
        for (int k = 0; k < 8; k++) x[k] += z[k];
        st8(y, i, x);
        return;
    }
    for (long j = i; j < n && j < i + 8; j++) st(y, j, ld(a, j) + ld(b, j));
}

#define RESIDUAL(SUF, T)                                                                       \
extern "C" __global__ void add_##SUF(const T* a, const T* b, T* y, long n) { add<T>(a, b, y, n); }
INSTANCES(RESIDUAL)
