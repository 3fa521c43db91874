// Paged attention on CPU: each (sequence, kv head, query token) walks its block table directly.
//
// No K/V is copied into a contiguous buffer: for one work item the kernel
//   1. reads the K vectors of the context block by block and scores them against the
//      G = num_heads / num_kv_heads query heads that share this K/V head,
//   2. turns the scores into softmax weights (max-subtracted, in float32),
//   3. reads the V vectors once more and accumulates the weighted sum.
// Every K and V vector is read once per (sequence, kv head, query token) and shared by the G
// query heads, so grouped-query and multi-query attention read G times less memory.
//
// Layouts:
//   q, out        (num_tokens, num_heads, head_dim)
//   k/v cache     (num_blocks, block_size, num_kv_heads, head_dim)  float32 | bfloat16 | float16 | fp8 e4m3
//   k_scale, v_scale  an fp8 cache holds K / k_scale and V / v_scale: k_scale is folded into the query,
//                     v_scale into the output
//   block_tables  (num_seqs, max_blocks) int32
//   seq_lens      (num_seqs,) int32            context length after this step
//   query_start   (num_seqs + 1,) int32        query token offsets
//   seq_ids       (n,) int64                   which sequences to process
//   window        keys a query sees, itself included (0: all); soft_cap: s -> cap * tanh(s / cap) (0: off)
//   chunk         attention_chunk_size (0: off): a query at p sees only keys >= p / chunk * chunk (Llama 4)
//   sinks         (num_heads,) float32 or empty: a logit per query head that joins the softmax's sum (GPT-OSS)
// Query token i of a q_len-token chunk sits at position seq_len - q_len + i and sees keys 0..that position
// (the last `window` of them under a sliding window).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Portable SIMD through GCC/Clang vector extensions: 16 floats, one AVX-512 register (two on AVX2).
typedef float vf16 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef int32_t vi32 __attribute__((vector_size(64)));

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename T>
inline vf16 load16(const T* p) {  // float16 and anything else: element by element
  vf16 v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
template <>
inline vf16 load16<float>(const float* p) {
  vf16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <>
inline vf16 load16<c10::BFloat16>(const c10::BFloat16* p) {  // bf16 -> f32 is a 16-bit shift
#if defined(__AVX512F__)
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i x = _mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16);
  vf16 v;
  __builtin_memcpy(&v, &x, sizeof(v));
  return v;
#else
  vu16 u;
  __builtin_memcpy(&u, p, sizeof(u));
  vu32 w = __builtin_convertvector(u, vu32) << 16;
  vf16 v;
  __builtin_memcpy(&v, &w, sizeof(v));
  return v;
#endif
}

// fp8 e4m3 (bias 7) -> f32: move sign, exponent and mantissa into f32 position and rebias by 2^120. The
// cache holds no e4m3 subnormals (writes store them as 0, attention/backend.py to_cache), so no f32 subnormal,
// which would cost ~100 cycles per operation on x86, ever appears; nor 0x7f (NaN): writes saturate.
// Sign-extending the byte puts the sign in bit 31 after the shift (bits 27..30, also set, are masked off).
typedef int8_t vi8 __attribute__((vector_size(16)));
// (GCC 12 scalarizes a byte -> int32 __builtin_convertvector: the widening uses intrinsics where it can.)
template <>
inline vf16 load16<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* p) {
  vu32 w;
#if defined(__AVX512F__)
  const __m512i x = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __builtin_memcpy(&w, &x, sizeof(w));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepi8_epi32(b), hi = _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8));
  __builtin_memcpy(&w, &lo, 32);
  __builtin_memcpy(reinterpret_cast<char*>(&w) + 32, &hi, 32);
#else
  vi8 u;
  __builtin_memcpy(&u, p, sizeof(u));
  w = reinterpret_cast<vu32>(__builtin_convertvector(u, vi32));
#endif
  const vu32 bits = (w << 20) & 0x87f00000u;
  vf16 v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v * 0x1p120f;
}

inline float hsum(vf16 v) {  // tree reduction: 4 shuffle + add steps
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// Sixteen sums at once: lane i of the result = hsum(a[i]). A transposing tree (15 shuffle pairs) instead of
// sixteen separate reductions (64 shuffle + add steps):
//   level 1: pairs (a0,a1) -> lanes 0-7 fold a0, 8-15 fold a1; level 2: 4-lane segments; level 3: 2; level 4: 1.
inline vf16 hsum16(const vf16* a) {
  vf16 l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i)
    l1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    l2[i] = __builtin_shufflevector(l1[2 * i], l1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(l1[2 * i], l1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    l3[i] = __builtin_shufflevector(l2[2 * i], l2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(l2[2 * i], l2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(l3[0], l3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(l3[0], l3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// exp for x <= 0 (softmax after max subtraction): 2^(x log2 e) = 2^n * 2^f, degree-6 polynomial for 2^f.
inline vf16 vexp(vf16 x) {
  const vf16 lo = vf16{} - 87.0f;
  x = x < lo ? lo : x;
  vf16 t = x * 1.44269504088896341f;
  vf16 n = __builtin_convertvector(__builtin_convertvector(t - 0.5f, vi32), vf16);  // floor for t <= 0.5
  n = n > t ? n - 1.0f : n;
  vf16 f = t - n;  // [0, 1)
  vf16 p = vf16{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  vi32 e = (__builtin_convertvector(n, vi32) + 127) << 23;
  vf16 scale;
  __builtin_memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// Ask for the next block's rows of this head while the current block is being used: blocks are
// scattered in memory, so the hardware prefetcher cannot guess where the next one starts.
template <typename cache_t>
inline void prefetch_block(const cache_t* base, int64_t n, int64_t token_stride, int64_t row_bytes) {
  for (int64_t t = 0; t < n; ++t) {
    const char* row = reinterpret_cast<const char*>(base + t * token_stride);
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

// Scores -> unnormalised softmax weights in place; returns 1 / sum. Soft-capping (Gemma 2) first:
// s -> cap * tanh(s / cap). A sink (not -inf) counts in the max and the sum, and has no value.
inline float softmax_weights(float* __restrict sg, int64_t m, float soft_cap,
                             float sink = -std::numeric_limits<float>::infinity()) {
  if (soft_cap > 0.f)
    for (int64_t j = 0; j < m; ++j) sg[j] = soft_cap * std::tanh(sg[j] / soft_cap);
  float mx = sink;
  for (int64_t j = 0; j < m; ++j) mx = sg[j] > mx ? sg[j] : mx;
  vf16 vsum = vf16{};
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    vf16 e = vexp(load16(sg + j) - mx);
    __builtin_memcpy(sg + j, &e, sizeof(e));
    vsum += e;
  }
  float sum = hsum(vsum) + (sink > -std::numeric_limits<float>::infinity() ? std::exp(sink - mx) : 0.f);
  for (; j < m; ++j) {
    sg[j] = std::exp(sg[j] - mx);
    sum += sg[j];
  }
  return 1.f / sum;
}

// softmax_weights over each of `rows` score rows of length m (row r's sink: sinks[r], if sinks); returns each
// row's 1 / sum.
inline std::vector<float> softmax_rows(float* __restrict scores, int64_t rows, int64_t m, float soft_cap,
                                       const float* sinks) {
  std::vector<float> inv_sum(rows);
  for (int64_t r = 0; r < rows; ++r)
    inv_sum[r] = sinks != nullptr ? softmax_weights(scores + r * m, m, soft_cap, sinks[r])
                                  : softmax_weights(scores + r * m, m, soft_cap);
  return inv_sum;
}

// The keys one query sees are positions lo .. ctx-1 (lo > 0 under a sliding window). Blocks are
// walked from the one holding lo; rows before lo in that block are skipped, and blocks wholly
// before it are never touched (they may already hold another sequence's tokens).
//
//   block_size 4, lo 6, ctx 11:   block 1: rows 2, 3 | block 2: rows 0..3 | block 3: rows 0..2
//   scores index = position - lo

// That walk: f(rows of the block at head offset head_off, the block's first position b0, the first row
// to use t0, the rows it holds n), with the next block's rows prefetched before f runs.
template <typename cache_t, typename F>
inline void for_each_block(const cache_t* cache, const int32_t* __restrict table, int64_t lo, int64_t ctx,
                           int64_t bs, int64_t head_off, int64_t token_stride, int64_t block_stride,
                           int64_t row_bytes, F&& f) {
  for (int64_t b0 = lo / bs * bs; b0 < ctx; b0 += bs) {
    if (b0 + bs < ctx)
      prefetch_block(cache + table[b0 / bs + 1] * block_stride + head_off, std::min(bs, ctx - b0 - bs), token_stride,
                     row_bytes);
    f(cache + table[b0 / bs] * block_stride + head_off, b0, std::max<int64_t>(lo - b0, 0), std::min(bs, ctx - b0));
  }
}

// One (sequence, query token) against `nh` consecutive K/V heads starting at `h0`, each shared by G
// query heads (QH = nh * G query heads in all), head_dim D = 16 * C. Taking several heads of a token
// at once reads each token's K/V row contiguously; the caller splits heads only when there are
// too few (sequence, token) items to keep every thread busy.
template <typename cache_t>
void attend_vec(const float* __restrict q, const cache_t* __restrict kc, const cache_t* __restrict vc,
                const int32_t* __restrict table, int64_t lo, int64_t ctx, int64_t bs, int64_t h0, int64_t nh,
                int64_t token_stride, int64_t block_stride, int64_t G, int64_t C, float soft_cap,
                const float* sinks, float* __restrict scores, vf16* __restrict qv, vf16* __restrict acc,
                vf16* __restrict tacc, float* __restrict out) {
  const int64_t QH = nh * G, D = C * 16, m = ctx - lo;
  for (int64_t x = 0; x < QH * C; ++x) qv[x] = load16(q + x * 16);
  const int64_t head_off = h0 * D;
  const int64_t row_bytes = nh * D * sizeof(cache_t);
  // 1. scores[qh][j - lo] = q_qh . k_j
  for_each_block(kc, table, lo, ctx, bs, head_off, token_stride, block_stride, row_bytes,
                 [&](const cache_t* kb, int64_t b0, int64_t t0, int64_t n) {
    int64_t t = t0;
    if (tacc != nullptr) {  // sixteen tokens at a time: one transposing reduction per query head
      for (; t + 16 <= n; t += 16) {
        for (int64_t i = 0; i < 16; ++i) {
          const cache_t* row = kb + (t + i) * token_stride;
          for (int64_t h = 0; h < nh; ++h) {
            const cache_t* k = row + h * D;
            vf16* a = tacc + (h * G) * 16 + i;  // tacc[qh * 16 + i]
            for (int64_t g = 0; g < G; ++g) a[g * 16] = vf16{};
            for (int64_t c = 0; c < C; ++c) {
              const vf16 kv = load16(k + c * 16);
              for (int64_t g = 0; g < G; ++g) a[g * 16] += qv[(h * G + g) * C + c] * kv;
            }
          }
        }
        for (int64_t qh = 0; qh < QH; ++qh) {
          const vf16 sums = hsum16(tacc + qh * 16);
          __builtin_memcpy(scores + qh * m + b0 + t - lo, &sums, sizeof(sums));
        }
      }
    }
    for (; t < n; ++t) {
      const cache_t* row = kb + t * token_stride;
      for (int64_t h = 0; h < nh; ++h) {
        const cache_t* k = row + h * D;
        for (int64_t g = 0; g < G; ++g) acc[g] = vf16{};
        for (int64_t c = 0; c < C; ++c) {
          const vf16 kv = load16(k + c * 16);
          for (int64_t g = 0; g < G; ++g) acc[g] += qv[(h * G + g) * C + c] * kv;
        }
        for (int64_t g = 0; g < G; ++g) scores[(h * G + g) * m + b0 + t - lo] = hsum(acc[g]);
      }
    }
  });
  // 2. softmax weights (unnormalised); out is scaled by 1 / sum at the end
  const std::vector<float> inv_sum = softmax_rows(scores, QH, m, soft_cap, sinks);
  // 3. out[qh] = sum_j p[qh][j] v_j
  for (int64_t x = 0; x < QH * C; ++x) acc[x] = vf16{};
  for_each_block(vc, table, lo, ctx, bs, head_off, token_stride, block_stride, row_bytes,
                 [&](const cache_t* vb, int64_t b0, int64_t t0, int64_t n) {
    for (int64_t t = t0; t < n; ++t) {
      const cache_t* row = vb + t * token_stride;
      for (int64_t h = 0; h < nh; ++h) {
        const cache_t* v = row + h * D;
        for (int64_t c = 0; c < C; ++c) {
          const vf16 vv = load16(v + c * 16);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t qh = h * G + g;
            acc[qh * C + c] += scores[qh * m + b0 + t - lo] * vv;
          }
        }
      }
    }
  });
  for (int64_t qh = 0; qh < QH; ++qh)
    for (int64_t c = 0; c < C; ++c) {
      const vf16 r = acc[qh * C + c] * inv_sum[qh];
      __builtin_memcpy(out + (qh * C + c) * 16, &r, sizeof(r));
    }
}

// The same computation with the group size G and the head size C (in 16-float chunks) known at compile
// time (the common shapes: G in {1, 2, 4, 8}, head_dim 64 or 128), the loop order chosen for registers:
//   phase 1, per block and K/V head: sixteen tokens' dot products for the G query heads in registers,
//            then one transposing reduction per query head (hsum16)
//   phase 3, per block and K/V head: the G x C output accumulators stay in registers over the block's
//            tokens, one load and store per block instead of one per token
template <int G, int C, typename cache_t>
void attend_vec_fixed(const float* __restrict q, const cache_t* __restrict kc, const cache_t* __restrict vc,
                      const int32_t* __restrict table, int64_t lo, int64_t ctx, int64_t bs, int64_t h0, int64_t nh,
                      int64_t token_stride, int64_t block_stride, float soft_cap, const float* sinks,
                      float* __restrict scores, vf16* __restrict qv, vf16* __restrict acc, float* __restrict out) {
  constexpr int64_t D = C * 16;
  const int64_t QH = nh * G, m = ctx - lo, head_off = h0 * D, row_bytes = nh * D * sizeof(cache_t);
  for (int64_t x = 0; x < QH * C; ++x) qv[x] = load16(q + x * 16);
  // 1. scores[qh][j - lo] = q_qh . k_j
  for_each_block(kc, table, lo, ctx, bs, head_off, token_stride, block_stride, row_bytes,
                 [&](const cache_t* kb, int64_t b0, int64_t t0, int64_t n) {
    for (int64_t h = 0; h < nh; ++h) {
      const vf16* qh_v = qv + h * G * C;
      int64_t t = t0;
      for (; t + 16 <= n; t += 16) {
        vf16 a[G][16];
        for (int i = 0; i < 16; ++i) {
          const cache_t* k = kb + (t + i) * token_stride + h * D;
          vf16 s[G];
          for (int g = 0; g < G; ++g) s[g] = vf16{};
          for (int c = 0; c < C; ++c) {
            const vf16 kv = load16(k + c * 16);
            for (int g = 0; g < G; ++g) s[g] += qh_v[g * C + c] * kv;
          }
          for (int g = 0; g < G; ++g) a[g][i] = s[g];
        }
        for (int g = 0; g < G; ++g) {
          const vf16 sums = hsum16(a[g]);
          __builtin_memcpy(scores + (h * G + g) * m + b0 + t - lo, &sums, sizeof(sums));
        }
      }
      for (; t < n; ++t) {
        const cache_t* k = kb + t * token_stride + h * D;
        vf16 s[G];
        for (int g = 0; g < G; ++g) s[g] = vf16{};
        for (int c = 0; c < C; ++c) {
          const vf16 kv = load16(k + c * 16);
          for (int g = 0; g < G; ++g) s[g] += qh_v[g * C + c] * kv;
        }
        for (int g = 0; g < G; ++g) scores[(h * G + g) * m + b0 + t - lo] = hsum(s[g]);
      }
    }
  });
  // 2. softmax weights (unnormalised); out is scaled by 1 / sum at the end
  const std::vector<float> inv_sum = softmax_rows(scores, QH, m, soft_cap, sinks);
  // 3. out[qh] = sum_j p[qh][j] v_j
  for (int64_t x = 0; x < QH * C; ++x) acc[x] = vf16{};
  for_each_block(vc, table, lo, ctx, bs, head_off, token_stride, block_stride, row_bytes,
                 [&](const cache_t* vb, int64_t b0, int64_t t0, int64_t n) {
    for (int64_t h = 0; h < nh; ++h) {
      vf16 r[G][C];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) r[g][c] = acc[(h * G + g) * C + c];
      const float* p = scores + h * G * m + b0 - lo;
      for (int64_t t = t0; t < n; ++t) {
        const cache_t* v = vb + t * token_stride + h * D;
        for (int c = 0; c < C; ++c) {
          const vf16 vv = load16(v + c * 16);
          for (int g = 0; g < G; ++g) r[g][c] += p[g * m + t] * vv;
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) acc[(h * G + g) * C + c] = r[g][c];
    }
  });
  for (int64_t qh = 0; qh < QH; ++qh)
    for (int64_t c = 0; c < C; ++c) {
      const vf16 r = acc[qh * C + c] * inv_sum[qh];
      __builtin_memcpy(out + (qh * C + c) * 16, &r, sizeof(r));
    }
}

template <typename cache_t>
using fixed_fn = void (*)(const float*, const cache_t*, const cache_t*, const int32_t*, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, float, const float*, float*, vf16*, vf16*, float*);

// The compiled shape for (G, C), or nullptr (then the generic attend_vec runs).
template <typename cache_t>
fixed_fn<cache_t> pick_fixed(int64_t G, int64_t C) {
#define PAGELLM_FIXED(g, c) if (G == g && C == c) return &attend_vec_fixed<g, c, cache_t>;
  PAGELLM_FIXED(1, 4) PAGELLM_FIXED(2, 4) PAGELLM_FIXED(4, 4) PAGELLM_FIXED(8, 4)
  PAGELLM_FIXED(1, 8) PAGELLM_FIXED(2, 8) PAGELLM_FIXED(4, 8) PAGELLM_FIXED(8, 8)
#undef PAGELLM_FIXED
  return nullptr;
}

// Any head_dim, any G: plain loops (the compiler vectorizes what it can).
template <typename cache_t>
void attend_scalar(const float* __restrict q, const cache_t* __restrict kc, const cache_t* __restrict vc,
                   const int32_t* __restrict table, int64_t lo, int64_t ctx, int64_t bs, int64_t head_off,
                   int64_t token_stride, int64_t block_stride, int64_t G, int64_t D, float soft_cap,
                   const float* sinks, float* __restrict scores, float* __restrict out) {
  const int64_t m = ctx - lo;
  for (int64_t j = lo; j < ctx; ++j) {
    const cache_t* k = kc + table[j / bs] * block_stride + (j % bs) * token_stride + head_off;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * to_f(k[d]);
      scores[g * m + j - lo] = s;
    }
  }
  const std::vector<float> inv_sum = softmax_rows(scores, G, m, soft_cap, sinks);
  std::fill(out, out + G * D, 0.f);
  for (int64_t j = lo; j < ctx; ++j) {
    const cache_t* v = vc + table[j / bs] * block_stride + (j % bs) * token_stride + head_off;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * m + j - lo];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * to_f(v[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] *= inv_sum[g];
}

template <typename q_t, typename cache_t>
void run(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& block_tables, const torch::Tensor& seq_lens, const torch::Tensor& query_start,
         const torch::Tensor& seq_ids, double scale, int64_t window, int64_t chunk, double soft_cap, double k_scale,
         double v_scale, const torch::Tensor& sinks) {
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH;
  const int64_t token_stride = KVH * D, block_stride = bs * KVH * D;
  const int64_t max_blocks = block_tables.size(1);
  const auto* qp = q.data_ptr<q_t>();
  auto* op = out.data_ptr<q_t>();
  const auto* kc = k_cache.data_ptr<cache_t>();
  const auto* vc = v_cache.data_ptr<cache_t>();
  const auto* bt = block_tables.data_ptr<int32_t>();
  const auto* sl = seq_lens.data_ptr<int32_t>();
  const auto* qsl = query_start.data_ptr<int32_t>();
  const auto* ids = seq_ids.data_ptr<int64_t>();
  const int64_t n = seq_ids.size(0);
  const float* sk = sinks.numel() > 0 ? sinks.data_ptr<float>() : nullptr;  // per query head

  // Work items: (sequence, query token, group of kv heads), flattened through a prefix sum.
  // Heads are split into groups only when (sequence, token) pairs alone would leave threads idle.
  int64_t num_q = 0;
  for (int64_t i = 0; i < n; ++i) num_q += qsl[ids[i] + 1] - qsl[ids[i]];
  int64_t splits = 1;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (num_q * splits < want && splits < KVH) {
    ++splits;
    while (KVH % splits) ++splits;
  }
  const int64_t nh = KVH / splits;
  std::vector<int64_t> item_start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = ids[i];
    item_start[i + 1] = item_start[i] + (qsl[s + 1] - qsl[s]) * splits;
  }
  int64_t max_ctx = 1;
  for (int64_t i = 0; i < n; ++i) max_ctx = std::max<int64_t>(max_ctx, sl[ids[i]]);
  const float fscale = static_cast<float>(scale * k_scale), fvscale = static_cast<float>(v_scale), fcap = static_cast<float>(soft_cap);
  const bool vectorized = D % 16 == 0;
  const int64_t QH = nh * G;

  const fixed_fn<cache_t> fixed = vectorized ? pick_fixed<cache_t>(G, D / 16) : nullptr;
  at::parallel_for(0, item_start[n], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(QH * D), scores(QH * max_ctx + 16), res(QH * D);
    std::vector<vf16> qv(vectorized ? QH * D / 16 : 0), acc(vectorized ? std::max(QH, G) * D / 16 : 0);
    std::vector<vf16> tacc(vectorized ? QH * 16 : 0);  // per query head, sixteen tokens' partial dot products
    int64_t i = std::upper_bound(item_start.begin(), item_start.end(), begin) - item_start.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= item_start[i + 1]) ++i;
      const int64_t s = ids[i];
      const int64_t local = item - item_start[i];
      const int64_t qi = local / splits, h0 = (local % splits) * nh;
      const int64_t q_len = qsl[s + 1] - qsl[s];
      const int64_t ctx = sl[s] - q_len + qi + 1;
      int64_t lo = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      if (chunk > 0) lo = std::max<int64_t>(lo, (ctx - 1) / chunk * chunk);
      const int64_t tok = qsl[s] + qi;
      const q_t* qsrc = qp + tok * H * D + h0 * G * D;
      for (int64_t x = 0; x < QH * D; ++x) qbuf[x] = to_f(qsrc[x]) * fscale;
      const int32_t* table = bt + s * max_blocks;
      if (fixed != nullptr) {
        fixed(qbuf.data(), kc, vc, table, lo, ctx, bs, h0, nh, token_stride, block_stride, fcap,
              sk != nullptr ? sk + h0 * G : nullptr, scores.data(), qv.data(), acc.data(), res.data());
      } else if (vectorized) {
        attend_vec<cache_t>(qbuf.data(), kc, vc, table, lo, ctx, bs, h0, nh, token_stride, block_stride, G, D / 16,
                            fcap, sk != nullptr ? sk + h0 * G : nullptr, scores.data(), qv.data(), acc.data(),
                            tacc.data(), res.data());
      } else {
        for (int64_t h = 0; h < nh; ++h)
          attend_scalar<cache_t>(qbuf.data() + h * G * D, kc, vc, table, lo, ctx, bs, (h0 + h) * D, token_stride,
                                 block_stride, G, D, fcap, sk != nullptr ? sk + (h0 + h) * G : nullptr,
                                 scores.data(), res.data() + h * G * D);
      }
      q_t* dst = op + tok * H * D + h0 * G * D;
      if (fvscale != 1.0f)
        for (int64_t x = 0; x < QH * D; ++x) res[x] *= fvscale;
      for (int64_t x = 0; x < QH * D; ++x) dst[x] = static_cast<q_t>(res[x]);
    }
  });
}

}  // namespace

void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start,
                     torch::Tensor seq_ids, double scale, int64_t window, int64_t chunk, double soft_cap,
                     double k_scale, double v_scale, torch::Tensor sinks) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32 &&
              query_start.scalar_type() == torch::kInt32 && seq_ids.scalar_type() == torch::kInt64,
              "index tensors: int32 tables/lens/offsets, int64 seq_ids");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(sinks.numel() == 0 || (sinks.scalar_type() == torch::kFloat32 && sinks.is_contiguous() &&
                                     sinks.numel() == q.size(1)), "sinks: float32, one per query head");
  auto bt = block_tables.contiguous();
#define PAGELLM_RUN(QT, CT) run<QT, CT>(out, q, k_cache, v_cache, bt, seq_lens, query_start, seq_ids, scale, window, chunk, \
                                    soft_cap, k_scale, v_scale, sinks)
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  if (qt == torch::kFloat32 && ct == torch::kFloat32) PAGELLM_RUN(float, float);
  else if (qt == torch::kFloat32 && ct == torch::kBFloat16) PAGELLM_RUN(float, c10::BFloat16);
  else if (qt == torch::kFloat32 && ct == torch::kFloat16) PAGELLM_RUN(float, c10::Half);
  else if (qt == torch::kBFloat16 && ct == torch::kBFloat16) PAGELLM_RUN(c10::BFloat16, c10::BFloat16);
  else if (qt == torch::kBFloat16 && ct == torch::kFloat32) PAGELLM_RUN(c10::BFloat16, float);
  else if (qt == torch::kFloat16 && ct == torch::kFloat16) PAGELLM_RUN(c10::Half, c10::Half);
  else if (qt == torch::kFloat32 && ct == torch::kFloat8_e4m3fn) PAGELLM_RUN(float, c10::Float8_e4m3fn);
  else if (qt == torch::kBFloat16 && ct == torch::kFloat8_e4m3fn) PAGELLM_RUN(c10::BFloat16, c10::Float8_e4m3fn);
  else if (qt == torch::kFloat16 && ct == torch::kFloat8_e4m3fn) PAGELLM_RUN(c10::Half, c10::Float8_e4m3fn);
  else TORCH_CHECK(false, "unsupported dtypes: q ", qt, ", cache ", ct);
#undef PAGELLM_RUN
}

std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x);  // int8_ops.cpp
torch::Tensor rescale_int32(torch::Tensor acc, torch::Tensor xs, torch::Tensor ws, torch::Tensor bias,
                            torch::ScalarType dtype);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "Paged attention over block tables (CPU)");
  m.def("quantize_rows_int8", &quantize_rows_int8, "Per-row symmetric int8 quantization (CPU)");
  m.def("rescale_int32", &rescale_int32, "int32 GEMM result * row scale * column scale (+ bias) (CPU)");
}
