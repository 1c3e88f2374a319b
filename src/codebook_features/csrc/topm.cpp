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
#include <sys/syscall.h>
#include <unistd.h>
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

// The certified screen, per token: err bounds |exact - screen score| (rounding of x and of the
// keys to bfloat16, float32 accumulation, flushed subnormals; as snap._certified), where the
// exact ranking score of a code is (x . book[gi, code]) * scale + bias (scale, bias: null for
// 1, 0). With thr the k-th best screen score, every code scoring >= thr - 2.2 err - 4 u |thr|
// (u: the rounding unit of the screen scores) is re-scored exactly (at most kMaxWindow of
// them); the k best go to codes/scores (N, G, k) at row o, |x| to xnorm[o], and ok[o] = 1 when
// the k-th exact score beats the best code left out by more than the bound (else the caller
// searches the token again exactly).
constexpr int kMaxWindow = 256;
constexpr double kU = 1.0 / 256, kU32 = 1.0 / 16777216;

float bf16_bits_value(int16_t b) {
  const uint32_t bits = uint32_t(uint16_t(b)) << 16;
  float v;
  __builtin_memcpy(&v, &bits, 4);
  return v;
}

struct ScreenArgs {
  int64_t c, g, dg;
  const float* x;
  const float* book;
  const float* scale;
  const float* bias;
  int k;
  int extra_ulps;
  int64_t* codes;
  float* scores;
  uint8_t* ok;
  float* xnorm;
};

struct ScreenScratch {  // the mm route's per-thread top-k scratch
  Scratch<I16> sc;
  std::vector<int64_t> top;
  std::vector<int16_t> topv;
  explicit ScreenScratch(int k) : top(k), topv(k) {}
};

// The window's lower edge: thr - 2.2 err - 4 u |thr| (u: the screen scores' rounding unit).
double window_cut(double thr, double err, double u) {
  return thr - 2.2 * err - 4 * u * __builtin_fabs(thr);
}

// The bound on |exact - screen score| of one token (as snap._certified); |x| to xnorm[o].
double screen_err(const float* xr, float kmax, float dkmax, float bmax, int64_t o,
                  const ScreenArgs& a) {
  const int64_t dg = a.dg;
  double xx, dd;
  norms(xr, dg, &xx, &dd);
  a.xnorm[o] = float(__builtin_sqrt(xx));
  // float32 sums of dg squares: relative error below dg * 2^-23 (+ the square root's).
  const double slack = 1 + (dg + 4) * 1.2e-7;
  const double xn = __builtin_sqrt(xx) * slack, dx = __builtin_sqrt(dd) * slack;
  double err = dx * kmax + xn * (1 + kU) * dkmax +
               (2.0 * dg + a.extra_ulps) * kU32 * xn * kmax * (1 + kU) * (1 + kU) +
               (dg + 1) * 1.2e-38 * (1 + xn + kmax);  // subnormals flushed by the hardware
  if (bmax >= 0) err += 3 * kU * bmax + 2 * kU * (xn * kmax + bmax);
  return err;
}

// Re-score the n window codes exactly, keep the k best, and certify them: ok[o] = 1 when the
// k-th exact score beats `left` (the best screen score outside the window) by the bound.
void screen_finish(const int32_t* win, int n, double err, double left, double ou, int64_t o,
                   int64_t gi, const float* xr, const ScreenArgs& a) {
  const int k = a.k;
  float exact[kMaxWindow];
  int order[kMaxWindow];
  for (int q = 0; q < n; ++q) {
    const int64_t code = gi * a.c + win[q];
    float v = dot(xr, a.book + code * a.dg, a.dg);
    if (a.scale) v *= a.scale[code];
    if (a.bias) v += a.bias[code];
    exact[q] = v;
    order[q] = q;
  }
  auto better = [&](int p, int q) {
    return exact[p] > exact[q] || (exact[p] == exact[q] && win[p] < win[q]);
  };
  std::partial_sort(order, order + k, order + n, better);
  for (int q = 0; q < k; ++q) {
    a.codes[o * k + q] = win[order[q]];
    a.scores[o * k + q] = exact[order[q]];
  }
  const double bound = left > -__builtin_inf() ? left + 2 * ou * __builtin_fabs(left) : left;
  a.ok[o] = exact[order[k - 1]] - 1.1 * err > bound;
}

// The certified screen of one token from a row of bfloat16 screen scores (bits as int16):
// thr is the k-th best; every code scoring >= thr - 2.2 err - 4 u |thr| is re-scored
// (at most kMaxWindow; more, a negative threshold or too few: ok[o] stays 0 and the caller
// searches the token again exactly).
void screen_one(const int16_t* row, int64_t o, int64_t gi, float kmax, float dkmax, float bmax,
                const ScreenArgs& a, ScreenScratch& ss) {
  const int64_t c = a.c;
  const int k = a.k;
  const float* xr = a.x + o * a.dg;
  int32_t win[kMaxWindow];
  a.ok[o] = 0;
  const double err = screen_err(xr, kmax, dkmax, bmax, o, a);
  row_topm<I16>(row, c, k, ss.sc, ss.top.data(), ss.topv.data());  // k = 1: one-pass argmax
  const double thr = bf16_bits_value(ss.topv[k - 1]);
  const double cut = window_cut(thr, err, kU);
  if (!(thr > 0) || !(cut > 0)) return;  // negative scores order backwards as bits: redo
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
  if (overflow || n < k) return;
  screen_finish(win, n, err, left > 0 ? bf16_bits_value(left) : 0.0, kU, o, gi, xr, a);
}

#if CBF_AVX512
// The certified screen of one token from a row of float32 screen scores (the AMX path) and
// its chunk maxima: cm[j] holds, lane by lane, the best of the 4 score vectors of codes
// 64 j .. 64 j + 63, taken while the tiles landed. The k-th best of (disjoint) maxima, t, is
// at most the k-th best score, so every code within t - 2.2 err - 4 u |t| is collected (and
// a few more), scanning only the chunks whose maxima reach that cut; the true k-th best then
// gives the final cut. Skipped chunks' maxima bound the best score left out.
void screen_chunks(const float* row, const float* cm, int64_t chunks, int64_t o, int64_t gi,
                   double err, const ScreenArgs& a) {
  const int64_t c = a.c;
  const int k = a.k;
  a.ok[o] = 0;
  float t;  // the k-th best of disjoint maxima
  if (k == 1) {
    __m512 m = _mm512_load_ps(cm);
    for (int64_t j = 1; j < chunks; ++j) m = _mm512_max_ps(m, _mm512_load_ps(cm + 16 * j));
    t = _mm512_reduce_max_ps(m);
  } else {  // 64 lanes: chunk j's maxima go to lanes 16 (j % 4) ..
    __m512 m[4];
    for (int p = 0; p < 4; ++p) m[p] = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < chunks; ++j)
      m[j % 4] = _mm512_max_ps(m[j % 4], _mm512_load_ps(cm + 16 * j));
    alignas(64) float lv[64];
    for (int p = 0; p < 4; ++p) _mm512_store_ps(lv + 16 * p, m[p]);
    std::nth_element(lv, lv + (k - 1), lv + 64, [](float p, float q) { return p > q; });
    t = lv[k - 1];
  }
  auto cut_of = [&](double v) {  // as float32, rounded down
    const double cut = window_cut(v, err, kU32);
    float f = float(cut);
    if (double(f) > cut) f = __builtin_nextafterf(f, -__builtin_inff());
    return f;
  };
  if (!(t == t) || !(err == err)) return;  // NaN: redo
  const float cut0 = cut_of(t);
  int32_t win[kMaxWindow];
  float val[kMaxWindow];
  int n = 0;
  const __m512 vc = _mm512_set1_ps(cut0);
  __m512 vl = _mm512_set1_ps(-__builtin_inff());
  for (int64_t j = 0; j < chunks; ++j) {
    const __m512 mj = _mm512_load_ps(cm + 16 * j);
    if (!_mm512_cmp_ps_mask(mj, vc, _CMP_GE_OQ)) {  // nothing here reaches the cut
      vl = _mm512_max_ps(vl, mj);
      continue;
    }
    for (int64_t i = 64 * j; i < std::min(c, 64 * j + 64); i += 16) {
      const int64_t rest = c - i;
      const __mmask16 valid = rest >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rest) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, row + i);
      uint32_t in = _mm512_mask_cmp_ps_mask(valid, v, vc, _CMP_GE_OQ);
      vl = _mm512_mask_max_ps(vl, __mmask16(valid & ~in), vl, v);
      while (in) {
        if (n == kMaxWindow) return;  // too many close scores: redo
        const int l = __builtin_ctz(in);
        win[n] = int32_t(i + l);
        val[n++] = row[i + l];
        in &= in - 1;
      }
    }
  }
  if (n < k) return;
  float kth = t;
  if (k > 1) {  // k = 1: the best maximum is the best score
    float tmp[kMaxWindow];
    std::copy(val, val + n, tmp);
    std::nth_element(tmp, tmp + (k - 1), tmp + n, [](float p, float q) { return p > q; });
    kth = tmp[k - 1];
  }
  const float cut = std::max(cut0, cut_of(kth));
  float left = _mm512_reduce_max_ps(vl);
  int m = 0;
  for (int q = 0; q < n; ++q) {
    if (val[q] >= cut) win[m++] = win[q];
    else left = std::max(left, val[q]);
  }
  screen_finish(win, m, err, left, kU32, o, gi, a.x + o * a.dg, a);
}

// x row (dg floats) -> n bfloat16 bits (round to nearest even, as bf16_round; zero past dg).
void to_bf16(const float* x, int64_t dg, int64_t n, uint16_t* out) {
  int64_t i = 0;
  const __m512i one = _mm512_set1_epi32(1), round = _mm512_set1_epi32(0x7FFF);
  for (; i + 16 <= dg; i += 16) {
    const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(x + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, round), lsb), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < dg; ++i) {
    const float v = bf16_round(x[i]);
    uint32_t bits;
    __builtin_memcpy(&bits, &v, 4);
    out[i] = uint16_t(bits >> 16);
  }
  for (; i < n; ++i) out[i] = 0;
}
#endif

}  // namespace

extern "C" {
// The screen's bfloat16 keys: key = book[g, c] * scale[g, c] with scale = 1 / |book[g, c]|
// (unit, for cosine) or 1, as bfloat16 bits, with scale, |key - bf16(key)| (dk) and |key| (kn),
// all (G, C), for the certificate. Layout: ncb = 0 writes them transposed into kb (G, dg, C)
// (for a bfloat16 mm); ncb > 0 writes AMX tiles: kb (G, ncb, nq, 16, 16, 2), code blocks of 16
// by dimension blocks of 32 in pairs (VNNI), zero where a block passes the last code or
// dimension. Rows r0..r1 count codes per group: C of them, or ncb * 16 with the padding.
void cbf_bf16_keys(const float* book, int64_t r0, int64_t r1, int64_t c, int64_t dg, int unit,
                   int64_t ncb, int64_t nq, uint16_t* kb, float* scale, float* dk, float* kn) {
  const int64_t per = ncb ? ncb * 16 : c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t gi = r / per, ci = r % per;
    auto at = [&](int64_t i) -> uint16_t& {  // where dimension i of this code goes
      if (!ncb) return kb[(gi * dg + i) * c + ci];
      const int64_t tile = (gi * ncb + ci / 16) * nq + i / 32;
      return kb[((tile * 16 + (i % 32) / 2) * 16 + ci % 16) * 2 + (i & 1)];
    };
    if (ci >= c) {  // padding code
      for (int64_t i = 0; i < nq * 32; ++i) at(i) = 0;
      continue;
    }
    const float* row = book + (gi * c + ci) * dg;
    double nn = 0;
    for (int64_t i = 0; i < dg; ++i) nn += double(row[i]) * row[i];
    const float s = unit ? float(1.0 / std::max(__builtin_sqrt(nn), 1e-12)) : 1.f;
    double kk = 0, dd = 0;
    for (int64_t i = 0; i < dg; ++i) {
      const float v = row[i] * s;
      const float b = bf16_round(v);
      uint32_t bits;
      __builtin_memcpy(&bits, &b, 4);
      at(i) = uint16_t(bits >> 16);
      kk += double(v) * v;
      dd += (double(v) - b) * (double(v) - b);
    }
    if (ncb)
      for (int64_t i = dg; i < nq * 32; ++i) at(i) = 0;
    const int64_t o = gi * c + ci;
    scale[o] = s;
    kn[o] = float(__builtin_sqrt(kk));
    dk[o] = float(__builtin_sqrt(dd));
  }
}

// The certified screen over a block of bfloat16 scores `s` (int16 bits, row stride ld) from a
// bfloat16 mm: row r is token n0 + r of group gi; x is (N, G, dg) float32 and book (G, C, dg).
// kmax, dkmax, bmax: the group's max key norm, key rounding error and |bias| (bmax < 0: none).
void cbf_screen_rows(const int16_t* s, int64_t r0, int64_t r1, int64_t ld, int64_t c,
                     int64_t n0, int64_t gi, const float* x, int64_t g, int64_t dg,
                     const float* book, const float* scale, const float* bias, int k,
                     float kmax, float dkmax, float bmax, int extra_ulps, int64_t* codes,
                     float* scores, uint8_t* ok, float* xnorm) {
  const ScreenArgs a{c, g, dg, x, book, scale, bias, k, extra_ulps, codes, scores, ok, xnorm};
  ScreenScratch ss(k);
  for (int64_t r = r0; r < r1; ++r)
    screen_one(s + r * ld, (n0 + r) * g + gi, gi, kmax, dkmax, bmax, a, ss);
}

#if CBF_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define CBF_AMX 1
#else
#define CBF_AMX 0
#endif

// Ask Linux for the AMX tile state (once per process is enough); 1 when AMX can run.
int cbf_amx_enable() {
#if CBF_AMX
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return 0;
#endif
}

// The certified screen with the screen scores made in place by AMX: tokens r0..r1 of x
// (N, G, dg), 16 at a time, every group; keys kb from cbf_bf16_keys with ncb > 0. Per block and
// group: the 16 tokens in bfloat16 (A tile), every code block's float32 scores (16 x 16 per
// tile, 4 code blocks per A load) into a 16 x ncb*16 buffer; while each 64-code chunk is in L1,
// the bias is added in float32 and each token's lane maxima over the chunk are kept; then
// screen_chunks per token. kmax, dkmax, bmax: per group (bmax null: no bias).
void cbf_amx_screen(int64_t r0, int64_t r1, const float* x, int64_t g, int64_t dg, int64_t c,
                    int64_t ncb, int64_t nq, const uint16_t* kb, const float* book,
                    const float* scale, const float* bias, int k, const float* kmax,
                    const float* dkmax, const float* bmax, int extra_ulps, int64_t* codes,
                    float* scores, uint8_t* ok, float* xnorm) {
#if CBF_AMX
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const ScreenArgs a{c, g, dg, x, book, scale, bias, k, extra_ulps, codes, scores, ok, xnorm};
  const int64_t kw = nq * 32, cp = ncb * 16;  // padded width and codes
  std::vector<uint16_t> at(16 * kw);
  std::vector<float> sb(16 * cp);  // 16 tokens' scores, in L1/L2
  const int64_t chunks = (ncb + 3) / 4;  // of 64 codes
  std::vector<float> cmax(16 * chunks * 16 + 16);  // per token and chunk: lane maxima
  float* cm = reinterpret_cast<float*>(  // 64-byte aligned
      (reinterpret_cast<uintptr_t>(cmax.data()) + 63) & ~uintptr_t(63));
  double err[16];
  uint16_t* ap = at.data();
  float* sp = sb.data();
  const int64_t lda = kw * 2, ldc = cp * 4, tile = 16 * 32;  // strides in bytes; tile in bf16
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  for (int64_t t0 = r0; t0 < r1; t0 += 16) {
    const int64_t rows = std::min<int64_t>(16, r1 - t0);
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t o = (t0 + i) * g + gi;
        if (i < rows) {
          to_bf16(x + o * dg, dg, kw, ap + i * kw);
          err[i] = screen_err(x + o * dg, kmax[gi], dkmax[gi], bmax ? bmax[gi] : -1.f, o, a);
        } else {
          std::fill(ap + i * kw, ap + (i + 1) * kw, uint16_t(0));
        }
      }
      const uint16_t* kg = kb + gi * ncb * nq * tile;
      const float* bg = bias ? bias + gi * c : nullptr;
      for (int64_t cb = 0; cb < ncb; cb += 4) {
        const int64_t nb = std::min<int64_t>(4, ncb - cb);
        float* out = sp + cb * 16;
        if (nb == 4) {
          _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          for (int64_t q = 0; q < nq; ++q) {
            _tile_loadd(4, ap + q * 32, lda);
            _tile_loadd(5, kg + ((cb + 0) * nq + q) * tile, 64);
            _tile_loadd(6, kg + ((cb + 1) * nq + q) * tile, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(7, kg + ((cb + 2) * nq + q) * tile, 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(5, kg + ((cb + 3) * nq + q) * tile, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 4, 5);
          }
          _tile_stored(0, out, ldc);
          _tile_stored(1, out + 16, ldc);
          _tile_stored(2, out + 32, ldc);
          _tile_stored(3, out + 48, ldc);
        } else {
          for (int64_t j = 0; j < nb; ++j) {
            _tile_zero(0);
            for (int64_t q = 0; q < nq; ++q) {
              _tile_loadd(4, ap + q * 32, lda);
              _tile_loadd(5, kg + ((cb + j) * nq + q) * tile, 64);
              _tile_dpbf16ps(0, 4, 5);
            }
            _tile_stored(0, out + 16 * j, ldc);
          }
        }
        // While the chunk is in L1: the bias, and each token's maxima over the chunk.
        const int64_t base = cb * 16;
        const int64_t count = std::min<int64_t>(nb * 16, c - base);
        for (int64_t i = 0; i < rows; ++i) {
          float* row = out + i * cp;
          __m512 mx = ninf;
          for (int64_t v = 0; v * 16 < count; ++v) {
            const int64_t rest = count - 16 * v;
            const __mmask16 valid = rest >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rest) - 1);
            __m512 sv = _mm512_loadu_ps(row + 16 * v);
            if (bg) {
              sv = _mm512_add_ps(sv, _mm512_maskz_loadu_ps(valid, bg + base + 16 * v));
              _mm512_storeu_ps(row + 16 * v, sv);
            }
            mx = _mm512_mask_max_ps(mx, valid, mx, sv);
          }
          _mm512_store_ps(cm + (i * chunks + cb / 4) * 16, mx);
        }
      }
      for (int64_t i = 0; i < rows; ++i)
        screen_chunks(sp + i * cp, cm + i * chunks * 16, chunks, (t0 + i) * g + gi, gi, err[i], a);
    }
  }
  _tile_release();
#else
  (void)r0; (void)r1; (void)x; (void)g; (void)dg; (void)c; (void)ncb; (void)nq; (void)kb;
  (void)book; (void)scale; (void)bias; (void)k; (void)kmax; (void)dkmax; (void)bmax;
  (void)extra_ulps; (void)codes; (void)scores; (void)ok; (void)xnorm;
#endif
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
