// Causal grouped-query attention in bf16 on tensor cores, without the L x L matrix
// (src/cuda/flash.rs): FlashAttention-2's scheme (online softmax over tiles of keys in the
// forward; the backward recomputes the probabilities from the forward's log-sum-exp and runs
// over keys and values by tiles: each block adds its share of the query gradient into an f32
// buffer with atomic adds, as FlashAttention-2 does, or, with `flash_bwd_dq`, the queries'
// gradient comes from a second kernel that recomputes the probabilities once more and adds
// nothing atomically). Products are warp-level mma.sync m16n8k16 (bf16 in, f32 accumulate;
// sm_80 and newer), or, compiled for sm_90a at head dims 64 and 128, warpgroup-level wgmma
// (`flash_fwd2_gm`, `flash_bwd_dq_gm`, `flash_bwd_dkdv_gm`); softmax arithmetic is f32.
//
// Rows: the R query heads that share a key/value head are read as one matrix of L * R rows,
// position-major (row i is position i / R, head i % R of the group), so a block of query rows
// is every head of the group over a block of positions and loads each key/value tile once.
// Any tensor is addressed by strides (batch, key/value head, position) in elements, the query
// head within a group at D elements: the step hands over q as (B, K, L, R, D) (its norm + RoPE
// kernel writes that), the output straight into the merged (B, L, H * D) layout o's projection
// reads, and v as the projection wrote it, (B, L, K * D).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 * gr + tq; A (16 x 16, row
// major) a0 = (gr, 2tq..2tq+1), a1 = (gr + 8, same), a2 = (gr, 2tq + 8..), a3 = (gr + 8, 2tq + 8..);
// B (16 x 8, "col": k x n) b0 = (k 2tq..2tq+1, n gr), b1 = (k 2tq + 8.., n gr); C/D (16 x 8)
// c0, c1 = (gr, 2tq..2tq+1), c2, c3 = (gr + 8, same). So a product's C tiles for n = 0..7 and
// 8..15 are, rounded to bf16, the A fragment of the next product over those 16 columns.

#define FA_WARPS 8  // warps per block, each 16 rows (query rows, or keys in the key/value backward)
#define FA_BM 128  // query rows per block (forward, query-side backward): FA_WARPS * 16
#define FA_BN 64   // keys per tile (forward, query-side backward)
#define FA_QT 64   // query rows per tile of the key/value backward
#define FA_PAD 8   // shared rows padded by 16 bytes: the fragment loads are free of bank conflicts
#define FA_NEG_INF __int_as_float(0xff800000)

// A shared-memory address (the compiler folds constant offsets into the instructions using it).
__device__ __forceinline__ unsigned fa_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// c += a * b: one 16 x 8 tile over k = 16.
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The B fragments (b0, b1) of two neighbouring 8-column tiles, for a product whose B is a
// shared (k rows, n columns) tile stored k-major: the four 8 x 8 matrices at rows k0 + (lane & 15)
// and columns n0 + 8 * (lane >> 4), transposed on the way. `p` is this lane's row address.
__device__ __forceinline__ void fa_ldsm_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
}

// Four 8 x 8 matrices of a shared tile, not transposed (lane l gives the address of row l & 7
// of matrix l >> 3; register i is matrix i's fragment: row lane / 4, columns 2 (lane % 4)..+1).
__device__ __forceinline__ void fa_ldsm(unsigned* r, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
}

// Two f32 rounded to bf16 (nearest even) in one register, `lo` in the low half.
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x (MUFU's approximation, results below 2^-126 flushed to zero: a probability that small adds
// nothing to a sum of at least one).
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned fa_u32(const unsigned short* p) {
    return *(const unsigned*)p;
}

// The element offset of row i of group g (batch g / nk, key/value head g % nk), rows being
// (position, head in group) for r heads per group.
__device__ __forceinline__ long fa_row(int g, int nk, int r, int i, long sb, long sk, long sl,
                                       int d) {
    return (long)(g / nk) * sb + (long)(g % nk) * sk + (long)(i / r) * sl + (long)(i % r) * d;
}

// Asynchronous 16-byte copy global -> shared (cp.async, no register on the way); `valid`
// false writes zeros instead (nothing is read).
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(fa_smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

// The same for 4 bytes.
__device__ __forceinline__ void fa_cp4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :
                 : "r"(fa_smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}

__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N groups of this thread's copies are in flight.
template <int N>
__device__ __forceinline__ void fa_wait() {
    asm volatile("cp.async.wait_group %0;\n" : : "n"(N) : "memory");
}

// p[0] += a, p[1] += b in global memory, atomically (one vector reduction on sm_90 and newer;
// p 8-byte aligned).
__device__ __forceinline__ void fa_red2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" : : "l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Shared tiles are rows padded by FA_PAD elements (ldmatrix reads them free of bank conflicts),
// or, for wgmma (sm_90a), `FaSwz`: N rows of D as D / 64 blocks of N rows of 128 bytes, each
// row's eight 16-byte pieces permuted by XOR with row % 8 (the 128-byte swizzle of the PTX
// ISA's shared-memory matrix layouts; the tile starts at a 1024-byte boundary).
template <int DP>
__device__ __forceinline__ unsigned short* fa_at(unsigned short (*t)[DP], int row, int col) {
    return &t[row][col];
}
template <int N>
struct FaSwz {
    unsigned char* p;
};
// The byte offset of element (row, col) of a swizzled tile of N rows.
template <int N>
__device__ __forceinline__ unsigned fa_swz(int row, int col) {
    return (unsigned)((col >> 6) * N * 128 + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) +
                      (col & 7) * 2);
}
template <int N>
__device__ __forceinline__ unsigned char* fa_at(FaSwz<N> t, int row, int col) {
    return t.p + fa_swz<N>(row, col);
}

// Starts copying N rows (from row `first`, of `count` in all) of a tensor into a shared tile,
// zeros past the last row; every copy is in flight at once (the caller commits and waits). The
// block's NT threads each copy 16 bytes of a row, the same column every pass.
// GROUPED: rows are (position, head in group) of r heads; else row i is position i. With `y`,
// the same rows of a second tensor (strides yb, yk, yl) go to `ytile`.
// A tile is a padded array (rows of D + FA_PAD) or a `FaSwz` (fa_at gives an element's address).
template <int D, int N, bool GROUPED, int NT = FA_WARPS * 32, class Tile>
__device__ __forceinline__ void fa_load(Tile tile, const unsigned short* __restrict__ x, int g,
                                        int nk, int r, int first, int count, long sb, long sk,
                                        long sl, Tile ytile = Tile(),
                                        const unsigned short* __restrict__ y = nullptr,
                                        long yb = 0, long yk = 0, long yl = 0) {
    constexpr int per_row = D / 8;                 // 16-byte copies per row
    constexpr int step = NT / per_row;             // rows one pass of the block's NT threads covers
    static_assert(N % step == 0, "a tile is whole passes of the block");
    const int col = (threadIdx.x % per_row) * 8;
    const long b = g / nk, h = g % nk;
    const unsigned short* xs = x + b * sb + h * sk + col;
    const unsigned short* ys = y ? y + b * yb + h * yk + col : nullptr;
    const int row0 = threadIdx.x / per_row;
#pragma unroll
    for (int m = 0; m < N / step; ++m) {
        const int row = row0 + m * step, i = first + row;
        const bool ok = i < count;
        int pos = ok ? i : 0, head = 0;
        if (GROUPED) {
            pos = pos / r;
            head = (ok ? i : 0) - pos * r;
        }
        fa_cp16(fa_at(tile, row, col), xs + pos * sl + (long)head * D, ok);
        if (ys) fa_cp16(fa_at(ytile, row, col), ys + pos * yl + (long)head * D, ok);
    }
}

// Hopper's warpgroup MMA (wgmma, sm_90a only: the family compiled for compute_90a), which the
// kernels below use at head dims 64 and 128 where FA_GM says so (their GM form). mma.sync makes
// each warp load its own copy of every B fragment from shared memory (four warps of a block's
// 64 keys read a q tile four times), and the key/value backward was bound by those loads (sixth
// session: short-scoreboard and MIO stalls, tensor pipe 38% busy). A wgmma reads its shared
// operands once for the warpgroup's 64 rows; products whose A is P or dS take it from
// registers, as mma.sync's A fragments, which is also the layout of a wgmma accumulator's rows:
// the arithmetic between the products is unchanged.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FA_SM90A 1
#else
#define FA_SM90A 0  // (the wgmma helpers below are empty: no kernel of this build calls them)
#endif
// Whether this build's kernels at head dim D run on wgmma.
#define FA_GM(D) (FA_SM90A && (D) >= 64)

#define FA_SWZ_ROW 128  // bytes of a swizzled row (64 bf16)

// The shared memory of a wgmma kernel, from its first 1024-byte boundary; traps where the
// launch gave less than `need` bytes from there (the host sizes it for padded rows).
__device__ __forceinline__ unsigned char* fa_gm_base(unsigned need) {
    extern __shared__ __align__(16) unsigned short fa_shared[];
    unsigned char* base = (unsigned char*)fa_shared;
    const unsigned skip = (1024 - (fa_smem_addr(base) & 1023)) & 1023;
    unsigned size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
    if (skip + need > size) __trap();
    return base + skip;
}


// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor"): start address, leading and
// stride byte offsets (each in 16-byte units), 128-byte swizzle.
__device__ __forceinline__ unsigned long long fa_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3ffff) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

// Rows r0..r0 + 63 and columns 16 c..16 c + 15 of a swizzled tile of N rows at `addr`, K-major
// (k = the columns): 8-row groups 1024 bytes apart, a 16-column step 32 bytes into the row.
template <int N>
__device__ __forceinline__ unsigned long long fa_kdesc(unsigned addr, int r0, int c) {
    return fa_desc(addr + (c >> 2) * N * FA_SWZ_ROW + r0 * FA_SWZ_ROW + (c & 3) * 32, 16, 1024);
}

// Rows 16 c..16 c + 15 (k) and every column (n) of a swizzled tile of N rows at `addr`,
// MN-major: 8-row groups 1024 bytes apart, 64-column blocks N * 128 bytes apart.
template <int N>
__device__ __forceinline__ unsigned long long fa_tdesc(unsigned addr, int c) {
    return fa_desc(addr + c * 16 * FA_SWZ_ROW, N * FA_SWZ_ROW, 1024);
}

__device__ __forceinline__ void fa_gm_fence() {
#if FA_SM90A
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void fa_gm_commit() {
#if FA_SM90A
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void fa_gm_wait() {
#if FA_SM90A
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" : : "n"(N) : "memory");
#endif
}
// Keeps the compiler from moving reads of wgmma accumulators above the wait that ends them.
template <int T>
__device__ __forceinline__ void fa_gm_hold(float (*d)[4]) {
#pragma unroll
    for (int t = 0; t < T; ++t)
        asm volatile("" : "+f"(d[t][0]), "+f"(d[t][1]), "+f"(d[t][2]), "+f"(d[t][3])::"memory");
}
// Makes this thread's generic-proxy writes of shared memory (cp.async) visible to wgmma.
__device__ __forceinline__ void fa_proxy_fence() {
#if FA_SM90A
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A wgmma accumulator of 8 (n64) or 16 (n128) tiles of four f32 as asm operands, and their
// places in the instruction.
#define FA_ACC4(d, t) "+f"(d[t][0]), "+f"(d[t][1]), "+f"(d[t][2]), "+f"(d[t][3])
#define FA_ACC32(d)                                                                          \
    FA_ACC4(d, 0), FA_ACC4(d, 1), FA_ACC4(d, 2), FA_ACC4(d, 3), FA_ACC4(d, 4), FA_ACC4(d, 5), \
        FA_ACC4(d, 6), FA_ACC4(d, 7)
#define FA_ACC64(d)                                                                          \
    FA_ACC32(d), FA_ACC4(d, 8), FA_ACC4(d, 9), FA_ACC4(d, 10), FA_ACC4(d, 11), FA_ACC4(d, 12), \
        FA_ACC4(d, 13), FA_ACC4(d, 14), FA_ACC4(d, 15)
#define FA_REGS32                                                                   \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FA_REGS64                                                                        \
    FA_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, " \
              "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// S (64 x 64 over k = 16, f32) (+)= A B^T, both bf16 tiles in shared memory named by descriptors
// (`fa_kdesc`), A's rows the warpgroup's; `accumulate` 0 overwrites d.
__device__ __forceinline__ void fa_gm_ss64(float (*d)[4], unsigned long long da,
                                           unsigned long long db, int accumulate) {
#if FA_SM90A
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" FA_REGS32
                 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : FA_ACC32(d)
                 : "l"(da), "l"(db), "r"(accumulate));
#endif
}
// d (64 x 64, f32) += A B over k = 16: A (the warp's 16 rows, mma.sync's A fragment) in
// registers, B a shared tile stored MN-major (`fa_tdesc`).
__device__ __forceinline__ void fa_gm_rs64(float (*d)[4], const unsigned* a,
                                           unsigned long long db) {
#if FA_SM90A
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" FA_REGS32
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FA_ACC32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#endif
}
// d (64 x 128, f32) += A B over k = 16: A (the warp's 16 rows, mma.sync's A fragment) in
// registers, B a shared tile stored MN-major (`fa_tdesc`).
__device__ __forceinline__ void fa_gm_rs128(float (*d)[4], const unsigned* a,
                                            unsigned long long db) {
#if FA_SM90A
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" FA_REGS64
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : FA_ACC64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#endif
}

// The backwards' first two products, issued together: S = A B^T and dP = A' B'^T over the head
// dim, the A tiles (AM rows, the warpgroup's 64 from r0) and the B tiles (64 rows) in shared
// memory at the addresses given. Returns when S is done; dP may still run while P is computed
// (gm_wait<0> ends it).
template <int D, int AM>
__device__ __forceinline__ void fa_gm_s_dp(float (*s)[4], float (*dp)[4], unsigned a, unsigned b,
                                           unsigned a2, unsigned b2, int r0) {
    fa_gm_fence();
#pragma unroll
    for (int c = 0; c < D / 16; ++c) fa_gm_ss64(s, fa_kdesc<AM>(a, r0, c), fa_kdesc<64>(b, 0, c), c);
    fa_gm_commit();
#pragma unroll
    for (int c = 0; c < D / 16; ++c)
        fa_gm_ss64(dp, fa_kdesc<AM>(a2, r0, c), fa_kdesc<64>(b2, 0, c), c);
    fa_gm_commit();
    fa_gm_wait<1>();
    fa_gm_hold<8>(s);
}

// dv += P^T dO or dk += dS^T q over a query tile: the 16 keys x 64 rows of this warp's C tiles
// `p` (rounded to bf16) as A, the swizzled tile at `b` (64 rows of D) as B.
template <int D>
__device__ __forceinline__ void fa_gm_pb(float (*acc)[4], const unsigned (*pa)[4], unsigned b) {
#pragma unroll
    for (int c = 0; c < FA_QT / 16; ++c) {
        if (D == 128) fa_gm_rs128(acc, pa[c], fa_tdesc<FA_QT>(b, c));
        else fa_gm_rs64(acc, pa[c], fa_tdesc<FA_QT>(b, c));
    }
}

// C tiles of 16 x 64 rounded to bf16 as four A fragments of 16 x 16 (fa_pb's packing).
__device__ __forceinline__ void fa_pack_a(unsigned (*pa)[4], float (*p)[4]) {
#pragma unroll
    for (int c = 0; c < FA_QT / 16; ++c) {
        pa[c][0] = fa_pack(p[2 * c][0], p[2 * c][1]);
        pa[c][1] = fa_pack(p[2 * c][2], p[2 * c][3]);
        pa[c][2] = fa_pack(p[2 * c + 1][0], p[2 * c + 1][1]);
        pa[c][3] = fa_pack(p[2 * c + 1][2], p[2 * c + 1][3]);
    }
}

// The kernel's dynamic shared memory: from its start on mma.sync; on wgmma from its first
// 1024-byte boundary, `need` bytes of it (fa_gm_base).
template <bool GM>
__device__ __forceinline__ unsigned char* fa_smem(unsigned need) {
    extern __shared__ __align__(16) unsigned short fa_shared[];
    if (GM) return fa_gm_base(need);
    return (unsigned char*)fa_shared;
}

// A shared tile of N rows of D as a kernel on mma.sync (GM false: rows padded, `bytes` of them)
// or on wgmma (GM true: swizzled) addresses it, from `p`.
template <int D, int N, bool GM>
struct FaTile {
    static constexpr int bytes = N * (D + FA_PAD) * 2;
    __device__ static unsigned short (*at(unsigned char* p))[D + FA_PAD] {
        return (unsigned short (*)[D + FA_PAD])p;
    }
};
template <int D, int N>
struct FaTile<D, N, true> {
    static constexpr int bytes = N * D * 2;
    __device__ static FaSwz<N> at(unsigned char* p) { return {p}; }
};

// The forward's and the query-side backward's key/value pipeline over two buffers of (k, v)
// tiles (FA_BN rows each, as FaTile<D, FA_BN, GM> lays them out) at `kvs`: `fa_kv_load`
// starts copying a tile into a buffer; `fa_kv_tile` starts copying tile j + 1 into the other
// buffer, waits for tile j (visible to wgmma too) and returns its k tile (its v tile follows).
// The caller syncs after using a tile: its buffer is copied into again two tiles on.
template <int D, int NT = FA_WARPS * 32, bool GM = false>
__device__ __forceinline__ void fa_kv_load(unsigned char* buf,
                                           const unsigned short* __restrict__ k,
                                           const unsigned short* __restrict__ v, int g, int nk,
                                           int k0, int l, long kb, long kk, long kl, long vb,
                                           long vk, long vl) {
    using T = FaTile<D, FA_BN, GM>;
    fa_load<D, FA_BN, false, NT>(T::at(buf), k, g, nk, 1, k0, l, kb, kk, kl,
                                 T::at(buf + T::bytes), v, vb, vk, vl);
    fa_commit();
}

template <int D, int NT = FA_WARPS * 32, bool GM = false>
__device__ __forceinline__ unsigned char* fa_kv_tile(unsigned char* kvs, int j, int tiles,
                                                     const unsigned short* __restrict__ k,
                                                     const unsigned short* __restrict__ v,
                                                     int g, int nk, int l, long kb, long kk,
                                                     long kl, long vb, long vk, long vl) {
    constexpr int TB = FaTile<D, FA_BN, GM>::bytes;
    if (j + 1 < tiles) {
        fa_kv_load<D, NT, GM>(kvs + ((j + 1) & 1) * 2 * TB, k, v, g, nk, (j + 1) * FA_BN, l, kb,
                              kk, kl, vb, vk, vl);
        fa_wait<1>();
    } else {
        fa_wait<0>();
    }
    if (GM) fa_proxy_fence();
    __syncthreads();
    return kvs + (j & 1) * 2 * TB;
}

// The A fragment of 16 rows (from `row0`) and 16 columns (from `c0`) of a shared tile: the
// matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8).
template <int D>
__device__ __forceinline__ void fa_frag_a(unsigned* a, unsigned short (*tile)[D + FA_PAD],
                                          int row0, int c0, int lane) {
    fa_ldsm(a, &tile[row0 + (lane & 7) + ((lane >> 3) & 1) * 8][c0 + (lane >> 4) * 8]);
}

// The B fragments (b0, b1) of two neighbouring 8-column tiles of a product s = a b^T, b a
// shared tile of rows n (from n0) by k (16 from c0): the matrices (rows +0, cols +0),
// (+0, +8), (+8, +0), (+8, +8) = b0, b1 of rows n0.., then of rows n0 + 8...
template <int D>
__device__ __forceinline__ void fa_frag_bt(unsigned* b, unsigned short (*tile)[D + FA_PAD],
                                           int n0, int c0, int lane) {
    fa_ldsm(b, &tile[n0 + (lane & 7) + (lane >> 4) * 8][c0 + ((lane >> 3) & 1) * 8]);
}

// s (16 x 8 * NT) = A (16 x D: `a` rows from row0 of a shared tile) times the first 8 * NT rows
// of the shared tile `b`, transposed (s = a b^T: both tiles are rows of D).
template <int D, int NT>
__device__ __forceinline__ void fa_abt(float (*s)[4], unsigned short (*a)[D + FA_PAD], int row0,
                                       unsigned short (*b)[D + FA_PAD], int lane) {
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        unsigned af[4];
        fa_frag_a<D>(af, a, row0, c * 16, lane);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            unsigned bf[4];
            fa_frag_bt<D>(bf, b, n * 8, c * 16, lane);
            fa_mma(s[n], af, bf[0], bf[1]);
            fa_mma(s[n + 1], af, bf[2], bf[3]);
        }
    }
}

// acc (16 x D) += P (16 x 16 * KT, as C tiles `p`, rounded to bf16) times the first 16 * KT rows
// of the shared tile `b` (rows of D).
template <int D, int KT>
__device__ __forceinline__ void fa_pb(float (*acc)[4], float (*p)[4],
                                      unsigned short (*b)[D + FA_PAD], int lane) {
#pragma unroll
    for (int c = 0; c < KT; ++c) {
        unsigned pa[4] = {fa_pack(p[2 * c][0], p[2 * c][1]), fa_pack(p[2 * c][2], p[2 * c][3]),
                          fa_pack(p[2 * c + 1][0], p[2 * c + 1][1]),
                          fa_pack(p[2 * c + 1][2], p[2 * c + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned bf[4];
            fa_ldsm_t(bf, &b[c * 16 + (lane & 15)][(2 * dp + (lane >> 4)) * 8]);
            fa_mma(acc[2 * dp], pa, bf[0], bf[1]);
            fa_mma(acc[2 * dp + 1], pa, bf[2], bf[3]);
        }
    }
}

__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One 16-row tile's step of the online softmax over the scores s of FA_BN keys from k0 (C tiles:
// this lane's rows gr and gr + 8, at positions pa and pb): keys past a row's position masked
// when `masked`, the running maxima (ma, mb) and sums (la, lb) updated, s turned into
// probabilities and the output accumulators rescaled. The maxima are kept scaled (ma = max *
// sl2), the scores raw: the scale is positive, so the raw maximum is the scaled one's, and each
// probability is one FFMA and one exp2.
template <int D>
__device__ __forceinline__ void fa_softmax_tile(float (*s)[4], float (*acc)[4], float& ma,
                                                float& mb, float& la, float& lb, int k0,
                                                bool masked, int pa, int pb, int tq, float sl2) {
    float na = FA_NEG_INF, nb = FA_NEG_INF;
#pragma unroll
    for (int n = 0; n < FA_BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = k0 + n * 8 + 2 * tq + (e & 1);
            if (masked && key > (e < 2 ? pa : pb)) s[n][e] = FA_NEG_INF;
            if (e < 2) na = fmaxf(na, s[n][e]); else nb = fmaxf(nb, s[n][e]);
        }
    }
    na = fmaxf(ma, fa_quad_max(na) * sl2);
    nb = fmaxf(mb, fa_quad_max(nb) * sl2);
    // (a row with nothing seen yet keeps a zero sum: no -inf - -inf)
    const float ua = na == FA_NEG_INF ? 0.f : na, ub = nb == FA_NEG_INF ? 0.f : nb;
    const float fa = fa_exp2(ma - ua), fb = fa_exp2(mb - ub);
    ma = na;
    mb = nb;
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int n = 0; n < FA_BN / 8; ++n) {
        s[n][0] = fa_exp2(fmaf(s[n][0], sl2, -ua));
        s[n][1] = fa_exp2(fmaf(s[n][1], sl2, -ua));
        s[n][2] = fa_exp2(fmaf(s[n][2], sl2, -ub));
        s[n][3] = fa_exp2(fmaf(s[n][3], sl2, -ub));
        sa += s[n][0] + s[n][1];
        sb += s[n][2] + s[n][3];
    }
    la = la * fa + sa;
    lb = lb * fb + sb;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
        acc[t][0] *= fa;
        acc[t][1] *= fa;
        acc[t][2] *= fb;
        acc[t][3] *= fb;
    }
}

// This lane's rows ra and ra + 8 of a 16-row tile of C tiles `acc` (16 x D) times fa and fb,
// in bf16, into rows ra and ra + 8 of group g of a tensor addressed as fa_row does, where they
// are below `rows`.
template <int D>
__device__ __forceinline__ void fa_store_rows(unsigned short* __restrict__ y, float (*acc)[4],
                                              int ra, float fa, float fb, int g, int nk, int r,
                                              int rows, int tq, long sb, long sk, long sl) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = ra + 8 * h;
        if (i >= rows) continue;
        const float f = h ? fb : fa;
        unsigned short* p = y + fa_row(g, nk, r, i, sb, sk, sl, D);
#pragma unroll
        for (int t = 0; t < D / 8; ++t)
            *(unsigned*)(p + t * 8 + 2 * tq) = fa_pack(acc[t][2 * h] * f, acc[t][2 * h + 1] * f);
    }
}

// The forward's end for one 16-row tile: the row sums (la, lb: this lane's share) summed over
// the quad, o = acc / sum, and lse = max + log2(sum) (the maxima ma, mb kept scaled).
template <int D>
__device__ __forceinline__ void fa_fwd_end(unsigned short* __restrict__ o, float* __restrict__ lse,
                                           float (*acc)[4], float ma, float mb, float la,
                                           float lb, int ra, int g, int nk, int r, int rows,
                                           int tq, long ob, long ok, long ol) {
    const float sa = fa_quad_sum(la), sb = fa_quad_sum(lb);
    fa_store_rows<D>(o, acc, ra, 1.f / sa, 1.f / sb, g, nk, r, rows, tq, ob, ok, ol);
    if (tq == 0 && ra < rows) lse[(long)g * rows + ra] = ma + log2f(sa);
    if (tq == 0 && ra + 8 < rows) lse[(long)g * rows + ra + 8] = mb + log2f(sb);
}

// Forward: o = softmax(scale * q k^T, causal) v and, per row, the log-sum-exp of the scaled
// scores in base 2 (lse[g * L * R + i]; the backward's p = 2^(s * sl2 - lse)). One block of
// FA_WARPS warps per FA_BM query rows of a group (blockIdx.y), the rows with the most keys first;
// sl2 = scale * log2(e).
template <int D>
__device__ void flash_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                          const unsigned short* __restrict__ v, unsigned short* __restrict__ o,
                          float* __restrict__ lse, int nk, int r, int l, long qb, long qk,
                          long ql, long kb, long kk, long kl, long vb, long vk, long vl, long ob,
                          long ok, long ol, float sl2) {
    typedef unsigned short Row[D + FA_PAD];
    extern __shared__ __align__(16) unsigned short fa_shared[];
    // two buffers of (k, v) tiles: the next tile is copied while this one is used
    Row* kvs = (Row*)fa_shared;
    const int g = blockIdx.y;
    const int rows = l * r;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * FA_BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int ra = i0 + warp * 16 + gr, rb = ra + 8;
    const int pa = ra / r, pb = rb / r;

    // This warp's 16 query rows as A fragments, read once.
    unsigned qa[D / 16][4];
    {
        const unsigned short* xa = q + fa_row(g, nk, r, ra < rows ? ra : 0, qb, qk, ql, D);
        const unsigned short* xb = q + fa_row(g, nk, r, rb < rows ? rb : 0, qb, qk, ql, D);
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            int col = c * 16 + 2 * tq;
            qa[c][0] = ra < rows ? fa_u32(xa + col) : 0u;
            qa[c][1] = rb < rows ? fa_u32(xb + col) : 0u;
            qa[c][2] = ra < rows ? fa_u32(xa + col + 8) : 0u;
            qa[c][3] = rb < rows ? fa_u32(xb + col + 8) : 0u;
        }
    }
    float acc[D / 8][4];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    float ma = FA_NEG_INF, mb = FA_NEG_INF, la = 0.f, lb = 0.f;
    const int last = (i0 + FA_BM < rows ? i0 + FA_BM : rows) - 1;
    const int pmin = i0 / r;
    const int tiles = last / r / FA_BN + 1;
    fa_kv_load<D>((unsigned char*)kvs, k, v, g, nk, 0, l, kb, kk, kl, vb, vk, vl);
    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * FA_BN;
        Row* ks = (Row*)fa_kv_tile<D>((unsigned char*)kvs, j, tiles, k, v, g, nk, l, kb, kk, kl,
                                      vb, vk, vl);
        Row* vs = ks + FA_BN;
        float s[FA_BN / 8][4];
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
#pragma unroll
            for (int n = 0; n < FA_BN / 8; n += 2) {
                unsigned bf[4];
                fa_frag_bt<D>(bf, ks, n * 8, c * 16, lane);
                fa_mma(s[n], qa[c], bf[0], bf[1]);
                fa_mma(s[n + 1], qa[c], bf[2], bf[3]);
            }
        }
        fa_softmax_tile<D>(s, acc, ma, mb, la, lb, k0, k0 + FA_BN - 1 > pmin, pa, pb, tq, sl2);
        fa_pb<D, FA_BN / 16>(acc, s, vs, lane);
        __syncthreads();  // (the buffer is copied into again two tiles on)
    }
    fa_fwd_end<D>(o, lse, acc, ma, mb, la, lb, ra, g, nk, r, rows, tq, ob, ok, ol);
}

// Forward, two row tiles a warp (FlashAttention-2's layout): FA_FWD_WARPS warps take FA_BM
// rows, q staged in shared memory. On mma.sync (GM false) each warp takes 32 rows: each k or v
// fragment from shared memory feeds both row tiles' products, so a block loads half the
// fragments per product that 16 rows a warp did, and each warp has two independent chains of
// products and of softmax. On wgmma (GM: D = 64 or 128) the one warpgroup takes the rows as two
// tiles of 64 (warp w: rows 16 w.. of each) and the tensor cores read q, k and v from swizzled
// tiles. Output and lse as flash_fwd's (same arithmetic per row).
#define FA_FWD_WARPS 4
// The forward's parameters, and the same names as arguments.
#define FA_FWD_PARAMS                                                                          \
    const unsigned short *__restrict__ q, const unsigned short *__restrict__ k,                \
        const unsigned short *__restrict__ v, unsigned short *__restrict__ o,                  \
        float *__restrict__ lse, int nk, int r, int l, long qb, long qk, long ql, long kb,     \
        long kk, long kl, long vb, long vk, long vl, long ob, long ok, long ol, float sl2
template <int D, bool GM>
__device__ void flash_fwd2(FA_FWD_PARAMS) {
    typedef unsigned short Row[D + FA_PAD];
    using QT = FaTile<D, FA_BM, GM>;
    using KT = FaTile<D, FA_BN, GM>;
    constexpr int NT = FA_FWD_WARPS * 32;
    static_assert(FA_FWD_WARPS * 32 == FA_BM, "a warp takes 32 of the block's rows");
    static_assert(!GM || D == 64 || D == 128, "wgmma tiles of 64 or 128 columns");
    unsigned char* base = fa_smem<GM>(QT::bytes + 4 * KT::bytes);
    const auto qs = QT::at(base);
    unsigned char* kvs = base + QT::bytes;  // two buffers of (k, v) tiles
    const int g = blockIdx.y;
    const int rows = l * r;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * FA_BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int w0 = warp * 32;
    int ra[2], rb[2], pa[2], pb[2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        ra[m] = i0 + (GM ? 64 * m + 16 * warp : w0 + 16 * m) + gr;
        rb[m] = ra[m] + 8;
        pa[m] = ra[m] / r;
        pb[m] = rb[m] / r;
    }
    fa_load<D, FA_BM, true, NT>(qs, q, g, nk, r, i0, rows, qb, qk, ql);
    fa_kv_load<D, NT, GM>(kvs, k, v, g, nk, 0, l, kb, kk, kl, vb, vk, vl);  // (commits q too)
    const unsigned qa_s = fa_smem_addr(base);
    float acc[2][D / 8][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int t = 0; t < D / 8; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.f;
    float ma[2] = {FA_NEG_INF, FA_NEG_INF}, mb[2] = {FA_NEG_INF, FA_NEG_INF};
    float la[2] = {0.f, 0.f}, lb[2] = {0.f, 0.f};
    const int last = (i0 + FA_BM < rows ? i0 + FA_BM : rows) - 1;
    const int pmin = i0 / r;
    const int tiles = last / r / FA_BN + 1;
    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * FA_BN;
        unsigned char* kt =
            fa_kv_tile<D, NT, GM>(kvs, j, tiles, k, v, g, nk, l, kb, kk, kl, vb, vk, vl);
        float s[2][FA_BN / 8][4];
        if constexpr (GM) {
            const unsigned ka_s = fa_smem_addr(kt);
            fa_gm_fence();
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int c = 0; c < D / 16; ++c)
                    fa_gm_ss64(s[m], fa_kdesc<FA_BM>(qa_s, 64 * m, c),
                               fa_kdesc<FA_BN>(ka_s, 0, c), c);
            fa_gm_commit();
            fa_gm_wait<0>();  // (also the previous tile's acc += P v)
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                fa_gm_hold<FA_BN / 8>(s[m]);
                fa_gm_hold<D / 8>(acc[m]);
            }
        } else {
            Row* ks = (Row*)kt;
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int n = 0; n < FA_BN / 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
#pragma unroll
            for (int c = 0; c < D / 16; ++c) {
                unsigned af[2][4];
                fa_frag_a<D>(af[0], qs, w0, c * 16, lane);
                fa_frag_a<D>(af[1], qs, w0 + 16, c * 16, lane);
#pragma unroll
                for (int n = 0; n < FA_BN / 8; n += 2) {
                    unsigned bf[4];
                    fa_frag_bt<D>(bf, ks, n * 8, c * 16, lane);
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        fa_mma(s[m][n], af[m], bf[0], bf[1]);
                        fa_mma(s[m][n + 1], af[m], bf[2], bf[3]);
                    }
                }
            }
        }
        // The softmax of flash_fwd, for each row tile.
        const bool masked = k0 + FA_BN - 1 > pmin;
#pragma unroll
        for (int m = 0; m < 2; ++m)
            fa_softmax_tile<D>(s[m], acc[m], ma[m], mb[m], la[m], lb[m], k0, masked, pa[m], pb[m],
                               tq, sl2);
        // acc += P v
        if constexpr (GM) {
            unsigned pf[2][FA_BN / 16][4];
            fa_pack_a(pf[0], s[0]);
            fa_pack_a(pf[1], s[1]);
            fa_gm_fence();
#pragma unroll
            for (int m = 0; m < 2; ++m) fa_gm_pb<D>(acc[m], pf[m], fa_smem_addr(kt) + KT::bytes);
            fa_gm_commit();
            fa_gm_wait<0>();
#pragma unroll
            for (int m = 0; m < 2; ++m) fa_gm_hold<D / 8>(acc[m]);
        } else {
            Row* vs = (Row*)kt + FA_BN;
            // each v fragment for both row tiles
#pragma unroll
            for (int c = 0; c < FA_BN / 16; ++c) {
                unsigned pf[2][4];
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    pf[m][0] = fa_pack(s[m][2 * c][0], s[m][2 * c][1]);
                    pf[m][1] = fa_pack(s[m][2 * c][2], s[m][2 * c][3]);
                    pf[m][2] = fa_pack(s[m][2 * c + 1][0], s[m][2 * c + 1][1]);
                    pf[m][3] = fa_pack(s[m][2 * c + 1][2], s[m][2 * c + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    unsigned bf[4];
                    fa_ldsm_t(bf, &vs[c * 16 + (lane & 15)][(2 * dp + (lane >> 4)) * 8]);
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        fa_mma(acc[m][2 * dp], pf[m], bf[0], bf[1]);
                        fa_mma(acc[m][2 * dp + 1], pf[m], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads();  // (the buffer is copied into again two tiles on)
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
        fa_fwd_end<D>(o, lse, acc[m], ma[m], mb[m], la[m], lb[m], ra[m], g, nk, r, rows, tq, ob,
                      ok, ol);
}

// The backward's per-row term delta = sum(dO * O) (delta[g * L * R + i]): d / 8 lanes a row,
// eight values a lane (16-byte loads: every row of o and dO starts 16-byte aligned).
extern "C" __global__ void flash_delta(const unsigned short* __restrict__ o,
                                       const unsigned short* __restrict__ dout,
                                       float* __restrict__ delta, long total, int nk, int r,
                                       int l, int d, long ob, long ok, long ol, long db, long dk,
                                       long dl) {
    // (32-bit divisions: the launcher keeps the threads below 2^32)
    const unsigned per_row = d / 8, t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned urow = t / per_row;
    const long row = urow;
    const int part = t - urow * per_row;
    float sum = 0.f;
    if (row < total) {
        const unsigned rows = l * r, ug = urow / rows;
        const int g = ug, i = urow - ug * rows;
        float a[8], b[8];
        ld8(o + fa_row(g, nk, r, i, ob, ok, ol, d), 8 * part, a);
        ld8(dout + fa_row(g, nk, r, i, db, dk, dl, d), 8 * part, b);
#pragma unroll
        for (int e = 0; e < 8; e++) sum += a[e] * b[e];
    }
    for (int m = per_row / 2; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    if (row < total && part == 0) delta[row] = sum;
}

// The query gradient from its f32 sums (flash_bwd_dkdvq's dqacc, rows of d): dq = scale * acc
// in bf16, in q's layout. Eight values a thread.
extern "C" __global__ void flash_dq_store(const float* __restrict__ acc,
                                          unsigned short* __restrict__ dq,
                                          long total, int nk, int r, int l, int d, long gb,
                                          long gk, long gl, float scale) {
    const int per_row = d / 8;
    const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total * per_row) return;
    const long row = t / per_row;
    const int part = t % per_row;
    const int rows = l * r;
    const float4* a = (const float4*)(acc + row * d + 8 * part);
    const float4 x = a[0], y = a[1];
    uint4 out;
    out.x = fa_pack(x.x * scale, x.y * scale);
    out.y = fa_pack(x.z * scale, x.w * scale);
    out.z = fa_pack(y.x * scale, y.y * scale);
    out.w = fa_pack(y.z * scale, y.w * scale);
    *(uint4*)(dq + fa_row(row / rows, nk, r, row % rows, gb, gk, gl, d) + 8 * part) = out;
}

// Backward, the query side: dq = scale * dS k, dS = P * (dO v^T - delta), one block of W warps
// per 16 * W query rows of group g, the rows with the most keys first (block `bx` of `nbx`).
// Dynamic shared memory: q, dO, k and v tiles. On wgmma (GM: D = 64 or 128) warpgroup w / 4
// takes the block's rows from 64 (w / 4), warp w still 16 of them, over swizzled tiles.
// The query-side backward's parameters, and the same names as arguments.
#define FA_DQ_PARAMS                                                                           \
    const unsigned short *__restrict__ q, const unsigned short *__restrict__ k,                \
        const unsigned short *__restrict__ v, const unsigned short *__restrict__ dout,         \
        const float *__restrict__ lse, const float *__restrict__ delta,                        \
        unsigned short *__restrict__ dq, int nk, int r, int l, long qb, long qk, long ql,      \
        long kb, long kk, long kl, long vb, long vk, long vl, long db, long dk, long dl,       \
        long gb, long gk, long gl, float sl2, float scale, int g, int bx, int nbx
template <int D, int W, bool GM>
__device__ void flash_bwd_dq(FA_DQ_PARAMS) {
    typedef unsigned short Row[D + FA_PAD];
    constexpr int BM = 16 * W, NT = 32 * W;  // rows and threads of a block
    using QT = FaTile<D, BM, GM>;
    using KT = FaTile<D, FA_BN, GM>;
    static_assert(!GM || D == 64 || D == 128, "wgmma tiles of 64 or 128 columns");
    static_assert(FA_BN == FA_QT, "fa_gm_pb takes tiles of FA_QT rows");
    unsigned char* base = fa_smem<GM>(2 * QT::bytes + 4 * KT::bytes);
    const auto qs = QT::at(base), dos = QT::at(base + QT::bytes);
    unsigned char* kvs = base + 2 * QT::bytes;  // two buffers of (k, v) tiles, as in the forward
    const int rows = l * r;
    const int i0 = (nbx - 1 - bx) * BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int w0 = warp * 16, wg0 = (warp / 4) * 64;
    const int ra = i0 + w0 + gr, rb = ra + 8;
    const int pa = ra / r, pb = rb / r;
    fa_load<D, BM, true, NT>(qs, q, g, nk, r, i0, rows, qb, qk, ql, dos, dout, db, dk, dl);
    fa_kv_load<D, NT, GM>(kvs, k, v, g, nk, 0, l, kb, kk, kl, vb, vk, vl);
    const float lsa = ra < rows ? lse[(long)g * rows + ra] : 0.f;
    const float lsb = rb < rows ? lse[(long)g * rows + rb] : 0.f;
    const float dea = ra < rows ? delta[(long)g * rows + ra] : 0.f;
    const float deb = rb < rows ? delta[(long)g * rows + rb] : 0.f;
    const unsigned qa_s = fa_smem_addr(base), da_s = qa_s + QT::bytes;
    float acc[D / 8][4];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    const int last = (i0 + BM < rows ? i0 + BM : rows) - 1;
    const int pmin = i0 / r;
    const int tiles = last / r / FA_BN + 1;
    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * FA_BN;
        unsigned char* kt =
            fa_kv_tile<D, NT, GM>(kvs, j, tiles, k, v, g, nk, l, kb, kk, kl, vb, vk, vl);
        const unsigned ka_s = fa_smem_addr(kt), va_s = ka_s + KT::bytes;
        float s[FA_BN / 8][4], dp[FA_BN / 8][4];
        if constexpr (GM) {  // S = q k^T and dP = dO v^T, the second while P is computed
            static_assert(FA_BN == 64, "fa_gm_s_dp takes tiles of 64 keys");
            fa_gm_s_dp<D, BM>(s, dp, qa_s, ka_s, da_s, va_s, wg0);
        } else {
            fa_abt<D, FA_BN / 8>(s, qs, w0, (Row*)kt, lane);
            fa_abt<D, FA_BN / 8>(dp, dos, w0, (Row*)kt + FA_BN, lane);
        }
        const bool masked = k0 + FA_BN - 1 > pmin;
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + 2 * tq + (e & 1);
                const bool a = e < 2;
                float p = fa_exp2(fmaf(s[n][e], sl2, -(a ? lsa : lsb)));
                if (masked && key > (a ? pa : pb)) p = 0.f;
                s[n][e] = p;
            }
        }
        if constexpr (GM) {
            fa_gm_wait<0>();
            fa_gm_hold<FA_BN / 8>(dp);
        }
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - (e < 2 ? dea : deb);
        // acc += dS k
        if constexpr (GM) {
            unsigned sa[FA_BN / 16][4];
            fa_pack_a(sa, s);
            fa_gm_fence();
            fa_gm_pb<D>(acc, sa, ka_s);
            fa_gm_commit();
            fa_gm_wait<0>();
            fa_gm_hold<D / 8>(acc);
        } else {
            fa_pb<D, FA_BN / 16>(acc, s, (Row*)kt, lane);
        }
        __syncthreads();  // (the buffer is copied into again two tiles on)
    }
    fa_store_rows<D>(dq, acc, ra, scale, scale, g, nk, r, rows, tq, gb, gk, gl);
}

// A shared tile of dS for FA_QT query rows, stored transposed (a row a key).
typedef unsigned short FaDsRow[FA_QT + FA_PAD];

// The query gradient's share of a block of KB = 16 * W keys for FA_QT query rows from i0, added
// atomically into `dqacc` (f32, rows of D, unscaled): dS (FA_QT x KB, `dss` holding it
// transposed) times the block's keys `ks` (KB x D, padded or swizzled). Warp w takes the 16
// rows from 16 (w % 4) and D / (W / 4) columns from the (w / 4)-th.
template <int D, int W, class Tile>
__device__ __forceinline__ void fa_dq_add(float* __restrict__ dqacc, FaDsRow* dss, Tile ks,
                                          int i0, int rows, int warp, int lane) {
    static_assert(W % 4 == 0 && FA_QT == 64, "four warps of 16 rows cover a query tile");
    constexpr int DC = D / (W / 4);  // columns a warp
    static_assert(DC % 16 == 0, "a warp's columns are whole pairs of 8-column tiles");
    const int rt = (warp % 4) * 16, c0 = (warp / 4) * DC;
    float acc[DC / 8][4];
#pragma unroll
    for (int t = 0; t < DC / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    const int m = lane >> 3;
#pragma unroll
    for (int c = 0; c < W; ++c) {  // 16 keys a step
        // A = dS (rows: queries, columns: keys): the transposed loads of dss's 8 x 8 matrices
        // (keys +0, queries +0), (+0, +8), (+8, +0), (+8, +8)
        unsigned a[4];
        fa_ldsm_t(a, &dss[c * 16 + (m >> 1) * 8 + (lane & 7)][rt + (m & 1) * 8]);
#pragma unroll
        for (int dp = 0; dp < DC / 16; ++dp) {
            unsigned bf[4];
            fa_ldsm_t(bf, fa_at(ks, c * 16 + (lane & 15), c0 + (2 * dp + (lane >> 4)) * 8));
            fa_mma(acc[2 * dp], a, bf[0], bf[1]);
            fa_mma(acc[2 * dp + 1], a, bf[2], bf[3]);
        }
    }
    const int gr = lane / 4, tq = lane % 4;
    const int ra = i0 + rt + gr, rb = ra + 8;
#pragma unroll
    for (int t = 0; t < DC / 8; ++t) {
        const int col = c0 + t * 8 + 2 * tq;
        if (ra < rows) fa_red2(dqacc + (long)ra * D + col, acc[t][0], acc[t][1]);
        if (rb < rows) fa_red2(dqacc + (long)rb * D + col, acc[t][2], acc[t][3]);
    }
}

// The key/value backwards' probabilities, in place over a warp's C tiles of S^T (its keys ka
// and kb = ka + 8 by FA_QT query rows): P = 2^(S^T sl2 - lse), the rows' lse in `ls`; where
// `masked`, zero for keys past a row's position, `pos(c)` for column c.
template <class Pos>
__device__ __forceinline__ void fa_kv_probs(float (*s)[4], const float* ls, float sl2, bool masked,
                                            int ka, int kb, int tq, Pos pos) {
#pragma unroll
    for (int n = 0; n < FA_QT / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + 2 * tq + (e & 1);
            float p = fa_exp2(fmaf(s[n][e], sl2, -ls[c]));
            if (masked && (e < 2 ? ka : kb) > pos(c)) p = 0.f;
            s[n][e] = p;
        }
    }
}

// dS^T = P^T (dP^T - delta) in place over the same C tiles, the rows' delta in `des`.
__device__ __forceinline__ void fa_kv_ds(float (*s)[4], const float (*dp)[4], const float* des,
                                         int tq) {
#pragma unroll
    for (int n = 0; n < FA_QT / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + 2 * tq + (e & 1);
            s[n][e] *= dp[n][e] - des[c];
        }
    }
}

// Backward, the key/value side: dv = P^T dO and dk = scale * dS^T q, summed over every query
// row of the group (all R heads) that sees the keys. One block of W warps per 16 * W keys of
// group g (block `bx`; the first keys, seen by the most rows, first), each warp 16 keys, over tiles
// of FA_QT query rows from the first row that sees the block's first key (W = 8; W = 4 where
// blocks of 128 keys would leave SMs idle: short sequences). It works in the
// transposed products (S^T = k q^T, dP^T = v dO^T), so each warp's C tiles are its keys' rows.
// With Q, each query tile's dS also goes through shared memory into the query gradient
// (`fa_dq_add`, into dqacc: B * K groups of L * R rows of D, f32, unscaled).
// Dynamic shared memory: k, v, q and dO tiles, the rows' lse and delta, and with Q two dS tiles
// (padded). On wgmma (GM: D = 64 or 128) warpgroup w / 4 takes the block's keys from 64 (w / 4)
// over swizzled k, v, q and dO tiles; S^T and dP^T are issued together, the second running
// while P is computed.
// The key/value backward's parameters, and the same names as arguments.
#define FA_KV_PARAMS                                                                           \
    const unsigned short *__restrict__ q, const unsigned short *__restrict__ k,                \
        const unsigned short *__restrict__ v, const unsigned short *__restrict__ dout,         \
        const float *__restrict__ lse, const float *__restrict__ delta,                        \
        unsigned short *__restrict__ dkey, unsigned short *__restrict__ dval,                  \
        float *__restrict__ dqacc, int nk, int r, int l, long qb, long qk, long ql, long kb,   \
        long kk, long kl, long vb, long vk, long vl, long db, long dk, long dl, long gkb,      \
        long gkk, long gkl, long gvb, long gvk, long gvl, float sl2, float scale, int g, int bx
template <int D, int W, bool Q, bool GM>
__device__ void flash_bwd_dkdv(FA_KV_PARAMS) {
    typedef unsigned short Row[D + FA_PAD];
    constexpr int KB = 16 * W, NT = 32 * W;  // keys and threads of a block
    using KT = FaTile<D, KB, GM>;
    using QT = FaTile<D, FA_QT, GM>;
    static_assert(!GM || D == 64 || D == 128, "wgmma tiles of 64 or 128 columns");
    unsigned char* base = fa_smem<GM>(2 * KT::bytes + 4 * QT::bytes + 6 * FA_QT * 4 +
                                      (Q ? 2 * KB * (FA_QT + FA_PAD) * 2 : 0));
    const auto ks = KT::at(base), vs = KT::at(base + KT::bytes);
    // two buffers of (q, dO) tiles and of the rows' lse, delta and positions
    unsigned char* qdos = base + 2 * KT::bytes;
    float* rowv = (float*)(qdos + 4 * QT::bytes);
    // (two dS tiles: a tile's is summed into dq after the next tile's first barrier)
    FaDsRow* dss = (FaDsRow*)(rowv + 6 * FA_QT);
    const int rows = l * r;
    const int j0 = bx * KB;
    if (Q) dqacc += (long)g * rows * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int w0 = warp * 16, wg0 = (warp / 4) * 64;
    const int ka = j0 + w0 + gr, kb_ = ka + 8;
    // Starts copying the query tile from row i0 into buffer b: q, dO, and each row's lse,
    // delta (zeros past the last row: such a row adds nothing, its q and dO being zero) and
    // position.
    auto load_rows = [&](int i0, int b) {
        unsigned char* qt = qdos + b * 2 * QT::bytes;
        fa_load<D, FA_QT, true, NT>(QT::at(qt), q, g, nk, r, i0, rows, qb, qk, ql,
                                    QT::at(qt + QT::bytes), dout, db, dk, dl);
        float* rv = rowv + b * 3 * FA_QT;
        const int c = threadIdx.x;
        if (c < FA_QT) {
            const bool ok = i0 + c < rows;
            fa_cp4(rv + c, lse + (long)g * rows + (ok ? i0 + c : 0), ok);
        } else if (c < 2 * FA_QT) {
            const int cc = c - FA_QT;
            const bool ok = i0 + cc < rows;
            fa_cp4(rv + FA_QT + cc, delta + (long)g * rows + (ok ? i0 + cc : 0), ok);
        }
        if (c < FA_QT) ((int*)rv)[2 * FA_QT + c] = (i0 + c) / r;
    };
    fa_load<D, KB, false, NT>(ks, k, g, nk, 1, j0, l, kb, kk, kl, vs, v, vb, vk, vl);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
        dka[t][0] = dka[t][1] = dka[t][2] = dka[t][3] = 0.f;
        dva[t][0] = dva[t][1] = dva[t][2] = dva[t][3] = 0.f;
    }
    const unsigned ka_s = fa_smem_addr(base), va_s = ka_s + KT::bytes;
    const int first = j0 * r / FA_QT * FA_QT;
    load_rows(first, 0);
    fa_commit();
    for (int i0 = first, it = 0; i0 < rows; i0 += FA_QT, ++it) {
        unsigned char* qt = qdos + (it & 1) * 2 * QT::bytes;
        const auto qs = QT::at(qt), dos = QT::at(qt + QT::bytes);
        const unsigned qa_s = fa_smem_addr(qt), da_s = qa_s + QT::bytes;
        const float* ls = rowv + (it & 1) * 3 * FA_QT;
        const float* des = ls + FA_QT;
        const int* qpos = (const int*)(des + FA_QT);
        if (i0 + FA_QT < rows) {
            load_rows(i0 + FA_QT, (it + 1) & 1);
            fa_commit();
            fa_wait<1>();
        } else {
            fa_wait<0>();
        }
        if (GM) fa_proxy_fence();
        __syncthreads();
        // the previous tile's dS is whole now (every warp wrote its keys' rows before the
        // barrier): its share of dq
        if (Q && it > 0)
            fa_dq_add<D, W>(dqacc, dss + ((it - 1) & 1) * KB, ks, i0 - FA_QT, rows, warp, lane);
        const bool masked = i0 / r < j0 + KB - 1;
        float s[FA_QT / 8][4], dp[FA_QT / 8][4];
        if constexpr (GM) {  // S^T = k q^T and dP^T = v dO^T
            static_assert(FA_QT == 64, "fa_gm_s_dp takes tiles of 64 query rows");
            fa_gm_s_dp<D, KB>(s, dp, ka_s, qa_s, va_s, da_s, wg0);
        } else {
            fa_abt<D, FA_QT / 8>(s, ks, w0, qs, lane);
        }
        fa_kv_probs(s, ls, sl2, masked, ka, kb_, tq, [&](int c) { return qpos[c]; });
        // dv += P^T dO (and dP^T)
        if constexpr (GM) {
            unsigned pa[FA_QT / 16][4];
            fa_pack_a(pa, s);
            fa_gm_fence();
            fa_gm_pb<D>(dva, pa, da_s);
            fa_gm_commit();
            fa_gm_wait<1>();
            fa_gm_hold<FA_QT / 8>(dp);
        } else {
            fa_pb<D, FA_QT / 16>(dva, s, dos, lane);
            fa_abt<D, FA_QT / 8>(dp, vs, w0, dos, lane);
        }
        fa_kv_ds(s, dp, des, tq);
        if (Q) {
            // dS^T's rows of this warp's keys, rounded to bf16 as the product below rounds them
            FaDsRow* ds = dss + (it & 1) * KB;
#pragma unroll
            for (int n = 0; n < FA_QT / 8; ++n) {
                *(unsigned*)&ds[w0 + gr][n * 8 + 2 * tq] = fa_pack(s[n][0], s[n][1]);
                *(unsigned*)&ds[w0 + gr + 8][n * 8 + 2 * tq] = fa_pack(s[n][2], s[n][3]);
            }
        }
        // dk += dS^T q
        if constexpr (GM) {
            unsigned sa[FA_QT / 16][4];
            fa_pack_a(sa, s);
            fa_gm_fence();
            fa_gm_pb<D>(dka, sa, qa_s);
            fa_gm_commit();
            fa_gm_wait<0>();
            fa_gm_hold<D / 8>(dva);
            fa_gm_hold<D / 8>(dka);
        } else {
            fa_pb<D, FA_QT / 16>(dka, s, qs, lane);
        }
        __syncthreads();
    }
    if (Q) {  // the last tile's share (the loop ended on a barrier)
        const int tiles = (rows - first + FA_QT - 1) / FA_QT;
        fa_dq_add<D, W>(dqacc, dss + ((tiles - 1) & 1) * KB, ks, first + (tiles - 1) * FA_QT,
                        rows, warp, lane);
    }
    fa_store_rows<D>(dkey, dka, ka, scale, scale, g, nk, 1, l, tq, gkb, gkk, gkl);
    fa_store_rows<D>(dval, dva, ka, 1.f, 1.f, g, nk, 1, l, tq, gvb, gvk, gvl);
}


// The query gradient from the warp-specialized backward's f32 sums (flash_bwd_ws_d128's dqacc:
// per group, `tiles` tiles of 64 rows of 128, each stored in the order its consumers hold it:
// float4 (w * 8 + n) * 128 + t is thread t of consumer warpgroup w's accumulator tile n, that
// is rows 16 (t / 32) + (t % 32) / 4 and 8 more, columns 64 w + 8 n + 2 (t % 4) and the next):
// dq = scale * acc in bf16, in q's layout. A thread takes four neighbouring float4 (t % 4 =
// 0..3: 64 bytes), eight columns of two rows; 16 threads the 128 columns of a row pair, so a
// warp writes two neighbouring rows whole (512 bytes). blockIdx.y is the group.
extern "C" __global__ void flash_dq_store_ws(const float* __restrict__ acc,
                                             unsigned short* __restrict__ dq, int tiles, int nk,
                                             int r, int l, long gb, long gk, long gl,
                                             float scale) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= tiles * 512) return;
    const int g = blockIdx.y, rows = l * r;
    const int tile = u / 512, pair = (u % 512) / 16, part = u % 16;
    const int t0 = (pair / 8) * 32 + (pair % 8) * 4;  // rows 16 (pair / 8) + pair % 8, +8
    const float4* a = (const float4*)(acc + ((long)g * tiles + tile) * (64 * 128)) + part * 128 + t0;
    const float4 x0 = a[0], x1 = a[1], x2 = a[2], x3 = a[3];
    const int i = tile * 64 + (pair / 8) * 16 + pair % 8;
    unsigned short* y = dq + (long)(g / nk) * gb + (long)(g % nk) * gk + part * 8;
    if (i < rows) {
        const unsigned pos = (unsigned)i / r, head = i - pos * r;
        *(uint4*)(y + pos * gl + head * 128) =
            make_uint4(fa_pack(x0.x * scale, x0.y * scale), fa_pack(x1.x * scale, x1.y * scale),
                       fa_pack(x2.x * scale, x2.y * scale), fa_pack(x3.x * scale, x3.y * scale));
    }
    if (i + 8 < rows) {
        const unsigned pos = (unsigned)(i + 8) / r, head = i + 8 - pos * r;
        *(uint4*)(y + pos * gl + head * 128) =
            make_uint4(fa_pack(x0.z * scale, x0.w * scale), fa_pack(x1.z * scale, x1.w * scale),
                       fa_pack(x2.z * scale, x2.w * scale), fa_pack(x3.z * scale, x3.w * scale));
    }
}

#if FA_SM90A
// mbarriers in shared memory (PTX ISA, "Parallel Synchronization and Communication
// Instructions: mbarrier"): `count` arrivals complete a phase.
__device__ __forceinline__ void fa_mbar_init(unsigned a, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void fa_mbar_wait(unsigned a, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(a), "r"(parity)
                     : "memory");
    } while (!done);
}
__device__ __forceinline__ void fa_mbar_arrive(unsigned a) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(a)
                 : "memory");
}
// One arrival once this thread's cp.async copies so far have landed.
__device__ __forceinline__ void fa_mbar_arrive_cp(unsigned a) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
// Named barriers (ids 1..15; __syncthreads is 0) over `n` threads, whole warps.
__device__ __forceinline__ void fa_bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// d (64 x 64, f32) (+)= A B over k = 16, both in shared memory stored MN-major (`fa_tdesc`): A
// (64 x 16) from a tile whose rows are k, B (16 x 64) likewise.
__device__ __forceinline__ void fa_gm_ss64t(float (*d)[4], unsigned long long da,
                                            unsigned long long db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" FA_REGS32
                 "}, %32, %33, p, 1, 1, 1, 1;\n}\n"
                 : FA_ACC32(d)
                 : "l"(da), "l"(db), "r"(accumulate));
}

// Shared memory of the warp-specialized backward, in bytes from its 1024-byte boundary: k and v
// (128 keys of 128), two stages of (q, dO) tiles (64 rows), two dS^T tiles (128 keys x 64 rows),
// the query gradient's f32 tile, two stages of the rows' lse and delta, four mbarriers.
#define FA_WS_K 0
#define FA_WS_V 32768
#define FA_WS_QDO 65536     // stage s: q at + 32768 s, dO 16384 after it
#define FA_WS_DS 131072     // buffer b at + 16384 b
#define FA_WS_DQ 163840     // 64 x 128 f32
#define FA_WS_ROWS 196608   // stage s: lse at + 512 s, delta 256 after it
#define FA_WS_BARS 197632   // full[2], empty[2]
#define FA_WS_SMEM 197664

// The whole backward in one pass over keys and values, warp-specialized after
// FlashAttention-3's Hopper backward (head dim 128, wgmma): a block takes 128 keys of group g
// over tiles of 64 query rows, from the first row that sees its first key, in three
// warpgroups. Warpgroup 0, the producer, copies each tile's q, dO, lse and delta into one of
// two stages (cp.async, each thread's copies completing the stage's `full` mbarrier) once the
// consumers have released the stage (`empty`). Warpgroups 1 and 2, the consumers (64 keys
// each), do what flash_bwd_dkdv does for a tile, in the same order (S^T = k q^T and
// dP^T = v dO^T, P, dv += P^T dO, dS, dk += dS^T q: the same bits of dk and dv), and keep dS^T
// (bf16, as dk's product rounds it) in shared memory; once both have, each computes half of
// the columns of dq = dS k (64 rows x 64 columns, dS^T and k read MN-major from shared memory)
// while dk's product runs, writes it into its half of an f32 tile in the order it holds it
// (thread t's accumulator tile n at float4 (w * 8 + n) * 128 + t: no bank conflicts, and the
// order flash_dq_store_ws reads dqacc in), and one thread adds that half into the global f32
// sums with one bulk reduction (cp.reduce.async.bulk .add.f32), which no thread waits for
// until the next tile. Registers move from the producer to the consumers (setmaxnreg 24 and
// 240). Five products a tile instead of the two kernels' seven. Shared memory: FA_WS_SMEM.
extern "C" __global__ void __launch_bounds__(384, 1)
flash_bwd_ws_d128(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                  const unsigned short* __restrict__ v, const unsigned short* __restrict__ dout,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  unsigned short* __restrict__ dkey, unsigned short* __restrict__ dval,
                  float* __restrict__ dqacc, int nk, int r, int l, long qb, long qk, long ql,
                  long kb, long kk, long kl, long vb, long vk, long vl, long db, long dk, long dl,
                  long gkb, long gkk, long gkl, long gvb, long gvk, long gvl, float sl2,
                  float scale) {
    constexpr int D = 128, KB = 128, QT = 64;
    unsigned char* base = fa_gm_base(FA_WS_SMEM);
    const unsigned sbase = fa_smem_addr(base);
    const unsigned full0 = sbase + FA_WS_BARS, empty0 = full0 + 16;
    // (blockIdx.x the group, y the key block: every group's first keys, which see the most
    // query rows, start before any group's later ones, so no long block is left for the end)
    const int g = blockIdx.x, rows = l * r, j0 = blockIdx.y * KB;
    const int first = j0 * r / QT * QT;
    const int ntiles = (rows - first + QT - 1) / QT;
    const long bb = g / nk, hh = g % nk;
    // k and v: every thread
    for (int x = threadIdx.x; x < KB * (D / 8); x += 384) {
        const int row = x / (D / 8), col = (x % (D / 8)) * 8, j = j0 + row;
        const bool ok = j < l;
        const long jj = ok ? j : 0;
        fa_cp16(base + FA_WS_K + fa_swz<KB>(row, col), k + bb * kb + hh * kk + jj * kl + col, ok);
        fa_cp16(base + FA_WS_V + fa_swz<KB>(row, col), v + bb * vb + hh * vk + jj * vl + col, ok);
    }
    fa_commit();
    if (threadIdx.x == 0) {
        fa_mbar_init(full0, 128);
        fa_mbar_init(full0 + 8, 128);
        fa_mbar_init(empty0, 256);
        fa_mbar_init(empty0 + 8, 256);
    }
    fa_wait<0>();
    fa_proxy_fence();
    __syncthreads();
    const int lane = threadIdx.x % 32;
    if (threadIdx.x < 128) {  // the producer: each thread 16 bytes of eight rows of q and dO
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        const unsigned short* qg = q + bb * qb + hh * qk;
        const unsigned short* dg = dout + bb * db + hh * dk;
        const float* lg = lse + (long)g * rows;
        const float* eg = delta + (long)g * rows;
        const int col = (threadIdx.x % 16) * 8, row0 = threadIdx.x / 16;
        // (a thread's rows are 8 apart: 8 = d8 * r + m8 positions and heads on; one division a
        // tile, so the producer's 24 registers hold its loop)
        const int d8 = 8 / r, m8 = 8 - d8 * r;
        for (int t = 0; t < ntiles; ++t) {
            const int s = t & 1, i0 = first + t * QT, mine = i0 + row0;
            if (t >= 2) fa_mbar_wait(empty0 + 8 * s, ((t >> 1) - 1) & 1);
            unsigned char* qt = base + FA_WS_QDO + s * 32768;
            int pos = mine / r, head = mine - pos * r;
#pragma unroll
            for (int m = 0; m < QT / 8; ++m) {
                const bool ok = mine + 8 * m < rows;
                const unsigned off = fa_swz<QT>(row0 + 8 * m, col);
                fa_cp16(qt + off, qg + (ok ? pos * ql + head * D + col : 0), ok);
                fa_cp16(qt + 16384 + off, dg + (ok ? pos * dl + head * D + col : 0), ok);
                pos += d8;
                head += m8;
                if (head >= r) head -= r, ++pos;
            }
            if (threadIdx.x < QT) {
                float* rv = (float*)(base + FA_WS_ROWS + s * 512);
                const int c = threadIdx.x;
                const bool ok = i0 + c < rows;
                fa_cp4(rv + c, lg + (ok ? i0 + c : 0), ok);
                fa_cp4(rv + QT + c, eg + (ok ? i0 + c : 0), ok);
            }
            fa_mbar_arrive_cp(full0 + 8 * s);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int ct = threadIdx.x - 128, wq = ct / 128, t128 = ct % 128, w = t128 / 32;
    const int gr = lane / 4, tq = lane % 4;
    const int ka = j0 + wq * 64 + w * 16 + gr, kb_ = ka + 8;
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
        dka[t][0] = dka[t][1] = dka[t][2] = dka[t][3] = 0.f;
        dva[t][0] = dva[t][1] = dva[t][2] = dva[t][3] = 0.f;
    }
    const unsigned ka_s = sbase + FA_WS_K, va_s = sbase + FA_WS_V;
    float* dqg = dqacc + ((long)g * ((rows + QT - 1) / QT) + first / QT) * (QT * D);
    for (int t = 0; t < ntiles; ++t) {
        const int s = t & 1, i0 = first + t * QT;
        const unsigned qa_s = sbase + FA_WS_QDO + s * 32768, da_s = qa_s + 16384;
        const float* ls = (const float*)(base + FA_WS_ROWS + s * 512);
        const float* des = ls + QT;
        fa_mbar_wait(full0 + 8 * s, (t >> 1) & 1);
        fa_proxy_fence();
        const bool masked = i0 / r < j0 + KB - 1;
        float sc[QT / 8][4], dp[QT / 8][4];
        fa_gm_s_dp<D, KB>(sc, dp, ka_s, qa_s, va_s, da_s, wq * 64);
        fa_kv_probs(sc, ls, sl2, masked, ka, kb_, tq, [&](int c) { return (i0 + c) / r; });
        {  // dv += P^T dO (and dP^T)
            unsigned pa[QT / 16][4];
            fa_pack_a(pa, sc);
            fa_gm_fence();
            fa_gm_pb<D>(dva, pa, da_s);
            fa_gm_commit();
            fa_gm_wait<1>();
            fa_gm_hold<QT / 8>(dp);
        }
        fa_kv_ds(sc, dp, des, tq);
        // dS^T rounded to bf16 as dk's product takes it (A fragments), and its rows of this
        // warp's keys into shared memory for dq's
        unsigned sa[QT / 16][4];
        fa_pack_a(sa, sc);
        unsigned char* dss = base + FA_WS_DS + s * 16384;
        const int row = wq * 64 + w * 16 + gr;
#pragma unroll
        for (int n = 0; n < QT / 8; ++n) {
            *(unsigned*)(dss + fa_swz<KB>(row, n * 8 + 2 * tq)) = sa[n / 2][2 * (n & 1)];
            *(unsigned*)(dss + fa_swz<KB>(row + 8, n * 8 + 2 * tq)) = sa[n / 2][2 * (n & 1) + 1];
        }
        // (this warpgroup's half of the f32 tile has been read by its last bulk add: known to
        // all its threads past the barrier below)
        if (t128 == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        // both warpgroups' dS^T is in shared memory and visible to wgmma
        fa_proxy_fence();
        fa_bar_sync(1, 256);
        {
            // dq's columns 64 wq.. = dS k over the block's 128 keys, then dk += dS^T q
            float dqa[8][4];
            const unsigned ds_s = sbase + FA_WS_DS + s * 16384;
            fa_gm_fence();
#pragma unroll
            for (int c = 0; c < KB / 16; ++c)
                fa_gm_ss64t(dqa, fa_tdesc<KB>(ds_s, c), fa_tdesc<KB>(ka_s + wq * KB * 128, c), c);
            fa_gm_commit();
            fa_gm_pb<D>(dka, sa, qa_s);
            fa_gm_commit();
            // dv and dq are done; dk runs on while dq goes into this warpgroup's half of the f32
            // tile, which one bulk reduction then adds into the sums
            fa_gm_wait<1>();
            fa_gm_hold<D / 8>(dva);
            fa_gm_hold<8>(dqa);
            float4* dq4 = (float4*)(base + FA_WS_DQ);
#pragma unroll
            for (int n = 0; n < 8; ++n)
                dq4[(wq * 8 + n) * 128 + t128] = make_float4(dqa[n][0], dqa[n][1], dqa[n][2],
                                                            dqa[n][3]);
            fa_proxy_fence();
            if (wq == 0) fa_bar_sync(2, 128);
            else fa_bar_sync(3, 128);
            if (t128 == 0) {
                asm volatile(
                    "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], "
                    "%2;\n" ::"l"(dqg + (long)t * QT * D + wq * (QT * D / 2)),
                    "r"(sbase + FA_WS_DQ + wq * (QT * D * 2)), "n"(QT * D * 2)
                    : "memory");
                asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
            }
            fa_gm_wait<0>();
            fa_gm_hold<D / 8>(dka);
            // (q and dO of this stage are read: the producer may fill it again)
            fa_mbar_arrive(empty0 + 8 * s);
        }
    }
    if (t128 == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    fa_store_rows<D>(dkey, dka, ka, scale, scale, g, nk, 1, l, tq, gkb, gkk, gkl);
    fa_store_rows<D>(dval, dva, ka, 1.f, 1.f, g, nk, 1, l, tq, gvb, gvk, gvl);
}
#endif

// The forward's entry points: NAME runs the kernel named last (flash_fwd<D> or flash_fwd2<D,
// GM>) in blocks of BOUNDS.
#define FLASH_FWD(NAME, BOUNDS, ...)                                                           \
extern "C" __global__ void BOUNDS                                                              \
NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v,                \
     unsigned short* o, float* lse, int nk, int r, int l, long qb, long qk, long ql, long kb,  \
     long kk, long kl, long vb, long vk, long vl, long ob, long ok, long ol, float sl2) {      \
    __VA_ARGS__(q, k, v, o, lse, nk, r, l, qb, qk, ql, kb, kk, kl, vb, vk, vl, ob, ok, ol,     \
                sl2);                                                                          \
}
// The key/value backward's: NAME runs flash_bwd_dkdv<D, W, Q, GM> (W warps a block; Q: the query
// gradient too, into dqacc).
#define FLASH_DKDV(NAME, D, W, Q)                                                              \
extern "C" __global__ void __launch_bounds__(W * 32)                                           \
NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v,                \
     const unsigned short* dout, const float* lse, const float* delta, unsigned short* dkey,   \
     unsigned short* dval, float* dqacc, int nk, int r, int l, long qb, long qk, long ql,      \
     long kb, long kk, long kl, long vb, long vk, long vl, long db, long dk, long dl, long gkb, \
     long gkk, long gkl, long gvb, long gvk, long gvl, float sl2, float scale) {               \
    flash_bwd_dkdv<D, W, Q, FA_GM(D)>(q, k, v, dout, lse, delta, dkey, dval, dqacc, nk, r, l,  \
                                      qb, qk, ql, kb, kk, kl, vb, vk, vl, db, dk, dl, gkb,     \
                                      gkk, gkl, gvb, gvk, gvl, sl2, scale, blockIdx.y,         \
                                      blockIdx.x);                                             \
}
// Both backwards in one launch, for short sequences (where either alone leaves SMs idle), four
// warps a block, two blocks an SM: the key/value kernel's `nkv` blocks of each of the `groups`
// groups first, then the query side's, each side's blocks with the most work first across all
// groups (blockIdx.x = block * groups + group), so no heavy block waits for a free SM behind
// light ones. The same arithmetic as the two kernels, so the same bits.
#define FLASH_BOTH(D)                                                                          \
extern "C" __global__ void __launch_bounds__(128, 2)                                           \
flash_bwd_both_w4_d##D(const unsigned short* q, const unsigned short* k,                       \
                       const unsigned short* v, const unsigned short* dout, const float* lse,  \
                       const float* delta, unsigned short* dq, unsigned short* dkey,           \
                       unsigned short* dval, int nk, int r, int l, long qb, long qk, long ql,  \
                       long kb, long kk, long kl, long vb, long vk, long vl, long db, long dk, \
                       long dl, long gqb, long gqk, long gql, long gkb, long gkk, long gkl,    \
                       long gvb, long gvk, long gvl, float sl2, float scale, int nkv,          \
                       int groups) {                                                           \
    const int b = blockIdx.x, kvb = nkv * groups;                                              \
    if (b < kvb)                                                                               \
        flash_bwd_dkdv<D, 4, false, FA_GM(D)>(q, k, v, dout, lse, delta, dkey, dval, nullptr,  \
                                              nk, r, l, qb, qk, ql, kb, kk, kl, vb, vk, vl,    \
                                              db, dk, dl, gkb, gkk, gkl, gvb, gvk, gvl, sl2,   \
                                              scale, b % groups, b / groups);                  \
    else                                                                                       \
        flash_bwd_dq<D, 4, FA_GM(D)>(q, k, v, dout, lse, delta, dq, nk, r, l, qb, qk, ql, kb,  \
                                     kk, kl, vb, vk, vl, db, dk, dl, gqb, gqk, gql, sl2,       \
                                     scale, (b - kvb) % groups, (b - kvb) / groups,            \
                                     ((int)gridDim.x - kvb) / groups);                         \
}
#define FLASH(D)                                                                               \
FLASH_FWD(flash_fwd_d##D, __launch_bounds__(256), flash_fwd<D>)                                \
FLASH_FWD(flash_fwd2_d##D, __launch_bounds__(FA_FWD_WARPS * 32, 2), flash_fwd2<D, FA_GM(D)>)  \
extern "C" __global__ void __launch_bounds__(256)                                              \
flash_bwd_dq_d##D(const unsigned short* q, const unsigned short* k, const unsigned short* v,   \
                  const unsigned short* dout, const float* lse, const float* delta,            \
                  unsigned short* dq, int nk, int r, int l, long qb, long qk, long ql, long kb, \
                  long kk, long kl, long vb, long vk, long vl, long db, long dk, long dl,       \
                  long gb, long gk, long gl, float sl2, float scale) {                         \
    flash_bwd_dq<D, 8, FA_GM(D)>(q, k, v, dout, lse, delta, dq, nk, r, l, qb, qk, ql, kb, kk,  \
                                 kl, vb, vk, vl, db, dk, dl, gb, gk, gl, sl2, scale,           \
                                 blockIdx.y, blockIdx.x, gridDim.x);                           \
}                                                                                              \
FLASH_DKDV(flash_bwd_dkdv_d##D, D, 8, false)                                                   \
FLASH_DKDV(flash_bwd_dkdv_w4_d##D, D, 4, false)                                                \
FLASH_DKDV(flash_bwd_dkdvq_d##D, D, 8, true)                                                   \
FLASH_DKDV(flash_bwd_dkdvq_w4_d##D, D, 4, true)                                                \
FLASH_BOTH(D)
FLASH(32)
FLASH(64)
FLASH(128)
