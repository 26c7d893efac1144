// AdamW (src/cuda/adamw.rs; the arithmetic is explained in src/optim.rs).

// AdamW, one thread per entry, each operation in the reference's order and rounded once (the
// _rn intrinsics keep NVRTC from contracting them into fused multiply-adds), so the result is
// the composed version's (src/optim.rs) to the bit. Without bias correction MLX's
// p * decay - (lr * m) / (sqrt(v) + eps); with it candle's p * decay - (m_hat / (sqrt(v_hat)
// + eps)) * lr. The scalars come from the host already in the parameter's precision.
extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, long n,
                                     float lr, float b1, float omb1, float b2, float omb2,
                                     float eps, float decay, float scale_m, float scale_v,
                                     int bias_correction) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, omb1));
    float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
    m[i] = mi;
    v[i] = vi;
    float pi = decay == 1.f ? p[i] : __fmul_rn(p[i], decay);
    float upd;
    if (bias_correction) {
        float mh = __fmul_rn(mi, scale_m), vh = __fmul_rn(vi, scale_v);
        upd = __fmul_rn(__fdiv_rn(mh, __fadd_rn(__fsqrt_rn(vh), eps)), lr);
    } else {
        upd = __fdiv_rn(__fmul_rn(mi, lr), __fadd_rn(__fsqrt_rn(vi), eps));
    }
    p[i] = __fsub_rn(pi, upd);
}

// AdamW on a bf16 parameter with bf16 moments, as MLX computes it: the gradient rounded to
// bf16, then every operation in f32 and rounded to bf16. Without bias correction
// p * decay - (lr * m) / (sqrt(v) + eps); with it MLX's (c1 * m) / (sqrt(v) * c2 + eps).
extern "C" __global__ void adamw_bf16(unsigned short* p, unsigned short* m, unsigned short* v,
                                      const float* g, long n, float lr, float b1, float omb1,
                                      float b2, float omb2, float eps, float decay, float c1,
                                      float c2, int bias_correction) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = bfr(g[i]);
    float mi = bfr(__fadd_rn(bfr(__fmul_rn(ld(m, i), b1)), bfr(__fmul_rn(gi, omb1))));
    float sq = bfr(__fmul_rn(gi, gi));
    float vi = bfr(__fadd_rn(bfr(__fmul_rn(ld(v, i), b2)), bfr(__fmul_rn(sq, omb2))));
    st(m, i, mi);
    st(v, i, vi);
    float pi = decay == 1.f ? ld(p, i) : bfr(__fmul_rn(ld(p, i), decay));
    float root = bfr(__fsqrt_rn(vi));
    float upd;
    if (bias_correction) {
        float den = bfr(__fadd_rn(bfr(__fmul_rn(root, c2)), eps));
        upd = bfr(__fdiv_rn(bfr(__fmul_rn(mi, c1)), den));
    } else {
        upd = bfr(__fdiv_rn(bfr(__fmul_rn(mi, lr)), bfr(__fadd_rn(root, eps))));
    }
    st(p, i, __fsub_rn(pi, upd));
}

