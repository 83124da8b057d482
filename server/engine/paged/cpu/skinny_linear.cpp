// Linear layers for a few rows: out[m, n] = x[m, :] . weight[n, :] + bias[n] (which row counts of which dtype
// come here is skinny_linear.py's choice).
//
// A decode step of a few rows is bound by reading the weights. In float32, at 2 to 15 rows `aten::linear`
// packs the weight for every call and reads it about 1.7 times, and oneDNN's prepacked product is slower
// still there; in bfloat16 the prepacked product pays a fixed cost per call that dominates small weights.
// Here each pair of weight rows is read once, from memory, and multiplied with every input row (the inputs
// stay in L1); the sums run in float32 over 16 lanes and are then added across (another order than MKL's or
// oneDNN's: float32 results differ in the last bits, as between their own kernels for different row counts;
// bfloat16 ones are rounded once, at the end).
//
// Plain C ABI, called through ctypes (see native_build.py); OpenMP binds to the runtime torch loaded.
#include <cstdint>

#include "bfloat16.h"

namespace {

#if defined(__AVX512F__)
using native::BF16;
using native::load;
using native::load16;
using native::store;

constexpr int64_t kAhead = 4;  // weight rows prefetched ahead of the two being read (2 to 16 measured alike)

// Output columns n0 and n0 + 1 (two weight rows at once, so each input vector loaded serves both) for all
// M input rows; K is a multiple of 16.
template <typename T, int M>
inline void two_columns(const T* x, int64_t x_stride, const T* w0, const T* w1, int64_t K, T* out,
                        int64_t out_stride, int64_t n0, const T* bias, bool both) {
  __m512 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    // (past the last row near the end: a prefetch never faults)
    _mm_prefetch(reinterpret_cast<const char*>(w0 + kAhead * K + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + kAhead * K + k), _MM_HINT_T0);
    const __m512 v0 = load16(w0 + k), v1 = load16(w1 + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = load16(x + m * x_stride + k);
      a0[m] = _mm512_fmadd_ps(xv, v0, a0[m]);
      a1[m] = _mm512_fmadd_ps(xv, v1, a1[m]);
    }
  }
  const float b0 = bias ? load(bias[n0]) : 0.0f, b1 = bias && both ? load(bias[n0 + 1]) : 0.0f;
  for (int m = 0; m < M; ++m) {
    store(out + m * out_stride + n0, _mm512_reduce_add_ps(a0[m]) + b0);
    if (both) store(out + m * out_stride + n0 + 1, _mm512_reduce_add_ps(a1[m]) + b1);
  }
}

// Rows in groups of up to kGroup (2 x kGroup accumulators stay in registers); the two weight rows of a pair,
// read from memory by the first group, are in L1 for the others.
constexpr int kGroup = 8;

template <typename T, int R>
inline void group_of(const T* x, int64_t x_stride, const T* w0, const T* w1, int64_t K, T* out, int64_t N,
                     int64_t n, const T* bias, bool both, int64_t rows) {
  if constexpr (R > 1) {
    if (rows < R) return group_of<T, R - 1>(x, x_stride, w0, w1, K, out, N, n, bias, both, rows);
  }
  two_columns<T, R>(x, x_stride, w0, w1, K, out, N, n, bias, both);
}

template <typename T>
void rows_of(const T* x, int64_t x_stride, const T* w, const T* bias, T* out, int64_t M, int64_t N, int64_t K,
             int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t n = 0; n < N; n += 2) {
    const bool both = n + 1 < N;
    const T *w0 = w + n * K, *w1 = w + (both ? n + 1 : n) * K;
    for (int64_t m = 0; m < M; m += kGroup) {
      group_of<T, kGroup>(x + m * x_stride, x_stride, w0, w1, K, out + m * N, N, n, bias, both,
                          M - m < kGroup ? M - m : kGroup);
    }
  }
}

template <typename T>
int skinny_linear(const T* x, int64_t x_stride, const T* w, const T* bias, T* out, int64_t M, int64_t N,
                  int64_t K, int num_threads) {
  if (K % 16 != 0 || M < 1) return 1;
  rows_of<T>(x, x_stride, w, bias, out, M, N, K, num_threads);
  return 0;
}
#endif

}  // namespace

// Each returns 0 when done, 1 when this build or these sizes are not covered (the caller computes it
// otherwise). Which row counts take them is the caller's choice (skinny_linear.py).
#if defined(__AVX512F__)
#define SKINNY_LINEAR(NAME, T)                                                                                 \
  extern "C" int NAME(const void* x, int64_t x_stride, const void* w, const void* bias, void* out, int64_t M,  \
                      int64_t N, int64_t K, int num_threads) {                                                 \
    return skinny_linear<T>(static_cast<const T*>(x), x_stride, static_cast<const T*>(w),                     \
                            static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, num_threads);         \
  }
#else
#define SKINNY_LINEAR(NAME, T)                                                                                 \
  extern "C" int NAME(const void*, int64_t, const void*, const void*, void*, int64_t, int64_t, int64_t, int) { \
    return 1;                                                                                                  \
  }
#endif

SKINNY_LINEAR(skinny_linear_float32, float)
SKINNY_LINEAR(skinny_linear_bfloat16, native::BF16)
