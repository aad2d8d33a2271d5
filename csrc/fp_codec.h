// MLX's floating-point quantization modes (mxfp4, nvfp4, mxfp8), one group at a time: the E2M1 and E4M3
// codes, the e8m0 and e4m3 scales, and the quantizer of mx.quantize's CPU op chain.
//
// The rules are the ones measured in docs/mlx-fp-formats.md (each against mx.quantize/mx.dequantize in
// tests/test_kernel_fp.py); the arithmetic is written here from those rules. As in affine_codec.h, the
// order of roundings is load-bearing: MLX runs the fp quantizer as an op chain in the weights' dtype, so
// every intermediate it stores is rounded to that dtype here too (round_to<T>).
//
// Speed: every per-value function is branch-free (bit arithmetic and selects, no table search, no library
// call), so that the group loops in fp_kernel.cpp vectorize under each instruction-set copy; the rare values
// that need MLX's exact table search (E2M1 beyond +-12, NaN) are flagged by the vector loop and the group is
// redone by the scalar form.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "affine_codec.h"
#include "fuse_kernel.h"

namespace reqnoise::REQNOISE_ISA {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// E2M1 magnitudes by code (bit 3 is the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6. From index 2 on, E2M1's mantissa
// bit is float32's bit 22 and its exponent carries into float32's exponent, so the float bits of 1, 1.5, 2,
// 3, 4, 6 step by 2^22 from those of 1.0; indices 0 and 1 (zero and the subnormal 0.5) are selected.
inline float e2m1_value(uint32_t c) {
  const uint32_t i = c & 7u;
  uint32_t u = 0x3F800000u + ((i - 2u) << 22);
  u = i == 1u ? 0x3F000000u : u;
  u = i == 0u ? 0u : u;
  return float_of(u | ((c & 8u) << 28));  // code 8 is -0
}

// MLX's E2M1 code: the first entry of its code table (index = code) at the smallest distance |x - value|,
// each distance rounded to D. NaN and inf give code 0. Used for the values e2m1_encode_near does not cover.
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

// Values up to |x| = 12 (for D = float32, bfloat16 or float16) take the same code from MLX's table search as
// from the thresholds below: up to 6 the search finds the nearest code with ties to the smaller magnitude,
// and any |x| <= 0.25 (negative included) gives +0. On (6, 12] x - 6 is exact in D (Sterbenz; D's spacing
// there is at most 2^-3 even for bfloat16), so the rounded distance to +-6 stays strictly the smallest and the
// code is +-6, which the count of thresholds (7) also gives.
inline constexpr float kE2m1NearLimit = 12.0f;

// The nearest E2M1 code of |x| <= kE2m1NearLimit by counting the midpoints below |x|; branch-free.
inline uint32_t e2m1_encode_near(float x) {
  const float a = __builtin_fabsf(x);
  const uint32_t c = uint32_t(a > 0.25f) + uint32_t(a > 0.75f) + uint32_t(a > 1.25f) + uint32_t(a > 1.75f) +
                     uint32_t(a > 2.5f) + uint32_t(a > 3.5f) + uint32_t(a > 5.0f);
  const uint32_t sign = (bits_of(x) >> 28) & 8u;
  return c | (c ? sign : 0u);
}

// 1 when e2m1_encode_near does not apply (|x| beyond the limit, or NaN): the group is then redone exactly.
inline uint32_t e2m1_is_far(float x) { return __builtin_fabsf(x) <= kE2m1NearLimit ? 0u : 1u; }

template <typename D>
inline uint32_t e2m1_encode(float x) {
  return e2m1_is_far(x) ? e2m1_encode_far<D>(x) : e2m1_encode_near(x);
}

// E4M3 (fn variant: no infinities; 0x7F and 0xFF are NaN, which the encoder never produces). A normal code's
// bits (exponent, mantissa) are float32's exponent and top mantissa bits with the bias moved from 7 to 127;
// subnormals are m * 2^-9. NaN codes give a NaN of the code's sign.
inline float e4m3_value(uint32_t c) {
  const uint32_t a = c & 0x7Fu;
  uint32_t u = (a << 20) + (120u << 23);
  u = a < 8u ? bits_of(float(int32_t(a)) * 0.001953125f) : u;
  u = a == 0x7Fu ? 0x7FC00000u : u;
  return float_of(u ^ ((c & 0x80u) << 24));
}

// Nearest E4M3 code, ties to even; |x| >= 464 (the midpoint above 448), inf and NaN saturate to +-448.
// Branch-free: both the subnormal and the normal code are computed and one is selected.
inline uint32_t e4m3_encode(float x) {
  const uint32_t ux = bits_of(x);
  const uint32_t sign = (ux >> 24) & 0x80u;
  const uint32_t ua = ux & 0x7FFFFFFFu;
  const float a = float_of(ua);
  const uint32_t small = code_of(a * 512.0f);            // below 2^-6: multiples of 2^-9 (scaling by 2^9 is exact)
  const uint32_t r = ua + 0x7FFFFu + ((ua >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, ties even
  uint32_t c = a < 0.015625f ? small : (r >> 20) - (120u << 3);
  c = a < 464.0f ? c : 0x7Eu;
  return c | sign;
}

inline float code_value(int mode, uint32_t c) { return mode == kMxfp8 ? e4m3_value(c) : e2m1_value(c); }

// The float value of a stored scale byte: 2^(byte-127) for e8m0 (byte 255 gives inf, byte 0 the subnormal
// 2^-127), e4m3 for nvfp4.
inline float e8m0_value(uint32_t b) { return float_of(b == 0u ? 0x00400000u : b << 23); }
inline float scale_value(int mode, uint8_t b) { return mode == kNvfp4 ? e4m3_value(b) : e8m0_value(b); }

// The smallest n with 2^n >= s (s > 0). Normal s from its bits; subnormal and non-finite s through frexp.
inline int ceil_log2(float s) {
  const uint32_t u = bits_of(s);
  const uint32_t e = (u >> 23) & 0xFFu;
  if (e != 0u && e != 0xFFu) return int(e) - ((u & 0x7FFFFFu) ? 126 : 127);
  int ex;
  const float m = __builtin_frexpf(s, &ex);
  return m == 0.5f ? ex - 1 : ex;
}

inline constexpr int group_of(int mode) { return mode == kNvfp4 ? 16 : 32; }
inline constexpr float largest_code(int mode) { return mode == kMxfp8 ? 448.0f : 6.0f; }

// The G codes of group ``gi`` straight from a packed row (4-bit: 8 codes per word; 8-bit: 4), eight at a
// time: one broadcast, one per-lane shift and one mask, the same on every instruction set.
template <int MODE>
inline void unpack_group(const uint32_t* __restrict row, int64_t gi, uint32_t* __restrict codes) {
  constexpr int G = group_of(MODE);
  if constexpr (MODE == kMxfp8) {
    const uint32_t* w = row + gi * (G / 4);
    const v8u sh = {0, 8, 16, 24, 0, 8, 16, 24};
    for (int b = 0; b < G / 8; ++b) {
      const uint32_t lo = w[2 * b], hi = w[2 * b + 1];
      const v8u c = (v8u{lo, lo, lo, lo, hi, hi, hi, hi} >> sh) & 0xFFu;
      std::memcpy(codes + 8 * b, &c, sizeof(c));
    }
  } else {
    const uint32_t* w = row + gi * (G / 8);
    const v8u sh = {0, 4, 8, 12, 16, 20, 24, 28};
    for (int b = 0; b < G / 8; ++b) {
      const uint32_t x = w[b];
      const v8u c = (v8u{x, x, x, x, x, x, x, x} >> sh) & 0xFu;
      std::memcpy(codes + 8 * b, &c, sizeof(c));
    }
  }
}

template <int MODE>
inline float decode(uint32_t c) {
  return MODE == kMxfp8 ? e4m3_value(c) : e2m1_value(c);
}

// |x| over G values, as MLX's sequential scan computes it (NaN ignored): eight independent lanes, then a
// pairwise fold (max is order-free for non-NaN values, and no lane ever holds a NaN).
template <int G>
inline float group_amax(const float* __restrict x) {
  static_assert(G % 8 == 0);
  const v8u abs_mask = {0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu,
                        0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu};
  v8f m = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < G; j += 8) {
    v8u v;
    std::memcpy(&v, x + j, sizeof(v));
    const v8f a = (v8f)(v & abs_mask);
    m = m < a ? a : m;
  }
  v8f h = __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m = m < h ? h : m;
  h = __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
  m = m < h ? h : m;
  h = __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
  m = m < h ? h : m;
  return m[0];
}

// A group's scale as mx.quantize(w, mode=MODE) on the CPU stream chooses it from the group's amax (of values
// that are T-values): s = amax / (6 or 448) in T; e8m0 modes take the smallest power of two >= s (2^0 for an
// all-zero group) and store exponent + 127 as a byte (wrapping below -127, as MLX's int32 -> uint8 cast does);
// nvfp4 stores the nearest e4m3 of s. ``p`` is the stored scale's value in T, which the group's values are
// divided by; ``inv`` is 1/p where that is exact (p a power of two with a normal reciprocal: a multiply by it
// then rounds the same real quotient once, as the division does), else 0.
struct FpScale {
  float p, inv;
  uint8_t byte;
};

template <typename T, int MODE>
inline FpScale fp_scale(float amax) {
  const float s = round_to<T>(amax / largest_code(MODE));
  FpScale r;
  if constexpr (MODE == kNvfp4) {
    r.byte = uint8_t(e4m3_encode(s));
    r.p = round_to<T>(e4m3_value(r.byte));
    r.inv = 0.0f;
  } else {
    const int n = s == 0.0f ? 0 : ceil_log2(s);
    r.byte = uint8_t(uint32_t(n + 127) & 0xFFu);
    r.p = round_to<T>(n >= -126 && n <= 127 ? float_of(uint32_t(n + 127) << 23) : __builtin_ldexpf(1.0f, n));
    const uint32_t pe = bits_of(r.p) >> 23;  // p >= 0
    r.inv = (bits_of(r.p) & 0x7FFFFFu) == 0u && pe >= 1u && pe <= 253u ? float_of((254u - pe) << 23) : 0.0f;
  }
  return r;
}

// round_to<T> for a value known not to be NaN (bfloat16 then skips its NaN case).
template <typename T>
inline float round_to_non_nan(float x) {
  if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
    return round_bf16_non_nan(x);
  } else {
    return round_to<T>(x);
  }
}

// fp_scale without branches, for a loop over many groups: the same for every s = amax / L (in T) that is zero
// or a normal float up to 2^127, which is every group of weights short of the float32 limits; returns 1 for
// the others (then fp_scale is used). amax is never NaN (group_amax). The logic is bitwise rather than
// short-circuit so that the body is one straight line, which the loop over groups vectorizes.
template <typename T, int MODE>
inline uint32_t fp_scale_fast(float amax, float& p, float& inv, uint32_t& byte) {
  const float s = round_to_non_nan<T>(amax / largest_code(MODE));
  if constexpr (MODE == kNvfp4) {
    byte = e4m3_encode(s);
    p = round_to<T>(e4m3_value(byte));
    inv = 0.0f;
    return 0u;
  } else {
    const uint32_t u = bits_of(s), e = u >> 23;
    const uint32_t n127 = u == 0u ? 127u : e + uint32_t((u & 0x7FFFFFu) != 0u);  // n + 127
    byte = n127 & 0xFFu;
    p = round_to_non_nan<T>(float_of(n127 << 23));
    const uint32_t pb = bits_of(p), pe = pb >> 23;
    const uint32_t exact = uint32_t((pb & 0x7FFFFFu) == 0u) & uint32_t(pe - 1u <= 252u);  // pe in [1, 253]
    inv = exact ? float_of((254u - pe) << 23) : 0.0f;
    // s subnormal (u in [1, 2^23)) or n beyond 127. A sum, not an OR, of the two tests: GCC 12 vectorizes
    // the loop for the one and not the other.
    return uint32_t(u - 1u < 0x7FFFFFu) + uint32_t(n127 >= 255u);
  }
}

// The codes of one group (G values that are T-values, unless DoRA rescaled them) at a chosen scale: the
// nearest code of x / p, that quotient rounded to T. The E2M1 table search computes its distances in T for
// mxfp4 and in float32 for nvfp4 (whose chain passes through a float32 multiply first).
template <typename T, int MODE, typename C>
inline void fp_encode_fresh(const float* __restrict x, float p, float inv, C* __restrict codes) {
  constexpr int G = group_of(MODE);
  uint32_t far = 0;
  if (inv != 0.0f) {
    for (int j = 0; j < G; ++j) {  // hot-loop: fp quantize (e8m0 scale)
      const float v = round_to<T>(x[j] * inv);
      if constexpr (MODE == kMxfp8) {
        codes[j] = C(e4m3_encode(v));
      } else {
        codes[j] = C(e2m1_encode_near(v));
        far |= e2m1_is_far(v);
      }
    }
  } else {
    for (int j = 0; j < G; ++j) {  // hot-loop: fp quantize (divide)
      const float v = round_to<T>(x[j] / p);
      if constexpr (MODE == kMxfp8) {
        codes[j] = C(e4m3_encode(v));
      } else {
        codes[j] = C(e2m1_encode_near(v));
        far |= e2m1_is_far(v);
      }
    }
  }
  if constexpr (MODE != kMxfp8) {
    using D = std::conditional_t<MODE == kNvfp4, float, T>;
    if (far) {
      for (int j = 0; j < G; ++j) codes[j] = C(e2m1_encode<D>(round_to<T>(x[j] / p)));
    }
  }
}

// mx.quantize of n values (n a multiple of the group size): codes (C: uint32_t, or uint8_t for E4M3, whose
// packed row is its codes as bytes) and scale bytes. The groups' scales are chosen a chunk at a time in one
// loop, apart from their codes, so that no group waits on its own scale's chain of dependent operations
// (amax, divide, round, exponent) before its codes.
template <typename T, int MODE, typename C>
inline void fp_quantize(const float* __restrict x, int64_t n, C* __restrict codes, uint8_t* __restrict bytes) {
  constexpr int G = group_of(MODE);
  constexpr int kChunk = 64;
  float amax[kChunk], p[kChunk], inv[kChunk];
  uint32_t b[kChunk];
  for (int64_t g0 = 0; g0 < n / G; g0 += kChunk) {
    const int m = int(n / G - g0 < kChunk ? n / G - g0 : kChunk);
    const float* xc = x + g0 * G;
    for (int i = 0; i < m; ++i) amax[i] = group_amax<G>(xc + i * G);
    uint32_t special = 0;
    for (int i = 0; i < m; ++i) special |= fp_scale_fast<T, MODE>(amax[i], p[i], inv[i], b[i]);
    if (special) {
      for (int i = 0; i < m; ++i) {
        const FpScale sc = fp_scale<T, MODE>(amax[i]);
        p[i] = sc.p, inv[i] = sc.inv, b[i] = sc.byte;
      }
    }
    for (int i = 0; i < m; ++i) bytes[g0 + i] = uint8_t(b[i]);
    for (int i = 0; i < m; ++i) fp_encode_fresh<T, MODE, C>(xc + i * G, p[i], inv[i], codes + (g0 + i) * G);
  }
}

// Keep-grid: re-encode against the stored scale. A value equal to its old code's value keeps that code
// (so +-0 survives a zero delta), and so does a NaN code; a zero, infinite or NaN scale cannot express a
// change. Values are clamped to the largest code first: the nearest code of a value beyond it is the largest,
// also for an infinite one (the fresh encoder's inf -> 0 is MLX's table search, not a nearest code).
template <int MODE>
inline void fp_encode_group(const float* __restrict x, float scale, const uint32_t* __restrict old_codes,
                            uint32_t* __restrict codes) {
  constexpr int G = group_of(MODE);
  const bool usable = scale != 0.0f && __builtin_fabsf(scale) < __builtin_inff();
  if (!usable) {
    for (int j = 0; j < G; ++j) codes[j] = old_codes[j];
    return;
  }
  constexpr float lim = largest_code(MODE);
  uint32_t far = 0;
  for (int j = 0; j < G; ++j) {  // hot-loop: fp keep-grid encode
    const uint32_t old = old_codes[j];
    float v = x[j] / scale;
    v = v < -lim ? -lim : (lim < v ? lim : v);
    const float ov = decode<MODE>(old);
    uint32_t c;
    if constexpr (MODE == kMxfp8) {
      c = e4m3_encode(v);
    } else {
      c = e2m1_encode_near(v);
      far |= e2m1_is_far(v);  // only a NaN, after the clamp
    }
    codes[j] = (v == ov || ov != ov) ? old : c;
  }
  if constexpr (MODE != kMxfp8) {
    if (far) {
      for (int j = 0; j < G; ++j) {
        const uint32_t old = old_codes[j];
        float v = x[j] / scale;
        v = v < -lim ? -lim : (lim < v ? lim : v);
        const float ov = e2m1_value(old);
        codes[j] = (v == ov || ov != ov) ? old : e2m1_encode<float>(v);
      }
    }
  }
}

// Keep-grid's rule for one value of a run-time mode (the calibrated kernel's column loop): what
// fp_encode_group gives that value, old code and scale.
inline uint32_t fp_encode_keep(int mode, float x, float scale, uint32_t old) {
  if (!(scale != 0.0f && __builtin_fabsf(scale) < __builtin_inff())) return old;
  const float lim = largest_code(mode);
  float v = x / scale;
  v = v < -lim ? -lim : (lim < v ? lim : v);
  const float ov = code_value(mode, old);
  if (v == ov || ov != ov) return old;
  return mode == kMxfp8 ? e4m3_encode(v) : e2m1_encode<float>(v);
}

}  // namespace reqnoise::REQNOISE_ISA
