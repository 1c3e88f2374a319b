// Exact per-row top-m selection for codebook search (codebook_features.kernels).
//
// Each row of a (rows, C) score matrix (float32, or bfloat16 bit patterns as int16 in signed
// order) gets its m largest values, best first (ties: lower index first), and their indices.
//
// Per row: (1) vertical maxima over >= 4m interleaved lanes (one SIMD max per vector);
// (2) thr = the m-th largest lane maximum: the lanes are disjoint, so at least m values are
// >= thr, and thr is <= the row's m-th largest value; (3) one SIMD compare pass collects every
// value >= thr (usually a few more than m); (4) the m best of those, sorted. Rows too short
// for lanes, or m too large, are selected directly. Every entry point works on rows
// [r0, r1), so that the caller can split the rows over threads (no OpenMP runtime here).
#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CBF_AVX512 1
#else
#define CBF_AVX512 0
#endif

namespace {

constexpr int kAcc = 4;  // independent accumulators (instruction-level parallelism)

#if CBF_AVX512
struct F32 {
  using T = float;
  using V = __m512;
  static constexpr int W = 16;
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V set1(T v) { return _mm512_set1_ps(v); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
  static uint64_t ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static uint64_t gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static V blend(uint64_t k, V a, V b) { return _mm512_mask_mov_ps(a, __mmask16(k), b); }
  // Vector counters per lane (which vector a lane's best came from).
  static __m512i iters(int64_t i) { return _mm512_set1_epi32(int32_t(i)); }
  static __m512i pick(uint64_t k, __m512i a, __m512i b) { return _mm512_mask_mov_epi32(a, __mmask16(k), b); }
  static void store_iters(int64_t* out, __m512i v) {
    alignas(64) int32_t t[16];
    _mm512_store_si512(t, v);
    for (int l = 0; l < 16; ++l) out[l] = t[l];
  }
  static constexpr int64_t kMaxIters = int64_t(1) << 31;
};
struct I16 {
  using T = int16_t;
  using V = __m512i;
  static constexpr int W = 32;
  static V load(const T* p) { return _mm512_loadu_si512(p); }
  static V max(V a, V b) { return _mm512_max_epi16(a, b); }
  static V set1(T v) { return _mm512_set1_epi16(v); }
  static void store(T* p, V v) { _mm512_storeu_si512(p, v); }
  static uint64_t ge(V a, V b) { return _mm512_cmpge_epi16_mask(a, b); }
  static uint64_t gt(V a, V b) { return _mm512_cmpgt_epi16_mask(a, b); }
  static V blend(uint64_t k, V a, V b) { return _mm512_mask_mov_epi16(a, __mmask32(k), b); }
  static __m512i iters(int64_t i) { return _mm512_set1_epi16(int16_t(i)); }
  static __m512i pick(uint64_t k, __m512i a, __m512i b) { return _mm512_mask_mov_epi16(a, __mmask32(k), b); }
  static void store_iters(int64_t* out, __m512i v) {
    alignas(64) uint16_t t[32];
    _mm512_store_si512(t, v);
    for (int l = 0; l < 32; ++l) out[l] = t[l];
  }
  static constexpr int64_t kMaxIters = int64_t(1) << 16;
};
#else
template <class TT, int WW>
struct Scalar {  // portable: the compiler vectorises the fixed-width loops where it can
  using T = TT;
  struct V { T v[WW]; };
  static constexpr int W = WW;
  static V load(const T* p) { V r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
  static V max(V a, V b) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
  static V set1(T x) { V r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
  static void store(T* p, V a) { for (int i = 0; i < W; ++i) p[i] = a.v[i]; }
  static uint64_t ge(V a, V b) {
    uint64_t m = 0;
    for (int i = 0; i < W; ++i) m |= uint64_t(a.v[i] >= b.v[i]) << i;
    return m;
  }
};
using F32 = Scalar<float, 16>;
using I16 = Scalar<int16_t, 32>;
#endif

template <class S>
struct Scratch {
  std::vector<typename S::T> lane;
  std::vector<int32_t> cand;
};

template <class S>
void best_first(const typename S::T* row, int32_t* cand, int64_t n, int m) {
  auto better = [row](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); };
  if (n > m) std::nth_element(cand, cand + (m - 1), cand + n, better);
  std::sort(cand, cand + m, better);
}

// Vertical maxima of `row` over A * W interleaved lanes (A accumulators of W each, at least
// kAcc of them in flight, folded down to A).
template <class S, int A>
void lane_max(const typename S::T* row, int64_t c, typename S::T* lane) {
  using V = typename S::V;
  constexpr int W = S::W;
  constexpr int R = A > kAcc ? A : kAcc;  // accumulators in flight
  V acc[R];
  for (int a = 0; a < R; ++a) acc[a] = S::load(row + a * W);
  int64_t j = int64_t(R) * W;
  for (; j + R * W <= c; j += R * W)
    for (int a = 0; a < R; ++a) acc[a] = S::max(acc[a], S::load(row + j + a * W));
  for (int a = 0; j + W <= c; j += W, a = (a + 1) % R) acc[a] = S::max(acc[a], S::load(row + j));
  for (int a = A; a < R; ++a) acc[a % A] = S::max(acc[a % A], acc[a]);
  for (int a = 0; a < A; ++a) S::store(lane + a * W, acc[a]);
  for (int64_t t = j; t < c; ++t) lane[t - j] = std::max(lane[t - j], row[t]);
}

#if CBF_AVX512
// m = 1 in one pass: per lane, the best value and the vector it came from (first wins), in
// kAcc interleaved accumulators; then the best lane (ties: lower index).
template <class S>
void row_argmax(const typename S::T* row, int64_t c, int64_t* idx, typename S::T* val) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int W = S::W;
  V best[kAcc];
  __m512i from[kAcc];
  for (int a = 0; a < kAcc; ++a) {
    best[a] = S::load(row + a * W);
    from[a] = S::iters(a);
  }
  int64_t v = kAcc;  // vectors consumed
  for (; (v + kAcc) * W <= c; v += kAcc)
    for (int a = 0; a < kAcc; ++a) {
      V x = S::load(row + (v + a) * W);
      uint64_t k = S::gt(x, best[a]);
      best[a] = S::blend(k, best[a], x);
      from[a] = S::pick(k, from[a], S::iters(v + a));
    }
  for (; (v + 1) * W <= c; ++v) {  // whole vectors left over
    V x = S::load(row + v * W);
    uint64_t k = S::gt(x, best[0]);
    best[0] = S::blend(k, best[0], x);
    from[0] = S::pick(k, from[0], S::iters(v));
  }
  T bv = row[0];
  int64_t bi = 0;
  alignas(64) T lane[W];
  alignas(64) int64_t it[W];
  for (int a = 0; a < kAcc; ++a) {
    S::store(lane, best[a]);
    S::store_iters(it, from[a]);
    for (int l = 0; l < W; ++l) {
      int64_t i = it[l] * W + l;
      if (lane[l] > bv || (lane[l] == bv && i < bi)) bv = lane[l], bi = i;
    }
  }
  for (int64_t i = v * W; i < c; ++i)
    if (row[i] > bv) bv = row[i], bi = i;
  *idx = bi;
  *val = bv;
}
#endif

template <class S>
void row_topm(const typename S::T* row, int64_t c, int m, Scratch<S>& sc, int64_t* idx,
              typename S::T* val) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int W = S::W;
#if CBF_AVX512
  if (m == 1 && c >= 2 * kAcc * W && c / W < S::kMaxIters) return row_argmax<S>(row, c, idx, val);
#endif
  int a = 1;  // lanes: at least 4m of them, for a threshold close to the m-th value
  while (a < 16 && a * W < 4 * m) a *= 2;
  const int L = a * W;
  int64_t n = 0;
  sc.cand.resize(c);
  int32_t* cand = sc.cand.data();
  if (L < 4 * m || c < int64_t(2) * std::max(L, kAcc * W)) {  // direct
    for (int64_t j = 0; j < c; ++j) cand[j] = int32_t(j);
    n = c;
  } else {
    sc.lane.resize(L);
    T* lane = sc.lane.data();
    switch (a) {
      case 1: lane_max<S, 1>(row, c, lane); break;
      case 2: lane_max<S, 2>(row, c, lane); break;
      case 4: lane_max<S, 4>(row, c, lane); break;
      case 8: lane_max<S, 8>(row, c, lane); break;
      default: lane_max<S, 16>(row, c, lane); break;
    }
    std::nth_element(lane, lane + (m - 1), lane + L, [](T x, T y) { return x > y; });
    const T thr = lane[m - 1];
    const V vt = S::set1(thr);
    int64_t i = 0;
    for (; i + W <= c; i += W) {
      uint64_t mask = S::ge(S::load(row + i), vt);
      while (mask) {
        cand[n++] = int32_t(i + __builtin_ctzll(mask));
        mask &= mask - 1;
      }
    }
    for (; i < c; ++i)
      if (row[i] >= thr) cand[n++] = int32_t(i);
  }
  best_first<S>(row, cand, n, m);
  for (int q = 0; q < m; ++q) {
    idx[q] = cand[q];
    val[q] = row[cand[q]];
  }
}

template <class S>
void topm(const typename S::T* s, int64_t r0, int64_t r1, int64_t c, int64_t ld, int m,
          int64_t* idx, typename S::T* val) {
  Scratch<S> sc;
  for (int64_t r = r0; r < r1; ++r) row_topm<S>(s + r * ld, c, m, sc, idx + r * m, val + r * m);
}

}  // namespace

namespace {

float dot(const float* a, const float* b, int64_t n) {
#if CBF_AVX512
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    __mmask16 k = __mmask16((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
#endif
}

// float32 -> bfloat16 -> float32, round to nearest even (as torch's .to(torch.bfloat16)).
float bf16_round(float v) {
  uint32_t b;
  __builtin_memcpy(&b, &v, 4);
  b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  __builtin_memcpy(&r, &b, 4);
  return r;
}

}  // namespace

extern "C" {
// The screen's bfloat16 keys: key = book[g, c] * scale[g, c] with scale = 1 / |book[g, c]|
// (unit, for cosine) or 1, written transposed as bfloat16 bits into kbt (G, dg, C), with
// scale, |key - bf16(key)| (dk) and |key| (kn), all (G, C), for the certificate.
void cbf_bf16_keys(const float* book, int64_t r0, int64_t r1, int64_t c, int64_t dg, int unit,
                   uint16_t* kbt, float* scale, float* dk, float* kn) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t gi = r / c, ci = r % c;
    const float* row = book + r * dg;
    double nn = 0;
    for (int64_t i = 0; i < dg; ++i) nn += double(row[i]) * row[i];
    const float s = unit ? float(1.0 / std::max(__builtin_sqrt(nn), 1e-12)) : 1.f;
    double kk = 0, dd = 0;
    uint16_t* out = kbt + gi * dg * c + ci;
    for (int64_t i = 0; i < dg; ++i) {
      const float v = row[i] * s;
      const float b = bf16_round(v);
      uint32_t bits;
      __builtin_memcpy(&bits, &b, 4);
      out[i * c] = uint16_t(bits >> 16);
      kk += double(v) * v;
      dd += (double(v) - b) * (double(v) - b);
    }
    scale[r] = s;
    kn[r] = float(__builtin_sqrt(kk));
    dk[r] = float(__builtin_sqrt(dd));
  }
}

// Exact re-rank of shortlists: for group g and token n, the k best of the m codes
// shortl[g, n, :] by (x[n, g] . book[g, code]) * scale[g, code] + bias[g, code] in float32
// (scale, bias: null for 1, 0), best first (ties: lower code), into codes and scores
// (N, G, k). Also |x[n, g]| and |x[n, g] - bf16(x[n, g])| into xnorm, dxnorm (N, G), for
// the screen's certificate.
void cbf_rerank_f32(const float* x, const float* book, const float* scale, const float* bias,
                    const int64_t* shortl, int64_t r0, int64_t r1, int64_t n, int64_t g,
                    int64_t c, int64_t dg, int m, int k, int64_t* codes, float* scores,
                    float* xnorm, float* dxnorm) {
  {
    std::vector<float> sc(m);
    std::vector<int> order(m);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t gi = r / n, o = (r % n) * g + gi;  // o: the (N, G) row
      const float* xr = x + o * dg;
      const int64_t* cand = shortl + r * m;
      for (int q = 0; q < m; ++q) {
        const int64_t code = gi * c + cand[q];
        float v = dot(xr, book + code * dg, dg);
        if (scale) v *= scale[code];
        if (bias) v += bias[code];
        sc[q] = v;
        order[q] = q;
      }
      auto better = [&](int a, int b) {
        return sc[a] > sc[b] || (sc[a] == sc[b] && cand[a] < cand[b]);
      };
      std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
      for (int q = 0; q < k; ++q) {
        codes[o * k + q] = cand[order[q]];
        scores[o * k + q] = sc[order[q]];
      }
      double xx = 0, dd = 0;
      for (int64_t i = 0; i < dg; ++i) {
        const double d = double(xr[i]) - double(bf16_round(xr[i]));
        xx += double(xr[i]) * xr[i];
        dd += d * d;
      }
      xnorm[o] = float(__builtin_sqrt(xx));
      dxnorm[o] = float(__builtin_sqrt(dd));
    }
  }
}

int cbf_simd_width() { return CBF_AVX512 ? 512 : 0; }
void cbf_topm_f32(const float* s, int64_t r0, int64_t r1, int64_t c, int64_t ld, int m,
                  int64_t* idx, float* val) {
  topm<F32>(s, r0, r1, c, ld, m, idx, val);
}
void cbf_topm_i16(const int16_t* s, int64_t r0, int64_t r1, int64_t c, int64_t ld, int m,
                  int64_t* idx, int16_t* val) {
  topm<I16>(s, r0, r1, c, ld, m, idx, val);
}
}
