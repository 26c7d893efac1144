// The ternary projection's arithmetic, shared by ternary.cu (the projection) and adamw.cu
// (AdamW that writes the projection of the weights it updates): see ternary.cu.

// f32 -> f16 -> f32, rounding to nearest even (PTX: NVRTC has no cuda_fp16.h here).
__device__ __forceinline__ float f16r(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    float y;
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
    return y;
}

// A scale as used: at least `min`, rounded to its dtype (sdt: 0 f32, 1 bf16, 2 f16), at least
// `min` again. Rounding a scale that is already so leaves it as it is.
__device__ __forceinline__ float used_scale(float s, int sdt, float min) {
    s = fmaxf(s, min);
    if (sdt == 1) s = fmaxf(bfr(s), min);
    if (sdt == 2) s = fmaxf(f16r(s), min);
    return s;
}

// A group's scale from the sum (absmean) or the max (absmax) of its |w|.
__device__ __forceinline__ float group_scale(float acc, long g, int absmax, int sdt, float min) {
    return used_scale(absmax ? acc : acc / (float)g, sdt, min);
}

__device__ __forceinline__ float ternary_level(float w, float s) {
    float x = w / s;
    return fabsf(x) > 0.5f ? (x > 0.f ? 1.f : -1.f) : 0.f;
}

// W_t (lambda >= 1), or w + lambda * (W_t - w) during a quantization warm-up, each operation
// rounded once as the composed version's (no contraction into an FMA).
__device__ __forceinline__ float ternary_value(float w, float s, float lambda) {
    float wt = __fmul_rn(ternary_level(w, s), s);
    return lambda >= 1.f ? wt : __fadd_rn(w, __fmul_rn(__fsub_rn(wt, w), lambda));
}

// The scale of the groups a warp holds when each lane has summed (or taken the max of) its
// values' |w|: groups of g = 32 or 64 span g / 4 lanes, from 128 on the whole warp.
__device__ __forceinline__ float warp_group_scale(float acc, int g, int absmax, int sdt,
                                                  float min) {
    for (int o = (g >= 128 ? 32 : g / 4) / 2; o > 0; o /= 2) {
        float other = __shfl_xor_sync(0xffffffffu, acc, o);
        acc = absmax ? fmaxf(acc, other) : acc + other;
    }
    return group_scale(acc, g, absmax, sdt, min);
}

