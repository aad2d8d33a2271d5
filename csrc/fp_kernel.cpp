// The row loop for every call that reads or writes a floating-point mode (mxfp4, nvfp4, mxfp8), including
// the cross-mode requantizations (affine <-> fp). Affine-to-affine calls never come here (fuse_kernel.cpp).
// Compiled once per instruction-set level, like fuse_kernel.cpp (see CMakeLists.txt).
#include <cstring>

#include "affine_codec.h"
#include "fp_codec.h"
#include "fuse_kernel.h"

namespace reqnoise::REQNOISE_ISA {
namespace {

inline int mode_bits(int mode, int bits) { return mode == kAffine ? bits : (mode == kMxfp8 ? 8 : 4); }

// The same float32 sum, in the same k order, as the affine kernel's delta (scale * b[k] rounded first).
inline void delta_row(const FuseSpec& spec, const float* a, const float* b, int64_t n, float* delta) {
  const float s0 = spec.scale * b[0];
  for (int64_t j = 0; j < n; ++j) delta[j] = s0 * a[j];
  for (int k = 1; k < spec.rank; ++k) {
    const float s = spec.scale * b[k];
    const float* ak = a + int64_t(k) * n;
    for (int64_t j = 0; j < n; ++j) delta[j] = delta[j] + s * ak[j];
  }
}

template <typename T>
void fp_one_row(const FuseSpec& spec, int64_t in_dim, const FuseBuffers<T>& row, const RowScratch& s) {
  const int mode = spec.mode, out_mode = spec.out_mode;
  const int g_in = spec.group_size;
  const int64_t n_groups = in_dim / g_in;
  float* q = s.q;
  float* w = s.w;
  float* delta = s.delta;
  const bool has_delta = spec.rank > 0;

  unpack_codes(mode_bits(mode, spec.bits), row.wq, in_dim, q);
  if (has_delta) delta_row(spec, row.A, row.B, in_dim, delta);

  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const float* qg = q + gi * g_in;
    float* wg = w + gi * g_in;
    if (mode == kAffine) {  // only fresh reaches here: keep-grid never changes the mode
      const float sc = load_value(row.scales + gi), bi = load_value(row.biases + gi);
      for (int j = 0; j < g_in; ++j) wg[j] = round_to<T>(round_to<T>(qg[j] * sc) + bi);
    } else if (spec.keep_grid) {
      const float sc = scale_value(mode, row.scales8[gi]);
      for (int j = 0; j < g_in; ++j) wg[j] = code_value(mode, uint32_t(qg[j])) * sc;
    } else {
      // mx.dequantize: the code and the scale as T, one product rounded to T.
      const float sc = round_to<T>(scale_value(mode, row.scales8[gi]));
      // one loop per code kind, so that neither carries the mode test
      if (mode == kMxfp8) {
        for (int j = 0; j < g_in; ++j) wg[j] = round_to<T>(e4m3_value(uint32_t(qg[j])) * sc);
      } else {
        for (int j = 0; j < g_in; ++j) wg[j] = round_to<T>(e2m1_value(uint32_t(qg[j])) * sc);
      }
    }
    if (has_delta) {
      const float* dg = delta + gi * g_in;
      if (spec.keep_grid) {
        for (int j = 0; j < g_in; ++j) wg[j] = wg[j] + dg[j];
      } else {
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
      fp_encode_group(mode, w + gi * g_in, g_in, scale_value(mode, row.scales8[gi]), q + gi * g_in, codes + gi * g_in);
    }
  } else {
    const int g_out = spec.out_group_size;
    for (int64_t gi = 0; gi < in_dim / g_out; ++gi) {
      if (out_mode == kAffine) {
        float so, bo;
        quantize_group(w + gi * g_out, g_out, spec.out_bits, codes + gi * g_out, so, bo);
        store_value(row.scales_out + gi, so);
        store_value(row.biases_out + gi, bo);
      } else {
        fp_quantize_group<T>(out_mode, w + gi * g_out, g_out, codes + gi * g_out, row.scales8_out[gi]);
      }
    }
  }
  pack_codes(mode_bits(out_mode, spec.out_bits), codes, in_dim, row.wq_out);
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
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t e = row / out_dim;
    FuseBuffers<T> one{buf.wq + row * words_in,
                       aff_in ? buf.scales + row * groups_in : nullptr,
                       aff_in ? buf.biases + row * groups_in : nullptr,
                       r ? buf.A + e * r * in_dim : nullptr,
                       r ? buf.B + row * r : nullptr,
                       buf.mag ? buf.mag + row : nullptr,
                       buf.wq_out + row * words_out,
                       (!keep && aff_out) ? buf.scales_out + row * groups_out : nullptr,
                       (!keep && aff_out) ? buf.biases_out + row * groups_out : nullptr};
    one.scales8 = aff_in ? nullptr : buf.scales8 + row * groups_in;
    one.scales8_out = (!keep && !aff_out) ? buf.scales8_out + row * groups_out : nullptr;
    fp_one_row<T>(spec, in_dim, one, s);
  }
}

#define REQNOISE_INSTANTIATE(T)                                                                             \
  template void fp_row_range<T>(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, \
                                const RowScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise::REQNOISE_ISA
