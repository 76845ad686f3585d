// Weight-only quantized matmul for CPUs with AVX2 + FMA + F16C:  y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
//
// Weights (formats in kuaida/kernels/reference.py):
//   int8: q int8 [N, K], symmetric;  w = q * d                     d: fp16 [N, K / group]
//   int4: q uint8 [N, K / 2], 0..15; w = q * d + m                 d, m: fp16 [N, K / group]
//         each 32-block of K is 16 bytes: low nibbles hold elements 0..15, high nibbles 16..31.
// group is a multiple of 32. Activations are quantized on the fly per 32-block to 15-bit integers
// xi = round(x / xd), xd = absmax / 16256, split into two int8 halves xi = 128 * hi + lo (hi in -127..127,
// lo in 0..127), so each block's dot product is integer (maddubs + madd for each half) and one FMA
// applies d * xd. 15 bits keep the result within ~1e-4 of fp32 activations; 8-bit activations (one
// half, ~1.3x less work) cost the default model 9 % of its top-1 agreement with fp32 over 512 tokens.
// The int4 min term uses the exact fp32 block sums of x: sum_i m * x_i = m * xs.
//
// Decode (M = 1) streams each weight byte from memory once. For M > 1 a tile of weight rows stays in L1
// while all M activation rows pass over it, so weights still stream from memory once per call.
// Threads split the output rows N (at::parallel_for: torch's intra-op pool).
//
// CPUs with AVX-512 VNNI get a second path (the `avx512` argument; functions marked KUAIDA_AVX512 are
// compiled for it and called only when the CPU has it, so the library still needs only AVX2): 64 bytes per
// instruction and vpdpbusd (u8 x s8, 4 products summed into an int32 lane) in place of maddubs + madd.
// vpdpbusd wants one unsigned side. int4 weights (0..15) and the lo half (0..127) already are; the signed
// hi half goes in as hi + 128 (hi ^ 0x80) and each lane's sum starts at -128 * (its 4 weights' sum), one
// vpdpbusd per weight vector shared by all activation rows of the tile. That is 2 vpdpbusd + 1 shift per
// (activation row, weight row) pair and step; moving w's sign onto x instead (no vpsignb in AVX-512) would
// add two masked negations per pair. The int32 lane sums are the same exact integers as the AVX2 path's,
// so the two differ only in the order of fp32 additions. With `avx512`, dequantizing to bf16 (the GEMM path)
// uses AVX512-BF16's conversion where the CPU has it (same rounding).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activation block, int4 packing unit; the weight group is a multiple
// Register tile: kRows weight rows x kCols activation rows. Measured (Zen, 1 thread) against 4x1, 2x2, 3x2,
// 2x3, 2x4, 8x1: 4 rows keep decode (M = 1) fastest, 2 activation rows gain 10-20 % for M >= 4; more
// accumulators than that spill out of the 16 AVX2 registers.
constexpr int kRows = 4;
constexpr int kCols = 2;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Activations of one call, quantized: hi, lo [M, K] int8 (xi = 128 * hi + lo); d and s [M, K / 32]
// (scale, exact sum of x).
struct QActs {
  std::vector<int8_t> hi, lo;
  std::vector<float> d, s;
};

constexpr float kActMax = 16256.0f;  // 127 * 128: |hi| <= 127, so _mm256_sign_epi8 can negate it

// 4 x 8 int32 -> 32 int8 in order (packs work per 128-bit lane: undo their interleaving).
inline __m256i pack_i32_to_i8(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One 32-block: xi = round_half_even(x * (16256 / absmax)), d = absmax / 16256.
void quantize_block(const float* x, int8_t* hi, int8_t* lo, float* d, float* s) {
  const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  const __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  const float m = hmax(amax);
  *d = m / kActMax;
  *s = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
  const __m256 id = _mm256_set1_ps(m > 0.0f ? kActMax / m : 0.0f);
  // cvtps rounds with MXCSR's default mode: to nearest, ties to even (as torch.round).
  __m256i h[4], l[4];
  const __m256 v[4] = {v0, v1, v2, v3};
  for (int j = 0; j < 4; ++j) {
    const __m256i xi = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));
    h[j] = _mm256_srai_epi32(xi, 7);  // floor(xi / 128)
    l[j] = _mm256_and_si256(xi, _mm256_set1_epi32(127));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), pack_i32_to_i8(h[0], h[1], h[2], h[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), pack_i32_to_i8(l[0], l[1], l[2], l[3]));
}

// Blocks 2p, 2p+1 of a row (A, B) become [A0-15 B0-15 | A16-31 B16-31], matching how one 32-byte load
// of int4 weights unpacks (see step_pair).
void interleave_pairs(int8_t* q, int64_t M, int64_t K) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t b = 0; b + 2 <= K / kBlock; b += 2) {
      __m256i* p = reinterpret_cast<__m256i*>(q + i * K + b * kBlock);
      const __m256i first = _mm256_loadu_si256(p), second = _mm256_loadu_si256(p + 1);
      _mm256_storeu_si256(p, _mm256_permute2x128_si256(first, second, 0x20));
      _mm256_storeu_si256(p + 1, _mm256_permute2x128_si256(first, second, 0x31));
    }
  }
}

// x [M, K] -> QActs; int4 kernels want block pairs interleaved.
QActs quantize_acts(const float* x, int64_t M, int64_t K, bool pairs) {
  const int64_t nb = K / kBlock;
  QActs a{std::vector<int8_t>(M * K), std::vector<int8_t>(M * K), std::vector<float>(M * nb),
          std::vector<float>(M * nb)};
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      quantize_block(x + b * kBlock, &a.hi[b * kBlock], &a.lo[b * kBlock], &a.d[b], &a.s[b]);
  });
  if (pairs) {
    interleave_pairs(a.hi.data(), M, K);
    interleave_pairs(a.lo.data(), M, K);
  }
  return a;
}

// A quantized weight matrix as raw pointers; scales and mins are fp16 [N, groups].
struct QWeight {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;  // int4 only
  int64_t N, K, groups, row_bytes;
};

QWeight view_weight(const at::Tensor& q, const at::Tensor& d, const at::Tensor* m, int64_t K) {
  return {static_cast<const uint8_t*>(q.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr()),
          m ? reinterpret_cast<const uint16_t*>(m->data_ptr()) : nullptr, q.size(0), K, d.size(1),
          q.size(1)};
}

// int16 pair sums of the hi and lo halves -> 8 fp32 sums of 128 * hi + lo.
inline __m256 combine_halves(__m256i ph, __m256i pl) {
  const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(128)),
                                     _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
  return _mm256_cvtepi32_ps(s);
}

// The 32 weights of block b of a row, as bytes: int8 as stored, int4 unpacked to 0..15.
template <bool kInt4>
inline __m256i load_block(const uint8_t* row, int64_t b) {
  if constexpr (kInt4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
  }
}

// Integer dot product of a weight block and an activation block (hi, lo halves), as 8 fp32 partial sums.
template <bool kInt4>
inline __m256 dot_block(__m256i w, __m256i hi, __m256i lo) {
  __m256i ph, pl;
  if constexpr (kInt4) {
    ph = _mm256_maddubs_epi16(w, hi);  // u8 * s8 pairs; 2 * 15 * 127 cannot saturate int16
    pl = _mm256_maddubs_epi16(w, lo);
  } else {
    // maddubs needs one unsigned side: |w| * (x with w's sign); 2 * 127 * 127 < 32767.
    const __m256i aw = _mm256_sign_epi8(w, w);
    ph = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(hi, w));
    pl = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(lo, w));
  }
  return combine_halves(ph, pl);
}

// n fp16 values -> fp32.
void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// Vectorized: a scalar loop would be one long chain of dependent FMAs per output row.
float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Per-block fp32 scales of NR weight rows from n0: dw [NR, K / 32]; and per-group fp32 mins: mw [NR, groups].
// Expanding per block keeps the inner loop flat (one iteration per 32-block, no group bookkeeping).
template <int NR, bool kInt4>
void row_scales(const QWeight& w, int64_t n0, float* dw, float* mw) {
  const int64_t nb = w.K / kBlock, G = w.groups, per_group = nb / G;
  for (int r = 0; r < NR; ++r) {
    const uint16_t* d = w.d + (n0 + r) * G;
    if (per_group == 1) {
      half_to_float(d, dw + r * nb, nb);
    } else {
      for (int64_t g = 0, b = 0; g < G; ++g)
        for (const float v = _cvtsh_ss(d[g]); b < (g + 1) * per_group; ++b) dw[r * nb + b] = v;
    }
    if constexpr (kInt4) half_to_float(w.m + (n0 + r) * G, mw + r * G, G);
  }
}

// Pointers of one register tile: MR activation rows from i0, NR weight rows from n0.
struct TileArgs {
  const uint8_t* q;   // first weight row
  const int8_t* hi;   // first activation row, high and low halves
  const int8_t* lo;
  const float* xd;    // its block scales
  const float* dw;    // [NR, K / 32] weight block scales
  int64_t row_bytes, K, nb;
};

inline TileArgs tile_args(const QWeight& w, const QActs& a, const float* dw, int64_t i0, int64_t n0) {
  const int64_t nb = w.K / kBlock;
  return {w.q + n0 * w.row_bytes, a.hi.data() + i0 * w.K, a.lo.data() + i0 * w.K, a.d.data() + i0 * nb, dw,
          w.row_bytes, w.K, nb};
}

// y[i, n0 + r] = v (a tile's sum, with int4's min term) + bias.
inline void put(const QWeight& w, int64_t i, int64_t n0, int r, float v, const float* bias, float* y) {
  y[i * w.N + n0 + r] = bias ? v + bias[n0 + r] : v;
}

// Accumulate 32-block b into acc[i][r] (int8, and int4's last block when K / 32 is odd).
template <int MR, int NR, bool kInt4>
__attribute__((always_inline)) inline void step_block(const TileArgs& t, int64_t b, __m256 (&acc)[MR][NR]) {
  __m256i wb[NR];
  for (int r = 0; r < NR; ++r) wb[r] = load_block<kInt4>(t.q + r * t.row_bytes, b);
  for (int i = 0; i < MR; ++i) {
    const int64_t off = i * t.K + b * kBlock;
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.hi + off));
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.lo + off));
    const __m256 x_scale = _mm256_broadcast_ss(t.xd + i * t.nb + b);
    for (int r = 0; r < NR; ++r) {
      const __m256 scale = _mm256_mul_ps(_mm256_broadcast_ss(t.dw + r * t.nb + b), x_scale);
      acc[i][r] = _mm256_fmadd_ps(dot_block<kInt4>(wb[r], hi, lo), scale, acc[i][r]);
    }
  }
}

// Two scales s[0], s[1] -> [s0 x4 | s1 x4].
inline __m256 pair_scales(const float* s) {
  const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// Accumulate int4 blocks 2p, 2p+1 at once: one 32-byte load holds both blocks' nibbles, low nibbles are
// [A0-15 | B0-15], high ones [A16-31 | B16-31], and the activations are interleaved the same way, so
// per two blocks it takes one multiply-add chain where step_block takes two.
template <int MR, int NR>
__attribute__((always_inline)) inline void step_pair(const TileArgs& t, int64_t p, __m256 (&acc)[MR][NR]) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < NR; ++r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.q + r * t.row_bytes + p * 32));
    const __m256i w_lo = _mm256_and_si256(v, low), w_hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    const __m256 w_scale = pair_scales(t.dw + r * t.nb + 2 * p);
    for (int i = 0; i < MR; ++i) {
      const int64_t off = i * t.K + 2 * p * kBlock;
      const auto at = [&](const int8_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); };
      // Per half of x, the first 16 elements of both blocks meet the low nibbles; 2 * 2 * 15 * 127 fits int16.
      const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(w_lo, at(t.hi + off)),
                                          _mm256_maddubs_epi16(w_hi, at(t.hi + off + kBlock)));
      const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(w_lo, at(t.lo + off)),
                                          _mm256_maddubs_epi16(w_hi, at(t.lo + off + kBlock)));
      const __m256 scale = _mm256_mul_ps(w_scale, pair_scales(t.xd + i * t.nb + 2 * p));
      acc[i][r] = _mm256_fmadd_ps(combine_halves(ph, pl), scale, acc[i][r]);
    }
  }
}

// y[i0 : i0 + MR, n0 : n0 + NR] (y is [M, N]): MR x NR accumulators in registers, so each weight block
// loaded (and unpacked) once serves MR activation rows. dw [NR, K / 32], mw [NR, groups]: from row_scales;
// xg [M, groups]: sums of x per weight group, for the int4 min term.
template <int MR, int NR, bool kInt4>
void tile(const QWeight& w, const QActs& a, const float* xg, const float* dw, const float* mw, int64_t i0,
          int64_t n0, const float* bias, float* y, bool prefetch) {
  const int64_t nb = w.K / kBlock;
  const TileArgs t = tile_args(w, a, dw, i0, n0);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  constexpr int64_t step = kInt4 ? 2 : 1;  // blocks per step
  for (int64_t b = 0; b + step <= nb; b += step) {
    if (prefetch) {
      // Re-reading a tile from L1 for more activation rows stalls the hardware prefetcher: fetch the next
      // tile's rows ourselves.
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(t.q + (NR + r) * w.row_bytes + b * (kInt4 ? 16 : 32)), _MM_HINT_T0);
    }
    if constexpr (kInt4) {
      step_pair<MR, NR>(t, b / 2, acc);
    } else {
      step_block<MR, NR, false>(t, b, acc);
    }
  }
  if (kInt4 && nb % 2) step_block<MR, NR, kInt4>(t, nb - 1, acc);
  const int64_t G = w.groups;
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) {
      const float v = hsum(acc[i][r]) + (kInt4 ? dot_f32(mw + r * G, xg + (i0 + i) * G, G) : 0.0f);
      put(w, i0 + i, n0, r, v, bias, y);
    }
  }
}

// NR weight rows from n0 against all M activation rows; dw, mw: scratch [NR, groups].
template <int NR, bool kInt4>
void row_tile(const QWeight& w, const QActs& a, const float* xg, int64_t n0, int64_t M, const float* bias,
              float* y, float* dw, float* mw) {
  row_scales<NR, kInt4>(w, n0, dw, mw);
  int64_t i = 0;
  for (; i + kCols <= M; i += kCols) tile<kCols, NR, kInt4>(w, a, xg, dw, mw, i, n0, bias, y, i == 0 && M > kCols);
  for (; i < M; ++i) tile<1, NR, kInt4>(w, a, xg, dw, mw, i, n0, bias, y, false);
}

// ---- AVX-512 VNNI path (see the header). A step is two 32-blocks: 64 bytes of activations per half.
#define KUAIDA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// Activation rows per register tile (weight rows: kRows). Measured (Zen 5, 1 thread, M = 4..64) against 2
// and 3: 4 is fastest from 8 rows (at M = 64, 3 was 5 % slower, 2 13 %); 16 accumulators leave 16 zmm.
constexpr int kCols512 = 4;

bool cpu_has_avx512_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

// The scales of blocks b, b + 1 (s[0], s[1]; with `tail` only s[0], the other lanes get 0) spread over the
// 16 int32 lanes of a step as idx says.
KUAIDA_AVX512 inline __m512 scales512(const float* s, __m512i idx, bool tail) {
  const __m128 v = tail ? _mm_load_ss(s) : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

// 64 activation bytes (blocks b, b + 1); with `tail` block b only, the upper 32 bytes zero.
KUAIDA_AVX512 inline __m512i acts512(const int8_t* p, bool tail) {
  return tail ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p) : _mm512_loadu_si512(p);
}

// Weights of blocks b, b + 1 of a row in the activations' byte order: int8 as stored; int4 unpacked to
// 0..15 as [low nibbles of both | high nibbles of both], which is the order interleave_pairs gives the
// activations. With `tail` block b only, in the lower 32 bytes (int4: [low | high nibbles], matching its
// activations, which are not interleaved).
template <bool kInt4>
KUAIDA_AVX512 inline __m512i weights512(const uint8_t* row, int64_t b, bool tail) {
  if constexpr (kInt4) {
    __m512i v;
    if (tail) {
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
      v = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set_m128i(_mm_srli_epi16(p, 4), p), 0);
    } else {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 16));
      v = _mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1);
    }
    return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  } else {
    return acts512(reinterpret_cast<const int8_t*>(row + b * kBlock), tail);
  }
}

// Accumulate blocks b, b + 1 (b only with `tail`) into acc[i][r]: 16 int32 lanes of exact sums of
// 4 products (128 * hi + lo), to fp32, times the blocks' scales.
template <int MR, int NR, bool kInt4>
KUAIDA_AVX512 __attribute__((always_inline)) inline void step512(const TileArgs& t, int64_t b, bool tail,
                                                                 __m512i idx, __m512 (&acc)[MR][NR]) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i wv[NR], start[NR];
  __m512 ws[NR];
  for (int r = 0; r < NR; ++r) {
    wv[r] = weights512<kInt4>(t.q + r * t.row_bytes, b, tail);
    ws[r] = scales512(t.dw + r * t.nb + b, idx, tail);
    // int8: hi enters as hi + 128, so each lane's hi sum starts at -128 * (sum of its 4 weights).
    start[r] = kInt4 ? zero
                     : _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(char(0x80)), wv[r]));
  }
  for (int i = 0; i < MR; ++i) {
    const int64_t off = i * t.K + b * kBlock;
    const __m512i hi = acts512(t.hi + off, tail), lo = acts512(t.lo + off, tail);
    const __m512i hu = kInt4 ? hi : _mm512_xor_si512(hi, _mm512_set1_epi8(char(0x80)));  // int8: hi + 128
    const __m512 xs = scales512(t.xd + i * t.nb + b, idx, tail);
    for (int r = 0; r < NR; ++r) {
      // |lane| <= 128 * 4 * 127 * 127 + 4 * 127 * 127 < 2^24: exact in int32 and in fp32.
      __m512i s;
      if constexpr (kInt4) {
        s = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, wv[r], hu), 7), wv[r], lo);
      } else {
        s = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(start[r], hu, wv[r]), 7), lo, wv[r]);
      }
      acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(ws[r], xs), acc[i][r]);
    }
  }
}

// tile() for AVX-512 VNNI: the same tile, two blocks per step, and a last single block when K / 32 is odd.
// prefetch: fetch the next weight tile (row_tile512 asks for it on its first activation tile).
template <int MR, int NR, bool kInt4>
KUAIDA_AVX512 void tile512(const QWeight& w, const QActs& a, const float* xg, const float* dw, const float* mw,
                           int64_t i0, int64_t n0, const float* bias, float* y, bool prefetch) {
  const int64_t nb = w.K / kBlock;
  const TileArgs t = tile_args(w, a, dw, i0, n0);
  // Lane -> block of the step: int8 and any tail [b x8 | b+1 x8]; int4 pairs [b x4, b+1 x4, b x4, b+1 x4].
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i idx = kInt4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1) : halves;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    if (prefetch) {  // as in tile(); here it pays for a lone tile too (M = 1..4: up to 1.4x faster)
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(t.q + (NR + r) * w.row_bytes + b * (kInt4 ? 16 : 32)), _MM_HINT_T0);
    }
    step512<MR, NR, kInt4>(t, b, false, idx, acc);
  }
  if (b < nb) step512<MR, NR, kInt4>(t, b, true, halves, acc);
  if constexpr (kInt4) {
    // The min term sum_g m[g] * xg[g], added to the accumulators before their one reduction: a separate
    // dot_f32 per output cost int4 ~25 % at M = 64.
    const int64_t G = w.groups;
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 k = G - g >= 16 ? 0xFFFF : (1u << (G - g)) - 1;
      __m512 mv[NR];
      for (int r = 0; r < NR; ++r) mv[r] = _mm512_maskz_loadu_ps(k, mw + r * G + g);
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(k, xg + (i0 + i) * G + g);
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(mv[r], xv, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) put(w, i0 + i, n0, r, _mm512_reduce_add_ps(acc[i][r]), bias, y);
}

// The last M - i (< MR) activation rows as one tile.
template <int MR, int NR, bool kInt4>
KUAIDA_AVX512 void last_tile512(const QWeight& w, const QActs& a, const float* xg, const float* dw,
                                const float* mw, int64_t i, int64_t M, int64_t n0, const float* bias, float* y) {
  if constexpr (MR > 1) {
    if (M - i == MR - 1) return tile512<MR - 1, NR, kInt4>(w, a, xg, dw, mw, i, n0, bias, y, i == 0);
    last_tile512<MR - 1, NR, kInt4>(w, a, xg, dw, mw, i, M, n0, bias, y);
  }
}

// row_tile() for AVX-512 VNNI.
template <int NR, bool kInt4>
KUAIDA_AVX512 void row_tile512(const QWeight& w, const QActs& a, const float* xg, int64_t n0, int64_t M,
                               const float* bias, float* y, float* dw, float* mw) {
  row_scales<NR, kInt4>(w, n0, dw, mw);
  int64_t i = 0;
  for (; i + kCols512 <= M; i += kCols512)
    tile512<kCols512, NR, kInt4>(w, a, xg, dw, mw, i, n0, bias, y, i == 0);
  if (i < M) last_tile512<kCols512, NR, kInt4>(w, a, xg, dw, mw, i, M, n0, bias, y);
}

// Sums of x over each weight group, from the 32-block sums: [M, groups].
std::vector<float> group_sums(const QActs& a, int64_t M, int64_t nb, int64_t G) {
  std::vector<float> xg(M * G, 0.0f);
  for (int64_t i = 0; i < M * nb; ++i) xg[i / (nb / G)] += a.s[i];
  return xg;
}

void check_inputs(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [..., K]");
  TORCH_CHECK(x.size(-1) == K && K % kBlock == 0, "K must match the weight and be a multiple of 32");
  TORCH_CHECK(q.is_contiguous() && d.is_contiguous() && d.scalar_type() == at::kHalf, "fp16 scales");
  TORCH_CHECK(d.size(0) == q.size(0) && (K / kBlock) % d.size(1) == 0, "scales: [N, K / group]");
}

// x's shape with its last dimension K replaced by the layer's N.
at::Tensor new_output(const at::Tensor& x, const QWeight& w) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w.N;
  return at::empty(shape, x.options());
}

// Threads take whole tiles of kRows weight rows, each at least ~16 KiB of weights: below that, waking a
// thread costs more than it saves. body(n, stop) computes weight rows [n, stop) (the last tile may be
// partial).
template <typename Body>
void parallel_weight_rows(const QWeight& w, const Body& body) {
  const int64_t tiles = (w.N + kRows - 1) / kRows, tile_bytes = kRows * w.row_bytes;
  at::parallel_for(0, tiles, (16384 + tile_bytes - 1) / tile_bytes,
                   [&](int64_t begin, int64_t end) { body(begin * kRows, std::min(end * kRows, w.N)); });
}

// row_tile or row_tile512: NR weight rows from n0 against all M activation rows.
using RowTile = void (*)(const QWeight&, const QActs&, const float*, int64_t, int64_t, const float*, float*,
                         float*, float*);

template <bool kInt4>
at::Tensor qlinear(const at::Tensor& x, const QWeight& w, const std::optional<at::Tensor>& bias, bool avx512) {
  TORCH_CHECK(!avx512 || cpu_has_avx512_vnni(), "avx512=True on a CPU without AVX-512 VNNI");
  // Called through pointers: the lambda below is compiled for AVX2 and must not inline AVX-512 code.
  const RowTile four = avx512 ? row_tile512<kRows, kInt4> : row_tile<kRows, kInt4>;
  const RowTile one = avx512 ? row_tile512<1, kInt4> : row_tile<1, kInt4>;
  const int64_t M = x.numel() / w.K, nb = w.K / kBlock;
  const QActs a = quantize_acts(x.data_ptr<float>(), M, w.K, kInt4);
  const std::vector<float> xg = kInt4 ? group_sums(a, M, nb, w.groups) : std::vector<float>();
  at::Tensor y = new_output(x, w);
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  parallel_weight_rows(w, [&](int64_t n, int64_t stop) {
    std::vector<float> dw(kRows * nb), mw(kRows * w.groups);
    for (; n + kRows <= stop; n += kRows) four(w, a, xg.data(), n, M, b, out, dw.data(), mw.data());
    for (; n < stop; ++n) one(w, a, xg.data(), n, M, b, out, dw.data(), mw.data());
  });
  return y;
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous fp32 [N]");
}

// 8 fp32 -> 8 bf16, rounding to nearest even (weights are finite; AVX2 has no conversion instruction).
inline __m128i float_to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 8 weights as fp32 to out[0..8), as fp32 or bf16.
template <typename T>
inline void store8(T* out, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), float_to_bf16(v));
  }
}

// Dequantized weights [N, K] as T (fp32 or bf16): for large M, where a GEMM library beats the integer kernel.
template <bool kInt4, typename T>
void dequantize_into(const QWeight& w, T* o) {
  const int64_t per_group = w.K / kBlock / w.groups;
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0, b = 0; g < w.groups; ++g) {
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(w.d[n * w.groups + g]));
        const __m256 m = _mm256_set1_ps(kInt4 ? _cvtsh_ss(w.m[n * w.groups + g]) : 0.0f);
        for (int64_t end_b = b + per_group; b < end_b; ++b) {
          alignas(32) int8_t bytes[kBlock];
          _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), load_block<kInt4>(w.q + n * w.row_bytes, b));
          for (int j = 0; j < kBlock; j += 8) {
            const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j));
            const __m256i i = kInt4 ? _mm256_cvtepu8_epi32(v) : _mm256_cvtepi8_epi32(v);
            store8(o + n * w.K + b * kBlock + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, m));
          }
        }
      }
    }
  });
}

#define KUAIDA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}

// Rows [begin, end) of dequantize_into's bf16 output on CPUs with AVX512-BF16: a block per step, no
// round trip through memory, and vcvtne2ps2bf16 rounds to nearest even as float_to_bf16 does (it also
// flushes fp32 denormals, which q * d + m with fp16 d and m never is).
template <bool kInt4>
KUAIDA_AVX512_BF16 void dequantize_rows_bf16(const QWeight& w, uint16_t* o, int64_t begin, int64_t end) {
  const int64_t per_group = w.K / kBlock / w.groups;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t g = 0, b = 0; g < w.groups; ++g) {
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(w.d[n * w.groups + g]));
      const __m512 m = _mm512_set1_ps(kInt4 ? _cvtsh_ss(w.m[n * w.groups + g]) : 0.0f);
      for (int64_t end_b = b + per_group; b < end_b; ++b) {
        const __m256i v = load_block<kInt4>(w.q + n * w.row_bytes, b);
        const __m128i v0 = _mm256_castsi256_si128(v), v1 = _mm256_extracti128_si256(v, 1);
        const __m512i i0 = kInt4 ? _mm512_cvtepu8_epi32(v0) : _mm512_cvtepi8_epi32(v0);
        const __m512i i1 = kInt4 ? _mm512_cvtepu8_epi32(v1) : _mm512_cvtepi8_epi32(v1);
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), d, m),
                                               _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), d, m));
        _mm512_storeu_si512(o + n * w.K + b * kBlock, reinterpret_cast<const __m512i&>(h));
      }
    }
  }
}

// Writes into `out` (fp32 or bf16 [N, K], contiguous): callers reuse one buffer, as a fresh multi-MB
// tensor per call spends more time in page faults than in dequantizing. avx512: bf16 output may use
// dequantize_rows_bf16 (where the CPU has AVX512-BF16).
template <bool kInt4>
at::Tensor dequantize(const QWeight& w, at::Tensor out, bool avx512) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == w.N && out.size(1) == w.K, "out: [N, K]");
  if (out.scalar_type() == at::kBFloat16 && avx512 && cpu_has_avx512_bf16()) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) { dequantize_rows_bf16<kInt4>(w, o, begin, end); });
  } else if (out.scalar_type() == at::kBFloat16) {
    dequantize_into<kInt4>(w, reinterpret_cast<uint16_t*>(out.data_ptr()));
  } else {
    TORCH_CHECK(out.scalar_type() == at::kFloat, "out: fp32 or bf16");
    dequantize_into<kInt4>(w, out.data_ptr<float>());
  }
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d,
                       const std::optional<at::Tensor>& bias, bool avx512) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "int8 weights: q int8 [N, K]");
  check_inputs(x, q, d, q.size(1));
  check_bias(bias, q.size(0));
  return qlinear<false>(x, view_weight(q, d, nullptr, q.size(1)), bias, avx512);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m,
                       const std::optional<at::Tensor>& bias, bool avx512) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "int4 weights: q uint8 [N, K / 2]");
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous(), "mins like scales");
  check_inputs(x, q, d, q.size(1) * 2);
  check_bias(bias, q.size(0));
  return qlinear<true>(x, view_weight(q, d, &m, q.size(1) * 2), bias, avx512);
}

at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& d, at::Tensor out, bool avx512) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && d.is_contiguous(), "int8 q, fp16 d");
  return dequantize<false>(view_weight(q, d, nullptr, q.size(1)), out, avx512);
}

at::Tensor int4_dequantize(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m, at::Tensor out,
                           bool avx512) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && d.is_contiguous() && m.is_contiguous(),
              "uint8 q, fp16 d and m");
  return dequantize<true>(view_weight(q, d, &m, q.size(1) * 2), out, avx512);
}

// ---- int8 weights x 16-bit activations (vpmaddwd), AVX2: decode and small prefills ----
// Without AVX-512 the integer kernel above is compute-bound from ~2 rows: per (activation row, weight row,
// 32-block) it runs two sign + two maddubs + two madd (the 15-bit activations' two halves) + add,
// conversion, scale multiply and FMA. Here activations are quantized per 32-block to one int16
// (xi = round(x * 32767 / absmax): a finer grid than the 15-bit halves) and each weight block is
// sign-extended to int16 once per tile, so a (row, weight row, block) takes two vpmaddwd (int8 * int16
// products, 2 * 127 * 32767 per int32 lane; four per lane in all, < 2^24) + add + conversion + multiply +
// FMA. (int4 the same way, nibbles zero-extended, was no faster than its 15-bit kernel, which takes two
// blocks per load: not kept.)
// Every output is one fp32 accumulator chain over the blocks in order and one fixed reduction: a row's
// result is the same whatever M and whichever tile it lands in (what batched decoding needs).
constexpr float kAct16Max = 32767.0f;
#define KUAIDA_UNROLL _Pragma("GCC unroll 8")

struct Acts16 {
  std::vector<int16_t> x;  // [M, K]
  std::vector<float> d;    // [M, K / 32] scales
};

// One 32-block: xi = round_half_even(x * (32767 / absmax)), d = absmax / 32767.
void quantize_block16(const float* x, int16_t* out, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  const float m = hmax(amax);
  *d = m / kAct16Max;
  const __m256 id = _mm256_set1_ps(m > 0.0f ? kAct16Max / m : 0.0f);
  for (int j = 0; j < 4; j += 2) {
    // packs works per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7] -> reorder the 64-bit quarters to a0-7 b0-7.
    const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], id)),
                                         _mm256_cvtps_epi32(_mm256_mul_ps(v[j + 1], id)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j), _mm256_permute4x64_epi64(p, 0xD8));
  }
}

Acts16 quantize_acts16(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock;
  Acts16 a{std::vector<int16_t>(M * K), std::vector<float>(M * nb)};
  for (int64_t b = 0; b < M * nb; ++b) quantize_block16(x + b * kBlock, &a.x[b * kBlock], &a.d[b]);
  return a;
}

// y[i0 : i0 + MR, n0 : n0 + NR]; dw [NR, K / 32] (row_scales).
// The tile's loops are unrolled by pragma (KUAIDA_UNROLL): left to itself GCC kept the accumulator array in
// memory, storing every accumulator each block and running one of them as a load-FMA-store chain through
// the stack. Unrolled, the 4 x 2 tile keeps seven of its eight accumulators in registers (one still runs
// through the stack: 17 live vectors for 16 registers; GCC 12): 1.11x at 8 rows, 1.16x at 48
// (benchmarks/results/kernels.md), the same results bit for bit.
template <int MR, int NR>
void tile16(const QWeight& w, const Acts16& a, const float* dw, int64_t i0, int64_t n0, const float* bias,
            float* y, bool prefetch) {
  const int64_t K = w.K, nb = K / kBlock;
  const uint8_t* q = w.q + n0 * w.row_bytes;
  const int16_t* x = a.x.data() + i0 * K;
  const float* xd = a.d.data() + i0 * nb;
  __m256 acc[MR][NR];
  KUAIDA_UNROLL
  for (int i = 0; i < MR; ++i)
    KUAIDA_UNROLL
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (prefetch) {
      KUAIDA_UNROLL
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (NR + r) * K + b * kBlock), _MM_HINT_T0);
    }
    __m256i w0[NR], w1[NR];  // the block's weights as int16: elements 0..15, 16..31
    KUAIDA_UNROLL
    for (int r = 0; r < NR; ++r) {
      const uint8_t* qb = q + r * K + b * kBlock;
      w0[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
      w1[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)));
    }
    KUAIDA_UNROLL
    for (int i = 0; i < MR; ++i) {
      const int16_t* xb = x + i * K + b * kBlock;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16));
      const __m256 xs = _mm256_broadcast_ss(xd + i * nb + b);
      KUAIDA_UNROLL
      for (int r = 0; r < NR; ++r) {
        const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0[r], x0), _mm256_madd_epi16(w1[r], x1));
        const __m256 scale = _mm256_mul_ps(_mm256_broadcast_ss(dw + r * nb + b), xs);
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i][r]);
      }
    }
  }
  KUAIDA_UNROLL
  for (int i = 0; i < MR; ++i)
    KUAIDA_UNROLL
    for (int r = 0; r < NR; ++r) put(w, i0 + i, n0, r, hsum(acc[i][r]), bias, y);
}

// The last M - i (< MR) activation rows as one tile.
template <int MR, int NR>
void last_tile16(const QWeight& w, const Acts16& a, const float* dw, int64_t i, int64_t M, int64_t n0,
                 const float* bias, float* y) {
  if constexpr (MR > 1) {
    if (M - i == MR - 1) return tile16<MR - 1, NR>(w, a, dw, i, n0, bias, y, i == 0);
    last_tile16<MR - 1, NR>(w, a, dw, i, M, n0, bias, y);
  }
}

// NR weight rows from n0 against all M activation rows, MR at a time; dw: scratch [NR, K / 32].
template <int MR, int NR>
void row_tile16(const QWeight& w, const Acts16& a, int64_t n0, int64_t M, const float* bias, float* y,
                float* dw) {
  row_scales<NR, false>(w, n0, dw, nullptr);
  int64_t i = 0;
  for (; i + MR <= M; i += MR) tile16<MR, NR>(w, a, dw, i, n0, bias, y, i == 0);
  if (i < M) last_tile16<MR, NR>(w, a, dw, i, M, n0, bias, y);
}

// Tile shape (activation rows x weight rows), settable for measurements (set_rows16_tile).
int g_rows16_mr = 4, g_rows16_nr = 2;

void set_rows16_tile(int64_t mr, int64_t nr) {
  TORCH_CHECK((mr == 1 || mr == 2 || mr == 3 || mr == 4 || mr == 6 || mr == 8) && (nr == 1 || nr == 2 || nr == 4),
              "tile: MR in 1, 2, 3, 4, 6, 8 and NR in 1, 2, 4");
  g_rows16_mr = static_cast<int>(mr);
  g_rows16_nr = static_cast<int>(nr);
}

using RowTile16 = void (*)(const QWeight&, const Acts16&, int64_t, int64_t, const float*, float*, float*);

template <int MR>
RowTile16 pick16(int nr) {
  return nr == 4 ? row_tile16<MR, 4> : nr == 2 ? row_tile16<MR, 2> : row_tile16<MR, 1>;
}

RowTile16 pick16(int mr, int nr) {
  switch (mr) {
    case 1: return pick16<1>(nr);
    case 2: return pick16<2>(nr);
    case 3: return pick16<3>(nr);
    case 6: return pick16<6>(nr);
    case 8: return pick16<8>(nr);
    default: return pick16<4>(nr);
  }
}

at::Tensor qlinear16(const at::Tensor& x, const QWeight& w, const std::optional<at::Tensor>& bias) {
  const int64_t M = x.numel() / w.K, nb = w.K / kBlock;
  at::Tensor y = new_output(x, w);
  if (M == 0) return y;
  const Acts16 a = quantize_acts16(x.data_ptr<float>(), M, w.K);
  const int nr = g_rows16_nr;
  const RowTile16 many = pick16(g_rows16_mr, nr), one = pick16(g_rows16_mr, 1);
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  parallel_weight_rows(w, [&](int64_t n, int64_t stop) {
    std::vector<float> dw(kRows * nb);
    for (; n + nr <= stop; n += nr) many(w, a, n, M, b, out, dw.data());
    for (; n < stop; ++n) one(w, a, n, M, b, out, dw.data());
  });
  return y;
}

at::Tensor int8_linear_rows16(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2, "int8 weights: q int8 [N, K]");
  check_inputs(x, q, d, q.size(1));
  check_bias(bias, q.size(0));
  return qlinear16(x, view_weight(q, d, nullptr, q.size(1)), bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("int8_linear", &int8_linear, "y = x @ dequant(q, d)^T + bias; avx512: the AVX-512 VNNI path");
  mod.def("int4_linear", &int4_linear, "y = x @ dequant(q, d, m)^T + bias; avx512: the AVX-512 VNNI path");
  mod.def("int8_linear_rows16", &int8_linear_rows16,
          "y = x @ dequant(q, d)^T + bias with 16-bit activations (vpmaddwd, AVX2): row-independent, for decode");
  mod.def("set_rows16_tile", &set_rows16_tile, "int8_linear_rows16's register tile (MR activation x NR weight rows)");
  mod.def("has_avx512_vnni", &cpu_has_avx512_vnni, "whether the CPU can run the avx512=True path");
  mod.def("int8_dequantize", &int8_dequantize, "out [N, K] fp32 or bf16 <- int8 q, fp16 scales; avx512: may use it");
  mod.def("int4_dequantize", &int4_dequantize,
          "out [N, K] fp32 or bf16 <- packed int4 q, fp16 scales, mins; avx512: may use it");
}
