// Per-token int8 quantization of activations and the int32 -> float rescale around an int8 GEMM
// (quantization/int8.py, w8a8), each one pass over memory with OpenMP over rows. In torch ops each is a
// chain of 5-6 full passes with temporaries, slower than the int8 GEMM itself at prefill sizes.
//
//   quantize_rows_int8(x (M, K) float32 | bfloat16) -> (q (M, K) int8, scale (M, 1) float32)
//       scale[m] = max_k |x[m, k]| / 127 (1e-12 at least), q = round-half-even(x / scale), in [-127, 127]
//   rescale_int32(acc (M, N) int32, xs (M, 1) float32, ws (N,) float32, bias (N,) or empty, out dtype)
//       out[m, n] = acc[m, n] * xs[m] * ws[n] (+ bias[n])

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32x16(const c10::BFloat16* p) {
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
}
#endif

template <typename T>
void quantize_rows(const T* __restrict x, int8_t* __restrict q, float* __restrict scale, int64_t M, int64_t K) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * K;
      int8_t* qr = q + m * K;
      int64_t k = 0;
      float mx = 0.f;
#if defined(__AVX512F__)
      __m512 vmax = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_f32x16(xr + k)));
      mx = _mm512_reduce_max_ps(vmax);
#endif
      for (; k < K; ++k) mx = std::max(mx, std::fabs(f32(xr[k])));
      const float s = std::max(mx, 1e-12f * 127.f) / 127.f;
      const float inv = 1.f / s;
      k = 0;
#if defined(__AVX512F__)
      const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
      for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(load_f32x16(xr + k), vinv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
      }
#endif
      for (; k < K; ++k) {
        // round half to even, as torch.round; |x| <= max keeps the value within [-127, 127]
        const float v = std::nearbyint(f32(xr[k]) * inv);
        qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
      }
      scale[m] = s;
    }
  });
}

template <typename T>
void rescale(const int32_t* __restrict acc, const float* __restrict xs, const float* __restrict ws,
             const T* __restrict bias, T* __restrict out, int64_t M, int64_t N) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* a = acc + m * N;
      T* o = out + m * N;
      const float s = xs[m];
      if (bias != nullptr)
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(static_cast<float>(a[n]) * s * ws[n] + f32(bias[n]));
      else
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(static_cast<float>(a[n]) * s * ws[n]);
    }
  });
}

}  // namespace

std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2, "x must be (M, K)");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto s = torch::empty({M, 1}, x.options().dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kFloat32)
    quantize_rows(x.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), M, K);
  else if (x.scalar_type() == torch::kBFloat16)
    quantize_rows(x.data_ptr<c10::BFloat16>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), M, K);
  else
    TORCH_CHECK(false, "quantize_rows_int8: float32 or bfloat16 input, got ", x.scalar_type());
  return {q, s};
}

torch::Tensor rescale_int32(torch::Tensor acc, torch::Tensor xs, torch::Tensor ws, torch::Tensor bias,
                            torch::ScalarType dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt32, "acc must be (M, N) int32");
  TORCH_CHECK(xs.scalar_type() == torch::kFloat32 && ws.scalar_type() == torch::kFloat32, "scales must be float32");
  acc = acc.contiguous();
  xs = xs.contiguous();
  ws = ws.contiguous();
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(xs.numel() == M && ws.numel() == N, "scale sizes do not match acc");
  auto out = torch::empty({M, N}, acc.options().dtype(dtype));
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias) {
    TORCH_CHECK(bias.numel() == N, "bias size does not match acc");
    bias = bias.to(dtype).contiguous();
  }
  if (dtype == torch::kFloat32)
    rescale(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), ws.data_ptr<float>(),
            has_bias ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N);
  else if (dtype == torch::kBFloat16)
    rescale(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), ws.data_ptr<float>(),
            has_bias ? bias.data_ptr<c10::BFloat16>() : nullptr, out.data_ptr<c10::BFloat16>(), M, N);
  else
    TORCH_CHECK(false, "rescale_int32: float32 or bfloat16 output, got ", dtype);
  return out;
}
