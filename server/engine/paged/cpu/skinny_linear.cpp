// A float32 linear layer for a few rows (2 to 15): out[m, n] = x[m, :] . weight[n, :] + bias[n].
//
// A decode step of a few rows is bound by reading the weights: one row reads each weight once (a matrix-
// vector product), but at 2 to 15 rows `aten::linear` packs the weight for every call and reads it about
// 1.7 times, and oneDNN's prepacked product is slower still there (SmolLM2-135M's 211 weights at 4 rows:
// 29 and 32 ms against 17 ms for one row). Here every weight row is read once, from memory, for all the
// input rows, which stay in L1; the sums run over 16 lanes and are then added across (another order than
// MKL's: float32 results differ in the last bits, as between MKL's own kernels for different row counts).
//
// Plain C ABI, called through ctypes (see native_build.py); OpenMP binds to the runtime torch loaded.
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int64_t kAhead = 4;  // weight rows prefetched ahead of the two being read (2 to 16 measured alike)

// Output columns n0 and n0 + 1 (two weight rows at once, so each input vector loaded serves both) for all
// M input rows; K is a multiple of 16.
template <int M>
inline void two_columns(const float* x, int64_t x_stride, const float* w0, const float* w1, int64_t K,
                        float* out, int64_t out_stride, int64_t n0, const float* bias, bool both) {
  __m512 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    // (past the last row near the end: a prefetch never faults)
    _mm_prefetch(reinterpret_cast<const char*>(w0 + kAhead * K + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + kAhead * K + k), _MM_HINT_T0);
    const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * x_stride + k);
      a0[m] = _mm512_fmadd_ps(xv, v0, a0[m]);
      a1[m] = _mm512_fmadd_ps(xv, v1, a1[m]);
    }
  }
  const float b0 = bias ? bias[n0] : 0.0f, b1 = bias && both ? bias[n0 + 1] : 0.0f;
  for (int m = 0; m < M; ++m) {
    out[m * out_stride + n0] = _mm512_reduce_add_ps(a0[m]) + b0;
    if (both) out[m * out_stride + n0 + 1] = _mm512_reduce_add_ps(a1[m]) + b1;
  }
}

template <int M>
void rows_of(const float* x, int64_t x_stride, const float* w, const float* bias, float* out, int64_t N,
             int64_t K, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t n = 0; n < N; n += 2) {
    const bool both = n + 1 < N;
    two_columns<M>(x, x_stride, w + n * K, w + (both ? n + 1 : n) * K, K, out, N, n, bias, both);
  }
}
#endif

}  // namespace

// Returns 0 when done, 1 when this build or these sizes are not covered (the caller computes it otherwise).
extern "C" int skinny_linear_float32(const float* x, int64_t x_stride, const float* w, const float* bias,
                                     float* out, int64_t M, int64_t N, int64_t K, int num_threads) {
#if defined(__AVX512F__)
  if (K % 16 != 0) return 1;
  switch (M) {
#define ROWS_CASE(R) \
  case R: rows_of<R>(x, x_stride, w, bias, out, N, K, num_threads); return 0;
    ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9)
    ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12) ROWS_CASE(13) ROWS_CASE(14) ROWS_CASE(15)
#undef ROWS_CASE
    default: return 1;
  }
#else
  (void)x; (void)x_stride; (void)w; (void)bias; (void)out; (void)M; (void)N; (void)K; (void)num_threads;
  return 1;
#endif
}
