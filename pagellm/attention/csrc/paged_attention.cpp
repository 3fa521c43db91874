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
//   k/v cache     (num_blocks, block_size, num_kv_heads, head_dim)  float32 | bfloat16 | float16
//   block_tables  (num_seqs, max_blocks) int32
//   seq_lens      (num_seqs,) int32            context length after this step
//   query_start   (num_seqs + 1,) int32        query token offsets
//   seq_ids       (n,) int64                   which sequences to process
// Query token i of a q_len-token chunk sits at position seq_len - q_len + i and sees keys 0..that position.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename cache_t>
void attend_one(const float* __restrict q,        // (G, D) already scaled
                const cache_t* __restrict kc, const cache_t* __restrict vc,
                const int32_t* __restrict table, int64_t ctx, int64_t bs, int64_t kvh_stride,
                int64_t token_stride, int64_t block_stride, int64_t G, int64_t D,
                float* __restrict scores,               // (G, ctx) scratch
                float* __restrict acc,                  // (G, D) scratch
                float* __restrict out_f) {              // (G, D) result
  // 1. scores[g][j] = q_g . k_j
  for (int64_t j = 0; j < ctx; ++j) {
    const int64_t blk = table[j / bs];
    const cache_t* k = kc + blk * block_stride + (j % bs) * token_stride + kvh_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * to_f(k[d]);
      scores[g * ctx + j] = s;
    }
  }
  // 2. softmax per head
  std::vector<float> inv_sum(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < ctx; ++j) m = sg[j] > m ? sg[j] : m;
    float sum = 0.f;
    for (int64_t j = 0; j < ctx; ++j) {
      sg[j] = std::exp(sg[j] - m);
      sum += sg[j];
    }
    inv_sum[g] = 1.f / sum;
  }
  // 3. acc[g] = sum_j p[g][j] v_j
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t j = 0; j < ctx; ++j) {
    const int64_t blk = table[j / bs];
    const cache_t* v = vc + blk * block_stride + (j % bs) * token_stride + kvh_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * ctx + j];
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * to_f(v[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out_f[g * D + d] = acc[g * D + d] * inv_sum[g];
}

template <typename q_t, typename cache_t>
void run(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& block_tables, const torch::Tensor& seq_lens, const torch::Tensor& query_start,
         const torch::Tensor& seq_ids, double scale) {
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

  // Work items: (sequence, query token, kv head), flattened through a prefix sum over query lengths.
  std::vector<int64_t> item_start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = ids[i];
    item_start[i + 1] = item_start[i] + (qsl[s + 1] - qsl[s]) * KVH;
  }
  int64_t max_ctx = 1;
  for (int64_t i = 0; i < n; ++i) max_ctx = std::max<int64_t>(max_ctx, sl[ids[i]]);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, item_start[n], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(G * D), scores(G * max_ctx), acc(G * D), res(G * D);
    int64_t i = std::upper_bound(item_start.begin(), item_start.end(), begin) - item_start.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= item_start[i + 1]) ++i;
      const int64_t s = ids[i];
      const int64_t local = item - item_start[i];
      const int64_t qi = local / KVH, kvh = local % KVH;
      const int64_t q_len = qsl[s + 1] - qsl[s];
      const int64_t ctx = sl[s] - q_len + qi + 1;
      const int64_t tok = qsl[s] + qi;
      const q_t* qsrc = qp + tok * H * D + kvh * G * D;
      for (int64_t x = 0; x < G * D; ++x) qbuf[x] = to_f(qsrc[x]) * fscale;
      attend_one<cache_t>(qbuf.data(), kc, vc, bt + s * max_blocks, ctx, bs, kvh * D, token_stride,
                          block_stride, G, D, scores.data(), acc.data(), res.data());
      q_t* dst = op + tok * H * D + kvh * G * D;
      for (int64_t x = 0; x < G * D; ++x) dst[x] = static_cast<q_t>(res[x]);
    }
  });
}

}  // namespace

void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start,
                     torch::Tensor seq_ids, double scale) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32 &&
              query_start.scalar_type() == torch::kInt32 && seq_ids.scalar_type() == torch::kInt64,
              "index tensors: int32 tables/lens/offsets, int64 seq_ids");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  auto bt = block_tables.contiguous();
#define PAGELLM_RUN(QT, CT) run<QT, CT>(out, q, k_cache, v_cache, bt, seq_lens, query_start, seq_ids, scale)
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  if (qt == torch::kFloat32 && ct == torch::kFloat32) PAGELLM_RUN(float, float);
  else if (qt == torch::kFloat32 && ct == torch::kBFloat16) PAGELLM_RUN(float, c10::BFloat16);
  else if (qt == torch::kFloat32 && ct == torch::kFloat16) PAGELLM_RUN(float, c10::Half);
  else if (qt == torch::kBFloat16 && ct == torch::kBFloat16) PAGELLM_RUN(c10::BFloat16, c10::BFloat16);
  else if (qt == torch::kBFloat16 && ct == torch::kFloat32) PAGELLM_RUN(c10::BFloat16, float);
  else if (qt == torch::kFloat16 && ct == torch::kFloat16) PAGELLM_RUN(c10::Half, c10::Half);
  else TORCH_CHECK(false, "unsupported dtypes: q ", qt, ", cache ", ct);
#undef PAGELLM_RUN
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "Paged attention over block tables (CPU)");
}
