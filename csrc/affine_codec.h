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
#include <limits>
#include <type_traits>

#include "mlx/types/half_types.h"

#ifndef REQNOISE_ISA
#error "affine_codec.h is compiled once per instruction-set level: define REQNOISE_ISA"
#endif

// Everything here lives in the per-ISA namespace and avoids out-of-line library templates (std::max and
// friends are written as plain comparisons), so that no function compiled for one instruction set can be
// merged by the linker into the copy for another.
namespace reqnoise::REQNOISE_ISA {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "MLX's packed layout is defined on little-endian hosts");

// Rows are unpacked from and packed into a padded copy of the row, so that every 8-code block (BITS bytes
// of the little-endian, LSB-first bitstream) can be read or written with one unaligned 8-byte access.
// Groups are multiples of 32 values, so a row is always a whole number of 8-code blocks.
constexpr int kRowPadBytes = 8;

template <int BITS>
inline void unpack_row(const uint8_t* src, int64_t n, float* codes) {
  constexpr uint64_t mask = (uint64_t(1) << BITS) - 1;
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, src + (i / 8) * BITS, 8);
    for (int k = 0; k < 8; ++k) {
      codes[i + k] = static_cast<float>(static_cast<int32_t>((v >> (k * BITS)) & mask));
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
    std::memcpy(dst + (i / 8) * BITS, &v, 8);  // the next block overwrites the spill
  }
}

// float -> T -> float: the rounding that storing a value in the scales' dtype applies. Branch-free so that
// the loops around it vectorise; bit-identical to mlx's own float -> bfloat16/float16 conversions
// (round to nearest even; a NaN becomes the positive quiet NaN for bfloat16).
inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t r = (u + ((u >> 16) & 1u) + 0x7FFFu) & 0xFFFF0000u;
  const uint32_t out = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : r;
  float y;
  std::memcpy(&y, &out, 4);
  return y;
}

template <typename T>
inline float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
    return round_bf16(x);
  } else {
#if defined(__FLT16_MAX__)
    // IEEE binary16 conversion (F16C where the target has it): the same round-to-nearest-even as mlx's.
    return static_cast<float>(static_cast<_Float16>(x));
#else
    return static_cast<float>(T(x));
#endif
  }
}

// Loads and stores of the scales' dtype through their bits, not through mlx's inline conversion operators,
// which would otherwise be compiled (and possibly emitted out of line) once per instruction set.
template <typename T>
inline float load_value(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    const uint32_t u = uint32_t(h) << 16;
    float y;
    std::memcpy(&y, &u, 4);
    return y;
  } else {
#if defined(__FLT16_MAX__)
    _Float16 h;
    std::memcpy(&h, p, 2);
    return static_cast<float>(h);
#else
    return static_cast<float>(*p);
#endif
  }
}

template <typename T>
inline void store_value(T* p, float x) {
  if constexpr (std::is_same_v<T, float>) {
    *p = x;
  } else if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
    const float r = round_bf16(x);
    uint32_t u;
    std::memcpy(&u, &r, 4);
    const uint16_t h = uint16_t(u >> 16);
    std::memcpy(p, &h, 2);
  } else {
#if defined(__FLT16_MAX__)
    const _Float16 h = static_cast<_Float16>(x);
    std::memcpy(p, &h, 2);
#else
    *p = T(x);
#endif
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
  // Eight independent lanes (one vector register), then a fold: the same extremes as MLX's sequential scan
  // (max and min are order-free for non-NaN values; a signed zero's sign cannot change scale, bias or codes).
  typedef float v8f __attribute__((vector_size(32)));
  v8f vmax, vmin;
  std::memcpy(&vmax, x, sizeof(v8f));
  vmin = vmax;
  for (int j = 8; j < g; j += 8) {
    v8f v;
    std::memcpy(&v, x + j, sizeof(v8f));
    vmax = vmax < v ? v : vmax;
    vmin = v < vmin ? v : vmin;
  }
  float w_max = vmax[0], w_min = vmin[0];
  for (int l = 1; l < 8; ++l) {
    w_max = w_max < vmax[l] ? vmax[l] : w_max;
    w_min = vmin[l] < w_min ? vmin[l] : w_min;
  }
  const bool mask = __builtin_fabsf(w_min) > __builtin_fabsf(w_max);
  float scale = (w_max - w_min) / n_bins;
  scale = scale < eps ? eps : scale;  // std::max(scale, eps)
  scale = mask ? scale : -scale;
  const float edge = mask ? w_min : w_max;
  const float q0 = __builtin_rintf(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  for (int j = 0; j < g; ++j) {
    float v = (x[j] - bias) / scale;
    v = v < 0.0f ? 0.0f : v;
    v = n_bins < v ? n_bins : v;
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
    v = v < 0.0f ? 0.0f : v;
    v = n_bins < v ? n_bins : v;
    codes[j] = static_cast<uint32_t>(rint_small(v));
  }
}

}  // namespace reqnoise::REQNOISE_ISA
