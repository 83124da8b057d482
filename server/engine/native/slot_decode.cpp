// One layer of the slot engine's decode: store the step's new keys and values in the KV pool, then attend
// every decoding row's query over its own slot's first `position + 1` columns. A row that started from a
// task's cached virtual-token KV reads its first columns from that shared copy instead of its slot (the
// same values): rows of one task then share those reads in the cache, so the prefix is fetched from memory
// once per step, not once per row.
//
// Plain C ABI (called through ctypes; no torch headers, so it builds in about a second). Every tensor comes
// as a base pointer and element strides, so this file knows no layout: kv_pool.py passes its own strides.
// OpenMP symbols are left undefined and bind to the runtime torch already loaded (or the preloaded Intel
// one): one thread pool, never two.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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
inline void store(BF16* p, float x) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) { p->bits = 0x7fc0; return; }  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  p->bits = uint16_t(u >> 16);
}

struct Strides { int64_t a, b, c; };  // element strides of a 3-d view (the innermost stride is 1)

// Column w of one head of a decoding row: the first `num_shared` from the task's shared prefix copy
// (contiguous rows of d), the rest from the row's slot (token stride `stride`).
template <typename T>
struct Columns {
  const T* shared;
  int64_t num_shared, head_dim;
  const T* slot;
  int64_t stride;
  const T* at(int64_t w) const { return w < num_shared ? shared + w * head_dim : slot + w * stride; }
};

template <typename T, typename Acc>
void slot_decode(const T* query, Strides qs, const T* new_keys, const T* new_values, Strides ns,
                 T* keys, T* values, Strides ps, const int64_t* slots, const int64_t* positions,
                 const int64_t* prefix_keys, const int64_t* prefix_values, const int64_t* prefix_tokens,
                 int64_t layer, int64_t num_tokens, int64_t num_decode, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, double scale, T* out, Strides os, int num_threads) {
  // query [N, H, d] (qs: token, head); new_keys/values [N, KVH, d] (ns: token, head);
  // keys/values pool [slots, KVH, tokens, d] (ps: slot, head, token); out [N, H, d] (os: token, head);
  // per decoding row, prefix_keys/values: the address of a contiguous [layers, KVH, n, d] copy of its first
  // n = prefix_tokens columns (0 and 0: none).
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < num_tokens * num_kv_heads; ++item) {
      const int64_t t = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t at = slots[t] * ps.a + h * ps.b + positions[t] * ps.c;
      std::memcpy(keys + at, new_keys + t * ns.a + h * ns.b, head_dim * sizeof(T));
      std::memcpy(values + at, new_values + t * ns.a + h * ns.b, head_dim * sizeof(T));
    }  // implicit barrier: every row's own new key is in place before anyone attends
    const int64_t group = num_heads / num_kv_heads;
    std::vector<Acc> q(group * head_dim), acc(group * head_dim), scores, sums(group);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < num_decode * num_kv_heads; ++item) {
      const int64_t r = item / num_kv_heads, h = item % num_kv_heads, length = positions[r] + 1;
      const int64_t n = std::min(prefix_tokens[r], length);
      const int64_t shared_at = ((layer * num_kv_heads + h) * prefix_tokens[r]) * head_dim;
      const Columns<T> k{reinterpret_cast<const T*>(prefix_keys[r]) + shared_at, n, head_dim,
                         keys + slots[r] * ps.a + h * ps.b, ps.c};
      const Columns<T> v{reinterpret_cast<const T*>(prefix_values[r]) + shared_at, n, head_dim,
                         values + slots[r] * ps.a + h * ps.b, ps.c};
      for (int64_t g = 0; g < group; ++g) {
        const T* qr = query + r * qs.a + (h * group + g) * qs.b;
        for (int64_t i = 0; i < head_dim; ++i) q[g * head_dim + i] = Acc(load(qr[i])) * Acc(scale);
      }
      scores.resize(group * length);
      for (int64_t w = 0; w < length; ++w) {  // each key row is read once for the whole head group
        const T* kw = k.at(w);
        for (int64_t g = 0; g < group; ++g) {
          const Acc* qg = q.data() + g * head_dim;
          Acc s = 0;
          for (int64_t i = 0; i < head_dim; ++i) s += qg[i] * Acc(load(kw[i]));
          scores[g * length + w] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        Acc* sg = scores.data() + g * length;
        const Acc top = *std::max_element(sg, sg + length);
        Acc sum = 0;
        for (int64_t w = 0; w < length; ++w) sum += (sg[w] = std::exp(sg[w] - top));
        sums[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t w = 0; w < length; ++w) {
        const T* vw = v.at(w);
        for (int64_t g = 0; g < group; ++g) {
          const Acc p = scores[g * length + w];
          Acc* ag = acc.data() + g * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) ag[i] += p * Acc(load(vw[i]));
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + r * os.a + (h * group + g) * os.b;
        for (int64_t i = 0; i < head_dim; ++i) store(o + i, acc[g * head_dim + i] / sums[g]);
      }
    }
  }
}

}  // namespace

#define SLOT_DECODE(NAME, T, ACC)                                                                          \
  extern "C" void NAME(const void* query, const int64_t* qs, const void* new_keys, const void* new_values, \
                       const int64_t* ns, void* keys, void* values, const int64_t* ps, const int64_t* slots,   \
                       const int64_t* positions, const int64_t* prefix_keys, const int64_t* prefix_values,    \
                       const int64_t* prefix_tokens, int64_t layer,                                           \
                       int64_t num_tokens, int64_t num_decode, int64_t num_heads,                             \
                       int64_t num_kv_heads, int64_t head_dim, double scale, void* out, const int64_t* os,    \
                       int num_threads) {                                                                    \
    slot_decode<T, ACC>(static_cast<const T*>(query), {qs[0], qs[1], 0}, static_cast<const T*>(new_keys),    \
                        static_cast<const T*>(new_values), {ns[0], ns[1], 0}, static_cast<T*>(keys),         \
                        static_cast<T*>(values), {ps[0], ps[1], ps[2]}, slots, positions, prefix_keys,       \
                        prefix_values, prefix_tokens, layer, num_tokens,                                     \
                        num_decode, num_heads, num_kv_heads, head_dim, scale, static_cast<T*>(out),          \
                        {os[0], os[1], 0}, num_threads);                                                     \
  }

SLOT_DECODE(slot_decode_float32, float, float)
SLOT_DECODE(slot_decode_float64, double, double)
SLOT_DECODE(slot_decode_bfloat16, BF16, float)
