// One layer of the paged engine's attention on the CPU: store the step's new keys and values in their KV
// rows, then attend every decoding row's query over its own context, read in place through its block table
// (column w of a row is KV row `table[w / B] * B + w % B` of the layer). Rows of one task share the
// blocks of their common prefix, so those columns are fetched from memory once per step for all of them.
//
// Plain C ABI (called through ctypes; no torch headers, so it builds in about a second). Every tensor comes
// as a base pointer and element strides, so this file knows no layout but the block arithmetic:
// kv_memory.py passes its own strides. OpenMP symbols are left undefined and bind to the runtime torch
// already loaded (or the preloaded Intel one): one thread pool, never two.
//
// Two attention variants, per layer: a sliding window (a row at position p reads only positions
// p - window + 1 .. p, itself included: transformers' `kv_idx > q_idx - sliding_window`; 0 = none) and
// logit soft-capping (scores = softcap * tanh(scores / softcap) before the softmax, as Gemma 2; 0 = none).
//
// Two ways to attend one (row, kv head): `attend_vector` with AVX-512 (float32 and bfloat16, head_dim a
// multiple of 16), and `attend_scalar` for everything else (float64, other machines, odd head sizes). The
// vector one is bound by memory latency, not arithmetic, so it prefetches the columns it reads next.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bfloat16.h"
#include "float_math.h"
#if defined(__AVX512F__) || defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

using native::BF16;
using native::FlushDenormals;
using native::load;
using native::store;

struct Strides { int64_t a, b, c; };  // element strides of a 3-d view (the innermost stride is 1)

// Column w of one head of a decoding row, counted from its first read position `first` (0 without a
// window): KV row `table[p >> shift] << shift | (p & mask)` for p = first + w (blocks of 2^shift tokens),
// `stride` elements apart.
template <typename T>
struct Columns {
  const T* base;  // the layer's keys (or values) of this head
  const int64_t* table;  // the row's block table
  int64_t shift, mask, stride, first;
  const T* at(int64_t w) const {
    const int64_t p = first + w;
    return base + ((table[p >> shift] << shift) | (p & mask)) * stride;
  }
};

// One (row, kv head): its `group` query heads `q` (scaled, Acc) over `length` columns, into `out` rows;
// scores soft-capped when `softcap` > 0.
template <typename T, typename Acc>
struct Work {
  const Columns<T> k, v;
  int64_t length, group, head_dim;
  T* out;
  int64_t out_stride;  // between the group's query heads
  Acc softcap;
};

// scores[0 .. n) = softcap * tanh(scores / softcap)
template <typename Acc>
void soft_cap(Acc* scores, int64_t n, Acc softcap) {
  for (int64_t w = 0; w < n; ++w) scores[w] = softcap * std::tanh(scores[w] / softcap);
}

template <typename T, typename Acc>
void attend_scalar(const Work<T, Acc>& job, const Acc* q, std::vector<Acc>& scores, std::vector<Acc>& acc) {
  const int64_t length = job.length, group = job.group, d = job.head_dim;
  scores.resize(group * length);
  acc.assign(group * d, Acc(0));
  std::vector<Acc> sums(group);
  for (int64_t w = 0; w < length; ++w) {  // each key row is read once for the whole head group
    const T* kw = job.k.at(w);
    for (int64_t g = 0; g < group; ++g) {
      Acc s = 0;
      for (int64_t i = 0; i < d; ++i) s += q[g * d + i] * Acc(load(kw[i]));
      scores[g * length + w] = s;
    }
  }
  if (job.softcap > 0) soft_cap(scores.data(), group * length, job.softcap);
  for (int64_t g = 0; g < group; ++g) {
    Acc* sg = scores.data() + g * length;
    const Acc top = *std::max_element(sg, sg + length);
    Acc sum = 0;
    for (int64_t w = 0; w < length; ++w) sum += (sg[w] = std::exp(sg[w] - top));
    sums[g] = sum;
  }
  for (int64_t w = 0; w < length; ++w) {
    const T* vw = job.v.at(w);
    for (int64_t g = 0; g < group; ++g) {
      const Acc p = scores[g * length + w];
      for (int64_t i = 0; i < d; ++i) acc[g * d + i] += p * Acc(load(vw[i]));
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) store(job.out + g * job.out_stride + i, acc[g * d + i] / sums[g]);
}

#if defined(__AVX512F__)
using native::exp16;
using native::load16;

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(static_cast<const char*>(p) + at, _MM_HINT_T0);
}

// NV = head_dim / 16 vectors per head row, known at compile time so that a row stays in registers.
template <typename T, int NV>
void attend_vector(const Work<T, float>& job, const float* q, std::vector<float>& scores,
                   std::vector<float>& inverse) {
  constexpr int64_t kAhead = 8;  // columns prefetched ahead (4 to 64 measured alike)
  constexpr int64_t kRowBytes = NV * 16 * sizeof(T);
  const int64_t length = job.length, group = job.group, d = NV * 16;
  const int64_t padded = (length + 15) & ~int64_t(15);
  scores.resize(group * padded);
  for (int64_t w = 0; w < length; ++w) {
    if (w + kAhead < length) prefetch(job.k.at(w + kAhead), kRowBytes);
    prefetch(job.v.at(w), kRowBytes);  // the values are read next: start fetching them now
    const T* kw = job.k.at(w);
    __m512 key[NV];
    for (int j = 0; j < NV; ++j) key[j] = load16(kw + 16 * j);
    for (int64_t g = 0; g < group; ++g) {
      __m512 s = _mm512_mul_ps(_mm512_loadu_ps(q + g * d), key[0]);
      for (int j = 1; j < NV; ++j) s = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + 16 * j), key[j], s);
      scores[g * padded + w] = _mm512_reduce_add_ps(s);
    }
  }
  inverse.resize(group);  // 1 / each query head's softmax denominator
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores.data() + g * padded;
    if (job.softcap > 0) soft_cap(sg, length, job.softcap);
    const __mmask16 tail = __mmask16((1u << (length & 15)) - 1u);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t w = 0; w + 16 <= length; w += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sg + w));
    if (tail) top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, sg + (length & ~15)));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t w = 0; w < padded; w += 16) {
      const __mmask16 m = w + 16 <= length ? __mmask16(0xffff) : tail;
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + w), max));
      _mm512_mask_storeu_ps(sg + w, m, e);
      sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    inverse[g] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
    const float* sg = scores.data() + g * padded;
    for (int64_t w = 0; w < length; ++w) {
      const T* vw = job.v.at(w);
      const __m512 p = _mm512_set1_ps(sg[w]);
      for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(p, load16(vw + 16 * j), acc[j]);
    }
    float row[16 * NV];
    const __m512 scale = _mm512_set1_ps(inverse[g]);
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(row + 16 * j, _mm512_mul_ps(acc[j], scale));
    for (int64_t i = 0; i < d; ++i) store(job.out + g * job.out_stride + i, row[i]);
  }
}

template <typename T>
bool attend_fast(const Work<T, float>& job, const float* q, std::vector<float>& scores,
                 std::vector<float>& scratch) {
  switch (job.head_dim) {
#define HEAD_DIM_CASE(NV) \
  case 16 * NV: attend_vector<T, NV>(job, q, scores, scratch); return true;
    HEAD_DIM_CASE(1) HEAD_DIM_CASE(2) HEAD_DIM_CASE(3) HEAD_DIM_CASE(4) HEAD_DIM_CASE(5) HEAD_DIM_CASE(6)
    HEAD_DIM_CASE(7) HEAD_DIM_CASE(8) HEAD_DIM_CASE(10) HEAD_DIM_CASE(12) HEAD_DIM_CASE(16)
#undef HEAD_DIM_CASE
    default: return false;  // other sizes take attend_scalar
  }
}
#endif

template <typename T, typename Acc>
bool attend_fast(const Work<T, Acc>&, const Acc*, std::vector<Acc>&, std::vector<Acc>&) { return false; }

template <typename T, typename Acc>
void paged_decode(const T* query, Strides qs, const T* new_keys, Strides ks, const T* new_values, Strides vs,
                  T* keys, T* values, Strides ps, const int64_t* write_rows, const int64_t* tables,
                  int64_t max_blocks, int64_t block_shift, const int64_t* lengths, int64_t num_tokens,
                  int64_t num_decode, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                  int64_t window, double softcap, T* out, Strides os, int num_threads) {
  // query [N, H, d] (qs: token, head); new_keys/values [N, KVH, d] (ks/vs: token, head; each its own: a
  // model may hand over keys made by a concatenation and values sliced from a fused projection);
  // keys/values: this layer's [KVH, rows, d] (ps: head, row); write_rows [N]: where token t goes;
  // tables [num_decode, max_blocks] and lengths [num_decode]: the decoding rows (the step's first tokens);
  // out [N, H, d] (os: token, head); window (0: none) and softcap (0: none): the layer's variants.
#pragma omp parallel num_threads(num_threads)
  {
    const FlushDenormals flush;  // this thread's, until the region ends
#pragma omp for schedule(static)
    for (int64_t item = 0; item < num_tokens * num_kv_heads; ++item) {
      const int64_t t = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t at = h * ps.a + write_rows[t] * ps.b;
      std::memcpy(keys + at, new_keys + t * ks.a + h * ks.b, head_dim * sizeof(T));
      std::memcpy(values + at, new_values + t * vs.a + h * vs.b, head_dim * sizeof(T));
    }  // implicit barrier: every row's own new key is in place before anyone attends
    const int64_t group = num_heads / num_kv_heads, mask = (int64_t(1) << block_shift) - 1;
    std::vector<Acc> q(group * head_dim), scores, acc;
    // Rows differ in length by 100x and more (a long prompt's row beside short ones): handed out one at a
    // time, the items keep every thread busy to the end (in even static shares, one thread took every
    // long row and the step waited for it).
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_decode * num_kv_heads; ++item) {
      const int64_t r = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t* table = tables + r * max_blocks;
      const int64_t first = window > 0 ? std::max<int64_t>(0, lengths[r] - window) : 0;
      const Work<T, Acc> job{{keys + h * ps.a, table, block_shift, mask, ps.b, first},
                             {values + h * ps.a, table, block_shift, mask, ps.b, first},
                             lengths[r] - first, group, head_dim, out + r * os.a + h * group * os.b, os.b,
                             Acc(softcap)};
      for (int64_t g = 0; g < group; ++g) {
        const T* qr = query + r * qs.a + (h * group + g) * qs.b;
        for (int64_t i = 0; i < head_dim; ++i) q[g * head_dim + i] = Acc(load(qr[i])) * Acc(scale);
      }
      if (!attend_fast(job, q.data(), scores, acc)) attend_scalar(job, q.data(), scores, acc);
    }
  }
}

}  // namespace

#define PAGED_DECODE(NAME, T, ACC)                                                                         \
  extern "C" void NAME(const void* query, const int64_t* qs, const void* new_keys, const int64_t* ks,      \
                       const void* new_values, const int64_t* vs, void* keys, void* values,                 \
                       const int64_t* ps, const int64_t* write_rows, const int64_t* tables,                 \
                       int64_t max_blocks, int64_t block_shift, const int64_t* lengths, int64_t num_tokens, \
                       int64_t num_decode, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,       \
                       double scale, int64_t window, double softcap, void* out, const int64_t* os,          \
                       int num_threads) {                                                                   \
    paged_decode<T, ACC>(static_cast<const T*>(query), {qs[0], qs[1], 0}, static_cast<const T*>(new_keys),   \
                         {ks[0], ks[1], 0}, static_cast<const T*>(new_values), {vs[0], vs[1], 0},            \
                         static_cast<T*>(keys), static_cast<T*>(values), {ps[0], ps[1], 0}, write_rows,      \
                         tables, max_blocks, block_shift, lengths, num_tokens, num_decode, num_heads,        \
                         num_kv_heads, head_dim, scale, window, softcap, static_cast<T*>(out),               \
                         {os[0], os[1], 0},                                                                  \
                         num_threads);                                                                       \
  }

PAGED_DECODE(paged_decode_float32, float, float)
PAGED_DECODE(paged_decode_float64, double, double)
PAGED_DECODE(paged_decode_bfloat16, BF16, float)
