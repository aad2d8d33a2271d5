#include "fuse_kernel.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "affine_codec.h"

namespace reqnoise {
namespace {

// Per-thread scratch: one row of each intermediate, never a dense copy of the weight.
struct RowScratch {
  std::vector<float> q, w, delta;
  std::vector<uint32_t> codes;
  explicit RowScratch(int64_t n) : q(n), w(n), delta(n), codes(n) {}
};

template <int BITS>
void unpack(const uint32_t* row, int64_t n, float* q) {
  unpack_row<BITS>(reinterpret_cast<const uint8_t*>(row), n, q);
}

inline void unpack_any(int bits, const uint32_t* row, int64_t n, float* q) {
  switch (bits) {
    case 2: return unpack<2>(row, n, q);
    case 3: return unpack<3>(row, n, q);
    case 4: return unpack<4>(row, n, q);
    case 5: return unpack<5>(row, n, q);
    case 6: return unpack<6>(row, n, q);
    case 8: return unpack<8>(row, n, q);
  }
  throw std::invalid_argument("unsupported bits");
}

inline void pack_any(int bits, const uint32_t* codes, int64_t n, uint32_t* row) {
  auto* dst = reinterpret_cast<uint8_t*>(row);
  switch (bits) {
    case 2: return pack_row<2>(codes, n, dst);
    case 3: return pack_row<3>(codes, n, dst);
    case 4: return pack_row<4>(codes, n, dst);
    case 5: return pack_row<5>(codes, n, dst);
    case 6: return pack_row<6>(codes, n, dst);
    case 8: return pack_row<8>(codes, n, dst);
  }
  throw std::invalid_argument("unsupported bits");
}

// delta[j] = sum_k (scale * b[k]) * A[k, j], summed in k order in float32 (as a rank-r matmul of the
// pre-scaled B would); the scaled b[k] is rounded to float32 first, like MLX's `scale * lora_b`.
inline void delta_row(const FuseSpec& spec, const float* a, const float* b, int64_t n, float* delta) {
  const float sb0 = spec.scale * b[0];
  for (int64_t j = 0; j < n; ++j) delta[j] = sb0 * a[j];
  for (int k = 1; k < spec.rank; ++k) {
    const float sb = spec.scale * b[k];
    const float* ak = a + int64_t(k) * n;
    for (int64_t j = 0; j < n; ++j) delta[j] = delta[j] + sb * ak[j];
  }
}

template <typename T>
void fuse_one_row(const FuseSpec& spec, int64_t in_dim, const uint32_t* wq, const T* scales, const T* biases,
                  const float* a, const float* b, const float* mag, uint32_t* wq_out, T* scales_out,
                  T* biases_out, RowScratch& s) {
  const int g_in = spec.group_size;
  const int64_t n_groups = in_dim / g_in;
  float* q = s.q.data();
  float* w = s.w.data();
  float* delta = s.delta.data();
  const bool has_delta = spec.rank > 0;

  unpack_any(spec.bits, wq, in_dim, q);
  if (has_delta) delta_row(spec, a, b, in_dim, delta);

  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const float sc = static_cast<float>(scales[gi]);
    const float bi = static_cast<float>(biases[gi]);
    const float* qg = q + gi * g_in;
    float* wg = w + gi * g_in;
    if (spec.keep_grid) {
      // float32 dequantization: re-encoding it against the same grid returns every code unchanged.
      for (int j = 0; j < g_in; ++j) wg[j] = qg[j] * sc + bi;
      if (has_delta) {
        const float* dg = delta + gi * g_in;
        for (int j = 0; j < g_in; ++j) wg[j] = wg[j] + dg[j];
      }
    } else {
      // MLX dequantizes with two ops in the scales' dtype (q*s, then +b), the delta is cast to that dtype
      // and the sum is rounded to it again: three roundings for 16-bit types, none for float32.
      for (int j = 0; j < g_in; ++j) wg[j] = round_to<T>(round_to<T>(qg[j] * sc) + bi);
      if (has_delta) {
        const float* dg = delta + gi * g_in;
        for (int j = 0; j < g_in; ++j) wg[j] = round_to<T>(wg[j] + round_to<T>(dg[j]));
      }
    }
  }

  if (spec.dora) {
    double ss = 0.0;
    for (int64_t j = 0; j < in_dim; ++j) ss += double(w[j]) * double(w[j]);
    const float row_scale = static_cast<float>(double(*mag) / std::sqrt(ss));
    for (int64_t j = 0; j < in_dim; ++j) w[j] = row_scale * w[j];
  }

  uint32_t* codes = s.codes.data();
  if (spec.keep_grid) {
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      encode_group(w + gi * g_in, g_in, spec.bits, static_cast<float>(scales[gi]),
                   static_cast<float>(biases[gi]), q + gi * g_in, codes + gi * g_in);
    }
  } else {
    const int g_out = spec.out_group_size;
    for (int64_t gi = 0; gi < in_dim / g_out; ++gi) {
      float so, bo;
      quantize_group(w + gi * g_out, g_out, spec.out_bits, codes + gi * g_out, so, bo);
      scales_out[gi] = T(so);
      biases_out[gi] = T(bo);
    }
  }
  pack_any(spec.out_bits, codes, in_dim, wq_out);
}

}  // namespace

template <typename T>
void fuse_rows(const FuseSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const uint32_t* wq,
               const T* scales, const T* biases, const float* A, const float* B, const float* mag,
               uint32_t* wq_out, T* scales_out, T* biases_out) {
  const int64_t n_rows = n_experts * out_dim;
  const int64_t words_in = in_dim * spec.bits / 32;
  const int64_t words_out = in_dim * spec.out_bits / 32;
  const int64_t groups_in = in_dim / spec.group_size;
  const int64_t groups_out = in_dim / spec.out_group_size;
  const int r = spec.rank;

  auto work = [&](int64_t row_begin, int64_t row_end) {
    RowScratch s(in_dim);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t e = row / out_dim;
      fuse_one_row<T>(spec, in_dim, wq + row * words_in, scales + row * groups_in, biases + row * groups_in,
                      r ? A + e * r * in_dim : nullptr, r ? B + row * r : nullptr, mag ? mag + row : nullptr,
                      wq_out + row * words_out, spec.keep_grid ? nullptr : scales_out + row * groups_out,
                      spec.keep_grid ? nullptr : biases_out + row * groups_out, s);
    }
  };

  int n_threads = spec.num_threads > 0 ? spec.num_threads : int(std::thread::hardware_concurrency());
  // Below a few hundred thousand values the thread start-up costs more than it saves.
  const int64_t min_rows = std::max<int64_t>(1, 262144 / std::max<int64_t>(in_dim, 1));
  n_threads = int(std::clamp<int64_t>(std::min<int64_t>(n_threads, n_rows / min_rows), 1, 256));
  if (n_threads == 1) {
    work(0, n_rows);
    return;
  }
  std::vector<std::thread> pool;
  std::exception_ptr error;
  std::mutex error_mutex;
  // Contiguous row blocks: each output byte is written by exactly one thread, so the result cannot depend
  // on the thread count.
  for (int t = 0; t < n_threads; ++t) {
    const int64_t begin = n_rows * t / n_threads, end = n_rows * (t + 1) / n_threads;
    pool.emplace_back([&, begin, end] {
      try {
        work(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

template void fuse_rows<float>(const FuseSpec&, int64_t, int64_t, int64_t, const uint32_t*, const float*,
                               const float*, const float*, const float*, const float*, uint32_t*, float*, float*);
template void fuse_rows<mlx::core::float16_t>(const FuseSpec&, int64_t, int64_t, int64_t, const uint32_t*,
                                              const mlx::core::float16_t*, const mlx::core::float16_t*,
                                              const float*, const float*, const float*, uint32_t*,
                                              mlx::core::float16_t*, mlx::core::float16_t*);
template void fuse_rows<mlx::core::bfloat16_t>(const FuseSpec&, int64_t, int64_t, int64_t, const uint32_t*,
                                               const mlx::core::bfloat16_t*, const mlx::core::bfloat16_t*,
                                               const float*, const float*, const float*, uint32_t*,
                                               mlx::core::bfloat16_t*, mlx::core::bfloat16_t*);

}  // namespace reqnoise
