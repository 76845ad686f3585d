// Decode attention over a KV cache (one new query token per sequence), AVX2 + FMA.
//
//   out[b, h] = softmax(scale * q[b, h] . K[rows[b], h / G, :len[b]]^T) @ V[rows[b], h / G, :len[b]]
//
// q [B, H, D] fp32; k, v [R, Hkv, S, D] fp32 or fp16 (the preallocated cache: R rows, S positions); rows, lens
// int64 [B]; G = H / Hkv query heads share a key/value head (GQA). One call covers a whole batched decode
// step of one layer: each (row, kv head) pair is a task, and its keys and values are read from memory once
// for all G query heads. Why not SDPA: torch's CPU flash-attention kernel costs ~110 us per row and layer
// for one query over 1,000 keys (3x the time to stream them), and rows of different lengths need one call
// each (or a padded copy of every history). The work streams each history from memory once, so an fp16
// cache halves its time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kMaxGroup = 16;  // query heads per kv head
constexpr int64_t kKeyBlock = 64;  // keys whose values stay in L1 while all D/8 output chunks pass

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 fp16 -> fp32 (F16C)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes-style range reduction x = n ln2 + r and a
// degree-5 polynomial for e^r; relative error ~2e-7. Inputs below -87 flush to 0.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// p[0..L) <- exp(p - max) / sum, in place.
void softmax_inplace(float* p, int64_t L) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < L; ++s) mx = std::max(mx, p[s]);
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= L; s += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + s), m8));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  for (; s < L; ++s) {
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (s = 0; s + 8 <= L; s += 8) _mm256_storeu_ps(p + s, _mm256_mul_ps(_mm256_loadu_ps(p + s), inv));
  for (; s < L; ++s) p[s] /= sum;
}

// One (sequence, kv head): G query heads q [G, D] over keys/values k, v [L, D] -> out [G, D].
// p: scratch [G, L].
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t G, int64_t L, int64_t D, float scale,
            float* p, float* out) {
  for (int64_t s = 0; s < L; ++s) {  // scores: each key row is loaded once for all G heads
    const T* ks = k + s * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), load8(ks));
      for (int64_t c = 8; c < D; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + c), load8(ks + c), acc);
      p[g * L + s] = hsum8(acc) * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax_inplace(p + g * L, L);
  std::fill(out, out + G * D, 0.0f);
  for (int64_t s0 = 0; s0 < L; s0 += kKeyBlock) {  // values: a block of rows stays in L1 across chunks
    const int64_t s1 = std::min(L, s0 + kKeyBlock);
    for (int64_t c = 0; c < D; c += 8) {
      __m256 acc[kMaxGroup];
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_loadu_ps(out + g * D + c);
      for (int64_t s = s0; s < s1; ++s) {
        const __m256 vs = load8(v + s * D + c);
        for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * L + s]), vs, acc[g]);
      }
      for (int64_t g = 0; g < G; ++g) _mm256_storeu_ps(out + g * D + c, acc[g]);
    }
  }
}

template <typename T>
void attend_all(const at::Tensor& q, const T* kp, const T* vp, const int64_t* row, const int64_t* len,
                int64_t Hkv, int64_t S, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = H / Hkv;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv, L = len[b];
      p.resize(G * L);
      const int64_t kv_off = ((row[b] * Hkv + h) * S) * D;
      attend(qp + (b * H + h * G) * D, kp + kv_off, vp + kv_off, G, L, D, scale, p.data(), op + (b * H + h * G) * D);
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& rows, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous fp32 [B, H, D]");
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == k.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "k, v: contiguous fp32 or fp16 [R, Hkv, S, D]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && rows.is_contiguous() &&
              lens.is_contiguous() && rows.numel() == q.size(0) && lens.numel() == q.size(0), "rows, lens: int64 [B]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), R = k.size(0), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(3) == D && D % 8 == 0, "head_dim must match and be a multiple of 8");
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup, "query heads must be a multiple of kv heads (at most 16x)");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < R && len[b] >= 1 && len[b] <= S, "row or length out of the cache's range");
  }
  at::Tensor out = at::empty_like(q);
  const float sc = static_cast<float>(scale);
  if (k.scalar_type() == at::kHalf) {
    attend_all(q, reinterpret_cast<const uint16_t*>(k.data_ptr()), reinterpret_cast<const uint16_t*>(v.data_ptr()),
               row, len, Hkv, S, sc, out);
  } else {
    attend_all(q, k.data_ptr<float>(), v.data_ptr<float>(), row, len, Hkv, S, sc, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("decode_attention", &decode_attention, "one query per sequence over its cached keys/values (GQA)");
}
