#include "fuse_kernel.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "affine_codec.h"
#include "lowrank_delta.h"

// Compiled once per instruction-set level (see CMakeLists.txt); REQNOISE_ISA names the copy.
namespace reqnoise::REQNOISE_ISA {
namespace {

// One group of G values as MLX's dequantize op chain computes it: two ops in the scales' dtype (q*s, then +b),
// the delta cast to that dtype and the sum rounded to it again (three roundings for 16-bit types, none for
// float32). For bfloat16 a first pass rounds without the NaN case, which is most of the rounding's cost,
// and keeps the group if every result is finite (then no NaN occurred: a rounded NaN never turns finite);
// otherwise the group is recomputed with the exact NaN handling, so the bytes are MLX's either way.
template <typename T, int G, bool DELTA>
inline void dequantize_group(const float* __restrict qg, const float* __restrict dg, float sc, float bi,
                             float* __restrict wg) {
  if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
    uint32_t non_finite = 0;
    for (int j = 0; j < G; ++j) {  // hot-loop: dequantize (bfloat16, finite)
      float x = round_bf16_non_nan(round_bf16_non_nan(qg[j] * sc) + bi);
      if constexpr (DELTA) x = round_bf16_non_nan(x + round_bf16_non_nan(dg[j]));
      wg[j] = x;
      non_finite |= is_non_finite(x);
    }
    if (!non_finite) return;
  }
  for (int j = 0; j < G; ++j) {  // hot-loop: dequantize
    float x = round_to<T>(round_to<T>(qg[j] * sc) + bi);
    if constexpr (DELTA) x = round_to<T>(x + round_to<T>(dg[j]));
    wg[j] = x;
  }
}

template <typename T, int G>
inline void dequantize_row(const T* scales, const T* biases, const float* __restrict q, const float* __restrict delta,
                           int64_t n, float* __restrict w) {
  for (int64_t gi = 0; gi < n / G; ++gi) {
    const float sc = load_value(scales + gi), bi = load_value(biases + gi);
    if (delta) {
      dequantize_group<T, G, true>(q + gi * G, delta + gi * G, sc, bi, w + gi * G);
    } else {
      dequantize_group<T, G, false>(q + gi * G, nullptr, sc, bi, w + gi * G);
    }
  }
}

// ``row``: this row's pointers (A: its expert's [rank, in] matrix; B: its [rank] row; mag: its magnitude).
// ``delta``: this row's scale * B @ A (unused when rank == 0).
template <typename T>
void fuse_one_row(const FuseSpec& spec, int64_t in_dim, const FuseBuffers<T>& row, const RowScratch& s,
                  const float* __restrict delta) {
  const T* scales = row.scales;
  const T* biases = row.biases;
  const int g_in = spec.group_size;
  const int64_t n_groups = in_dim / g_in;
  float* __restrict q = s.q;
  float* __restrict w = s.w;
  const bool has_delta = spec.rank > 0;

  unpack_codes(spec.bits, row.wq, in_dim, q);

  if (spec.keep_grid) {
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      const float sc = load_value(scales + gi);
      const float bi = load_value(biases + gi);
      const float* __restrict qg = q + gi * g_in;
      float* __restrict wg = w + gi * g_in;
      // float32 dequantization: re-encoding it against the same grid returns every code unchanged.
      for (int j = 0; j < g_in; ++j) wg[j] = qg[j] * sc + bi;  // hot-loop: keep-grid dequantize
      if (has_delta) {
        const float* __restrict dg = delta + gi * g_in;
        for (int j = 0; j < g_in; ++j) wg[j] = wg[j] + dg[j];  // hot-loop: keep-grid delta
      }
    }
  } else {
    const float* d = has_delta ? delta : nullptr;
    switch (g_in) {  // group sizes are validated before dispatch
      case 32:
        dequantize_row<T, 32>(scales, biases, q, d, in_dim, w);
        break;
      case 64:
        dequantize_row<T, 64>(scales, biases, q, d, in_dim, w);
        break;
      default:
        dequantize_row<T, 128>(scales, biases, q, d, in_dim, w);
        break;
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
  pack_codes(spec.out_bits, codes, in_dim, row.wq_out);
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
  // The tile's deltas: kTile rows of in_dim floats per thread (s.delta holds one row only). malloc, not a
  // std:: container, whose out-of-line template code could be shared between the instruction-set copies.
  float* tile_delta = nullptr;
  if (r) {
    tile_delta = static_cast<float*>(std::malloc(sizeof(float) * kTile * in_dim));
    if (!tile_delta) throw std::bad_alloc();
  }
  for (int64_t row0 = row_begin; row0 < row_end;) {
    const int64_t e = row0 / out_dim;
    // A tile never crosses an expert (its rows share A) nor this thread's range.
    const int64_t expert_end = (e + 1) * out_dim;
    int64_t tile_end = row0 + kTile;
    tile_end = tile_end < row_end ? tile_end : row_end;
    tile_end = tile_end < expert_end ? tile_end : expert_end;
    const float* a = r ? buf.A + e * r * in_dim : nullptr;
    if (r) {
      if (tile_end - row0 == kTile) {
        delta_tile<kTile>(spec, a, buf.B + row0 * r, in_dim, tile_delta);
      } else {
        for (int64_t row = row0; row < tile_end; ++row) {
          delta_row(spec, a, buf.B + row * r, in_dim, tile_delta + (row - row0) * in_dim);
        }
      }
    }
    for (int64_t row = row0; row < tile_end; ++row) {
      const FuseBuffers<T> one{buf.wq + row * words_in,
                               buf.scales + row * groups_in,
                               buf.biases + row * groups_in,
                               a,
                               r ? buf.B + row * r : nullptr,
                               buf.mag ? buf.mag + row : nullptr,
                               buf.wq_out + row * words_out,
                               spec.keep_grid ? nullptr : buf.scales_out + row * groups_out,
                               spec.keep_grid ? nullptr : buf.biases_out + row * groups_out};
      fuse_one_row<T>(spec, in_dim, one, s, r ? tile_delta + (row - row0) * in_dim : nullptr);
    }
    row0 = tile_end;
  }
  std::free(tile_delta);
}

#define REQNOISE_INSTANTIATE(T)                                                                               \
  template void fuse_row_range<T>(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, \
                                  const RowScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise::REQNOISE_ISA
