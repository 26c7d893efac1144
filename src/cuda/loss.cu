// Cross-entropy over the vocabulary (src/cuda/loss.rs), one block per row of logits, in the
// logits' dtype with f32 arithmetic: no f32 copy of the (N, V) logits is ever made.

// (m, s) <- the log-sum-exp state of (m, s) and (m2, s2), with one exponential.
__device__ __forceinline__ void merge1(float& m, float& s, float m2, float s2) {
    if (m2 <= m) {
        s += s2 * __expf(m2 - m);
    } else {
        s = s * __expf(m - m2) + s2;
        m = m2;
    }
}

// The log-sum-exp of the (m, s) states of a block's threads, returned to every thread.
__device__ float block_lse(float m, float s) {
    __shared__ float sm[32], ss[32], lse;
    for (int o = 16; o > 0; o /= 2) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge1(m, s, m2, s2);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = sm[0], S = ss[0];
        for (int w = 1; w < warps; w++) merge1(M, S, sm[w], ss[w]);
        lse = M + __logf(S);
    }
    __syncthreads();
    return lse;
}

// loss[r] = lse(x_r) - x_r[t_r]. When dx is not null it also gets the gradient,
// dx_r = scale * g_r * (softmax(x_r) - onehot(t_r)) with g_r = row_grad[r] (1 when row_grad is
// null); dx may be x itself (the training step overwrites the logits with their gradient).
// Pairs of logits per access when v is even (every row then starts at an even element).
template <typename T>
__device__ void cross_entropy(const T* x, const unsigned int* y, float* loss, T* dx,
                              const float* row_grad, long rows, int v, float scale) {
    long row = blockIdx.x;
    const T* xr = x + row * v;
    float m = -3.0e38f, s = 0.f;
    bool pairs = (v % 2) == 0;
    if (pairs) {
        for (int j = 2 * threadIdx.x; j < v; j += 2 * blockDim.x) {
            float a, b;
            ld2(xr, j, a, b);
            float hi = fmaxf(a, b);
            merge1(m, s, hi, 1.f + __expf(fminf(a, b) - hi));
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x) merge1(m, s, ld(xr, j), 1.f);
    }
    float lse = block_lse(m, s);
    unsigned int t = y[row];
    if (threadIdx.x == 0) loss[row] = lse - ld(xr, t);
    if (dx == 0) return;
    __syncthreads();  // x[t] is read before any thread overwrites the row
    float g = scale * (row_grad ? row_grad[row] : 1.f);
    T* dr = dx + row * v;
    if (pairs) {
        for (int j = 2 * threadIdx.x; j < v; j += 2 * blockDim.x) {
            float a, b;
            ld2(xr, j, a, b);
            float ga = g * (__expf(a - lse) - (j == t ? 1.f : 0.f));
            float gb = g * (__expf(b - lse) - (j + 1 == t ? 1.f : 0.f));
            st2(dr, j, ga, gb);
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x)
            st(dr, j, g * (__expf(ld(xr, j) - lse) - (j == t ? 1.f : 0.f)));
    }
}

#define LOSS(SUF, T)                                                                           \
extern "C" __global__ void cross_entropy_##SUF(const T* x, const unsigned int* y, float* loss,\
                                               T* dx, const float* row_grad, long rows, int v, \
                                               float scale) {                                  \
    cross_entropy<T>(x, y, loss, dx, row_grad, rows, v, scale);                                \
}
INSTANCES(LOSS)
