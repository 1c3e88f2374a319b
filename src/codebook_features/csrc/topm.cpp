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
#include <climits>
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
  static uint64_t eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
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
  static uint64_t eq(V a, V b) { return _mm512_cmpeq_epi16_mask(a, b); }
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
  // The best value: fold the accumulators, then the lanes and the tail.
  V all = best[0];
  for (int a = 1; a < kAcc; ++a) all = S::max(all, best[a]);
  alignas(64) T lane[W];
  S::store(lane, all);
  T bv = lane[0];
  for (int l = 1; l < W; ++l) bv = std::max(bv, lane[l]);
  int64_t bi = c;
  for (int64_t i = v * W; i < c; ++i)
    if (row[i] > bv) bv = row[i], bi = i;
  if (bi == c) {  // in the vectors: the lowest index among the lanes holding it
    const V vb = S::set1(bv);
    alignas(64) int64_t it[W];
    for (int a = 0; a < kAcc; ++a) {
      uint64_t k = S::eq(best[a], vb);
      if (!k) continue;
      S::store_iters(it, from[a]);
      for (; k; k &= k - 1) {
        const int l = __builtin_ctzll(k);
        bi = std::min(bi, it[l] * W + l);
      }
    }
  }
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

// |x|^2 and |x - bf16(x)|^2 of one row (bf16: round to nearest even), float32 sums.
void norms(const float* x, int64_t n, double* xx, double* dd) {
  int64_t i = 0;
  float sx = 0.f, sd = 0.f;
#if CBF_AVX512
  __m512 ax = _mm512_setzero_ps(), ad = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1), round = _mm512_set1_epi32(0x7FFF),
                hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(b, round), lsb), hi);
    const __m512 d = _mm512_sub_ps(v, _mm512_castsi512_ps(r));
    ax = _mm512_fmadd_ps(v, v, ax);
    ad = _mm512_fmadd_ps(d, d, ad);
  }
  sx = _mm512_reduce_add_ps(ax);
  sd = _mm512_reduce_add_ps(ad);
#endif
  for (; i < n; ++i) {
    const float d = x[i] - bf16_round(x[i]);
    sx += x[i] * x[i];
    sd += d * d;
  }
  *xx = sx;
  *dd = sd;
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

// The certified bfloat16 screen, one group's block of rows. Row r of `s` (bfloat16 scores as
// int16 bits, row stride ld) belongs to token n0 + r of group gi; x is (N, G, dg) float32 and
// the exact ranking score of a code is (x . book[gi, code]) * scale + bias (scale, bias: null
// for 1, 0). Per row: err bounds |exact - screen score| (rounding of x, of the keys, float32
// accumulation; as snap._certified); thr is the k-th best screen score; every code scoring
// >= thr - 2.2 err - 4u|thr| is re-scored exactly (at most kMaxWindow of them), the k best go
// to codes/scores (N, G, k), |x[n, g]| to xnorm (N, G), and ok[n, g] = 1 when the k-th exact score beats the best code
// left out by more than the bound (else the caller searches the token again exactly).
constexpr int kMaxWindow = 256;
constexpr double kU = 1.0 / 256, kU32 = 1.0 / 16777216;

float bf16_bits_value(int16_t b) {
  const uint32_t bits = uint32_t(uint16_t(b)) << 16;
  float v;
  __builtin_memcpy(&v, &bits, 4);
  return v;
}

void cbf_screen_rows(const int16_t* s, int64_t r0, int64_t r1, int64_t ld, int64_t c,
                     int64_t n0, int64_t gi, const float* x, int64_t g, int64_t dg,
                     const float* book, const float* scale, const float* bias, int k,
                     float kmax, float dkmax, float bmax, int extra_ulps, int64_t* codes,
                     float* scores, uint8_t* ok, float* xnorm) {
  Scratch<I16> sc;
  std::vector<int64_t> top(k);
  std::vector<int16_t> topv(k);
  int32_t win[kMaxWindow];
  float exact[kMaxWindow];
  int order[kMaxWindow];
  for (int64_t r = r0; r < r1; ++r) {
    const int16_t* row = s + r * ld;
    const int64_t o = (n0 + r) * g + gi;  // the (N, G) row
    const float* xr = x + o * dg;
    ok[o] = 0;
    double xx, dd;
    norms(xr, dg, &xx, &dd);
    xnorm[o] = float(__builtin_sqrt(xx));
    // float32 sums of dg squares: relative error below dg * 2^-23 (+ the square root's).
    const double slack = 1 + (dg + 4) * 1.2e-7;
    const double xn = __builtin_sqrt(xx) * slack, dx = __builtin_sqrt(dd) * slack;
    double err = dx * kmax + xn * (1 + kU) * dkmax +
                 (2.0 * dg + extra_ulps) * kU32 * xn * kmax * (1 + kU) * (1 + kU);
    if (bmax >= 0) err += 3 * kU * bmax + 2 * kU * (xn * kmax + bmax);
    row_topm<I16>(row, c, k, sc, top.data(), topv.data());  // k = 1: a one-pass argmax
    const double thr = bf16_bits_value(topv[k - 1]);
    const double cut = thr - 2.2 * err - 4 * kU * __builtin_fabs(thr);
    if (!(thr > 0) || !(cut > 0)) continue;  // negative scores order backwards as bits: redo
    // The smallest bfloat16 >= cut, as bits (cut > 0: round the float32 bits up).
    const float cf = float(cut);
    uint32_t cb;
    __builtin_memcpy(&cb, &cf, 4);
    const int16_t cut16 = int16_t((cb >> 16) + ((cb & 0xFFFFu) ? 1 : 0));
    int n = 0;
    bool overflow = false;
    int16_t left = INT16_MIN;  // best screen score left out
    int64_t i = 0;
#if CBF_AVX512
    const __m512i vc = _mm512_set1_epi16(cut16);
    __m512i vl = _mm512_set1_epi16(INT16_MIN);
    for (; i + 32 <= c; i += 32) {
      const __m512i v = _mm512_loadu_si512(row + i);
      uint32_t in = _mm512_cmpge_epi16_mask(v, vc);
      vl = _mm512_mask_max_epi16(vl, __mmask32(~in), vl, v);
      while (in) {
        if (n == kMaxWindow) { overflow = true; break; }
        win[n++] = int32_t(i + __builtin_ctz(in));
        in &= in - 1;
      }
    }
    alignas(64) int16_t lanes[32];
    _mm512_store_si512(lanes, vl);
    for (int l = 0; l < 32; ++l) left = std::max(left, lanes[l]);
#endif
    for (; i < c; ++i) {
      if (row[i] >= cut16) {
        if (n == kMaxWindow) { overflow = true; break; }
        win[n++] = int32_t(i);
      } else {
        left = std::max(left, row[i]);
      }
    }
    if (overflow || n < k) continue;
    for (int q = 0; q < n; ++q) {
      const int64_t code = gi * c + win[q];
      float v = dot(xr, book + code * dg, dg);
      if (scale) v *= scale[code];
      if (bias) v += bias[code];
      exact[q] = v;
      order[q] = q;
    }
    auto better = [&](int a, int b) {
      return exact[a] > exact[b] || (exact[a] == exact[b] && win[a] < win[b]);
    };
    std::partial_sort(order, order + k, order + n, better);
    for (int q = 0; q < k; ++q) {
      codes[o * k + q] = win[order[q]];
      scores[o * k + q] = exact[order[q]];
    }
    const double bound = left > 0 ? bf16_bits_value(left) : 0.0;
    ok[o] = exact[order[k - 1]] - 1.1 * err > bound + 2 * kU * bound;
  }
}

// sum over elements [e0, e1) of (a - b)^2, accumulated in double per 16 lanes.
double cbf_sq_dist(const float* a, const float* b, int64_t e0, int64_t e1) {
  double total = 0;
  int64_t i = e0;
#if CBF_AVX512
  for (; i + 1024 <= e1;) {  // float32 partial sums over 1024 elements, then double
    __m512 acc = _mm512_setzero_ps();
    for (int64_t end = i + 1024; i < end; i += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
      acc = _mm512_fmadd_ps(d, d, acc);
    }
    total += _mm512_reduce_add_ps(acc);
  }
#endif
  for (; i < e1; ++i) {
    const double d = double(a[i]) - b[i];
    total += d * d;
  }
  return total;
}

// The codebook gradient of a top-k combine with one weight w for every slot: for each row r
// (of width dg) and slot j < kk, grad[flat[r * kk + j]] += w * (gy[r] + a * (y[r] - x[r]))
// (y, x null when a = 0). One thread: codes repeat across rows.
void cbf_scatter_slots(float* grad, const int64_t* flat, int64_t kk, const float* gy,
                       const float* y, const float* x, int64_t rows, int64_t dg, float w,
                       float a) {
  std::vector<float> t(dg);
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gy + r * dg;
    if (a != 0.f) {
      const float* yr = y + r * dg;
      const float* xr = x + r * dg;
      for (int64_t i = 0; i < dg; ++i) t[i] = w * (g[i] + a * (yr[i] - xr[i]));
    } else {
      for (int64_t i = 0; i < dg; ++i) t[i] = w * g[i];
    }
    for (int64_t j = 0; j < kk; ++j) {
      float* dst = grad + flat[r * kk + j] * dg;
      for (int64_t i = 0; i < dg; ++i) dst[i] += t[i];
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
