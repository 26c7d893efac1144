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
// dx_r = scale * g_r * (softmax(x_r) - onehot(t_r)) + plus_r with g_r = row_grad[r] (1 when
// row_grad is null) and plus_r the row of `plus` (0 when null: another loss term's gradient);
// dx may be x itself (the training step overwrites the logits with their gradient).
// Pairs of logits per access when v is even (every row then starts at an even element).
template <typename T>
__device__ void cross_entropy(const T* x, const unsigned int* y, float* loss, T* dx,
                              const float* row_grad, const T* plus, long rows, int v,
                              float scale) {
    long row = blockIdx.x;
    const T* xr = x + row * v;
    float m = -3.0e38f, s = 0.f;
    bool pairs = (v % 2) == 0;
    // Eight logits per access (16 bytes of bf16) when every row starts 16-byte aligned.
    bool eights = (v % 8) == 0 && aligned16(x, dx, plus);
    // Four such loads in flight a thread, then one merge for the 32 logits.
    const int stride = 8 * blockDim.x;
    if (eights) {
        for (int j0 = 8 * threadIdx.x; j0 < v; j0 += 4 * stride) {
            float a[4][8];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                if (j0 + u * stride < v) {
                    ld8(xr, j0 + u * stride, a[u]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; e++) a[u][e] = -3.0e38f;
                }
            }
            float hi = m;
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int e = 0; e < 8; e++) hi = fmaxf(hi, a[u][e]);
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int e = 0; e < 8; e++) sum += __expf(a[u][e] - hi);
            s = s * __expf(m - hi) + sum;
            m = hi;
        }
    } else if (pairs) {
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
    const T* pr = plus ? plus + row * v : 0;
    if (eights) {
        for (int j0 = 8 * threadIdx.x; j0 < v; j0 += 2 * stride) {
            // (both loads before either store: dx may be x)
            float a[2][8], p[2][8];
#pragma unroll
            for (int u = 0; u < 2; u++) {
#pragma unroll
                for (int e = 0; e < 8; e++) p[u][e] = 0.f;
                if (j0 + u * stride < v) {
                    ld8(xr, j0 + u * stride, a[u]);
                    if (pr) ld8(pr, j0 + u * stride, p[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int j = j0 + u * stride;
                if (j >= v) break;
                float o[8];
#pragma unroll
                for (int e = 0; e < 8; e++)
                    o[e] = g * (__expf(a[u][e] - lse) - (j + e == t ? 1.f : 0.f)) + p[u][e];
                st8(dr, j, o);
            }
        }
    } else if (pairs) {
        for (int j = 2 * threadIdx.x; j < v; j += 2 * blockDim.x) {
            float a, b, pa = 0.f, pb = 0.f;
            ld2(xr, j, a, b);
            if (pr) ld2(pr, j, pa, pb);
            float ga = g * (__expf(a - lse) - (j == t ? 1.f : 0.f)) + pa;
            float gb = g * (__expf(b - lse) - (j + 1 == t ? 1.f : 0.f)) + pb;
            st2(dr, j, ga, gb);
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x)
            st(dr, j, g * (__expf(ld(xr, j) - lse) - (j == t ? 1.f : 0.f)) + (pr ? ld(pr, j) : 0.f));
    }
}

// The sum of a value over a block's threads, returned to every thread.
__device__ float block_sum(float v) {
    __shared__ float part[32], total;
    v = warp_sum(v);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < warps; w++) s += part[w];
        total = s;
    }
    __syncthreads();
    return total;
}

// Logits distillation, one block per row: with s = x * inv_t and u = teacher * inv_t,
// kl[r] = t2 * KL(softmax(u) || softmax(s)) = t2 * (sum_j p_u (u_j - s_j) - lse(u) + lse(s)),
// and the teacher's row is overwritten with this term's gradient,
// gscale * (softmax(s) - softmax(u)) (gscale = weight * T / N for the mean over N rows).
template <typename T>
__device__ void distill_kl(const T* x, T* teacher, float* kl, long rows, int v, float inv_t,
                           float t2, float gscale) {
    long row = blockIdx.x;
    const T* xr = x + row * v;
    T* tr = teacher + row * v;
    float ms = -3.0e38f, ss = 0.f, mu = -3.0e38f, su = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        merge1(ms, ss, ld(xr, j) * inv_t, 1.f);
        merge1(mu, su, ld(tr, j) * inv_t, 1.f);
    }
    float lse_s = block_lse(ms, ss);
    float lse_u = block_lse(mu, su);
    float acc = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float s = ld(xr, j) * inv_t, u = ld(tr, j) * inv_t;
        float pu = __expf(u - lse_u), ps = __expf(s - lse_s);
        acc += pu * (u - s);
        st(tr, j, gscale * (ps - pu));
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) kl[row] = t2 * (acc - lse_u + lse_s);
}

#define LOSS(SUF, T)                                                                           \
extern "C" __global__ void cross_entropy_##SUF(const T* x, const unsigned int* y, float* loss,\
                                               T* dx, const float* row_grad, const T* plus,    \
                                               long rows, int v, float scale) {                \
    cross_entropy<T>(x, y, loss, dx, row_grad, plus, rows, v, scale);                          \
}                                                                                              \
extern "C" __global__ void distill_kl_##SUF(const T* x, T* teacher, float* kl, long rows,     \
                                            int v, float inv_t, float t2, float gscale) {      \
    distill_kl<T>(x, teacher, kl, rows, v, inv_t, t2, gscale);                                 \
}
INSTANCES(LOSS)
