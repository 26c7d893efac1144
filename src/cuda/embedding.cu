// The token embedding (src/cuda/embedding.rs).

// Gather with the cast to T: out (n, e) = table[ids] (f32 table), one thread per entry.
template <typename T>
__device__ void embed(const float* table, const unsigned int* ids, T* out, long n, int e) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * e) return;
    st(out, i, table[(long)ids[i / e] * e + i % e]);
}

// The gather's backward: dtable[ids[t]] += dx[t] (f32 atomics, every token at once, so the
// sum's order, and its last bits, vary from run to run).
template <typename T>
__device__ void embed_bwd(const T* dx, const unsigned int* ids, float* dtable, long n, int e) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * e) return;
    atomicAdd(dtable + (long)ids[i / e] * e + i % e, ld(dx, i));
}

#define EMBEDDING(SUF, T)                                                                      \
extern "C" __global__ void embed_##SUF(const float* table, const unsigned int* ids, T* out,   \
                                       long n, int e) {                                        \
    embed<T>(table, ids, out, n, e);                                                           \
}                                                                                              \
extern "C" __global__ void embed_bwd_##SUF(const T* dx, const unsigned int* ids,              \
                                           float* dtable, long n, int e) {                     \
    embed_bwd<T>(dx, ids, dtable, n, e);                                                       \
}
INSTANCES(EMBEDDING)
