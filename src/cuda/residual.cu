// The residual stream's sum (src/cuda/residual.rs).

// y = a + b, two neighbouring elements per thread (the last one alone when n is odd).
template <typename T>
__device__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long n) {
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

#define RESIDUAL(SUF, T)                                                                       \
extern "C" __global__ void add_##SUF(const T* a, const T* b, T* y, long n) { add<T>(a, b, y, n); }
INSTANCES(RESIDUAL)
