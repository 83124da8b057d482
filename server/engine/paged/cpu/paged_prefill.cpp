// One prefill chunk's attention on the CPU: query positions start .. start + T - 1 of one request, each over
// the request's context up to itself (every cached position, and causally the chunk's own), read in place
// from the layer's KV rows through the runs of its blocks. The step has written the chunk's own keys and
// values there already.
//
// Flash attention's structure (tiles of keys; per query row a running maximum, sum and output), laid out
// for AVX-512 so that nothing is transposed and nothing is reduced across lanes: a work item is one KV head
// and up to 64 query rows (consecutive positions x the head's query heads), whose queries are packed once
// as [head_dim][64]. Scores are computed keys x rows: each key element is one broadcast against up to 4
// vectors of 16 rows (a short chunk's items compute only the vectors they fill), the softmax's maximum and
// sum run down a tile's keys a vector of rows at a time, and the causal mask is one compare per key. The
// output rows then take the tile's values, each key's row of values a few vectors, with the weights
// broadcast. On the 2-core Xeon this was written on, a 512-token chunk over 9,000 positions ran at about
// 260 GFLOP/s in float32, torch's CPU flash attention at about 210 (docs/benchmarks.md).
//
// Plain C ABI through ctypes, as paged_decode.cpp (same conventions: element strides, OpenMP bound to torch's
// runtime). float32 only: in bfloat16, torch's flash attention runs on AMX tiles, 2.6x faster than this
// kernel (measured 549 against 214 GFLOP/s). head_dim 16 to 128 in steps of 16, 160, 192 or 256, with AVX-512;
// `paged_prefill_covers` says whether a call would be served, and the caller keeps SDPA otherwise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bfloat16.h"  // load16, and the scalar load/store every dtype shares
#include "float_math.h"

namespace {

using native::FlushDenormals;
using native::load;
using native::store;

struct Strides { int64_t a, b; };  // element strides of the two outer dims of a 3-d view (innermost: 1)

constexpr int kRowVectors = 4;  // query rows of a work item, in vectors of 16
constexpr int64_t kRows = 16 * kRowVectors;
constexpr int64_t kKeys = 64;  // keys of a tile

// Keys at context positions [position, position + count), in KV rows from `row` on (one run of blocks).
struct Tile { int64_t row, position, count; };

// Positions 0 .. end - 1 of a context whose blocks make `num_runs` runs (first row, length) as tiles of at most
// kKeys keys, none across two runs.
std::vector<Tile> tiles_of(const int64_t* runs, int64_t num_runs, int64_t end) {
  std::vector<Tile> tiles;
  int64_t position = 0;
  for (int64_t i = 0; i < num_runs && position < end; ++i) {
    const int64_t first = runs[2 * i], length = std::min(runs[2 * i + 1], end - position);
    for (int64_t at = 0; at < length; at += kKeys)
      tiles.push_back({first + at, position + at, std::min(kKeys, length - at)});
    position += length;
  }
  return tiles;
}

#if defined(__AVX512F__)
using native::exp16;
using native::load16;

// Per-thread buffers of a work item, reused across items.
struct Scratch {
  std::vector<float> queries;  // [d][kRows], scaled
  std::vector<float> weights;  // [kKeys + 16][kRows]: a tile's scores, then its softmax weights
  std::vector<float> out;  // [kRows + row group][d], unnormalized
};

// One KV head `h`, `heads` of its query heads from its `first_head`-th on, and chunk positions [i0, i1): rows
// r = (i - i0) * heads + g, for query head h * group + first_head + g; RV = vectors of 16 rows needed.
template <typename T, int NV, int RV>
void attend_item(const T* query, Strides qs, const T* keys, const T* values, int64_t row_stride,
                 const std::vector<Tile>& tiles, int64_t start, int64_t i0, int64_t i1, int64_t h, int64_t group,
                 int64_t first_head, int64_t heads, float scale, T* out, Strides os, Scratch& s) {
  constexpr int64_t d = 16 * NV;
  constexpr int kKeyGroup = 16 / RV;  // keys scored at once: 16 accumulators, whatever the rows
  constexpr int kRowGroup = NV <= 4 ? 4 : NV <= 8 ? 2 : 1;  // output rows updated at once (<= 16 accumulators)
  const int64_t rows = (i1 - i0) * heads;
  s.queries.assign(d * kRows, 0.0f);
  s.weights.resize((kKeys + 16) * kRows);
  s.out.assign((kRows + kRowGroup) * d, 0.0f);  // a last row group may run past `rows`
  float* qt = s.queries.data();
  float* w = s.weights.data();
  float* o = s.out.data();
  alignas(64) int32_t position[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t i = i0 + std::min(r, rows - 1) / heads;  // padding rows: the last one's position
    position[r] = int32_t(start + i);
    if (r >= rows) continue;
    const T* q = query + i * qs.a + (h * group + first_head + r % heads) * qs.b;
    for (int64_t j = 0; j < d; ++j) qt[j * kRows + r] = load(q[j]) * scale;
  }
  const int64_t first = start + i0, last = start + i1 - 1;
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  __m512 top[RV], sum[RV];  // per row: the running maximum score and sum of weights
  __m512i where[RV];
  for (int v = 0; v < RV; ++v) {
    top[v] = minus_inf;
    sum[v] = _mm512_setzero_ps();
    where[v] = _mm512_load_si512(position + 16 * v);
  }
  for (const Tile& t : tiles) {
    if (t.position > last) break;
    const T* k = keys + t.row * row_stride;
    const T* val = values + t.row * row_stride;
    const bool visible = t.position + t.count - 1 <= first;  // every row sees every key of the tile
    // Scores w[c][r] = q_r . k_c, -inf where key c is after row r's position, and the tile's maximum per row.
    __m512 now[RV];
    for (int v = 0; v < RV; ++v) now[v] = top[v];
    for (int64_t c = 0; c < t.count; c += kKeyGroup) {
      const T* kc[kKeyGroup];  // a tail group re-reads the tile's last key; its scores are not used
      for (int u = 0; u < kKeyGroup; ++u) kc[u] = k + std::min<int64_t>(c + u, t.count - 1) * row_stride;
      __m512 acc[kKeyGroup][RV];
      for (int u = 0; u < kKeyGroup; ++u)
        for (int v = 0; v < RV; ++v) acc[u][v] = _mm512_setzero_ps();
      for (int64_t j = 0; j < d; ++j) {
        __m512 q[RV];
        for (int v = 0; v < RV; ++v) q[v] = _mm512_loadu_ps(qt + j * kRows + 16 * v);
        for (int u = 0; u < kKeyGroup; ++u) {
          const __m512 kb = _mm512_set1_ps(load(kc[u][j]));
          for (int v = 0; v < RV; ++v) acc[u][v] = _mm512_fmadd_ps(q[v], kb, acc[u][v]);
        }
      }
      for (int u = 0; u < kKeyGroup && c + u < t.count; ++u)
        for (int v = 0; v < RV; ++v) {
          __m512 score = acc[u][v];
          if (!visible) {
            const __mmask16 sees = _mm512_cmple_epi32_mask(_mm512_set1_epi32(int32_t(t.position + c + u)), where[v]);
            score = _mm512_mask_blend_ps(sees, minus_inf, score);
          }
          _mm512_storeu_ps(w + (c + u) * kRows + 16 * v, score);
          now[v] = _mm512_max_ps(now[v], score);
        }
    }
    // Softmax, online: a row's new maximum rescales what it has summed so far by e^(old - new). Rows that see
    // no key yet keep -inf: their factor is 1 and their weights 0 (no NaN from -inf - -inf).
    alignas(64) float rescale[kRows + 16];
    for (int v = 0; v < RV; ++v) {
      const __mmask16 seen = _mm512_cmp_ps_mask(now[v], minus_inf, _CMP_NEQ_OQ);
      const __m512 factor = _mm512_mask_blend_ps(seen, _mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(top[v], now[v])));
      __m512 added = _mm512_setzero_ps();
      for (int64_t c = 0; c < t.count; ++c) {
        const __m512 score = _mm512_loadu_ps(w + c * kRows + 16 * v);
        __m512 p = exp16(_mm512_sub_ps(score, now[v]));
        if (!visible) p = _mm512_maskz_mov_ps(seen & _mm512_cmp_ps_mask(score, minus_inf, _CMP_NEQ_OQ), p);
        _mm512_storeu_ps(w + c * kRows + 16 * v, p);
        added = _mm512_add_ps(added, p);
      }
      sum[v] = _mm512_fmadd_ps(sum[v], factor, added);
      top[v] = now[v];
      _mm512_store_ps(rescale + 16 * v, factor);
    }
    // Output rows: o_r = o_r * factor_r + sum_c w[c][r] v_c.
    for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
      __m512 acc[kRowGroup][NV];
      for (int g = 0; g < kRowGroup; ++g) {
        const __m512 f = _mm512_set1_ps(rescale[r0 + g]);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_mul_ps(_mm512_loadu_ps(o + (r0 + g) * d + 16 * j), f);
      }
      for (int64_t c = 0; c < t.count; ++c) {
        const T* vc = val + c * row_stride;
        __m512 vv[NV];
        for (int j = 0; j < NV; ++j) vv[j] = load16(vc + 16 * j);
        for (int g = 0; g < kRowGroup; ++g) {
          const __m512 p = _mm512_set1_ps(w[c * kRows + r0 + g]);
          for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);
        }
      }
      for (int g = 0; g < kRowGroup; ++g)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + (r0 + g) * d + 16 * j, acc[g][j]);
    }
  }
  alignas(64) float total[16 * RV];
  for (int v = 0; v < RV; ++v) _mm512_store_ps(total + 16 * v, sum[v]);
  for (int64_t r = 0; r < rows; ++r) {
    const float inverse = 1.0f / total[r];
    T* dst = out + (i0 + r / heads) * os.a + (h * group + first_head + r % heads) * os.b;
    for (int64_t j = 0; j < d; ++j) store(dst + j, o[r * d + j] * inverse);
  }
}

template <typename T>
using ItemFn = void (*)(const T*, Strides, const T*, const T*, int64_t, const std::vector<Tile>&, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, T*, Strides, Scratch&);

// The work item's code for 16 * rv rows (rv = 1..kRowVectors) of head size `head_dim`; nullptr if none.
template <typename T>
ItemFn<T> item_for(int64_t head_dim, int64_t rv) {
  switch (head_dim * 8 + rv) {
#define ITEM_CASE(NV, RV) \
  case 16 * NV * 8 + RV: return attend_item<T, NV, RV>;
#define HEAD_DIM_CASE(NV) ITEM_CASE(NV, 1) ITEM_CASE(NV, 2) ITEM_CASE(NV, 3) ITEM_CASE(NV, 4)
    HEAD_DIM_CASE(1) HEAD_DIM_CASE(2) HEAD_DIM_CASE(3) HEAD_DIM_CASE(4) HEAD_DIM_CASE(5) HEAD_DIM_CASE(6)
    HEAD_DIM_CASE(7) HEAD_DIM_CASE(8) HEAD_DIM_CASE(10) HEAD_DIM_CASE(12) HEAD_DIM_CASE(16)
#undef HEAD_DIM_CASE
#undef ITEM_CASE
    default: return nullptr;
  }
}

template <typename T>
int paged_prefill(const T* query, Strides qs, const T* keys, const T* values, Strides ps, const int64_t* runs,
                  int64_t num_runs, int64_t start, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                  int64_t head_dim, double scale, T* out, Strides os, int num_threads) {
  // query [T, H, d] (qs: token, head); keys/values: the layer's [KVH, rows, d] (ps: head, row); runs
  // [num_runs, 2]: the request's blocks as runs (first row, positions), covering at least start + T
  // positions; out [T, H, d] (os: token, head).
  // A work item: one KV head, up to kRows / heads positions of `heads` of its query heads (all of them
  // unless a head group is wider than a work item). A short chunk's items compute only the rows it has.
  const int64_t group = num_heads / num_kv_heads, heads = std::min(group, kRows);
  const int64_t subgroups = (group + heads - 1) / heads, span = std::min(kRows / heads, num_tokens);
  const ItemFn<T> attend = item_for<T>(head_dim, (span * heads + 15) / 16);
  if (attend == nullptr) return 0;
  const std::vector<Tile> tiles = tiles_of(runs, num_runs, start + num_tokens);
  const int64_t num_spans = (num_tokens + span - 1) / span, per_span = num_kv_heads * subgroups;
#pragma omp parallel num_threads(num_threads)
  {
    const FlushDenormals flush;
    Scratch scratch;
    // The last positions see the most keys: handed out first, one at a time, so the threads finish together.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_spans * per_span; ++item) {
      const int64_t i0 = (num_spans - 1 - item / per_span) * span;
      const int64_t h = item % per_span / subgroups, first_head = item % subgroups * heads;
      attend(query, qs, keys + h * ps.a, values + h * ps.a, ps.b, tiles, start, i0,
             std::min(i0 + span, num_tokens), h, group, first_head, std::min(heads, group - first_head),
             float(scale), out, os, scratch);
    }
  }
  return 1;
}
#else
template <typename T>
int paged_prefill(const T*, Strides, const T*, const T*, Strides, const int64_t*, int64_t, int64_t, int64_t,
                  int64_t, int64_t, int64_t, double, T*, Strides, int) {
  return 0;  // no AVX-512: SDPA serves the chunk
}
#endif

}  // namespace

extern "C" int paged_prefill_covers(int64_t head_dim) {
#if defined(__AVX512F__)
  return item_for<float>(head_dim, 1) != nullptr;
#else
  (void)head_dim;
  return 0;
#endif
}

#define PAGED_PREFILL(NAME, T)                                                                               \
  extern "C" int NAME(const void* query, const int64_t* qs, const void* keys, const void* values,            \
                      const int64_t* ps, const int64_t* runs, int64_t num_runs, int64_t start,                \
                      int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,          \
                      double scale, void* out, const int64_t* os, int num_threads) {                           \
    return paged_prefill<T>(static_cast<const T*>(query), {qs[0], qs[1]}, static_cast<const T*>(keys),       \
                            static_cast<const T*>(values), {ps[0], ps[1]}, runs, num_runs, start, num_tokens, \
                            num_heads, num_kv_heads, head_dim, scale, static_cast<T*>(out), {os[0], os[1]},   \
                            num_threads);                                                                     \
  }

PAGED_PREFILL(paged_prefill_float32, float)
