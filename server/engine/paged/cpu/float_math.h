// Numerics shared by the native attention kernels: denormals flushed while a kernel runs, and e^x on 16
// float32 lanes (AVX-512).
#pragma once
#if defined(__AVX512F__) || defined(__SSE__)
#include <immintrin.h>
#endif

namespace native {

// Denormal floats as zero, in and out, while an object lives (the thread's MXCSR; restored after). A long
// context's softmax has many weights below 1e-38 (scores 88 to 104 below the row's maximum): as denormals,
// every product with one took a microcode assist, and a 9,000-position row's attention ran 2.3x slower in
// the engine than on random data. Such weights add under 1e-34 to sums of at least 1, so results keep
// their float32 value.
struct FlushDenormals {
#if defined(__SSE__)
  const unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // flush-to-zero (bit 15) and denormals-are-zero (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#if defined(__AVX512F__)
// e^x for x <= 0 (scores minus their maximum), within about 1 float32 ulp: x = n ln2 + r, |r| <= ln2/2,
// e^r by its Taylor series to r^7 (relative error below 1e-8), times 2^n by scalef (which also underflows
// gracefully).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is 0 in float32
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace native
