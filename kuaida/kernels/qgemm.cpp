// Weight-only quantized matmul for CPUs with AVX2 + FMA + F16C:  y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
//
// Weights (formats in kuaida/kernels/reference.py):
//   int8: q int8 [N, K], symmetric;  w = q * d                     d: fp16 [N, K / group]
//   int4: q uint8 [N, K / 2], 0..15; w = q * d + m                 d, m: fp16 [N, K / group]
//         each 32-block of K is 16 bytes: low nibbles hold elements 0..15, high nibbles 16..31.
// group is a multiple of 32. Activations are quantized on the fly to int8 per 32-block
// (xd = absmax / 127), so each block's dot product is integer (maddubs + madd) and one FMA applies
// d * xd. The int4 min term uses the exact fp32 block sums of x: sum_i m * x_i = m * xs.
//
// Decode (M = 1) streams each weight byte from memory once; for M > 1 a block of NR weight rows stays in
// L1 while all M activation rows pass over it, so weights still stream from memory once per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activation block, int4 packing unit; the weight group is a multiple
constexpr int kRows = 4;        // weight rows per register tile: 4 independent accumulator chains

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

// Activations of one call, quantized: q [M, K] int8, d and s [M, K / 32] (scale, exact sum of x).
struct QActs {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

// One 32-block: q = round_half_even(x * (127 / absmax)), d = absmax / 127.
void quantize_block(const float* x, int8_t* q, float* d, float* s) {
  const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  const __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  const float m = hmax(amax);
  *d = m / 127.0f;
  *s = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
  const __m256 id = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
  // cvtps rounds with MXCSR's default mode: to nearest, ties to even (as torch.round).
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
  const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
  const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
  const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
  // packs work per 128-bit lane, leaving 4-byte groups in order 0 2 4 6 1 3 5 7: permute back.
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  const __m256i fixed = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), fixed);
}

QActs quantize_acts(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock;
  QActs a{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) quantize_block(x + b * kBlock, &a.q[b * kBlock], &a.d[b], &a.s[b]);
  });
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

// The 32 weights of block b of a row, as bytes: int8 as stored, int4 unpacked to 0..15.
template <bool kInt4>
inline __m256i load_block(const uint8_t* row, int64_t b) {
  if constexpr (kInt4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
  }
}

// Integer dot product of a weight block and an activation block, as 8 fp32 partial sums.
template <bool kInt4>
inline __m256 dot_block(__m256i w, __m256i x) {
  __m256i p;
  if constexpr (kInt4) {
    p = _mm256_maddubs_epi16(w, x);  // u8 * s8 pairs; 2 * 15 * 127 cannot saturate int16
  } else {
    // maddubs needs one unsigned side: |w| * (x with w's sign); 2 * 128 * 127 < 32767.
    p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  }
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// fp16 per-group values of row n, expanded to one fp32 per 32-block: out [K / 32].
void expand_groups(const uint16_t* src, const QWeight& w, int64_t n, float* out) {
  const int64_t nb = w.K / kBlock, per_group = nb / w.groups;
  const uint16_t* g = src + n * w.groups;
  for (int64_t b = 0; b < nb; ++b) out[b] = _cvtsh_ss(g[b / per_group]);
}

float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// NR weight rows from n0 against all M activation rows; y [M, N]. dw, mw: scratch [NR, K / 32].
template <int NR, bool kInt4>
void row_tile(const QWeight& w, const QActs& a, int64_t n0, int64_t M, const float* bias, float* y,
              float* dw, float* mw) {
  const int64_t nb = w.K / kBlock;
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = w.q + (n0 + r) * w.row_bytes;
    expand_groups(w.d, w, n0 + r, dw + r * nb);
    if constexpr (kInt4) expand_groups(w.m, w, n0 + r, mw + r * nb);
  }
  for (int64_t i = 0; i < M; ++i) {
    const int8_t* xq = a.q.data() + i * w.K;
    const float* xd = a.d.data() + i * nb;
    __m256 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
      for (int r = 0; r < NR; ++r) {
        const __m256 scale = _mm256_set1_ps(dw[r * nb + b] * xd[b]);
        acc[r] = _mm256_fmadd_ps(dot_block<kInt4>(load_block<kInt4>(rows[r], b), x), scale, acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      float v = hsum(acc[r]);
      if constexpr (kInt4) v += dot_f32(mw + r * nb, a.s.data() + i * nb, nb);
      y[i * w.N + n0 + r] = bias ? v + bias[n0 + r] : v;
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(x.size(1) == K && K % kBlock == 0, "K must match the weight and be a multiple of 32");
  TORCH_CHECK(q.is_contiguous() && d.is_contiguous() && d.scalar_type() == at::kHalf, "fp16 scales");
  TORCH_CHECK(d.size(0) == q.size(0) && (K / kBlock) % d.size(1) == 0, "scales: [N, K / group]");
}

template <bool kInt4>
at::Tensor qlinear(const at::Tensor& x, const QWeight& w, const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), nb = w.K / kBlock;
  const QActs a = quantize_acts(x.data_ptr<float>(), M, w.K);
  at::Tensor y = at::empty({M, w.N}, x.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  // Split rows so each thread streams at least ~16 KiB of weights: below that, waking a thread costs more.
  const int64_t grain = std::max<int64_t>(kRows, (16384 / w.row_bytes + kRows - 1) / kRows * kRows);
  at::parallel_for(0, w.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> dw(kRows * nb), mw(kInt4 ? kRows * nb : 0);
    int64_t n = begin;
    for (; n + kRows <= end; n += kRows) row_tile<kRows, kInt4>(w, a, n, M, b, out, dw.data(), mw.data());
    for (; n < end; ++n) row_tile<1, kInt4>(w, a, n, M, b, out, dw.data(), mw.data());
  });
  return y;
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous fp32 [N]");
}

// Dequantized weights, fp32 [N, K]: for large M, where fp32 GEMM (MKL) beats the integer kernel.
template <bool kInt4>
at::Tensor dequantize(const QWeight& w) {
  at::Tensor out = at::empty({w.N, w.K});
  float* o = out.data_ptr<float>();
  const int64_t nb = w.K / kBlock;
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> dw(nb), mw(nb, 0.0f);
    for (int64_t n = begin; n < end; ++n) {
      expand_groups(w.d, w, n, dw.data());
      if constexpr (kInt4) expand_groups(w.m, w, n, mw.data());
      for (int64_t b = 0; b < nb; ++b) {
        alignas(32) int8_t bytes[kBlock];
        _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), load_block<kInt4>(w.q + n * w.row_bytes, b));
        const __m256 d = _mm256_set1_ps(dw[b]), m = _mm256_set1_ps(mw[b]);
        for (int j = 0; j < kBlock; j += 8) {
          const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j));
          const __m256i i = kInt4 ? _mm256_cvtepu8_epi32(v) : _mm256_cvtepi8_epi32(v);
          _mm256_storeu_ps(o + n * w.K + b * kBlock + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, m));
        }
      }
    }
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "int8 weights: q int8 [N, K]");
  check_inputs(x, q, d, q.size(1));
  check_bias(bias, q.size(0));
  return qlinear<false>(x, view_weight(q, d, nullptr, q.size(1)), bias);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "int4 weights: q uint8 [N, K / 2]");
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous(), "mins like scales");
  check_inputs(x, q, d, q.size(1) * 2);
  check_bias(bias, q.size(0));
  return qlinear<true>(x, view_weight(q, d, &m, q.size(1) * 2), bias);
}

at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& d) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && d.is_contiguous(), "int8 q, fp16 d");
  return dequantize<false>(view_weight(q, d, nullptr, q.size(1)));
}

at::Tensor int4_dequantize(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && d.is_contiguous() && m.is_contiguous(),
              "uint8 q, fp16 d and m");
  return dequantize<true>(view_weight(q, d, &m, q.size(1) * 2));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("int8_linear", &int8_linear, "y = x @ dequant(q, d)^T + bias");
  mod.def("int4_linear", &int4_linear, "y = x @ dequant(q, d, m)^T + bias");
  mod.def("int8_dequantize", &int8_dequantize, "fp32 [N, K] from int8 q and fp16 scales");
  mod.def("int4_dequantize", &int4_dequantize, "fp32 [N, K] from packed int4 q, fp16 scales and mins");
}
