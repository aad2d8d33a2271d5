// MLX's floating-point quantization modes (mxfp4, nvfp4, mxfp8), one group at a time: the E2M1 and E4M3
// codes, the e8m0 and e4m3 scales, and the quantizer of mx.quantize's CPU op chain.
//
// The rules are the ones measured in docs/mlx-fp-formats.md (each against mx.quantize/mx.dequantize in
// tests/test_kernel_fp.py); the arithmetic is written here from those rules. As in affine_codec.h, the
// order of roundings is load-bearing: MLX runs the fp quantizer as an op chain in the weights' dtype, so
// every intermediate it stores is rounded to that dtype here too (round_to<T>).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "affine_codec.h"
#include "fuse_kernel.h"

namespace reqnoise::REQNOISE_ISA {

// E2M1 magnitudes by code (bit 3 is the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
inline float e2m1_value(uint32_t c) {
  constexpr float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = mag[c & 7u];
  return (c & 8u) ? -m : m;
}

// MLX's E2M1 code: the first entry of its code table (index = code) at the smallest distance |x - value|,
// each distance rounded to D. Up to |x| = 6 that is the nearest code with ties to the smaller magnitude, and
// any |x| <= 0.25 (negative included) gives +0: the thresholds below. Beyond 6 (only when a scale saturated
// or underflowed) the rounded distances decide, so they are computed as MLX does; NaN and inf give code 0.
template <typename D>
inline uint32_t e2m1_encode_far(float x) {
  uint32_t best = 0;
  float bd = __builtin_fabsf(round_to<D>(x - e2m1_value(0)));
  for (uint32_t c = 1; c < 16; ++c) {
    const float d = __builtin_fabsf(round_to<D>(x - e2m1_value(c)));
    if (d < bd) {
      bd = d;
      best = c;
    }
  }
  return best;
}

template <typename D>
inline uint32_t e2m1_encode(float x) {
  const float a = __builtin_fabsf(x);
  if (!(a <= 6.0f)) return e2m1_encode_far<D>(x);
  const uint32_t c = uint32_t(a > 0.25f) + uint32_t(a > 0.75f) + uint32_t(a > 1.25f) + uint32_t(a > 1.75f) +
                     uint32_t(a > 2.5f) + uint32_t(a > 3.5f) + uint32_t(a > 5.0f);
  return (__builtin_signbit(x) && c) ? (c | 8u) : c;
}

// E4M3 (fn variant: no infinities; 0x7F and 0xFF are NaN, which the encoder never produces).
inline float e4m3_value(uint32_t c) {
  const uint32_t e = (c >> 3) & 15u, m = c & 7u;
  float v;
  if (e == 15 && m == 7) {
    v = __builtin_nanf("");
  } else if (e == 0) {
    v = float(m) * 0.001953125f;  // subnormals: m * 2^-9
  } else {
    const uint32_t u = ((e + 120u) << 23) | (m << 20);
    std::memcpy(&v, &u, 4);
  }
  return (c & 0x80u) ? -v : v;
}

// Nearest E4M3 code, ties to even; |x| >= 464 (the midpoint above 448), inf and NaN saturate to +-448.
inline uint32_t e4m3_encode(float x) {
  uint32_t ux;
  std::memcpy(&ux, &x, 4);
  const uint32_t sign = (ux >> 24) & 0x80u;
  const float a = __builtin_fabsf(x);
  uint32_t c;
  if (!(a < 464.0f)) {
    c = 0x7Eu;
  } else if (a < 0.015625f) {
    c = uint32_t(rint_small(a * 512.0f));  // below 2^-6: multiples of 2^-9 (scaling by 2^9 is exact)
  } else {
    uint32_t ua;
    std::memcpy(&ua, &a, 4);
    const uint32_t r = ua + 0x7FFFFu + ((ua >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, ties even
    c = (r >> 20) - (120u << 3);
  }
  return c | sign;
}

inline float code_value(int mode, uint32_t c) { return mode == kMxfp8 ? e4m3_value(c) : e2m1_value(c); }
// D: the dtype MLX's table search computes distances in (the weights' dtype; float32 for nvfp4, whose chain
// passes through a float32 multiply first).
template <typename D>
inline uint32_t code_encode(int mode, float x) {
  return mode == kMxfp8 ? e4m3_encode(x) : e2m1_encode<D>(x);
}

// The float value of a stored scale byte: 2^(byte-127) for e8m0 (byte 255 gives inf), e4m3 for nvfp4.
inline float scale_value(int mode, uint8_t b) {
  return mode == kNvfp4 ? e4m3_value(b) : __builtin_ldexpf(1.0f, int(b) - 127);
}

// The smallest power of two >= s (s > 0, finite), as its exponent.
inline int ceil_log2(float s) {
  int e;
  const float m = __builtin_frexpf(s, &e);
  return m == 0.5f ? e - 1 : e;
}

// One group as mx.quantize(w, mode=...) on the CPU stream, for values ``x`` that are already T-values:
// scale = amax / (6 or 448) in T; e8m0 modes take the smallest power of two >= it (0 for an all-zero group)
// and store exponent + 127 as a byte (wrapping below -127, as MLX's int32 -> uint8 cast does); nvfp4 stores
// the scale's nearest e4m3. Codes are the nearest code of x / scale, that quotient rounded to T.
template <typename T>
inline void fp_quantize_group(int mode, const float* x, int g, uint32_t* codes, uint8_t& scale_byte) {
  float amax = 0.0f;
  for (int j = 0; j < g; ++j) {
    const float a = __builtin_fabsf(x[j]);
    amax = amax < a ? a : amax;
  }
  const float s = round_to<T>(amax / (mode == kMxfp8 ? 448.0f : 6.0f));
  float p;
  if (mode == kNvfp4) {
    scale_byte = uint8_t(e4m3_encode(s));
    p = round_to<T>(e4m3_value(scale_byte));
  } else {
    const int n = s == 0.0f ? 0 : ceil_log2(s);
    scale_byte = uint8_t(uint32_t(n + 127) & 0xFFu);
    p = round_to<T>(__builtin_ldexpf(1.0f, n));
  }
  if (mode == kNvfp4) {
    for (int j = 0; j < g; ++j) codes[j] = e2m1_encode<float>(round_to<T>(x[j] / p));
  } else if (mode == kMxfp4) {
    for (int j = 0; j < g; ++j) codes[j] = e2m1_encode<T>(round_to<T>(x[j] / p));
  } else {
    for (int j = 0; j < g; ++j) codes[j] = e4m3_encode(round_to<T>(x[j] / p));
  }
}

// Keep-grid: re-encode against the stored scale. A value equal to its old code's value keeps that code
// (so +-0 survives a zero delta), and so does a NaN code; a zero, infinite or NaN scale cannot express a change.
inline void fp_encode_group(int mode, const float* x, int g, float scale, const float* old_codes, uint32_t* codes) {
  const bool usable = scale != 0.0f && __builtin_fabsf(scale) < __builtin_inff();
  for (int j = 0; j < g; ++j) {
    const uint32_t old = static_cast<uint32_t>(old_codes[j]);
    if (!usable) {
      codes[j] = old;
      continue;
    }
    // Clamped first: the nearest code of a value beyond the largest is the largest, also for an infinite one
    // (the fresh encoder's inf -> 0 is MLX's table search, not a nearest code).
    const float lim = mode == kMxfp8 ? 448.0f : 6.0f;
    float v = x[j] / scale;
    v = v < -lim ? -lim : (lim < v ? lim : v);
    const float ov = code_value(mode, old);
    codes[j] = (v == ov || ov != ov) ? old : code_encode<float>(mode, v);
  }
}

}  // namespace reqnoise::REQNOISE_ISA
