// The row loop for every call that reads or writes a floating-point mode (mxfp4, nvfp4, mxfp8), including
// the cross-mode requantizations (affine <-> fp). Affine-to-affine calls never come here (fuse_kernel.cpp).
// Compiled once per instruction-set level, like fuse_kernel.cpp (see CMakeLists.txt).
//
// A row goes through two passes over L1-resident scratch: the dequantized values (+ delta) of the input
// mode, then the groups of the output mode. Each pass is templated on its mode and dtype, so its group loop
// is a fixed-length, branch-free loop that the compiler vectorizes.
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "affine_codec.h"
#include "fp_codec.h"
#include "fuse_kernel.h"
#include "lowrank_delta.h"

namespace reqnoise::REQNOISE_ISA {
namespace {

inline int mode_bits(int mode, int bits) { return mode == kAffine ? bits : (mode == kMxfp8 ? 8 : 4); }

// mx.dequantize of one group: the code and the scale as T, one product rounded to T; then the delta cast to
// T and the sum rounded to T (the fuse chain's `w + delta.astype(w.dtype)`).
template <typename T, int MODE, bool DELTA>
inline void fp_dequantize_group(const uint32_t* __restrict cg, float sc, const float* __restrict dg,
                                float* __restrict wg) {
  for (int j = 0; j < group_of(MODE); ++j) {  // hot-loop: fp dequantize
    float v = round_to<T>(decode<MODE>(cg[j]) * sc);
    // dg + 0: a delta that is a sum of products all -0 becomes +0, as MLX's matmul (whose sums start from
    // +0) gives it; nothing else changes. The sign matters here only, where it can reach an E4M3 code.
    if constexpr (DELTA) v = round_to<T>(v + round_to<T>(dg[j] + 0.0f));
    wg[j] = v;
  }
}

// Pass 1: w = the row's values in the input mode, plus the delta, straight from the packed row. Fresh rounds
// as MLX's op chain does; keep-grid keeps float32 (re-encoding that against the same grid returns every code
// unchanged).
template <typename T, int MODE>
void dequantize_fp_row(bool keep_grid, const uint32_t* wq, const uint8_t* scales8, const float* __restrict delta,
                       int64_t n, float* __restrict w) {
  constexpr int G = group_of(MODE);
  uint32_t cg[G];
  for (int64_t gi = 0; gi < n / G; ++gi) {
    unpack_group<MODE>(wq, gi, cg);
    float* wg = w + gi * G;
    if (keep_grid) {
      const float sc = scale_value(MODE, scales8[gi]);
      for (int j = 0; j < G; ++j) wg[j] = decode<MODE>(cg[j]) * sc;  // hot-loop: fp keep-grid dequantize
      if (delta) {
        const float* dg = delta + gi * G;
        for (int j = 0; j < G; ++j) wg[j] = wg[j] + dg[j];
      }
    } else {
      const float sc = round_to<T>(scale_value(MODE, scales8[gi]));
      if (delta) {
        fp_dequantize_group<T, MODE, true>(cg, sc, delta + gi * G, wg);
      } else {
        fp_dequantize_group<T, MODE, false>(cg, sc, nullptr, wg);
      }
    }
  }
}

// Pass 1 for an affine input (a requantization into an fp mode): MLX's affine dequantize chain in T.
template <typename T>
void dequantize_affine_row(const FuseSpec& spec, const FuseBuffers<T>& row, float* __restrict q,
                           const float* __restrict delta, int64_t n, float* __restrict w) {
  const int g = spec.group_size;
  unpack_codes(spec.bits, row.wq, n, q);
  for (int64_t gi = 0; gi < n / g; ++gi) {
    const float sc = load_value(row.scales + gi), bi = load_value(row.biases + gi);
    const float* qg = q + gi * g;
    float* wg = w + gi * g;
    for (int j = 0; j < g; ++j) wg[j] = round_to<T>(round_to<T>(qg[j] * sc) + bi);
    if (delta) {
      const float* dg = delta + gi * g;
      for (int j = 0; j < g; ++j) wg[j] = round_to<T>(wg[j] + round_to<T>(dg[j] + 0.0f));  // + 0: as above
    }
  }
}

// Pass 2 into an fp mode, through to the packed output row: fresh (scales chosen here) or keep-grid (the
// input's scales and codes). Fresh E4M3 codes are written straight to the row (8-bit codes pack as bytes).
template <typename T, int MODE>
void quantize_fp_row(bool keep_grid, const uint32_t* wq_in, const uint8_t* scales8_in, const float* __restrict w,
                     int64_t n, uint32_t* __restrict codes, uint32_t* wq_out, uint8_t* scales8_out) {
  constexpr int G = group_of(MODE);
  if (!keep_grid && MODE == kMxfp8) return fp_quantize<T, MODE>(w, n, reinterpret_cast<uint8_t*>(wq_out), scales8_out);
  if (keep_grid) {
    uint32_t old[G];
    for (int64_t gi = 0; gi < n / G; ++gi) {
      unpack_group<MODE>(wq_in, gi, old);
      fp_encode_group<MODE>(w + gi * G, scale_value(MODE, scales8_in[gi]), old, codes + gi * G);
    }
  } else {
    fp_quantize<T, MODE>(w, n, codes, scales8_out);
  }
  pack_codes(MODE == kMxfp8 ? 8 : 4, codes, n, wq_out);
}

template <typename T>
void fp_one_row(const FuseSpec& spec, int64_t in_dim, const FuseBuffers<T>& row, const RowScratch& s,
                const float* delta) {
  const int mode = spec.mode, out_mode = spec.out_mode;
  const bool keep = spec.keep_grid;
  float* q = s.q;
  float* w = s.w;

  switch (mode) {  // keep-grid never changes the mode, so only fresh reaches the affine input
    case kMxfp4:
      dequantize_fp_row<T, kMxfp4>(keep, row.wq, row.scales8, delta, in_dim, w);
      break;
    case kNvfp4:
      dequantize_fp_row<T, kNvfp4>(keep, row.wq, row.scales8, delta, in_dim, w);
      break;
    case kMxfp8:
      dequantize_fp_row<T, kMxfp8>(keep, row.wq, row.scales8, delta, in_dim, w);
      break;
    default:
      dequantize_affine_row<T>(spec, row, q, delta, in_dim, w);
      break;
  }

  if (spec.dora) {
    double ss = 0.0;
    for (int64_t j = 0; j < in_dim; ++j) ss += double(w[j]) * double(w[j]);
    const float row_scale = static_cast<float>(double(*row.mag) / __builtin_sqrt(ss));
    for (int64_t j = 0; j < in_dim; ++j) w[j] = row_scale * w[j];
  }

  uint32_t* codes = s.codes;
  switch (out_mode) {
    case kMxfp4:
      return quantize_fp_row<T, kMxfp4>(keep, row.wq, row.scales8, w, in_dim, codes, row.wq_out, row.scales8_out);
    case kNvfp4:
      return quantize_fp_row<T, kNvfp4>(keep, row.wq, row.scales8, w, in_dim, codes, row.wq_out, row.scales8_out);
    case kMxfp8:
      return quantize_fp_row<T, kMxfp8>(keep, row.wq, row.scales8, w, in_dim, codes, row.wq_out, row.scales8_out);
    default: {
      const int g_out = spec.out_group_size;
      for (int64_t gi = 0; gi < in_dim / g_out; ++gi) {
        float so, bo;
        quantize_group(w + gi * g_out, g_out, spec.out_bits, codes + gi * g_out, so, bo);
        store_value(row.scales_out + gi, so);
        store_value(row.biases_out + gi, bo);
      }
      pack_codes(spec.out_bits, codes, in_dim, row.wq_out);
    }
  }
}

}  // namespace

template <typename T>
void fp_row_range(const FuseSpec& spec, int64_t out_dim, int64_t in_dim, int64_t row_begin, int64_t row_end,
                  const FuseBuffers<T>& buf, const RowScratch& s) {
  const int64_t words_in = in_dim * mode_bits(spec.mode, spec.bits) / 32;
  const int64_t words_out = in_dim * mode_bits(spec.out_mode, spec.out_bits) / 32;
  const int64_t groups_in = in_dim / spec.group_size;
  const int64_t groups_out = in_dim / spec.out_group_size;
  const bool aff_in = spec.mode == kAffine, aff_out = spec.out_mode == kAffine, keep = spec.keep_grid;
  const int r = spec.rank;
  // The delta in tiles of rows of one expert, as the affine kernel computes it (lowrank_delta.h). malloc, not
  // a std:: container, whose out-of-line template code could be shared between the instruction-set copies.
  float* tile_delta = nullptr;
  if (r) {
    tile_delta = static_cast<float*>(std::malloc(sizeof(float) * kTile * in_dim));
    if (!tile_delta) throw std::bad_alloc();
  }
  for (int64_t row0 = row_begin; row0 < row_end;) {
    const int64_t e = row0 / out_dim;
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
      FuseBuffers<T> one{buf.wq + row * words_in,
                         aff_in ? buf.scales + row * groups_in : nullptr,
                         aff_in ? buf.biases + row * groups_in : nullptr,
                         a,
                         r ? buf.B + row * r : nullptr,
                         buf.mag ? buf.mag + row : nullptr,
                         buf.wq_out + row * words_out,
                         (!keep && aff_out) ? buf.scales_out + row * groups_out : nullptr,
                         (!keep && aff_out) ? buf.biases_out + row * groups_out : nullptr};
      one.scales8 = aff_in ? nullptr : buf.scales8 + row * groups_in;
      one.scales8_out = (!keep && !aff_out) ? buf.scales8_out + row * groups_out : nullptr;
      fp_one_row<T>(spec, in_dim, one, s, r ? tile_delta + (row - row0) * in_dim : nullptr);
    }
    row0 = tile_end;
  }
  std::free(tile_delta);
}

#define REQNOISE_INSTANTIATE(T)                                                                             \
  template void fp_row_range<T>(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, \
                                const RowScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise::REQNOISE_ISA
