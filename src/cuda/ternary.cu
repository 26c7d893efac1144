// The ternary projection (src/cuda/ternary.rs).

// One warp per group of g consecutive weights of the f32 latent:
// s = max(mean |w|, 1e-8), W_t = s * [|w / s| > 0.5] * sign(w), stored in T.
template <typename T>
__device__ void ternarize(const float* w, T* out, long groups, int g) {
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= groups) return;
    const float* src = w + warp * g;
    float acc = 0.f;
    for (int i = lane; i < g; i += 32) acc += fabsf(src[i]);
    float s = fmaxf(warp_sum(acc) / (float)g, 1e-8f);
    for (int i = lane; i < g; i += 32) {
        float x = src[i] / s;
        float q = fabsf(x) > 0.5f ? (x > 0.f ? 1.f : -1.f) : 0.f;
        st(out, warp * g + i, q * s);
    }
}

#define TERNARY(SUF, T)                                                                        \
extern "C" __global__ void ternarize_##SUF(const float* w, T* out, long groups, int g) {      \
    ternarize<T>(w, out, groups, g);                                                           \
}
INSTANCES(TERNARY)
