// The header every kernel family of ternlab starts with (src/cuda/*.cu; each family is compiled
// at run time with NVRTC as this header followed by the family's file). There are no system
// headers under NVRTC: bf16 is handled as its 16 bits (`unsigned short`), and every kernel has
// an f32 and a bf16 instance named `<kernel>_f32` / `<kernel>_bf16`.

// f32 -> bf16, rounding to nearest even; a NaN stays a (quiet) NaN. (Without the NaN case the
// rounding carry turns the GPU's canonical NaN, 0x7fffffff, into -0: a diverging bf16 run
// would have shown zeros where its activations were NaN.)
// (Built for compute capability 8.0 and up, the card's conversion instruction does the same
// rounding in one instruction, src/cuda/launch.rs; a NaN comes out as the canonical NaN.)
__device__ __forceinline__ unsigned short f32_to_bf16(float v) {
#if __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

// A float rounded to bf16 and widened back: one bf16 operation's result.
__device__ __forceinline__ float bfr(float x) {
    return __uint_as_float(((unsigned int)f32_to_bf16(x)) << 16);
}

// Loads and stores in f32 arithmetic, whatever the storage type.
__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const unsigned short* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(unsigned short* p, long i, float v) { p[i] = f32_to_bf16(v); }

// Two neighbouring values at an even index (one 4- or 8-byte access).
__device__ __forceinline__ void ld2(const float* p, long i, float& a, float& b) {
    float2 v = *(const float2*)(p + i);
    a = v.x;
    b = v.y;
}
__device__ __forceinline__ void ld2(const unsigned short* p, long i, float& a, float& b) {
    unsigned int v = *(const unsigned int*)(p + i);
    a = __uint_as_float(v << 16);
    b = __uint_as_float(v & 0xffff0000u);
}
__device__ __forceinline__ void st2(float* p, long i, float a, float b) {
    *(float2*)(p + i) = make_float2(a, b);
}
__device__ __forceinline__ void st2(unsigned short* p, long i, float a, float b) {
    *(unsigned int*)(p + i) = (unsigned int)f32_to_bf16(a) | ((unsigned int)f32_to_bf16(b) << 16);
}

// Eight neighbouring values at a multiple of 8 (16 bytes of bf16, 32 of f32).
__device__ __forceinline__ void ld8(const float* p, long i, float* v) {
    float4 a = *(const float4*)(p + i), b = *(const float4*)(p + i + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void ld8(const unsigned short* p, long i, float* v) {
    uint4 u = *(const uint4*)(p + i);
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void st8(float* p, long i, const float* v) {
    *(float4*)(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4*)(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(unsigned short* p, long i, const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
        w[k] = (unsigned int)f32_to_bf16(v[2 * k]) | ((unsigned int)f32_to_bf16(v[2 * k + 1]) << 16);
    *(uint4*)(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
}

// V = 2, 4 or 8 neighbouring values at a multiple of V (one access of 4 to 16 bytes, two for
// eight f32).
template <int V>
__device__ __forceinline__ void ldv(const float* p, long i, float* v) {
    if (V == 2) {
        ld2(p, i, v[0], v[1]);
    } else if (V == 4) {
        float4 a = *(const float4*)(p + i);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else {
        ld8(p, i, v);
    }
}
template <int V>
__device__ __forceinline__ void ldv(const unsigned short* p, long i, float* v) {
    if (V == 2) {
        ld2(p, i, v[0], v[1]);
    } else if (V == 4) {
        uint2 u = *(const uint2*)(p + i);
        v[0] = __uint_as_float(u.x << 16); v[1] = __uint_as_float(u.x & 0xffff0000u);
        v[2] = __uint_as_float(u.y << 16); v[3] = __uint_as_float(u.y & 0xffff0000u);
    } else {
        ld8(p, i, v);
    }
}
template <int V>
__device__ __forceinline__ void stv(float* p, long i, const float* v) {
    if (V == 2) {
        st2(p, i, v[0], v[1]);
    } else if (V == 4) {
        *(float4*)(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        st8(p, i, v);
    }
}
template <int V>
__device__ __forceinline__ void stv(unsigned short* p, long i, const float* v) {
    if (V == 2) {
        st2(p, i, v[0], v[1]);
    } else if (V == 4) {
        uint2 u;
        u.x = (unsigned int)f32_to_bf16(v[0]) | ((unsigned int)f32_to_bf16(v[1]) << 16);
        u.y = (unsigned int)f32_to_bf16(v[2]) | ((unsigned int)f32_to_bf16(v[3]) << 16);
        *(uint2*)(p + i) = u;
    } else {
        st8(p, i, v);
    }
}

// Whether every pointer is 16-byte aligned (null ones count as aligned).
__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c = 0,
                                          const void* d = 0, const void* e = 0) {
    return (((unsigned long long)a | (unsigned long long)b | (unsigned long long)c |
             (unsigned long long)d | (unsigned long long)e) & 15) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The weight gradient of a block of 8 warps: each warp's per-column sums (part[warp][j],
// j < d), summed over the warps and added to dw[j] (one atomic add per column per block).
template <int W>
__device__ __forceinline__ void add_warp_sums(float (*part)[W], int d, float* dw) {
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float sum = 0.f;
        for (int k = 0; k < 8; k++) sum += part[k][j];
        atomicAdd(dw + j, sum);
    }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// The f32 and bf16 instances of a kernel body: INSTANCES(M) expands M(f32, float) and
// M(bf16, unsigned short).
#define INSTANCES(M) M(f32, float) M(bf16, unsigned short)
