// MLX affine format, one row at a time: bit (un)packing and the per-group quantizer.
//
// Everything here reproduces mlx's CPU stream bit for bit (mlx/backend/cpu/quantized.cpp and the dequantize
// op chain in mlx/ops.cpp, mlx 0.32): the arithmetic order below is load-bearing, and the file must be
// compiled with -ffp-contract=off so that no multiply-add is fused.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "mlx/types/half_types.h"

namespace reqnoise {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "MLX's packed layout is defined on little-endian hosts");

// Eight codes of BITS bits fill exactly BITS bytes of the row's little-endian, LSB-first bitstream. Groups
// are multiples of 32 values, so a row is always a whole number of such 8-code blocks.
template <int BITS>
inline void unpack_row(const uint8_t* src, int64_t n, float* codes) {
  constexpr uint64_t mask = (uint64_t(1) << BITS) - 1;
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t v = 0;
    std::memcpy(&v, src, BITS);
    src += BITS;
    for (int k = 0; k < 8; ++k) {
      codes[i + k] = static_cast<float>((v >> (k * BITS)) & mask);
    }
  }
}

template <int BITS>
inline void pack_row(const uint32_t* codes, int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t v = 0;
    for (int k = 0; k < 8; ++k) {
      v |= uint64_t(codes[i + k]) << (k * BITS);
    }
    std::memcpy(dst, &v, BITS);
    dst += BITS;
  }
}

// float -> T -> float: the rounding that storing a value in the scales' dtype applies.
template <typename T>
inline float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return static_cast<float>(T(x));
  }
}

// Round-half-to-even of a value already clamped to [0, 255]: for |x| < 2^22, adding and subtracting
// 1.5 * 2^23 leaves exactly rint(x) under the default rounding mode, and it vectorises where std::rint
// may become a library call. clamp-then-round equals MLX's round-then-clamp because the bounds are integers.
inline float rint_small(float x) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

// One group, exactly as mlx::core quantize() on the CPU stream: float32 arithmetic, scale and bias from the
// group's extremes, 0.0 put on the grid, codes from the unrounded float32 scale and bias.
inline void quantize_group(const float* x, int g, int bits, uint32_t* codes, float& scale_out, float& bias_out) {
  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  float w_min = std::numeric_limits<float>::infinity();
  float w_max = -w_min;
  for (int j = 0; j < g; ++j) {
    w_max = std::max(w_max, x[j]);
    w_min = std::min(w_min, x[j]);
  }
  const bool mask = std::abs(w_min) > std::abs(w_max);
  float scale = std::max((w_max - w_min) / n_bins, eps);
  scale = mask ? scale : -scale;
  const float edge = mask ? w_min : w_max;
  const float q0 = std::rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  for (int j = 0; j < g; ++j) {
    float v = (x[j] - bias) / scale;
    v = std::min(std::max(v, 0.0f), n_bins);
    codes[j] = static_cast<uint32_t>(rint_small(v));
  }
  scale_out = scale;
  bias_out = bias;
}

// Re-encode a group against a fixed (stored) scale and bias: the keep-grid requantizer.
inline void encode_group(const float* x, int g, int bits, float scale, float bias, const float* old_codes,
                         uint32_t* codes) {
  const float n_bins = float((1 << bits) - 1);
  if (scale == 0.0f) {
    // A zero step cannot express any change; the group keeps its codes.
    for (int j = 0; j < g; ++j) codes[j] = static_cast<uint32_t>(old_codes[j]);
    return;
  }
  for (int j = 0; j < g; ++j) {
    float v = (x[j] - bias) / scale;
    v = std::min(std::max(v, 0.0f), n_bins);
    codes[j] = static_cast<uint32_t>(rint_small(v));
  }
}

}  // namespace reqnoise
