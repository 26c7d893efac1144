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

// The gather's backward into a bf16 table, the same bits every run: `seen` (2 V u32, zeroed by
// the caller) first gets, for each token id, its count and n minus its first position
// (`embed_seen`); then the block (t, y) of a token's first position t sums, in f32 and in
// position order, the rows of dx of every position with that token (columns y * 256 to
// y * 256 + 255 of them), and adds the sum to the table's row once: dtable[id] = bf16(dtable[id]
// + sum). Other blocks return at once; a block stops scanning at its token's last position, so
// the ids a step scans are the sum over its tokens of the span from first to last position.
extern "C" __global__ void embed_seen(const unsigned int* ids, unsigned int* seen, long n) {
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    unsigned id = ids[t];
    atomicAdd(seen + 2 * (long)id, 1u);
    atomicMax(seen + 2 * (long)id + 1, (unsigned)(n - t));
}

template <typename T>
__device__ void embed_bwd_rows(const T* dx, const unsigned int* ids, const unsigned int* seen,
                               unsigned short* dtable, long n, int e) {
    const long t = blockIdx.x;
    const unsigned id = ids[t];
    const uint2 s = *(const uint2*)(seen + 2 * (long)id);
    if ((long)(n - s.y) != t) return;
    // 2,048 positions a pass, 8 consecutive ones a thread; the positions holding the token
    // listed in order (each thread's at the count of those before it), then their rows added
    // (a column a thread) sixteen at a time, all sixteen loaded before the first is added: a
    // frequent token's thousands of rows are a chain of loads.
    __shared__ unsigned short list[2048];
    __shared__ unsigned before[8];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long col = (long)blockIdx.y * 256 + threadIdx.x;
    const bool in = col < e;
    float acc = 0.f;
    unsigned found = 0;
    for (long j0 = t; j0 < n && found < s.x; j0 += 2048) {
        unsigned mine = 0;
#pragma unroll
        for (int b = 0; b < 8; b++) {
            const long j = j0 + 8 * threadIdx.x + b;
            if (j < n && ids[j] == id) mine |= 1u << b;
        }
        // exclusive prefix of the counts over the block: within the warp, then the warps'
        unsigned c = __popc(mine), incl = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            unsigned u = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += u;
        }
        if (lane == 31) before[warp] = incl;
        __syncthreads();
        unsigned at = incl - c, total = 0;
        for (int w = 0; w < 8; w++) {
            if (w < warp) at += before[w];
            total += before[w];
        }
        for (unsigned mb = mine; mb; mb &= mb - 1) list[at++] = 8 * threadIdx.x + __ffs(mb) - 1;
        __syncthreads();
        for (unsigned i0 = 0; i0 < total; i0 += 16) {
            float v[16];
#pragma unroll
            for (int i = 0; i < 16; i++)
                v[i] = in && i0 + i < total ? ld(dx, (j0 + list[i0 + i]) * e + col) : 0.f;
#pragma unroll
            for (int i = 0; i < 16; i++)
                if (i0 + i < total) acc += v[i];
        }
        found += total;
        __syncthreads();
    }
    if (in) {
        unsigned short* p = dtable + (long)id * e + col;
        *p = f32_to_bf16(ld(p, 0) + acc);
    }
}

#define EMBEDDING(SUF, T)                                                                      \
extern "C" __global__ void embed_##SUF(const float* table, const unsigned int* ids, T* out,   \
                                       long n, int e) {                                        \
    embed<T>(table, ids, out, n, e);                                                           \
}                                                                                              \
extern "C" __global__ void embed_bwd_##SUF(const T* dx, const unsigned int* ids,              \
                                           float* dtable, long n, int e) {                     \
    embed_bwd<T>(dx, ids, dtable, n, e);                                                       \
}                                                                                              \
extern "C" __global__ void embed_bwd_rows_##SUF(const T* dx, const unsigned int* ids,         \
                                                const unsigned int* seen,                      \
                                                unsigned short* dtable, long n, int e) {       \
    embed_bwd_rows<T>(dx, ids, seen, dtable, n, e);                                            \
}
INSTANCES(EMBEDDING)
