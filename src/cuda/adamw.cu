// AdamW (src/cuda/adamw.rs; the arithmetic is explained in src/optim.rs).

// The step's scalars of one parameter, already in its precision: lr, b1, 1 - b1, b2, 1 - b2,
// eps, decay, and the two corrections (f32: candle's scale_m, scale_v; bf16: MLX's c1, c2).
struct AdamwK {
    float lr, b1, omb1, b2, omb2, eps, decay, ca, cb;
    int bias_correction;
};

// AdamW on one f32 value, each operation in the reference's order and rounded once (the _rn
// intrinsics keep NVRTC from contracting them into fused multiply-adds), so the result is the
// composed version's (src/optim.rs) to the bit. Without bias correction MLX's
// p * decay - (lr * m) / (sqrt(v) + eps); with it candle's p * decay - (m_hat / (sqrt(v_hat)
// + eps)) * lr.
__device__ __forceinline__ void adamw_f32_v(float& p, float& m, float& v, float gi,
                                            const AdamwK& k) {
    float mi = __fadd_rn(__fmul_rn(m, k.b1), __fmul_rn(gi, k.omb1));
    float vi = __fadd_rn(__fmul_rn(v, k.b2), __fmul_rn(__fmul_rn(gi, gi), k.omb2));
    m = mi;
    v = vi;
    float pi = k.decay == 1.f ? p : __fmul_rn(p, k.decay);
    float upd;
    if (k.bias_correction) {
        float mh = __fmul_rn(mi, k.ca), vh = __fmul_rn(vi, k.cb);
        upd = __fmul_rn(__fdiv_rn(mh, __fadd_rn(__fsqrt_rn(vh), k.eps)), k.lr);
    } else {
        upd = __fdiv_rn(__fmul_rn(mi, k.lr), __fadd_rn(__fsqrt_rn(vi), k.eps));
    }
    p = __fsub_rn(pi, upd);
}

// AdamW on one bf16 parameter value with bf16 moments (all three widened to f32), as MLX
// computes it: the gradient rounded to bf16, then every operation in f32 and rounded to bf16.
// Without bias correction p * decay - (lr * m) / (sqrt(v) + eps); with it MLX's
// (c1 * m) / (sqrt(v) * c2 + eps). m and v come back rounded; p is rounded when stored.
__device__ __forceinline__ void adamw_bf16_v(float& p, float& m, float& v, float g,
                                             const AdamwK& k) {
    float gi = bfr(g);
    float mi = bfr(__fadd_rn(bfr(__fmul_rn(m, k.b1)), bfr(__fmul_rn(gi, k.omb1))));
    float sq = bfr(__fmul_rn(gi, gi));
    float vi = bfr(__fadd_rn(bfr(__fmul_rn(v, k.b2)), bfr(__fmul_rn(sq, k.omb2))));
    m = mi;
    v = vi;
    float pi = k.decay == 1.f ? p : bfr(__fmul_rn(p, k.decay));
    float root = bfr(__fsqrt_rn(vi));
    float upd;
    if (k.bias_correction) {
        float den = bfr(__fadd_rn(bfr(__fmul_rn(root, k.cb)), k.eps));
        upd = bfr(__fdiv_rn(bfr(__fmul_rn(mi, k.ca)), den));
    } else {
        upd = bfr(__fdiv_rn(bfr(__fmul_rn(mi, k.lr)), bfr(__fadd_rn(root, k.eps))));
    }
    p = __fsub_rn(pi, upd);
}

// One parameter of a multi-tensor update (`Entry` in src/cuda/adamw.rs, same layout): its
// four buffers, its length (0: no update this step), the step's scalars in its precision (in
// `AdamwK`'s order), and its dtype; then, for an f32 latent whose ternary projection the step
// multiplies by, where to write that projection of the updated weights (wt, 0: nowhere) and
// how (ternarize_v's arguments: group, C = max(1, group / 128), absmax, scale dtype, smallest
// scale, lambda; wt in bf16 or f32).
struct AdamwEntry {
    unsigned long long p, m, v, g;
    long long n;
    float k[9];
    int bf16;
    int bias_correction;
    int pad;
    unsigned long long wt;
    int wg, wc, wabsmax, wsdt;
    float wmin, wlambda;
    int wt_bf16, pad2;
};

// Elements [start, end) of one parameter, four at a time (start is a multiple of 4; every
// buffer starts 16-byte aligned: ldv/stv in common.cuh), the last few one by one.
template <typename T, bool BF16>
__device__ __forceinline__ void adamw_span(T* p, T* m, T* v, const float* g, long start,
                                           long end, const AdamwK& k) {
    for (long i = start + 4 * (long)threadIdx.x; i < end; i += 4 * (long)blockDim.x) {
        if (i + 4 <= end) {
            float pv[4], mv[4], vv[4], gv[4];
            ldv<4>(p, i, pv);
            ldv<4>(m, i, mv);
            ldv<4>(v, i, vv);
            ldv<4>(g, i, gv);
#pragma unroll
            for (int t = 0; t < 4; t++) {
                if (BF16) adamw_bf16_v(pv[t], mv[t], vv[t], gv[t], k);
                else adamw_f32_v(pv[t], mv[t], vv[t], gv[t], k);
            }
            stv<4>(p, i, pv);
            stv<4>(m, i, mv);
            stv<4>(v, i, vv);
        } else {
            for (long j = i; j < end; j++) {
                float pj = ld(p, j), mj = ld(m, j), vj = ld(v, j);
                if (BF16) adamw_bf16_v(pj, mj, vj, g[j], k);
                else adamw_f32_v(pj, mj, vj, g[j], k);
                st(p, j, pj);
                st(m, j, mj);
                st(v, j, vj);
            }
        }
    }
}

// The same on an f32 latent, then its ternary projection written to `wt` as ternarize_v<T, C>
// (ternary.cu) would make it from the updated values, without reading them again: each warp
// takes 128 * C consecutive weights at a time, four neighbours a lane per access, whole groups
// (start and end are multiples of 128 * C).
template <typename T, int C>
__device__ __forceinline__ void adamw_ternary_span(float* p, float* m, float* v, const float* g,
                                                   T* wt, long start, long end,
                                                   const AdamwK& k, const AdamwEntry* e) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (long base = start + (long)(threadIdx.x / 32) * (128 * C); base < end;
         base += (long)warps * (128 * C)) {
        float pv[C][4];
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            const long i = base + 128 * c + 4 * lane;
            float mv[4], vv[4], gv[4];
            ldv<4>(p, i, pv[c]);
            ldv<4>(m, i, mv);
            ldv<4>(v, i, vv);
            ldv<4>(g, i, gv);
#pragma unroll
            for (int t = 0; t < 4; t++) adamw_f32_v(pv[c][t], mv[t], vv[t], gv[t], k);
            stv<4>(p, i, pv[c]);
            stv<4>(m, i, mv);
            stv<4>(v, i, vv);
#pragma unroll
            for (int t = 0; t < 4; t++)
                acc = e->wabsmax ? fmaxf(acc, fabsf(pv[c][t])) : acc + fabsf(pv[c][t]);
        }
        const float s = warp_group_scale(acc, e->wg, e->wabsmax, e->wsdt, e->wmin);
#pragma unroll
        for (int c = 0; c < C; c++) {
            float o[4];
#pragma unroll
            for (int t = 0; t < 4; t++) o[t] = ternary_value(pv[c][t], s, e->wlambda);
            stv<4>(wt, base + 128 * c + 4 * lane, o);
        }
    }
}

template <typename T>
__device__ __forceinline__ void adamw_ternary(const AdamwEntry* e, long start, long end,
                                              const AdamwK& k) {
    float *p = (float*)e->p, *m = (float*)e->m, *v = (float*)e->v;
    const float* g = (const float*)e->g;
    T* wt = (T*)e->wt;
    if (e->wc == 4) adamw_ternary_span<T, 4>(p, m, v, g, wt, start, end, k, e);
    else if (e->wc == 2) adamw_ternary_span<T, 2>(p, m, v, g, wt, start, end, k, e);
    else adamw_ternary_span<T, 1>(p, m, v, g, wt, start, end, k, e);
}

// Every parameter in one launch: block b updates elements [c.y * chunk, (c.y + 1) * chunk) of
// entry c.x, c = chunks[b] (chunk a multiple of 512, so a chunk is whole groups of a latent
// whose projection is written too). The table lives on the device, so a
// captured CUDA graph replays with each step's scalars. With a `gate` (the step's loss, on the
// device), nothing is updated unless it is finite: a replayed step whose loss is not finite
// changes nothing, as an eager step that stops at its loss.
extern "C" __global__ void adamw_multi(const AdamwEntry* entries, const uint2* chunks,
                                       long chunk, const float* gate) {
    if (gate && !isfinite(*gate)) return;
    uint2 c = chunks[blockIdx.x];
    const AdamwEntry* e = entries + c.x;
    long start = (long)c.y * chunk;
    long end = start + chunk < (long)e->n ? start + chunk : (long)e->n;
    AdamwK k = {e->k[0], e->k[1], e->k[2], e->k[3], e->k[4], e->k[5], e->k[6], e->k[7], e->k[8],
                e->bias_correction};
    const float* g = (const float*)e->g;
    if (e->wt) {
        if (e->wt_bf16) adamw_ternary<unsigned short>(e, start, end, k);
        else adamw_ternary<float>(e, start, end, k);
    } else if (e->bf16) {
        adamw_span<unsigned short, true>((unsigned short*)e->p, (unsigned short*)e->m,
                                         (unsigned short*)e->v, g, start, end, k);
    } else {
        adamw_span<float, false>((float*)e->p, (float*)e->m, (float*)e->v, g, start, end, k);
    }
}
