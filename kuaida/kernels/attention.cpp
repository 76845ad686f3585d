// Decode attention over a KV cache (one new query token per sequence), AVX2 + FMA.
//
//   out[b, h] = softmax(scale * q[b, h] . K[rows[b], h / G, :len[b]]^T) @ V[rows[b], h / G, :len[b]]
//
// q [B, H, D] fp32; k, v [R, Hkv, S, D] fp32 or fp16 (the preallocated cache: R rows, S positions); rows, lens
// int64 [B]; G = H / Hkv query heads share a key/value head (GQA). One call covers a whole batched decode
// step of one layer, and reads each key and value from memory once for every query that attends to it: the
// G heads of an entry, the entries of one row (prompt-lookup drafts), and entries whose rows hold copies of
// one prefix (a system prompt; `srcs`, `shared`, see decode_step). Why not SDPA: torch's CPU flash-attention
// kernel costs ~110 us per row and layer for one query over 1,000 keys (3x the time to stream them), and
// rows of different lengths need one call each (or a padded copy of every history). The work streams the
// histories from memory, so an fp16 cache halves its time.
//
// Prefill attention (many new query tokens of one sequence over its cached prefix): AVX-512 BF16 in
// prefill_attention below, AVX2 fp32 in prefill_attention_fp32 for the other CPUs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace {

constexpr int64_t kMaxGroup = 16;  // query heads per kv head
constexpr int64_t kKeyBlock = 64;  // keys whose values stay in L1 while all D/8 output chunks pass

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
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
  // The max in 8 lanes (a scalar loop does not vectorize without -ffast-math); exact in any order.
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + t));
  float mx = hmax8(m);
  for (; t < L; ++t) mx = std::max(mx, p[t]);
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

// ---- The batched decode step ---------------------------------------------------------------------
//
// Entry b (one query token) attends to cache positions [0, len[b]): [0, shared[b]) read from cache row
// src[b], [shared[b], len[b]) from its own row[b]. The caller guarantees that src's positions [0, shared)
// hold bitwise the same keys/values as row's (a system prompt copied from one slot into others; drafts of
// one request share their row). Entries are grouped into segments that read each key and value once for
// all their members: "prefix" segments (entries with the same src, their [0, shared)) and "own" segments
// (entries with the same row, their [shared, len)). Every entry's arithmetic is the same whichever entries
// share its segments, or with shared = 0: scores one dot product each, softmax over its own row of scores,
// then its output as one chain of fused multiply-adds over its keys in order (prefix segments before own
// ones). So a reply does not depend on the requests beside it, and grouping changes only the bytes read.
//
// Four phases in one OpenMP region, split into small units for the threads: scores (segment, kv head,
// chunk of keys) -> p [B, H, Lmax]; softmax of each (entry, head) row, output zeroed; P @ V of the prefix
// segments, then of the own segments (segment, kv head).

constexpr int64_t kScoreChunk = 256;  // keys per scores unit (a multiple of 8)
// Output dims per P @ V unit: all of them. Units of 32 dims (one cache line of fp16 values per key) balanced
// small batches better but cost ~15 % at 8 rows: the two halves of a line pair were fetched apart.
constexpr int64_t kOutDims = 256;
constexpr int64_t kMaxDim = 256;
constexpr int64_t kPrefetchKeys = 32;  // how far ahead score and P @ V units fetch keys / values

struct Segment {
  int64_t row;                   // the cache row it reads
  bool prefix;                   // members' [0, shared) (else [shared, len))
  std::vector<int64_t> members;  // entries
  int64_t lo, hi;                // union of the members' key ranges
};

struct Unit {
  int32_t seg, head;
  int64_t a, b;  // keys [a, b) (scores) or output dims [a, b) (P @ V)
};

struct DecodeArgs {
  const float* q;
  float* out;
  float* p;  // scores then softmax weights [B, H, Lmax]
  const int64_t *row, *len, *src, *shared;
  int64_t H, Hkv, G, S, D, Lmax;
  float scale;
};

inline void member_range(const DecodeArgs& a, const Segment& seg, int64_t b, int64_t& lo, int64_t& hi) {
  lo = seg.prefix ? 0 : a.shared[b];
  hi = seg.prefix ? a.shared[b] : a.len[b];
}

// Eight sums of eight lanes: [sum(a0), ..., sum(a7)], each vector's lanes added in the same order.
inline __m256 hsum8x8(const __m256 (&a)[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Scores of keys [u.a, u.b) (u.a a multiple of 8) for every member query that sees them: 8 keys at a time,
// converted to fp32 once for all members and heads, one accumulator per key, one reduction per 8 keys. A
// key's score depends only on its query and key (not on the block or the keys beside it).
template <typename T>
void score_unit(const DecodeArgs& a, const Segment& seg, const T* k, const Unit& u) {
  alignas(32) float kf[8 * kMaxDim];
  alignas(32) float sc[8];
  const T* base = k + (seg.row * a.Hkv + u.head) * a.S * a.D;
  for (int64_t s = u.a; s < u.b; s += 8) {
    // Units are short streams (a few hundred keys): fetch ahead, the hardware prefetcher ramps up too late.
    const char* ahead = reinterpret_cast<const char*>(base + std::min(s + kPrefetchKeys, seg.hi - 1) * a.D);
    for (int64_t off = 0; off < int64_t(8 * a.D * sizeof(T)); off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    for (int64_t j = 0; j < 8; ++j) {
      float* kj = kf + j * a.D;
      if (s + j < seg.lo || s + j >= seg.hi) {  // outside every member's keys (maybe outside the cache)
        std::fill(kj, kj + a.D, 0.0f);
        continue;
      }
      const T* ks = base + (s + j) * a.D;
      for (int64_t c = 0; c < a.D; c += 8) _mm256_store_ps(kj + c, load8(ks + c));
    }
    for (const int64_t b : seg.members) {
      int64_t lo, hi;
      member_range(a, seg, b, lo, hi);
      lo = std::max(lo, s), hi = std::min(hi, s + 8);
      if (lo >= hi) continue;
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t hh = u.head * a.G + g;
        const float* qg = a.q + (b * a.H + hh) * a.D;
        __m256 acc[8];
        const __m256 q0 = _mm256_loadu_ps(qg);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_mul_ps(q0, _mm256_load_ps(kf + j * a.D));
        for (int64_t c = 8; c < a.D; c += 8) {
          const __m256 qc = _mm256_loadu_ps(qg + c);
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qc, _mm256_load_ps(kf + j * a.D + c), acc[j]);
        }
        const __m256 scores = _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(a.scale));
        float* pr = a.p + (b * a.H + hh) * a.Lmax;
        if (lo == s && hi == s + 8) {  // the member sees the whole block (almost always)
          _mm256_storeu_ps(pr + s, scores);
          continue;
        }
        _mm256_store_ps(sc, scores);
        for (int64_t t = lo; t < hi; ++t) pr[t] = sc[t - s];
      }
    }
  }
}

// out += P @ V over the segment's keys for each member, output dims [u.a, u.b): one fused multiply-add
// chain per output element, keys in order. GC: the query heads per kv head as a constant (0: runtime), NC
// the 8-dim chunks held at once, so that the G x NC accumulators stay in registers and each key's weights
// are broadcast once per part (a runtime count made this loop ~1.5x slower).
template <typename T, int GC, int NC>
void pv_unit_g(const DecodeArgs& a, const Segment& seg, const T* v, const Unit& u) {
  constexpr int kG = GC > 0 ? GC : kMaxGroup;
  const int64_t G = GC > 0 ? GC : a.G, D = a.D, Lmax = a.Lmax;
  const T* base = v + (seg.row * a.Hkv + u.head) * a.S * D;
  for (int64_t s0 = seg.lo; s0 < seg.hi; s0 += kKeyBlock) {  // a block of values stays in L1 across members
    const int64_t s1 = std::min(seg.hi, s0 + kKeyBlock);
    for (int64_t s = s1; s < std::min(seg.hi, s1 + kPrefetchKeys); ++s)  // the next block's first values
      for (int64_t d = u.a; d < u.b; d += 64 / int64_t(sizeof(T))) _mm_prefetch(reinterpret_cast<const char*>(base + s * D + d), _MM_HINT_T0);
    for (const int64_t b : seg.members) {
      int64_t lo, hi;
      member_range(a, seg, b, lo, hi);
      lo = std::max(lo, s0), hi = std::min(hi, s1);
      if (lo >= hi) continue;
      const float* pb = a.p + (b * a.H + u.head * G) * Lmax;
      float* ob = a.out + (b * a.H + u.head * G) * D;
      for (int64_t d0 = u.a; d0 < u.b; d0 += 8 * NC) {
        __m256 acc[kG][NC];
        for (int64_t g = 0; g < G; ++g)
          for (int c = 0; c < NC; ++c) acc[g][c] = _mm256_loadu_ps(ob + g * D + d0 + 8 * c);
        for (int64_t s = lo; s < hi; ++s) {
          __m256 pg[kG];
          for (int64_t g = 0; g < G; ++g) pg[g] = _mm256_broadcast_ss(pb + g * Lmax + s);
          const T* vs = base + s * D + d0;
          for (int c = 0; c < NC; ++c) {
            const __m256 vc = load8(vs + 8 * c);
            for (int64_t g = 0; g < G; ++g) acc[g][c] = _mm256_fmadd_ps(pg[g], vc, acc[g][c]);
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int c = 0; c < NC; ++c) _mm256_storeu_ps(ob + g * D + d0 + 8 * c, acc[g][c]);
      }
    }
  }
}

template <typename T>
void pv_unit(const DecodeArgs& a, const Segment& seg, const T* v, const Unit& u) {
  // Units span a multiple of 32 dims when D is one (else 8: D % 8 == 0); a part of 8 * NC dims must divide it.
  const bool wide = (u.b - u.a) % 32 == 0;
  switch (a.G) {
    case 1: return wide ? pv_unit_g<T, 1, 4>(a, seg, v, u) : pv_unit_g<T, 1, 1>(a, seg, v, u);
    case 2: return wide ? pv_unit_g<T, 2, 4>(a, seg, v, u) : pv_unit_g<T, 2, 1>(a, seg, v, u);
    case 3: return wide ? pv_unit_g<T, 3, 4>(a, seg, v, u) : pv_unit_g<T, 3, 1>(a, seg, v, u);
    case 4: return wide ? pv_unit_g<T, 4, 2>(a, seg, v, u) : pv_unit_g<T, 4, 1>(a, seg, v, u);
    case 5: return wide ? pv_unit_g<T, 5, 2>(a, seg, v, u) : pv_unit_g<T, 5, 1>(a, seg, v, u);
    case 6: return wide ? pv_unit_g<T, 6, 2>(a, seg, v, u) : pv_unit_g<T, 6, 1>(a, seg, v, u);
    case 7: return pv_unit_g<T, 7, 1>(a, seg, v, u);
    case 8: return pv_unit_g<T, 8, 1>(a, seg, v, u);
    default: return pv_unit_g<T, 0, 1>(a, seg, v, u);
  }
}

// Segments: prefix ones (entries with shared > 0, by src), then own ones (entries with len > shared, by row).
std::vector<Segment> make_segments(const DecodeArgs& a, int64_t B) {
  std::vector<Segment> segs;
  for (int pass = 0; pass < 2; ++pass) {
    const bool prefix = pass == 0;
    const size_t first = segs.size();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t lo = prefix ? 0 : a.shared[b], hi = prefix ? a.shared[b] : a.len[b];
      if (lo >= hi) continue;
      const int64_t r = prefix ? a.src[b] : a.row[b];
      size_t i = first;
      while (i < segs.size() && segs[i].row != r) ++i;
      if (i == segs.size()) segs.push_back(Segment{r, prefix, {}, lo, hi});
      segs[i].members.push_back(b);
      segs[i].lo = std::min(segs[i].lo, lo), segs[i].hi = std::max(segs[i].hi, hi);
    }
  }
  return segs;
}

template <typename T>
void decode_step(const DecodeArgs& a, int64_t B, const T* k, const T* v) {
  const std::vector<Segment> segs = make_segments(a, B);
  std::vector<Unit> scores, pv_prefix, pv_own;
  for (int32_t i = 0; i < int32_t(segs.size()); ++i) {
    for (int32_t h = 0; h < a.Hkv; ++h) {
      for (int64_t s = segs[i].lo / 8 * 8; s < segs[i].hi; s += kScoreChunk) scores.push_back({i, h, s, std::min(segs[i].hi, s + kScoreChunk)});
      for (int64_t d = 0; d < a.D; d += kOutDims) (segs[i].prefix ? pv_prefix : pv_own).push_back({i, h, d, std::min(a.D, d + kOutDims)});
    }
  }
  const int64_t rows = B * a.H;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(scores.size()))));
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < scores.size(); ++i) score_unit(a, segs[scores[i].seg], k, scores[i]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      softmax_inplace(a.p + r * a.Lmax, a.len[r / a.H]);
      std::fill(a.out + r * a.D, a.out + (r + 1) * a.D, 0.0f);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < pv_prefix.size(); ++i) pv_unit(a, segs[pv_prefix[i].seg], v, pv_prefix[i]);
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < pv_own.size(); ++i) pv_unit(a, segs[pv_own[i].seg], v, pv_own[i]);
  }
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& rows, const at::Tensor& lens, const at::Tensor& srcs,
                            const at::Tensor& shared, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous fp32 [B, H, D]");
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == k.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "k, v: contiguous fp32 or fp16 [R, Hkv, S, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), R = k.size(0), Hkv = k.size(1), S = k.size(2);
  for (const at::Tensor* t : {&rows, &lens, &srcs, &shared}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == B,
                "rows, lens, srcs, shared: int64 [B]");
  }
  TORCH_CHECK(k.size(3) == D && D % 8 == 0 && D <= kMaxDim, "head_dim must match, be a multiple of 8, at most 256");
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup, "query heads must be a multiple of kv heads (at most 16x)");
  const int64_t *row = rows.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>();
  const int64_t *src = srcs.data_ptr<int64_t>(), *sh = shared.data_ptr<int64_t>();
  int64_t Lmax = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < R && src[b] >= 0 && src[b] < R && len[b] >= 1 && len[b] <= S,
                "row or length out of the cache's range");
    TORCH_CHECK(sh[b] >= 0 && sh[b] <= len[b], "shared must be within [0, len]");
    Lmax = std::max(Lmax, len[b]);
  }
  at::Tensor out = at::empty_like(q);
  // Scores for the whole step, per calling thread, kept across calls (a fresh ~0.3 MB would be mapped and
  // faulted in at every layer).
  thread_local std::vector<float> scratch;
  if (int64_t(scratch.size()) < B * H * Lmax) scratch.resize(B * H * Lmax);
  const DecodeArgs a{q.data_ptr<float>(), out.data_ptr<float>(), scratch.data(), row, len, src, sh,
                     H, Hkv, H / Hkv, S, D, Lmax, static_cast<float>(scale)};
  if (k.scalar_type() == at::kHalf) {
    decode_step(a, B, reinterpret_cast<const uint16_t*>(k.data_ptr()), reinterpret_cast<const uint16_t*>(v.data_ptr()));
  } else {
    decode_step(a, B, k.data_ptr<float>(), v.data_ptr<float>());
  }
  return out;
}

// ---- Prefill attention, AVX-512 BF16 ----------------------------------------------------------------------
//
//   out[h, t] = softmax_{j <= pos[t]}(scale * q[h, t] . K[row, h / G, j]) @ V[row, h / G, j]
//
// q [H, T, D] fp32 (any strides, d contiguous); k, v [R, Hkv, S, D] fp16, read in place (the new tokens'
// keys/values already written); pos int64 [T] strictly increasing, gaps allowed (a prompt around passages
// written from a passage cache) -> out [H, T, D] fp32, stored [T, H, D] so that o_proj's input
// [T, H * D] is a view.
//
// Why: the SDPA path copies the prefix to fp32 and runs torch's fp32 attention at ~140 GFLOP/s (2 threads,
// T = 47 over 1,272 keys); vdpbf16ps does 32 multiply-adds with fp32 accumulation per instruction. A small
// GEMM in three steps:
//   1. pack the prefix once per call, shared by all tasks: keys as bf16 [Hkv][S/16][D/2][16][2] (a "panel":
//      16 keys' pair d, d+1 fill one zmm, broadcast q pairs against it) and values as [Hkv][S/2][D][2] (keys
//      j, j+1 of one d in a 32-bit lane, broadcast P pairs against it), zero past the prefix.
//   2. a task = (kv head, kQueryBlock query tokens x its G heads = rows): scores [rows, L] fp32 with L = the
//      block's last position + 1 (key panels past it are skipped: causal); per row mask, max, exp and sum in
//      fp32, P = exp(s - max) rounded to bf16 (computed as 2^x of scores scaled by log2(e)).
//   3. out rows = (P @ V) / sum, fp32 accumulation.
// Numerics: q, k, P and v are rounded to bf16 (8-bit mantissa); tests bound the difference to fp32 SDPA.
// Measured (Zen 5, 2 threads, T = 47 over 1,272 keys): 0.26 ms per layer against 1.05 ms for fp32 SDPA
// (benchmarks/results/kernels.md).
#define KUAIDA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}

constexpr int64_t kPanel = 16;       // keys per panel (one zmm of scores)
constexpr int kRows = 6;             // query rows per register tile: scores 6 x 4 panels, P @ V 6 x 64 dims
constexpr int kPanels = 4;           // 24 accumulators + 4 loads + 1 broadcast of the 32 zmm
constexpr int64_t kQueryBlock = 8;   // query tokens per task: 8 x G = 3 -> 24 rows = 4 tiles, no padding

KUAIDA_AVX512_BF16 inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// 16 fp16 -> 16 bf16 (round to nearest even) in the low halves of 32-bit lanes.
KUAIDA_AVX512_BF16 inline __m512i fp16_to_bf16_lanes(const uint16_t* p) {
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f));
}

// 2^x for x <= 0 (scores are kept in log2 units, see score_tile): x = n + f, |f| <= 1/2, Cephes' exp2f
// polynomial for 2^f (relative error 1e-7), then scalef multiplies by 2^n (0 for very negative x).
KUAIDA_AVX512_BF16 inline __m512 exp2_512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// r[0..16) <- its transpose (16 x 16 32-bit lanes): four rounds, each swapping the off-diagonal b x b blocks
// of every 2b x 2b block (b = 8, 4, 2, 1) with two-source permutes.
KUAIDA_AVX512_BF16 void transpose16(__m512i* r) {
  // The permute indices of each round, computed once (building them per call cost more than the permutes).
  struct Indices {
    alignas(64) int32_t lo[4][16], hi[4][16];
    Indices() {
      for (int round = 0, b = 8; b >= 1; b /= 2, ++round)
        for (int j = 0; j < 16; ++j) {
          // row i keeps its columns without bit b, takes row i + b's
          lo[round][j] = (j & b) ? 16 + j - b : j;
          hi[round][j] = (j & b) ? 16 + j : j + b;
        }
    }
  };
  static const Indices idx;
  for (int round = 0, b = 8; b >= 1; b /= 2, ++round) {
    const __m512i ilo = _mm512_load_si512(idx.lo[round]), ihi = _mm512_load_si512(idx.hi[round]);
    for (int i = 0; i < 16; ++i) {
      if (i & b) continue;
      const __m512i a = r[i], c = r[i + b];
      r[i] = _mm512_permutex2var_epi32(a, ilo, c);
      r[i + b] = _mm512_permutex2var_epi32(a, ihi, c);
    }
  }
}

// Keys/values [j0, j0 + 16) of one kv head (k, v: fp16 rows of D from key j0; the first n exist, the rest
// become zeros) -> one key panel kp [D/2][16] and 8 value pairs vp [8][D], 32-bit lanes of bf16 pairs.
KUAIDA_AVX512_BF16 void pack_panel(const uint16_t* k, const uint16_t* v, int64_t n, int64_t D, uint32_t* kp,
                                   uint32_t* vp) {
  for (int64_t d = 0; d < D; d += 32) {  // pairs d/2 .. d/2 + 15 of the 16 keys: a 16 x 16 transpose
    __m512i r[kPanel];
    for (int64_t i = 0; i < kPanel; ++i) {
      r[i] = _mm512_setzero_si512();
      if (i < n) {
        const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + i * D + d)));
        const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + i * D + d + 16)));
        r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // bf16 d .. d + 31 of key i
      }
    }
    transpose16(r);
    for (int64_t p = 0; p < kPanel; ++p) _mm512_storeu_si512(kp + (d / 2 + p) * kPanel, r[p]);
  }
  for (int64_t i = 0; i < kPanel / 2; ++i) {
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i a = 2 * i < n ? fp16_to_bf16_lanes(v + 2 * i * D + d) : _mm512_setzero_si512();
      const __m512i b = 2 * i + 1 < n ? fp16_to_bf16_lanes(v + (2 * i + 1) * D + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + i * D + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// Scores of MR query rows (q: bf16 pairs [MR][P]) against NR key panels (kp: [NR][P][16] pairs):
// s[r][16 n + i] = scale * q[r] . key[16 n + i] (the caller passes scale * log2(e): softmax then needs 2^x,
// cheaper than e^x).
template <int MR, int NR>
KUAIDA_AVX512_BF16 void score_tile(const uint32_t* q, const uint32_t* kp, int64_t P, float scale, float* s,
                                   int64_t lds) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh k[NR];
    for (int n = 0; n < NR; ++n) k[n] = as_bh(_mm512_loadu_si512(kp + (n * P + p) * kPanel));
    for (int r = 0; r < MR; ++r) {
      const __m512bh qb = as_bh(_mm512_set1_epi32(static_cast<int>(q[r * P + p])));
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], k[n], qb);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) _mm512_storeu_ps(s + r * lds + n * kPanel, _mm512_mul_ps(acc[r][n], sc));
}

// A row of scores s[0, width) (log2 units) with keys [0, len) visible -> p[0, width) = bf16 2^(s - max), 0
// where masked; returns the sum of the (fp32) powers.
KUAIDA_AVX512_BF16 float softmax_row(const float* s, int64_t len, int64_t width, uint16_t* p) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + kPanel <= len; j += kPanel) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  if (j < len) {
    const __mmask16 live = static_cast<__mmask16>((1u << (len - j)) - 1);
    mx = _mm512_mask_max_ps(mx, live, mx, _mm512_maskz_loadu_ps(live, s + j));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j < width; j += kPanel) {
    __m512 e = _mm512_setzero_ps();
    if (j + kPanel <= len) {
      e = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    } else if (j < len) {
      const __mmask16 live = static_cast<__mmask16>((1u << (len - j)) - 1);
      e = _mm512_maskz_mov_ps(live, exp2_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), m)));
    }
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(sum);
}

// out[r][d0, d0 + 16 NC) = inv[r] * sum_j P[r][j] v[j][d0 ...] for MR rows; p: bf16 pairs [MR][ldp],
// vp: value pairs [npairs][D] from d0.
template <int MR, int NC>
KUAIDA_AVX512_BF16 void pv_tile(const uint32_t* p, int64_t ldp, const uint32_t* vp, int64_t npairs, int64_t D,
                                const float* inv, float* const* out, int64_t d0) {
  __m512 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < npairs; ++jp) {
    __m512bh v[NC];
    for (int c = 0; c < NC; ++c) v[c] = as_bh(_mm512_loadu_si512(vp + jp * D + c * 16));
    for (int r = 0; r < MR; ++r) {
      const __m512bh pb = as_bh(_mm512_set1_epi32(static_cast<int>(p[r * ldp + jp])));
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v[c], pb);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out[r] + d0 + c * 16, _mm512_mul_ps(acc[r][c], s));
  }
}

struct PrefillArgs {
  const float* q;
  int64_t q_head, q_tok;  // q's strides (elements) over heads and tokens
  const uint32_t* kp;     // packed keys [Hkv][Spad / 16][D / 2][16]
  const uint32_t* vp;     // packed values [Hkv][Spad / 2][D]
  int64_t head_pairs;     // 32-bit elements per kv head in kp and vp: Spad * D / 2
  const int64_t* pos;
  int64_t H, G, D;
  float scale;  // 1/sqrt(D) * log2(e): scores in log2 units
  float* out;   // [T, H, D]
};

struct PrefillScratch {  // per worker thread, reused across calls
  std::vector<uint32_t> q;
  std::vector<float> s;
  std::vector<uint16_t> p;
  std::vector<float> inv, sink;
};

template <int NR>
KUAIDA_AVX512_BF16 void score_rows(const uint32_t* q, const uint32_t* kp, int64_t rows, int64_t P, float scale,
                                   float* s, int64_t lds) {
  for (int64_t r = 0; r < rows; r += kRows) score_tile<kRows, NR>(q + r * P, kp, P, scale, s + r * lds, lds);
}

// One task: kv head h, query tokens [t0, t1) (rows r = (t - t0) * G + g for query head h * G + g).
KUAIDA_AVX512_BF16 void prefill_task(const PrefillArgs& a, int64_t h, int64_t t0, int64_t t1, PrefillScratch& w) {
  const int64_t G = a.G, D = a.D, P = D / 2;
  const int64_t rows = (t1 - t0) * G, rows_pad = (rows + kRows - 1) / kRows * kRows;
  const int64_t L = a.pos[t1 - 1] + 1, panels = (L + kPanel - 1) / kPanel, width = panels * kPanel;
  w.q.resize(rows_pad * P);
  w.s.resize(rows_pad * width);
  w.p.resize(rows_pad * width);
  w.inv.resize(rows_pad);
  w.sink.resize(D);
  for (int64_t r = 0; r < rows_pad; ++r) {  // q rows -> bf16 pairs (padding rows: zeros)
    const float* qr = a.q + (h * G + r % G) * a.q_head + (t0 + std::min(r, rows - 1) / G) * a.q_tok;
    for (int64_t d = 0; d < D; d += 32) {
      __m512i b = _mm512_setzero_si512();
      if (r < rows) b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(qr + d + 16), _mm512_loadu_ps(qr + d));
      _mm512_storeu_si512(w.q.data() + r * P + d / 2, b);
    }
  }
  const uint32_t* kp = a.kp + h * a.head_pairs;
  for (int64_t n = 0; n < panels; n += kPanels) {  // a group of key panels (8 KB at D = 64) stays in L1
    const uint32_t* kn = kp + n * P * kPanel;
    float* sn = w.s.data() + n * kPanel;
    switch (std::min<int64_t>(kPanels, panels - n)) {
      case 4: score_rows<4>(w.q.data(), kn, rows_pad, P, a.scale, sn, width); break;
      case 3: score_rows<3>(w.q.data(), kn, rows_pad, P, a.scale, sn, width); break;
      case 2: score_rows<2>(w.q.data(), kn, rows_pad, P, a.scale, sn, width); break;
      default: score_rows<1>(w.q.data(), kn, rows_pad, P, a.scale, sn, width);
    }
  }
  for (int64_t r = 0; r < rows_pad; ++r) {
    uint16_t* pr = w.p.data() + r * width;
    if (r < rows) {
      w.inv[r] = 1.0f / softmax_row(w.s.data() + r * width, a.pos[t0 + r / G] + 1, width, pr);
    } else {
      std::fill(pr, pr + width, 0);
      w.inv[r] = 0.0f;
    }
  }
  const uint32_t* vp = a.vp + h * a.head_pairs;
  const uint32_t* p32 = reinterpret_cast<const uint32_t*>(w.p.data());
  const int64_t npairs = (L + 1) / 2;
  for (int64_t r0 = 0; r0 < rows_pad; r0 += kRows) {
    float* out[kRows];
    for (int64_t i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      out[i] = r < rows ? a.out + ((t0 + r / G) * a.H + h * G + r % G) * D : w.sink.data();
    }
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // D % 32 == 0: 64-wide chunks, then maybe one of 32
      const uint32_t* pr = p32 + r0 * width / 2;
      if (D - d0 >= 64) {
        pv_tile<kRows, 4>(pr, width / 2, vp + d0, npairs, D, w.inv.data() + r0, out, d0);
      } else {
        pv_tile<kRows, 2>(pr, width / 2, vp + d0, npairs, D, w.inv.data() + r0, out, d0);
      }
    }
  }
}

// -- int8 weights x many rows, AVX-512 BF16 ----------------------------------------------------------
// y [M, N] = x [M, K] @ dequant(q [N, K] int8, d [N, groups] fp16)^T (+ bias), for prefill-sized M (the
// integer kernel in qgemm.cpp serves a few rows). The former many-row path dequantized the whole layer into
// a bf16 buffer and called oneDNN, which then reorders it. Here the roles of attention's score tile are
// swapped: the activations are packed once per call into panels of 16 rows ([K/2][16] bf16 pairs, the
// "keys"), and each thread dequantizes kWRows weight rows at a time, row after row, into bf16 pairs (the
// "queries", broadcast one pair at a time): the weights need no transpose, every weight byte is read once,
// and nothing the size of a layer is written. Output tiles [kWRows weight rows][16 x panels] are stored
// transposed into y.
// Numerics: weights q * d and activations rounded to bf16 (RNE), fp32 accumulation.
constexpr int kWRows = 12;  // weight rows per tile: 12 x 2 panels = 24 accumulators

// 32 int8 weights from src times their group's scale -> 32 bf16 (RNE) in element order (bf16 pairs).
KUAIDA_AVX512_BF16 inline __m512bh int8_block_bf16(const int8_t* src, const at::Half* scale) {
  const __m512 sc = _mm512_set1_ps(_cvtsh_ss(scale->x));
  const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)))), sc);
  const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)))), sc);
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// Weight rows [0, n) of q (K int8 each, scales d) -> bf16 pairs [n][K/2].
KUAIDA_AVX512_BF16 void dequant_rows_int8(const int8_t* q, const at::Half* d, int64_t K, int64_t groups,
                                          int64_t n, uint32_t* out) {
  const int64_t per_group = K / groups;  // a multiple of 32 (group sizes are)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k0 = 0; k0 < K; k0 += 32)
      _mm512_storeu_si512(out + i * (K / 2) + k0 / 2,
                          (__m512i)int8_block_bf16(q + i * K + k0, d + i * groups + k0 / per_group));
  }
}

// x [M, K] fp32 -> panels [ceil(M/16)][K/2][16] of bf16 pairs (rows past M zero).
KUAIDA_AVX512_BF16 void pack_rows_bf16(const float* x, int64_t M, int64_t K, uint32_t* panels) {
  const int64_t P = K / 2;
  for (int64_t m0 = 0; m0 < M; m0 += kPanel) {
    uint32_t* panel = panels + (m0 / kPanel) * P * kPanel;
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      __m512i r[kPanel];
      for (int64_t i = 0; i < kPanel; ++i) {
        if (m0 + i >= M) {
          r[i] = _mm512_setzero_si512();
          continue;
        }
        const float* src = x + (m0 + i) * K + k0;
        r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
      }
      transpose16(r);
      for (int64_t p = 0; p < kPanel; ++p) _mm512_storeu_si512(panel + (k0 / 2 + p) * kPanel, r[p]);
    }
  }
}

struct Int8Gemm {
  const uint32_t* xp;  // activation panels
  int64_t M, panels, N, K, groups;
  const int8_t* q;
  const at::Half* d;
  const float* bias;
  float* out;
};

// Weight rows [n0, n0 + rows) against every activation panel.
KUAIDA_AVX512_BF16 void int8_gemm_task(const Int8Gemm& g, int64_t n0, int64_t rows, uint32_t* w, float* s) {
  const int64_t P = g.K / 2;
  dequant_rows_int8(g.q + n0 * g.K, g.d + n0 * g.groups, g.K, g.groups, rows, w);
  if (rows < kWRows) std::fill(w + rows * P, w + kWRows * P, 0u);
  constexpr int64_t lds = 2 * kPanel;
  for (int64_t j = 0; j < g.panels; j += 2) {
    const int64_t np = std::min<int64_t>(2, g.panels - j);
    if (np == 2) {
      score_tile<kWRows, 2>(w, g.xp + j * P * kPanel, P, 1.0f, s, lds);
    } else {
      score_tile<kWRows, 1>(w, g.xp + j * P * kPanel, P, 1.0f, s, lds);
    }
    const int64_t m_end = std::min<int64_t>(g.M, (j + np) * kPanel);
    for (int64_t m = j * kPanel; m < m_end; ++m) {  // s[r][m - j * 16] -> y[m][n0 + r]
      float* o = g.out + m * g.N + n0;
      const float* sc = s + (m - j * kPanel);
      for (int64_t r = 0; r < rows; ++r) o[r] = g.bias ? sc[r * lds] + g.bias[n0 + r] : sc[r * lds];
    }
  }
}

// -- int8 weights x a few rows (decode), AVX-512 BF16 ----------------------------------------------
// y [M, N] for decode-sized M (1 .. ~16 rows), where int8_linear_bf16's 16-row panels would be mostly
// padding. The integer kernel (qgemm.cpp) is compute-bound from ~4 rows here: per 64 weights and row it
// takes two vpdpbusd (15-bit activations in two halves), a shift, and one int -> fp32 conversion, multiply
// and FMA to apply the two 32-blocks' scales. Here each weight block is dequantized once into bf16 (q * d,
// the same values int8_linear_bf16 uses) and serves every activation row of the tile with one
// vdpbf16ps per 32 weights: no per-block scale work per row. Numerics: weights and activations rounded to
// bf16 (RNE), each output one fp32 accumulator chain over K in order, then one fixed 16-lane reduction;
// the arithmetic of an output is the same whatever M and whichever tile its row lands in, so a row's
// result does not depend on the rows that share the call (what batched decoding needs).
constexpr int kDecodeRows = 8;  // activation rows per register tile: 8 x 2 accumulators

// x [M, K] fp32 -> bf16 [M, K] (pairs [M][K/2]), RNE.
KUAIDA_AVX512_BF16 void rows_bf16(const float* x, int64_t M, int64_t K, uint32_t* out) {
  for (int64_t i = 0; i < M * K; i += 32)
    _mm512_storeu_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16),
                                                                   _mm512_loadu_ps(x + i)));
}

struct Int8Decode {
  const uint32_t* xb;  // activations as bf16 pairs [M][K/2]
  int64_t M, N, K, groups;
  const int8_t* q;
  const at::Half* d;
  const float* bias;
  float* out;
};

// Outputs [i0, i0 + MR) x [n0, n0 + NR): weights dequantized block by block in registers.
// prefetch: fetch the next NR weight rows (asked on a tile's first activation tile).
template <int MR, int NR>
KUAIDA_AVX512_BF16 void decode_tile(const Int8Decode& g, int64_t i0, int64_t n0, bool prefetch) {
  const int64_t K = g.K, per_group = K / g.groups;
  const int8_t* q = g.q + n0 * K;
  const at::Half* d = g.d + n0 * g.groups;
  const uint32_t* x = g.xb + i0 * (K / 2);
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    if (prefetch) {
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (NR + r) * K + k0), _MM_HINT_T0);
    }
    __m512bh w[NR];
    for (int r = 0; r < NR; ++r) w[r] = int8_block_bf16(q + r * K + k0, d + r * g.groups + k0 / per_group);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * (K / 2) + k0 / 2);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], w[r], xv);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* o = g.out + (i0 + i) * g.N + n0;
    for (int r = 0; r < NR; ++r) {
      const float v = _mm512_reduce_add_ps(acc[i][r]);
      o[r] = g.bias ? v + g.bias[n0 + r] : v;
    }
  }
}

// The last M - i0 (< MR) activation rows as one tile.
template <int MR, int NR>
KUAIDA_AVX512_BF16 void decode_last_tile(const Int8Decode& g, int64_t i0, int64_t n0) {
  if constexpr (MR > 1) {
    if (g.M - i0 == MR - 1) return decode_tile<MR - 1, NR>(g, i0, n0, i0 == 0);
    decode_last_tile<MR - 1, NR>(g, i0, n0);
  }
}

// NR weight rows from n0 against all M activation rows.
template <int NR>
KUAIDA_AVX512_BF16 void decode_rows(const Int8Decode& g, int64_t n0) {
  int64_t i = 0;
  for (; i + kDecodeRows <= g.M; i += kDecodeRows) decode_tile<kDecodeRows, NR>(g, i, n0, i == 0);
  if (i < g.M) decode_last_tile<kDecodeRows, NR>(g, i, n0);
}

}  // namespace

at::Tensor int8_linear_bf16_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d,
                                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "int8_linear_bf16_rows needs AVX512-BF16");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q: contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) == K && K % 32 == 0,
              "x: contiguous fp32 [..., K], K a multiple of 32");
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == N &&
              d.size(1) >= 1 && K % d.size(1) == 0 && (K / d.size(1)) % 32 == 0, "d: fp16 [N, K / group]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous fp32 [N]");
  const int64_t M = x.numel() / K;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0) return y;
  std::vector<uint32_t> xb(M * K / 2);
  rows_bf16(x.data_ptr<float>(), M, K, xb.data());
  const Int8Decode g{xb.data(), M, N, K, d.size(1), q.data_ptr<int8_t>(), d.data_ptr<at::Half>(),
                     bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>()};
  // Threads take whole tiles of 4 weight rows, each chunk at least ~16 KiB of weights (as in qgemm.cpp).
  constexpr int64_t kTile = 4;
  const int64_t tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, tiles, (16384 + kTile * K - 1) / (kTile * K), [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(end * kTile, N);
    int64_t n = begin * kTile;
    if (M >= 4)
      for (; n + 2 <= stop; n += 2) decode_rows<2>(g, n);
    for (; n < stop; ++n) decode_rows<1>(g, n);
  });
  return y;
}

at::Tensor int8_linear_bf16(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "int8_linear_bf16 needs AVX512-BF16");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q: contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) == K && K % 32 == 0,
              "x: contiguous fp32 [..., K], K a multiple of 32");
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == N &&
              d.size(1) >= 1 && K % d.size(1) == 0 && (K / d.size(1)) % 32 == 0, "d: fp16 [N, K / group]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous fp32 [N]");
  const int64_t M = x.numel() / K, P = K / 2, panels = (M + kPanel - 1) / kPanel;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0) return y;
  std::vector<uint32_t> xp(panels * P * kPanel);
  pack_rows_bf16(x.data_ptr<float>(), M, K, xp.data());
  const Int8Gemm g{xp.data(), M, panels, N, K, d.size(1), q.data_ptr<int8_t>(), d.data_ptr<at::Half>(),
                   bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>()};
  const int64_t tiles = (N + kWRows - 1) / kWRows;
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<uint32_t> w;
    static thread_local std::vector<float> s;
    w.resize(kWRows * P);
    s.resize(kWRows * 2 * kPanel);
    for (int64_t t = begin; t < end; ++t)
      int8_gemm_task(g, t * kWRows, std::min<int64_t>(kWRows, N - t * kWRows), w.data(), s.data());
  });
  return y;
}

namespace {

// What both prefill kernels take: q fp32 [H, T, D] (d contiguous), k and v contiguous fp16 [R, Hkv, S, D]
// with D a multiple of `dim_multiple`, a row of the cache, positions int64 [T] strictly increasing in it.
void check_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t row,
                   const at::Tensor& positions, int64_t dim_multiple) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1, "q: fp32 [H, T, D], d contiguous");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kHalf && k.is_contiguous() && v.is_contiguous() &&
              v.sizes() == k.sizes() && v.scalar_type() == at::kHalf, "k, v: contiguous fp16 [R, Hkv, S, D]");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous() &&
              positions.numel() == q.size(1) && q.size(1) >= 1, "positions: int64 [T], T >= 1");
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), R = k.size(0), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(3) == D && D % dim_multiple == 0, "head_dim must match and be a multiple of ", dim_multiple);
  TORCH_CHECK(H % Hkv == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(row >= 0 && row < R, "row out of the cache's range");
  const int64_t* pos = positions.data_ptr<int64_t>();
  TORCH_CHECK(pos[0] >= 0 && pos[T - 1] < S, "positions out of the cache's range");
  for (int64_t t = 1; t < T; ++t) TORCH_CHECK(pos[t] > pos[t - 1], "positions must be strictly increasing");
}

// A prefill's tasks (kv head, first token of a block of `block` tokens), costliest (longest prefix) first, for
// the threads to take in turn: the blocks of a causal prefill grow in cost, and a static split would hand one
// thread all the long ones.
std::vector<std::pair<int64_t, int64_t>> prefill_tasks(const int64_t* pos, int64_t T, int64_t Hkv, int64_t block) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t t0 = 0; t0 < T; t0 += block)
    for (int64_t h = 0; h < Hkv; ++h) tasks.emplace_back(h, t0);
  std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& x, const auto& y) {
    return pos[std::min(T, x.second + block) - 1] > pos[std::min(T, y.second + block) - 1];
  });
  return tasks;
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t row,
                             const at::Tensor& positions, double scale) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "prefill_attention needs AVX512-BF16");
  check_prefill(q, k, v, row, positions, 32);
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  const int64_t* pos = positions.data_ptr<int64_t>();

  // 1. pack keys [0, span) of every kv head; buffers of the calling thread, reused (a fresh MB-sized buffer
  // per call costs page faults).
  const int64_t span = pos[T - 1] + 1, panels = (span + kPanel - 1) / kPanel, head_pairs = panels * kPanel * D / 2;
  static thread_local std::vector<uint32_t> kbuf, vbuf;
  kbuf.resize(Hkv * head_pairs);
  vbuf.resize(Hkv * head_pairs);
  const uint16_t* kc = reinterpret_cast<const uint16_t*>(k.data_ptr()) + row * Hkv * S * D;
  const uint16_t* vc = reinterpret_cast<const uint16_t*>(v.data_ptr()) + row * Hkv * S * D;
  uint32_t* kb = kbuf.data();
  uint32_t* vb = vbuf.data();
  at::parallel_for(0, Hkv * panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / panels, j0 = i % panels * kPanel, src = (h * S + j0) * D, dst = h * head_pairs + j0 * D / 2;
      pack_panel(kc + src, vc + src, std::min(kPanel, span - j0), D, kb + dst, vb + dst);
    }
  });

  // 2., 3. tasks (kv head, query block), taken by the workers in turn (prefill_tasks).
  at::Tensor out = at::empty({T, H, D}, q.options());
  const PrefillArgs args{q.data_ptr<float>(), q.stride(0), q.stride(1), kb, vb, head_pairs, pos,
                         H, H / Hkv, D, static_cast<float>(scale * 1.44269504088896341), out.data_ptr<float>()};
  const std::vector<std::pair<int64_t, int64_t>> tasks = prefill_tasks(pos, T, Hkv, kQueryBlock);
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_tasks), 1, [&](int64_t, int64_t) {
    static thread_local PrefillScratch w;
    for (int64_t i; (i = next.fetch_add(1)) < n_tasks;) {
      const auto [h, t0] = tasks[i];
      prefill_task(args, h, t0, std::min(T, t0 + kQueryBlock), w);
    }
  });
  return out.permute({1, 0, 2});
}


// ---- Prefill attention, AVX2 + FMA + F16C (fp32) -----------------------------------------------------------
//
// prefill_attention's contract (above) for CPUs without AVX512-BF16 (Zen 3, most AVX2 machines), all in fp32:
// the fp16 cache is read in place (converted while packing), no bf16 rounding, so the result is fp32 SDPA's
// within summation order (~1e-6). Why: there the model's prefill ran KVCache.update's fp32 copy of the whole
// prefix (every layer) and torch's SDPA at ~58 GFLOP/s on 2 threads (T = 48 over 1,278 keys: 73 ms of
// attention and ~13 ms of copies in a 236 ms turn-10 prefill on Zen 3); FMA alone allows ~150. Three steps:
//   1. pack the prefix once per call: keys as fp32 panels [Hkv][S/8][D][8] (8 keys' dimension d in one ymm:
//      a broadcast q element times a panel row gives 8 scores' partial sums, no horizontal adds), values as
//      fp32 [Hkv][S][D]; zeros past the prefix.
//   2. a task = (kv head, kQueryBlock8 tokens x G heads = rows), q rows pre-scaled: scores of 6-row x 16-key
//      tiles (12 accumulators), per row mask, max, exp (exp256) and sum; P kept in place of the scores.
//   3. P @ V in blocks of kPvKeys keys (their values stay in L1 while every row tile passes): 3-row x 32-dim
//      tiles accumulate into the task's fp32 output rows, scaled by 1 / sum at the end.
namespace {

constexpr int64_t kKeyPanel = 8;      // keys per panel (one ymm of scores)
constexpr int kScoreRows = 6;         // score tile: 6 rows x 2 panels = 12 accumulators, 2 loads, 1 broadcast
constexpr int kScorePanels = 2;
constexpr int kPvRows = 3;            // P @ V tile: 3 rows x 4 ymm (32 dims) = 12 accumulators
constexpr int kPvChunks = 4;
constexpr int64_t kPvKeys = 64;       // values per block: 16 KB at D = 64
constexpr int64_t kQueryBlock8 = 8;   // query tokens per task

struct PrefillArgs32 {
  const float* q;
  int64_t q_head, q_tok;  // q's strides (elements) over heads and tokens
  const float* kp;        // packed keys [Hkv][Spad / 8][D][8]
  const float* v;         // values [Hkv][Spad][D]
  int64_t head_elems;     // Spad * D: floats per kv head in kp and v
  const int64_t* pos;
  int64_t H, G, D;
  float scale;
  float* out;  // [T, H, D]
};

struct PrefillScratch32 {  // per worker thread, reused across calls
  std::vector<float> q, s, acc, inv;
};

// r[0..8) <- its transpose (8 x 8 floats).
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Keys/values [j0, j0 + 8) of one kv head (k, v: fp16 rows of D from key j0; the first n exist, the rest
// become zeros) -> one key panel kp [D][8] and 8 value rows vp [8][D], fp32.
void pack_panel8(const uint16_t* k, const uint16_t* v, int64_t n, int64_t D, float* kp, float* vp) {
  for (int64_t d = 0; d < D; d += 8) {
    __m256 r[kKeyPanel];
    for (int64_t i = 0; i < kKeyPanel; ++i) r[i] = i < n ? load8(k + i * D + d) : _mm256_setzero_ps();
    transpose8(r);
    for (int64_t i = 0; i < kKeyPanel; ++i) _mm256_storeu_ps(kp + (d + i) * kKeyPanel, r[i]);
  }
  for (int64_t i = 0; i < kKeyPanel; ++i)
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(vp + i * D + d, i < n ? load8(v + i * D + d) : _mm256_setzero_ps());
}

// c[r][8 n .. 8 n + 8) (+)= sum_{t0 <= t < t1} a[r lda + t] * b[t bt + n bn .. + 8) for MR rows and NC columns
// of 8 floats: a register tile, MR x NC accumulators, NC loads and MR broadcasts per t. Scores (q rows times
// key panels: bt = 8, bn = 8 D) and P @ V (P rows times value rows: bt = D, bn = 8) are both one.
template <int MR, int NC, bool kAccumulate>
void tile8(const float* a, int64_t lda, const float* b, int64_t bt, int64_t bn, int64_t t0, int64_t t1, float* c,
           int64_t ldc) {
  __m256 acc[MR][NC];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) acc[r][n] = kAccumulate ? _mm256_loadu_ps(c + r * ldc + n * 8) : _mm256_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    __m256 bv[NC];
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) bv[n] = _mm256_loadu_ps(b + t * bt + n * bn);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 ab = _mm256_broadcast_ss(a + r * lda + t);
#pragma GCC unroll 8
      for (int n = 0; n < NC; ++n) acc[r][n] = _mm256_fmadd_ps(ab, bv[n], acc[r][n]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) _mm256_storeu_ps(c + r * ldc + n * 8, acc[r][n]);
}

// s[r][8 n + i] = q[r] . key[8 n + i] for MR rows (q: fp32 [MR][D], pre-scaled) and NR panels (kp [NR][D][8]).
template <int MR, int NR>
void score_tile8(const float* q, int64_t D, const float* kp, float* s, int64_t lds) {
  tile8<MR, NR, false>(q, D, kp, kKeyPanel, D * kKeyPanel, 0, D, s, lds);
}

template <int NR>
void score_rows8(const float* q, int64_t rows, int64_t D, const float* kp, float* s, int64_t lds) {
  int64_t r = 0;
  for (; r + kScoreRows <= rows; r += kScoreRows) score_tile8<kScoreRows, NR>(q + r * D, D, kp, s + r * lds, lds);
  switch (rows - r) {
    case 5: score_tile8<5, NR>(q + r * D, D, kp, s + r * lds, lds); break;
    case 4: score_tile8<4, NR>(q + r * D, D, kp, s + r * lds, lds); break;
    case 3: score_tile8<3, NR>(q + r * D, D, kp, s + r * lds, lds); break;
    case 2: score_tile8<2, NR>(q + r * D, D, kp, s + r * lds, lds); break;
    case 1: score_tile8<1, NR>(q + r * D, D, kp, s + r * lds, lds); break;
    default: break;
  }
}

// One row of scores s[0, width) with keys [0, len) visible (1 <= len <= width, width % 8 == 0) -> in place
// exp(s - max), 0 where masked; returns the sum of the powers.
float softmax_row8(float* s, int64_t len, int64_t width) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
  const int64_t tail = len - j;  // 0..7 visible lanes in the vector at j
  const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(tail)), lane));
  if (tail) mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j), live));
  const __m256 m = _mm256_set1_ps(hmax8(mx));
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= len; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (tail) {
    // Masked lanes may hold larger scores: clamp before exp, then zero them.
    const __m256 x = _mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), m), _mm256_setzero_ps());
    const __m256 e = _mm256_and_ps(exp256(x), live);
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
    j += 8;
  }
  for (; j < width; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
  return hsum8(sum);
}

// acc[r][d0, d0 + 8 NC) += sum_{j0 <= j < j1} p[r][j] v[j][d0 ...] for MR rows (p [MR][ldp], acc [MR][D]).
template <int MR, int NC>
void pv_tile8(const float* p, int64_t ldp, const float* v, int64_t D, int64_t j0, int64_t j1, float* acc,
              int64_t d0) {
  tile8<MR, NC, true>(p, ldp, v + d0, D, 8, j0, j1, acc + d0, D);
}

template <int MR>
void pv_rows8(const float* p, int64_t ldp, const float* v, int64_t D, int64_t j0, int64_t j1, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += kPvChunks * 8) {
    switch (std::min<int64_t>(kPvChunks, (D - d0) / 8)) {
      case 4: pv_tile8<MR, 4>(p, ldp, v, D, j0, j1, acc, d0); break;
      case 3: pv_tile8<MR, 3>(p, ldp, v, D, j0, j1, acc, d0); break;
      case 2: pv_tile8<MR, 2>(p, ldp, v, D, j0, j1, acc, d0); break;
      default: pv_tile8<MR, 1>(p, ldp, v, D, j0, j1, acc, d0);
    }
  }
}

// One task: kv head h, query tokens [t0, t1) (rows r = (t - t0) * G + g for query head h * G + g).
void prefill_task32(const PrefillArgs32& a, int64_t h, int64_t t0, int64_t t1, PrefillScratch32& w) {
  const int64_t G = a.G, D = a.D, rows = (t1 - t0) * G;
  const int64_t L = a.pos[t1 - 1] + 1, panels = (L + kKeyPanel - 1) / kKeyPanel, width = panels * kKeyPanel;
  w.q.resize(rows * D);
  w.s.resize(rows * width);
  w.acc.assign(rows * D, 0.0f);
  w.inv.resize(rows);
  const __m256 sc = _mm256_set1_ps(a.scale);
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = a.q + (h * G + r % G) * a.q_head + (t0 + r / G) * a.q_tok;
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(w.q.data() + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(qr + d), sc));
  }
  const float* kp = a.kp + h * a.head_elems;
  for (int64_t n = 0; n < panels; n += kScorePanels) {  // two panels (4 KB at D = 64) stay in L1 for all rows
    const float* kn = kp + n * D * kKeyPanel;
    float* sn = w.s.data() + n * kKeyPanel;
    if (panels - n >= kScorePanels) score_rows8<kScorePanels>(w.q.data(), rows, D, kn, sn, width);
    else score_rows8<1>(w.q.data(), rows, D, kn, sn, width);
  }
  for (int64_t r = 0; r < rows; ++r)
    w.inv[r] = 1.0f / softmax_row8(w.s.data() + r * width, a.pos[t0 + r / G] + 1, width);
  const float* vh = a.v + h * a.head_elems;
  for (int64_t j0 = 0; j0 < L; j0 += kPvKeys) {
    const int64_t j1 = std::min(L, j0 + kPvKeys);
    int64_t r = 0;
    for (; r + kPvRows <= rows; r += kPvRows)
      pv_rows8<kPvRows>(w.s.data() + r * width, width, vh, D, j0, j1, w.acc.data() + r * D);
    if (rows - r == 2) pv_rows8<2>(w.s.data() + r * width, width, vh, D, j0, j1, w.acc.data() + r * D);
    if (rows - r == 1) pv_rows8<1>(w.s.data() + r * width, width, vh, D, j0, j1, w.acc.data() + r * D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = a.out + ((t0 + r / G) * a.H + h * G + r % G) * D;
    const __m256 inv = _mm256_set1_ps(w.inv[r]);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(w.acc.data() + r * D + d), inv));
  }
}

}  // namespace

at::Tensor prefill_attention_fp32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t row,
                                  const at::Tensor& positions, double scale) {
  check_prefill(q, k, v, row, positions, 8);
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  const int64_t* pos = positions.data_ptr<int64_t>();

  // Packed keys/values [0, span) of every kv head: the calling thread's buffers, reused (a fresh MB-sized
  // buffer per call costs page faults).
  const int64_t span = pos[T - 1] + 1, panels = (span + kKeyPanel - 1) / kKeyPanel, head_elems = panels * kKeyPanel * D;
  static thread_local std::vector<float> kbuf, vbuf;
  kbuf.resize(Hkv * head_elems);
  vbuf.resize(Hkv * head_elems);
  const uint16_t* kc = reinterpret_cast<const uint16_t*>(k.data_ptr()) + row * Hkv * S * D;
  const uint16_t* vc = reinterpret_cast<const uint16_t*>(v.data_ptr()) + row * Hkv * S * D;
  float* kb = kbuf.data();
  float* vb = vbuf.data();
  at::Tensor out = at::empty({T, H, D}, q.options());
  const PrefillArgs32 args{q.data_ptr<float>(), q.stride(0), q.stride(1), kb, vb, head_elems, pos,
                           H, H / Hkv, D, static_cast<float>(scale), out.data_ptr<float>()};
  // Tasks (kv head, query block), taken by the threads in turn (prefill_tasks).
  const std::vector<std::pair<int64_t, int64_t>> tasks = prefill_tasks(pos, T, Hkv, kQueryBlock8);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks)));
  // One parallel region (each region's fork and join costs the threads a wake-up): 1. pack, 2.-3. tasks.
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < Hkv * panels; ++i) {
      const int64_t h = i / panels, j0 = i % panels * kKeyPanel, src = (h * S + j0) * D, dst = h * head_elems + j0 * D;
      pack_panel8(kc + src, vc + src, std::min(kKeyPanel, span - j0), D, kb + dst, vb + dst);
    }
    static thread_local PrefillScratch32 w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tasks; ++i) {
      const auto [h, t0] = tasks[i];
      prefill_task32(args, h, t0, std::min(T, t0 + kQueryBlock8), w);
    }
  }
  return out.permute({1, 0, 2});
}


// ---- Cache writes of one sequence, AVX2 + F16C ------------------------------------------------------------
// Why: a prompt around passages written from a passage cache has gaps in its positions, and torch's indexed
// write (index_put of a converted, transposed copy) cost ~75 us per layer for ~45 tokens; a passage moved
// into a row cost ~1 ms (rotation in fp32 temporaries, then 60 slice copies). Both are plain loops here.

namespace {

inline void fp32_to_fp16_row(const float* src, uint16_t* dst, int64_t D) {  // D % 8 == 0
  for (int64_t d = 0; d < D; d += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
}

}  // namespace

// k, v [Hkv, T, D] fp32 (any strides, d contiguous) -> cache row `row` of kc, vc [R, Hkv, S, D] fp16 at
// positions pos [T] (int64, each in [0, S)); rounding to nearest even, as torch's .to(float16).
void write_kv_fp16(at::Tensor kc, at::Tensor vc, int64_t row, const at::Tensor& positions, const at::Tensor& k,
                   const at::Tensor& v) {
  TORCH_CHECK(kc.dim() == 4 && kc.scalar_type() == at::kHalf && kc.is_contiguous() && vc.is_contiguous() &&
              vc.sizes() == kc.sizes() && vc.scalar_type() == at::kHalf, "kc, vc: contiguous fp16 [R, Hkv, S, D]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat && k.stride(2) == 1 && v.stride(2) == 1, "k, v: fp32 [Hkv, T, D], d contiguous");
  const int64_t Hkv = kc.size(1), S = kc.size(2), D = kc.size(3), T = k.size(1);
  TORCH_CHECK(k.size(0) == Hkv && k.size(2) == D && D % 8 == 0, "k, v must match the cache's heads and head_dim");
  TORCH_CHECK(row >= 0 && row < kc.size(0), "row out of the cache's range");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous() &&
              positions.numel() == T, "positions: int64 [T]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < S, "positions out of the cache's range");
  uint16_t* kd = reinterpret_cast<uint16_t*>(kc.data_ptr()) + row * Hkv * S * D;
  uint16_t* vd = reinterpret_cast<uint16_t*>(vc.data_ptr()) + row * Hkv * S * D;
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t dst = (h * S + pos[t]) * D;
      fp32_to_fp16_row(kp + h * k.stride(0) + t * k.stride(1), kd + dst, D);
      fp32_to_fp16_row(vp + h * v.stride(0) + t * v.stride(1), vd + dst, D);
    }
  }
}

// A decode step's new keys and values: entry b's k, v [B, Hkv, 1, D] fp32 (any strides, d contiguous) into
// row rows[b] of kc, vc [R, Hkv, S, D] fp16 at position pos[b]. Why: two index_put calls with their fp16
// copies cost ~20 us per layer and step, more than the attention over a short history.
void write_kv_rows_fp16(at::Tensor kc, at::Tensor vc, const at::Tensor& rows, const at::Tensor& positions,
                        const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(kc.dim() == 4 && kc.scalar_type() == at::kHalf && kc.is_contiguous() && vc.is_contiguous() &&
              vc.sizes() == kc.sizes() && vc.scalar_type() == at::kHalf, "kc, vc: contiguous fp16 [R, Hkv, S, D]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.size(2) == 1 &&
              k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.stride(3) == 1 && v.stride(3) == 1,
              "k, v: fp32 [B, Hkv, 1, D], d contiguous");
  const int64_t R = kc.size(0), Hkv = kc.size(1), S = kc.size(2), D = kc.size(3), B = k.size(0);
  TORCH_CHECK(k.size(1) == Hkv && k.size(3) == D && D % 8 == 0, "k, v must match the cache's heads and head_dim");
  for (const at::Tensor* t : {&rows, &positions}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == B,
                "rows, positions: int64 [B]");
  }
  const int64_t *row = rows.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < R && pos[b] >= 0 && pos[b] < S, "row or position out of the cache's range");
  }
  uint16_t* kd = reinterpret_cast<uint16_t*>(kc.data_ptr());
  uint16_t* vd = reinterpret_cast<uint16_t*>(vc.data_ptr());
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t dst = ((row[b] * Hkv + h) * S + pos[b]) * D;
      fp32_to_fp16_row(kp + b * k.stride(0) + h * k.stride(1), kd + dst, D);
      fp32_to_fp16_row(vp + b * v.stride(0) + h * v.stride(1), vd + dst, D);
    }
  }
}

// A passage's keys and values, encoded at other positions, into cache row `row` from position `start`:
// k, v [L, Hkv, T, D] fp16 contiguous; kcs[l], vcs[l] the cache's [R, Hkv, S, D] fp16 of layer l. Each key
// is rotated by the position shift (RoPE: R(p + d) k = R(d) R(p) k) with cos, sin [D / 2] fp32:
//   out[:h] = x1 * c - x2 * s,  out[h:] = x2 * c + x1 * s  (x1, x2 the halves), in fp32, rounded to fp16.
void place_passage(const std::vector<at::Tensor>& kcs, const std::vector<at::Tensor>& vcs, int64_t row,
                   int64_t start, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                   const at::Tensor& sin) {
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kHalf && k.is_contiguous() && v.is_contiguous() &&
              v.sizes() == k.sizes() && v.scalar_type() == at::kHalf, "k, v: contiguous fp16 [L, Hkv, T, D]");
  const int64_t L = k.size(0), Hkv = k.size(1), T = k.size(2), D = k.size(3), half = D / 2;
  TORCH_CHECK(D % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(static_cast<int64_t>(kcs.size()) == L && static_cast<int64_t>(vcs.size()) == L, "one cache tensor per layer");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == half && sin.numel() == half, "cos, sin: fp32 [D / 2]");
  for (int64_t l = 0; l < L; ++l) {
    const auto& kc = kcs[l];
    const auto& vc = vcs[l];
    TORCH_CHECK(kc.dim() == 4 && kc.scalar_type() == at::kHalf && kc.is_contiguous() && vc.is_contiguous() &&
                vc.sizes() == kc.sizes() && vc.scalar_type() == at::kHalf && kc.size(1) == Hkv && kc.size(3) == D,
                "cache layers: contiguous fp16 [R, Hkv, S, D] matching the passage");
    TORCH_CHECK(row >= 0 && row < kc.size(0) && start >= 0 && start + T <= kc.size(2), "row or span out of the cache's range");
  }
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const uint16_t* ks = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* vs = reinterpret_cast<const uint16_t*>(v.data_ptr());
  at::parallel_for(0, L * Hkv, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / Hkv, h = i % Hkv, S = kcs[l].size(2);
      uint16_t* kd = reinterpret_cast<uint16_t*>(kcs[l].data_ptr()) + ((row * Hkv + h) * S + start) * D;
      uint16_t* vd = reinterpret_cast<uint16_t*>(vcs[l].data_ptr()) + ((row * Hkv + h) * S + start) * D;
      const uint16_t* kr = ks + i * T * D;
      std::copy(vs + i * T * D, vs + (i + 1) * T * D, vd);  // values do not depend on position
      for (int64_t t = 0; t < T; ++t, kr += D, kd += D) {
        for (int64_t d = 0; d < half; d += 8) {
          const __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + d)));
          const __m256 x2 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + half + d)));
          const __m256 cc = _mm256_loadu_ps(c + d), ss = _mm256_loadu_ps(s + d);
          const __m256 lo = _mm256_sub_ps(_mm256_mul_ps(x1, cc), _mm256_mul_ps(x2, ss));
          const __m256 hi = _mm256_add_ps(_mm256_mul_ps(x2, cc), _mm256_mul_ps(x1, ss));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(kd + d), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(kd + half + d), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
        }
      }
    }
  });
}

// ---- Inference glue: RMSNorm, RoPE on the fused q/k/v projection, SwiGLU's silu(gate) * up -----------------
//
// Why: at one token per step each of these is a few microseconds of arithmetic spread over 6-20 PyTorch ops
// (about 35 per layer in all), and the ops' dispatch, not their work, made up a third of a decode step of the
// default model on 2 cores (benchmarks/results/kernels.md). One call each here (kuaida.model.fused).

namespace {

// Rows of x [n, D] fp32 -> out = w * (x / sqrt(mean(x^2) + eps)).
void rms_rows(const float* x, const float* w, float* out, int64_t n, int64_t D, float eps) {
  for (int64_t r = 0; r < n; ++r, x += D, out += D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(x + d), acc);
    float ss = hsum8(acc);
    for (; d < D; ++d) ss += x[d] * x[d];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    const __m256 iv = _mm256_set1_ps(inv);
    for (d = 0; d + 8 <= D; d += 8)
      _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(w + d), _mm256_mul_ps(_mm256_loadu_ps(x + d), iv)));
    for (; d < D; ++d) out[d] = w[d] * (x[d] * inv);
  }
}

// One head vector x [D] rotated (rotate-half RoPE: pairs d, d + D/2) with cos, sin [D] -> out [D].
inline void rotate(const float* x, const float* c, const float* s, float* out, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) {
    out[d] = x[d] * c[d] - x[d + h] * s[d];
    out[d + h] = x[d + h] * c[d + h] + x[d] * s[d + h];
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous fp32 [..., D]");
  const int64_t D = x.size(-1), n = D ? x.numel() / D : 0;
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "w: fp32 [D]");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    rms_rows(xp + b * D, wp, op + b * D, e - b, D, static_cast<float>(eps));
  });
  return out;
}

// qkv [B, T, (H + 2 Hkv) D] fp32 contiguous (q heads, then k heads, then v heads); cos, sin [B, T, D] fp32
// contiguous -> {q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]}, q and k rotated.
std::vector<at::Tensor> rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                                 int64_t Hkv) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv: contiguous fp32 [B, T, N]");
  const int64_t B = qkv.size(0), T = qkv.size(1), N = qkv.size(2);
  TORCH_CHECK(H > 0 && Hkv > 0 && N % (H + 2 * Hkv) == 0, "qkv's width must be (H + 2 Hkv) x head_dim");
  const int64_t D = N / (H + 2 * Hkv);
  TORCH_CHECK(D % 2 == 0 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == B * T * D && sin.numel() == B * T * D, "cos, sin: fp32 [B, T, D]");
  at::Tensor q = at::empty({B, H, T, D}, qkv.options());
  at::Tensor k = at::empty({B, Hkv, T, D}, qkv.options());
  at::Tensor v = at::empty({B, Hkv, T, D}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t bt = b0; bt < b1; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float* row = src + bt * N;
      const float* c = cp + bt * D;
      const float* s = sp + bt * D;
      for (int64_t h = 0; h < H; ++h) rotate(row + h * D, c, s, qp + ((b * H + h) * T + t) * D, D);
      for (int64_t h = 0; h < Hkv; ++h) {
        rotate(row + (H + h) * D, c, s, kp + ((b * Hkv + h) * T + t) * D, D);
        std::copy(row + (H + Hkv + h) * D, row + (H + Hkv + h + 1) * D, vp + ((b * Hkv + h) * T + t) * D);
      }
    }
  });
  return {q, k, v};
}

// gu [..., 2 I] fp32 contiguous (gate, then up) -> silu(gate) * up [..., I]; silu(x) = x / (1 + e^-x).
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.dim() >= 1 && gu.size(-1) % 2 == 0,
              "gu: contiguous fp32 [..., 2 I]");
  const int64_t I = gu.size(-1) / 2, n = I ? gu.numel() / (2 * I) : 0;
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  at::Tensor out = at::empty(sizes, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* gr = g + r * 2 * I;
      const float* ur = gr + I;
      float* orow = o + r * I;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.0f);
      const __m256 sign = _mm256_set1_ps(-0.0f);
      for (; i + 8 <= I; i += 8) {
        const __m256 x = _mm256_loadu_ps(gr + i);
        // e = e^-|x| (exp256 wants x <= 0); sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below.
        const __m256 e = exp256(_mm256_or_ps(x, sign));
        const __m256 num = _mm256_blendv_ps(one, e, x);  // blendv picks e where x's sign bit is set
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(ur + i)));
      }
      for (; i < I; ++i) orow[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("rms_norm", &rms_norm, "RMSNorm of the rows of x (fp32)");
  mod.def("rope_qkv", &rope_qkv, "q, k, v [B, heads, T, D] from a fused qkv projection, q and k rotated (RoPE)");
  mod.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
  mod.def("decode_attention", &decode_attention,
          "one query per entry over its cached keys/values (GQA), shared prefixes read once");
  mod.def("prefill_attention", &prefill_attention, "T queries of one sequence over its fp16 cache (AVX-512 BF16)");
  mod.def("prefill_attention_fp32", &prefill_attention_fp32,
          "T queries of one sequence over its fp16 cache (AVX2, fp32)");
  mod.def("int8_linear_bf16", &int8_linear_bf16,
          "int8 weights x many fp32 rows via bf16 dot products (AVX-512 BF16)");
  mod.def("int8_linear_bf16_rows", &int8_linear_bf16_rows,
          "int8 weights x a few fp32 rows via bf16 dot products, each row's result independent of the others");
  mod.def("has_avx512_bf16", &cpu_has_avx512_bf16, "whether the CPU can run prefill_attention");
  mod.def("write_kv_fp16", &write_kv_fp16, "one sequence's keys/values into an fp16 cache row at given positions");
  mod.def("write_kv_rows_fp16", &write_kv_rows_fp16, "a decode step's keys/values, one per (row, position)");
  mod.def("place_passage", &place_passage, "a passage's keys (rotated by a position shift) and values into a cache row");
}
