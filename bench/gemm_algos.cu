// The GEMMs of a Qwen3-0.6B training step at T tokens (default 1,024: the seed's 4 x 256):
// cublasGemmEx's default algorithm (what src/cuda/gemm.rs calls) against each of cuBLASLt's
// heuristic candidates for the same product, each launched back to back REPS times and timed
// with events. A probe for bench/RESULTS.md, not part of ternlab. Build and run (CUDA toolkit
// with cuBLAS):
//   nvcc -O2 -arch=sm_90 -o gemm_algos bench/gemm_algos.cu -lcublasLt -lcublas
//   ./gemm_algos 1024; ./gemm_algos 16384
// Row-major C (m, n) = op(A) (m, k) op(B) (k, n), as gemm.rs states its products; "dW" products
// write f32, the others bf16.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <algorithm>
#include <vector>
#define CK(x) do { auto e = (x); if ((int)e) { printf("error %d at %s:%d\n", (int)e, __FILE__, __LINE__); exit(1);} } while (0)
struct Shape { int m, n, k; bool at, bt; bool f32out; const char* what; };
int main(int argc, char** argv) {
  int tokens = argc > 1 ? atoi(argv[1]) : 1024;
  const int REPS = 50;
  std::vector<Shape> shapes = {
    {tokens, 4096, 1024, false, true, false, "qkv fwd"},
    {tokens, 1024, 2048, false, true, false, "o fwd"},
    {tokens, 6144, 1024, false, true, false, "gate_up fwd"},
    {tokens, 1024, 3072, false, true, false, "down fwd"},
    {tokens, 1024, 4096, false, false, false, "qkv dx"},
    {tokens, 2048, 1024, false, false, false, "o dx"},
    {tokens, 1024, 6144, false, false, false, "gate_up dx"},
    {tokens, 3072, 1024, false, false, false, "down dx"},
    {4096, 1024, tokens, true, false, true, "qkv dW"},
    {1024, 2048, tokens, true, false, true, "o dW"},
    {6144, 1024, tokens, true, false, true, "gate_up dW"},
    {1024, 3072, tokens, true, false, true, "down dW"},
    {tokens, 151936, 1024, false, true, false, "head fwd"},
    {tokens, 1024, 151936, false, false, false, "head dx"},
    {151936, 1024, tokens, true, false, true, "head dW"},
  };
  cublasHandle_t h; CK(cublasCreate(&h));
  cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
  size_t ws_size = 64 << 20; void* ws; CK(cudaMalloc(&ws, ws_size));
  // operands sized for the largest product of each role
  size_t big = 0, out = 0;
  for (auto s : shapes) {
    big = std::max(big, std::max((size_t)s.m * s.k, (size_t)s.k * s.n) * 2);
    out = std::max(out, (size_t)s.m * s.n * 4);
  }
  void *A, *B, *C;
  CK(cudaMalloc(&A, big)); CK(cudaMalloc(&B, big)); CK(cudaMalloc(&C, out));
  CK(cudaMemset(A, 0, big)); CK(cudaMemset(B, 0, big));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  double tot_def = 0, tot_best = 0;
  for (auto s : shapes) {
    // row-major C(m,n) = op(A)(m,k) op(B)(k,n)  ==  column-major C^T(n,m) = op(B)^T op(A)^T
    cublasOperation_t opb = s.bt ? CUBLAS_OP_T : CUBLAS_OP_N, opa = s.at ? CUBLAS_OP_T : CUBLAS_OP_N;
    int ldb = s.bt ? s.k : s.n, lda = s.at ? s.m : s.k, ldc = s.n;
    cudaDataType_t ct = s.f32out ? CUDA_R_32F : CUDA_R_16BF;
    float alpha = 1, beta = 0;
    auto run_def = [&]() { CK(cublasGemmEx(h, opb, opa, s.n, s.m, s.k, &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C, ct, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)); };
    auto timeit = [&](auto f) { for (int i = 0; i < 5; i++) f(); cudaEventRecord(e0); for (int i = 0; i < REPS; i++) f(); cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); return ms * 1000 / REPS; };
    double t_def = timeit(run_def);
    cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opb, sizeof(opb)));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opa, sizeof(opa)));
    cublasLtMatrixLayout_t la, lb, lc;
    // Lt's "A" is our B^T side: rows/cols as stored (column-major)
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.bt ? s.k : s.n, s.bt ? s.n : s.k, ldb));
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.at ? s.m : s.k, s.at ? s.k : s.m, lda));
    CK(cublasLtMatrixLayoutCreate(&lc, ct, s.n, s.m, ldc));
    cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size, sizeof(ws_size)));
    cublasLtMatmulHeuristicResult_t res[32]; int n = 0;
    CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, res, &n));
    double best = 1e9; int bi = -1; double t0 = -1;
    for (int i = 0; i < n; i++) {
      auto f = [&]() { CK(cublasLtMatmul(lt, op, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &res[i].algo, ws, ws_size, 0)); };
      double t = timeit(f);
      if (i == 0) t0 = t;
      if (t < best) { best = t; bi = i; }
    }
    double fl = 2.0 * s.m * s.n * s.k;
    printf("%-12s %6dx%6dx%6d  default %7.1f us (%4.0f TF)  lt#0 %7.1f  best lt#%d/%d %7.1f us (%4.0f TF)  %+.1f%%\n", s.what, s.m, s.n, s.k, t_def, fl / t_def / 1e6, t0, bi, n, best, fl / best / 1e6, 100 * (best - t_def) / t_def);
    tot_def += t_def; tot_best += best < t_def ? best : t_def;
  }
  printf("sum of one layer's 12 products and the head's 3: default %.1f us, best of each %.1f us\n",
         tot_def, tot_best);
}
