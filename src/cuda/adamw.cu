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

// N values rounded to bf16 and widened back, each as bfr rounds it: on compute capability 8.0
// and up two at a time by one conversion instruction (`cvt.rn.bf16x2.f32`, round to nearest
// even; bfr's rounding is integer arithmetic, seven instructions a value, which made this
// update's bf16 half compute-bound). The one difference: a NaN comes back as the canonical NaN
// rather than bfr's quieted payload.
template <int N>
__device__ __forceinline__ void bfr_n(float* x) {
#if __CUDA_ARCH__ >= 800
    if (N % 2 == 0) {
#pragma unroll
        for (int t = 0; t < N; t += 2) {
            unsigned r;
            asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x[t + 1]), "f"(x[t]));
            x[t] = __uint_as_float(r << 16);
            x[t + 1] = __uint_as_float(r & 0xffff0000u);
        }
    } else
#endif
    {
#pragma unroll
        for (int t = 0; t < N; t++) x[t] = bfr(x[t]);
    }
}

// AdamW on N bf16 parameter values with bf16 moments (all widened to f32), as MLX computes it:
// the gradient rounded to bf16, then every operation in f32 and rounded to bf16. Without bias
// correction p * decay - (lr * m) / (sqrt(v) + eps); with it MLX's (c1 * m) / (sqrt(v) * c2 +
// eps). m and v come back rounded; p is rounded when stored. (Each step on all N values, then
// their rounding: `bfr_n`.)
template <int N>
__device__ __forceinline__ void adamw_bf16_n(float* p, float* m, float* v, const float* g,
                                             const AdamwK& k) {
    float gi[N], a[N], b[N], sq[N], root[N], num[N], den[N];
#define EACH(stmt) _Pragma("unroll") for (int t = 0; t < N; t++) stmt;
    EACH(gi[t] = g[t]) bfr_n<N>(gi);
    EACH(a[t] = __fmul_rn(m[t], k.b1)) bfr_n<N>(a);
    EACH(b[t] = __fmul_rn(gi[t], k.omb1)) bfr_n<N>(b);
    EACH(m[t] = __fadd_rn(a[t], b[t])) bfr_n<N>(m);
    EACH(sq[t] = __fmul_rn(gi[t], gi[t])) bfr_n<N>(sq);
    EACH(a[t] = __fmul_rn(v[t], k.b2)) bfr_n<N>(a);
    EACH(b[t] = __fmul_rn(sq[t], k.omb2)) bfr_n<N>(b);
    EACH(v[t] = __fadd_rn(a[t], b[t])) bfr_n<N>(v);
    if (k.decay != 1.f) {
        EACH(p[t] = __fmul_rn(p[t], k.decay)) bfr_n<N>(p);
    }
    EACH(root[t] = __fsqrt_rn(v[t])) bfr_n<N>(root);
    if (k.bias_correction) {
        EACH(den[t] = __fmul_rn(root[t], k.cb)) bfr_n<N>(den);
        EACH(den[t] = __fadd_rn(den[t], k.eps)) bfr_n<N>(den);
        EACH(num[t] = __fmul_rn(m[t], k.ca)) bfr_n<N>(num);
    } else {
        EACH(num[t] = __fmul_rn(m[t], k.lr)) bfr_n<N>(num);
        EACH(den[t] = __fadd_rn(root[t], k.eps)) bfr_n<N>(den);
    }
    EACH(num[t] = __fdiv_rn(num[t], den[t])) bfr_n<N>(num);
    EACH(p[t] = __fsub_rn(p[t], num[t]))
#undef EACH
}

// Four values already exact in bf16 (rounded by bfr_n) stored as bf16: their high halves.
__device__ __forceinline__ void st4_exact(unsigned short* p, long i, const float* v) {
    uint2 u;
    u.x = (__float_as_uint(v[0]) >> 16) | (__float_as_uint(v[1]) & 0xffff0000u);
    u.y = (__float_as_uint(v[2]) >> 16) | (__float_as_uint(v[3]) & 0xffff0000u);
    *(uint2*)(p + i) = u;
}

// One parameter of a multi-tensor update (`Entry` in src/cuda/adamw.rs, same layout): its
// four buffers, its length (0: no update this step), the step's scalars in its precision (in
// `AdamwK`'s order), its dtype and its gradient's (f32, or bf16 where the step's products ran
// in bf16: a weight gradient as the GEMM rounded it); then, for an f32 latent whose ternary
// projection the step multiplies by, where to write that projection of the updated weights
// (wt, 0: nowhere) and how (ternarize_v's arguments: group, C = max(1, group / 128), absmax,
// scale dtype, smallest scale, lambda; wt in bf16 or f32).
struct AdamwEntry {
    unsigned long long p, m, v, g;
    long long n;
    float k[9];
    int bf16;
    int bias_correction;
    int g_bf16;
    unsigned long long wt;
    int wg, wc, wabsmax, wsdt;
    float wmin, wlambda;
    int wt_bf16, pad2;
};

// Elements [start, end) of one parameter, four at a time (start is a multiple of 4; every
// buffer starts 16-byte aligned: ldv/stv in common.cuh), the last few one by one; the
// gradient G is f32 or bf16 (unsigned short), widened as it is read.
template <typename T, bool BF16, typename G>
__device__ __forceinline__ void adamw_span(T* p, T* m, T* v, const G* g, long start,
                                           long end, const AdamwK& k) {
    for (long i = start + 4 * (long)threadIdx.x; i < end; i += 4 * (long)blockDim.x) {
        if (i + 4 <= end) {
            float pv[4], mv[4], vv[4], gv[4];
            ldv<4>(p, i, pv);
            ldv<4>(m, i, mv);
            ldv<4>(v, i, vv);
            ldv<4>(g, i, gv);
            if (BF16) {
                adamw_bf16_n<4>(pv, mv, vv, gv, k);
                bfr_n<4>(pv);
                st4_exact((unsigned short*)p, i, pv);
                st4_exact((unsigned short*)m, i, mv);
                st4_exact((unsigned short*)v, i, vv);
            } else {
#pragma unroll
                for (int t = 0; t < 4; t++) adamw_f32_v(pv[t], mv[t], vv[t], gv[t], k);
                stv<4>(p, i, pv);
                stv<4>(m, i, mv);
                stv<4>(v, i, vv);
            }
        } else {
            for (long j = i; j < end; j++) {
                float pj = ld(p, j), mj = ld(m, j), vj = ld(v, j), gj = ld(g, j);
                if (BF16) adamw_bf16_n<1>(&pj, &mj, &vj, &gj, k);
                else adamw_f32_v(pj, mj, vj, gj, k);
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
template <typename T, int C, typename G>
__device__ __forceinline__ void adamw_ternary_span(float* p, float* m, float* v, const G* g,
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

template <typename T, typename G>
__device__ __forceinline__ void adamw_ternary(const AdamwEntry* e, long start, long end,
                                              const AdamwK& k) {
    float *p = (float*)e->p, *m = (float*)e->m, *v = (float*)e->v;
    const G* g = (const G*)e->g;
    T* wt = (T*)e->wt;
    if (e->wc == 4) adamw_ternary_span<T, 4>(p, m, v, g, wt, start, end, k, e);
    else if (e->wc == 2) adamw_ternary_span<T, 2>(p, m, v, g, wt, start, end, k, e);
    else adamw_ternary_span<T, 1>(p, m, v, g, wt, start, end, k, e);
}

// One entry's elements [start, end) with its gradient of type G.
template <typename G>
__device__ __forceinline__ void adamw_entry(const AdamwEntry* e, long start, long end,
                                            const AdamwK& k) {
    const G* g = (const G*)e->g;
    if (e->wt) {
        if (e->wt_bf16) adamw_ternary<unsigned short, G>(e, start, end, k);
        else adamw_ternary<float, G>(e, start, end, k);
    } else if (e->bf16) {
        adamw_span<unsigned short, true>((unsigned short*)e->p, (unsigned short*)e->m,
                                         (unsigned short*)e->v, g, start, end, k);
    } else {
        adamw_span<float, false>((float*)e->p, (float*)e->m, (float*)e->v, g, start, end, k);
    }
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
    if (e->g_bf16) adamw_entry<unsigned short>(e, start, end, k);
    else adamw_entry<float>(e, start, end, k);
}
