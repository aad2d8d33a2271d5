#include "fuse_kernel.h"

#include <cstring>

#include "affine_codec.h"

// Compiled once per instruction-set level (see CMakeLists.txt); REQNOISE_ISA names the copy.
namespace reqnoise::REQNOISE_ISA {
namespace {

inline void unpack_any(int bits, const uint32_t* row, int64_t n, float* q, uint8_t* pad) {
  std::memcpy(pad, row, n * bits / 8);
  switch (bits) {
    case 2:
      return unpack_row<2>(pad, n, q);
    case 3:
      return unpack_row<3>(pad, n, q);
    case 4:
      return unpack_row<4>(pad, n, q);
    case 5:
      return unpack_row<5>(pad, n, q);
    case 6:
      return unpack_row<6>(pad, n, q);
    default:
      return unpack_row<8>(pad, n, q);  // widths are validated before dispatch
  }
}

inline void pack_any(int bits, const uint32_t* codes, int64_t n, uint32_t* row, uint8_t* pad) {
  switch (bits) {
    case 2:
      pack_row<2>(codes, n, pad);
      break;
    case 3:
      pack_row<3>(codes, n, pad);
      break;
    case 4:
      pack_row<4>(codes, n, pad);
      break;
    case 5:
      pack_row<5>(codes, n, pad);
      break;
    case 6:
      pack_row<6>(codes, n, pad);
      break;
    default:
      pack_row<8>(codes, n, pad);
      break;
  }
  std::memcpy(row, pad, n * bits / 8);
}

// delta[j] = sum_k (scale * b[k]) * A[k, j], summed in k order in float32 (as a rank-r matmul of the
// pre-scaled B would); the scaled b[k] is rounded to float32 first, like MLX's `scale * lora_b`. Columns go in
// blocks of 32 whose partial sums stay in registers while k runs, so A is the only stream.
inline void delta_row(const FuseSpec& spec, const float* a, const float* b, int64_t n, float* delta) {
  constexpr int kBlock = 32;  // rows are multiples of 32 values
  float sb[256];
  const int r = spec.rank < 256 ? spec.rank : 256;
  for (int k = 0; k < r; ++k) sb[k] = spec.scale * b[k];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    float acc[kBlock];
    for (int j = 0; j < kBlock; ++j) acc[j] = sb[0] * a[j0 + j];
    for (int k = 1; k < r; ++k) {
      const float* ak = a + int64_t(k) * n + j0;
      const float s = sb[k];
      for (int j = 0; j < kBlock; ++j) acc[j] = acc[j] + s * ak[j];
    }
    std::memcpy(delta + j0, acc, sizeof(acc));
  }
  for (int k = 256; k < spec.rank; ++k) {  // ranks above 256: the plain form, same order of operations
    const float s = spec.scale * b[k];
    const float* ak = a + int64_t(k) * n;
    for (int64_t j = 0; j < n; ++j) delta[j] = delta[j] + s * ak[j];
  }
}

// ``row``: this row's pointers (A: its expert's [rank, in] matrix; B: its [rank] row; mag: its magnitude).
template <typename T>
void fuse_one_row(const FuseSpec& spec, int64_t in_dim, const FuseBuffers<T>& row, const RowScratch& s) {
  const T* scales = row.scales;
  const T* biases = row.biases;
  const int g_in = spec.group_size;
  const int64_t n_groups = in_dim / g_in;
  float* q = s.q;
  float* w = s.w;
  float* delta = s.delta;
  const bool has_delta = spec.rank > 0;

  unpack_any(spec.bits, row.wq, in_dim, q, s.packed);
  if (has_delta) delta_row(spec, row.A, row.B, in_dim, delta);

  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const float sc = load_value(scales + gi);
    const float bi = load_value(biases + gi);
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
    const float row_scale = static_cast<float>(double(*row.mag) / __builtin_sqrt(ss));
    for (int64_t j = 0; j < in_dim; ++j) w[j] = row_scale * w[j];
  }

  uint32_t* codes = s.codes;
  if (spec.keep_grid) {
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      encode_group(w + gi * g_in, g_in, spec.bits, load_value(scales + gi), load_value(biases + gi), q + gi * g_in,
                   codes + gi * g_in);
    }
  } else {
    const int g_out = spec.out_group_size;
    for (int64_t gi = 0; gi < in_dim / g_out; ++gi) {
      float so, bo;
      quantize_group(w + gi * g_out, g_out, spec.out_bits, codes + gi * g_out, so, bo);
      store_value(row.scales_out + gi, so);
      store_value(row.biases_out + gi, bo);
    }
  }
  pack_any(spec.out_bits, codes, in_dim, row.wq_out, s.packed);
}

}  // namespace

template <typename T>
void fuse_row_range(const FuseSpec& spec, int64_t out_dim, int64_t in_dim, int64_t row_begin, int64_t row_end,
                    const FuseBuffers<T>& buf, const RowScratch& s) {
  const int64_t words_in = in_dim * spec.bits / 32;
  const int64_t words_out = in_dim * spec.out_bits / 32;
  const int64_t groups_in = in_dim / spec.group_size;
  const int64_t groups_out = in_dim / spec.out_group_size;
  const int r = spec.rank;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t e = row / out_dim;
    const FuseBuffers<T> one{buf.wq + row * words_in,
                             buf.scales + row * groups_in,
                             buf.biases + row * groups_in,
                             r ? buf.A + e * r * in_dim : nullptr,
                             r ? buf.B + row * r : nullptr,
                             buf.mag ? buf.mag + row : nullptr,
                             buf.wq_out + row * words_out,
                             spec.keep_grid ? nullptr : buf.scales_out + row * groups_out,
                             spec.keep_grid ? nullptr : buf.biases_out + row * groups_out};
    fuse_one_row<T>(spec, in_dim, one, s);
  }
}

#define REQNOISE_INSTANTIATE(T)                                                                               \
  template void fuse_row_range<T>(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, \
                                  const RowScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise::REQNOISE_ISA
