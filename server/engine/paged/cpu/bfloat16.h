// bfloat16 for the native kernels: a 16-bit struct, scalar loads and stores (float32 arithmetic, round to
// nearest even on store, as torch does) and, with AVX-512, 16 lanes loaded as float32. Overloads for float
// and double let one template serve every dtype.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace native {

struct BF16 { uint16_t bits; };

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(BF16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, float x) { *p = x; }
inline void store(double* p, double x) { *p = x; }
inline void store(BF16* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) { p->bits = 0x7fc0; return; }  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  p->bits = uint16_t(u >> 16);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BF16* p) {  // bfloat16 -> float32 is a 16-bit shift
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

}  // namespace native
