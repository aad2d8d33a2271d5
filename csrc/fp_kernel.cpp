// The row loop for every call that reads or writes a floating-point mode (mxfp4, nvfp4, mxfp8), including
// the cross-mode requantizations (affine <-> fp). Affine-to-affine calls never come here (fuse_kernel.cpp).
// Compiled once per instruction-set level, like fuse_kernel.cpp (see CMakeLists.txt).
//
// A row goes through two passes over L1-resident scratch: the dequantized values (+ delta) of the input
// mode, then the groups of the output mode. Each pass is templated on its mode and dtype, so its group loop
// is a fixed-length, branch-free loop that the compiler vectorizes. bfloat16 fresh rows requantized into their
// own mode (the common case) take a three-pass form written with vector types instead (fp_pass1_bf16,
// fp_pass23_bf16), which writes the same bytes.
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

// ---- bfloat16 fresh rows requantized into their own mode: three passes ----
//
// The common case (mx.dequantize to bfloat16, the delta added, mx.quantize into the same mode) in the form of
// fuse_kernel.cpp's three-pass affine rows, each value's path held in registers within a pass: (1) the packed
// codes dequantized eight at a time, the delta added, each group's largest |value| kept as eight partial maxima
// (of the values' bits: for non-negative floats the integer order is the float order, and a non-finite value
// has the largest bits); (2) the scales of eight groups at a time as vectors; (3) each group's codes computed
// and packed straight into the output row. The bytes are those of dequantize_fp_row and fp_quantize: a group
// that holds a non-finite value, or whose scale is outside the fast form's range, is redone by those functions'
// own per-group code (fp_exact_group).

// E2M1 magnitudes are looked up in a table by one permute where the build has it (REQNOISE_PERMUTE_TABLE,
// affine_codec.h); elsewhere they are computed lane by lane.

// A vector of floats as its bits (unsigned lanes), and back; any width.
template <typename V>
inline auto fp_bits_v(V x) {
  typedef uint32_t U __attribute__((vector_size(sizeof(V))));
  U u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

template <typename U>
inline auto fp_float_v(U u) {
  typedef float F __attribute__((vector_size(sizeof(U))));
  F x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline v8f fp_splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// e4m3_value on eight lanes (codes < 256).
inline v8f fp_e4m3_value_v(v8u c) {
  const v8u a = c & 0x7Fu;
  v8u u = (a << 20) + (120u << 23);
  u = a < 8u ? fp_bits_v(__builtin_convertvector((v8i)a, v8f) * 0.001953125f) : u;
  u = a == 0x7Fu ? v8u{} + 0x7FC00000u : u;
  return fp_float_v(u ^ ((c & 0x80u) << 24));
}

// e4m3_encode on eight lanes; SATURATE = false for values known to be below 464 in magnitude. A subnormal
// code is |x| rounded to a multiple of 2^-9 by adding 2^14 (whose float spacing is 2^-9; ties to even).
template <bool SATURATE>
inline v8u fp_e4m3_encode_v(v8f x) {
  const v8u ux = fp_bits_v(x);
  const v8u ua = ux & 0x7FFFFFFFu;
  const v8u small = fp_bits_v(fp_float_v(ua) + 16384.0f) - 0x46800000u;
  const v8u r = ua + 0x7FFFFu + ((ua >> 20) & 1u);
  v8u c = (v8i)ua < 0x3C800000 ? small : (r >> 20) - (120u << 3);        // |x| < 2^-6: subnormal codes
  if constexpr (SATURATE) c = (v8i)ua < 0x43E80000 ? c : v8u{} + 0x7Eu;  // 464
  return c | ((ux >> 24) & 0x80u);
}

// e2m1_encode_near on eight lanes of q, for the lanes where |q| <= kE2m1NearLimit; when FAR, ``far`` keeps the
// largest |q| bits seen (fp_is_far tells whether any lane was beyond the limit, or NaN).
// The thresholds 0.75, 1.25, 1.75, 2.5, 3.5 and 5 (ties to the smaller magnitude) are odd multiples of 2^21
// in the bits from 0.75 on, so from there the code is the number of them below |q|, counted by one add and
// one shift: (bits + 2^21 - 1) >> 22 steps by one at each; below 1 that count is short (0.5 to 1 is one
// binade, E2M1's subnormal step), so the code is the larger of it and the count of 0.25 and 0.75 below |q|.
// ROUND: q = x * fl(1/p) stands for round_bf16(x / p), x a bfloat16 value and p > 0 an E4M3 value. Every
// boundary B here (a multiple of 2^21 in the bits: at most 3 significant bits) times p is a bfloat16 value, so
// x / p is B exactly, above B * (1 + 2^-8) or at most B * (1 - 2^-9): neither the bfloat16 rounding (which keeps
// B itself: bit 16 of B is 0, so a tie goes to B) nor the reciprocal's (2^-23) moves it across B, and a
// boundary counts where q's bits exceed it by more than 0x8000 (B * 2^-8 is at least that many steps).
template <bool ROUND, bool FAR>
inline v8u fp_e2m1_encode_v(v8f q, v8i& far) {
  constexpr int32_t h = ROUND ? 0x8000 : 0;
  const v8u uq = fp_bits_v(q);
  const v8i a = (v8i)(uq & 0x7FFFFFFFu);
  v8i hi = (a + (0x1FFFFF - h - 0x3F000000)) >> 22;              // code of 1.0 (bits 0x3F800000) is 2 = 254 - 252
  hi = hi > 7 ? v8i{} + 7 : hi;                                  // this form (not hi < 7 ? ...) is one vpminsd for GCC
  const v8i m25 = a > 0x3E800000 + h, m75 = a > 0x3F400000 + h;  // -1 where true
  v8i c = -(m25 + m75);
  c = c < hi ? hi : c;
  c |= (v8i)(uq >> 28) & m25 & 8;  // the sign (code bit 3) of values that are not +0
  if constexpr (FAR) far = far < a ? a : far;
  return (v8u)c;
}

inline bool fp_any(v8u x) {
  uint64_t h[4];
  std::memcpy(h, &x, sizeof(h));
  return h[0] | h[1] | h[2] | h[3];
}

// Whether fp_e2m1_encode_v<true, true>'s ``far`` holds a quotient whose bfloat16 rounding is beyond 12, or NaN.
inline bool fp_is_far(v8i far) { return fp_any((v8u)(far > 0x41400000 + 0x8000)); }

// fp_e2m1_encode_v for sixteen values (two blocks' quotients) on 16-bit lanes, half the instructions: the
// thresholds and boundaries are bfloat16 values, so only the high half of each quotient's bits takes part (for
// ROUND, of the bits plus 0x7FFF: the high half then exceeds a boundary's exactly when the bits exceed it by
// more than 0x8000). Lanes in the order of x86's pack instructions: codes 0-3 of q0, 0-3 of q1, 4-7 of q0,
// 4-7 of q1 (one shuffle per input, no lane crossing; fp_pack_unit16 undoes it).
typedef int16_t v16s __attribute__((vector_size(32)));
typedef uint16_t v16u __attribute__((vector_size(32)));

template <bool ROUND, bool FAR>
inline v16s fp_e2m1_encode_v16(v8f q0, v8f q1, v16s& far) {
  v8u u0 = fp_bits_v(q0), u1 = fp_bits_v(q1);
  if constexpr (ROUND) u0 += 0x7FFFu, u1 += 0x7FFFu;
  const v16s x = __builtin_shufflevector((v16s)u0, (v16s)u1, 1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31);
  const v16s a = x & 0x7FFF;
  v16s hi = (a + int16_t(0x1F - 0x3F00)) >> 6;  // as in fp_e2m1_encode_v, on the high halves
  hi = hi > 7 ? v16s{} + 7 : hi;
  const v16s m25 = a > 0x3E80, m75 = a > 0x3F40;
  v16s c = -(m25 + m75);
  c = c < hi ? hi : c;
  c |= (v16s)((v16u)x >> 12) & m25 & 8;
  if constexpr (FAR) far = far < a ? a : far;
  return c;
}

// Whether fp_e2m1_encode_v16<true, true>'s ``far`` holds a quotient beyond 12 (rounded), or NaN.
inline bool fp_is_far16(v16s far) { return fp_any((v8u)(far > 0x4140)); }

// Four blocks of E2M1 codes from fp_e2m1_encode_v16 (c01: blocks 0 and 1, c23: 2 and 3) packed into 16 bytes:
// a block's pair of codes joined as one byte (c01's in byte 0 of a 32-bit lane, c23's in byte 1), then one byte
// shuffle into block order.
inline void fp_pack_unit16(v16s c01, v16s c23, uint8_t* dst) {
  v8u y = (v8u)(c01 | (c23 << 8));
  y |= y >> 12;
  typedef uint8_t v16b __attribute__((vector_size(16)));
  // Lane L holds pair (L & 1) + 2 * (L >> 2) of block (L >> 1) & 1 (byte 0) or 2 + that (byte 1).
#define REQNOISE_S(L, s) 4 * (L) + (s)
  const v16b z = __builtin_shufflevector(
      (v32b)y, (v32b)y, REQNOISE_S(0, 0), REQNOISE_S(1, 0), REQNOISE_S(4, 0), REQNOISE_S(5, 0), REQNOISE_S(2, 0),
      REQNOISE_S(3, 0), REQNOISE_S(6, 0), REQNOISE_S(7, 0), REQNOISE_S(0, 1), REQNOISE_S(1, 1), REQNOISE_S(4, 1),
      REQNOISE_S(5, 1), REQNOISE_S(2, 1), REQNOISE_S(3, 1), REQNOISE_S(6, 1), REQNOISE_S(7, 1));
#undef REQNOISE_S
  std::memcpy(dst, &z, 16);
}

// e4m3_encode of sixteen quotients known to be bfloat16 values below 464 in magnitude (mxfp8's x * (1/p)), on
// 16-bit lanes as fp_e2m1_encode_v16 (same lane order): normal codes from the rounded bits, magnitudes up to
// 2^-10 (which round to code 0) as +-0; the magnitudes between, whose subnormal codes need more, are flagged in
// ``mid`` (their groups are re-encoded by fp_group_codes_fast).
inline v16s fp_e4m3_encode_v16(v8f q0, v8f q1, v16s& mid) {
  const v8u u0 = fp_bits_v(q0), u1 = fp_bits_v(q1);
  const v16s x = __builtin_shufflevector((v16s)u0, (v16s)u1, 1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31);
  const v16s a = x & 0x7FFF;
  const v16s r = a + 7 + ((a >> 4) & 1);  // the 7-bit mantissa rounded to 3 bits, ties to even
  const v16s normal = a > 0x3C7F;         // at least 2^-6
  const v16s c = ((r >> 4) - (120 << 3)) & normal;
  mid |= (a > 0x3A80) & ~normal;  // above 2^-10
  return c | ((v16s)((v16u)x >> 8) & 0x80);
}

// Four blocks of E4M3 codes from fp_e4m3_encode_v16 (c01: blocks 0 and 1, c23: 2 and 3) into 32 bytes: the low
// bytes in the order of x86's pack instruction, then the 32-bit groups into block order.
inline void fp_pack_unit16_e4m3(v16s c01, v16s c23, uint8_t* dst) {
  const v32b t = __builtin_shufflevector((v32b)c01, (v32b)c23, 0, 2, 4, 6, 8, 10, 12, 14, 32, 34, 36, 38, 40, 42, 44,
                                         46, 16, 18, 20, 22, 24, 26, 28, 30, 48, 50, 52, 54, 56, 58, 60, 62);
  const v8u y = __builtin_shufflevector((v8u)t, (v8u)t, 0, 4, 1, 5, 2, 6, 3, 7);
  std::memcpy(dst, &y, 32);
}

// An E4M3 input block: 8 bytes, code j in the top byte of lane j (the bytes below it zero).
inline v8u fp_e4m3_block_high(const uint8_t* __restrict src, int64_t blk) {
  uint64_t v;
  std::memcpy(&v, src + blk * 8, 8);
  const v4q b = {v, v, v, v};
  const v32b z = {};
#define REQNOISE_LANE(j) 32, 32, 32, 16 * (j / 4) + j
  return (v8u)__builtin_shufflevector((v32b)b, z, REQNOISE_LANE(0), REQNOISE_LANE(1), REQNOISE_LANE(2),
                                      REQNOISE_LANE(3), REQNOISE_LANE(4), REQNOISE_LANE(5), REQNOISE_LANE(6),
                                      REQNOISE_LANE(7));
#undef REQNOISE_LANE
}

// The codes of kLanes / 8 E4M3 blocks from blk on, each in the top byte of its lane (the bytes below it zero):
// with 16 lanes one 16-byte read broadcast to the four 128-bit lanes and one vpshufb.
inline vNu fp_e4m3_lanes_high(const uint8_t* __restrict src, int64_t blk) {
#if defined(REQNOISE_LANES16)
  __m128i x;
  std::memcpy(&x, src + blk * 8, 16);
#define REQNOISE_LANE(j) (0x808080u | uint32_t(j) << 24)
  const vNu pick = {REQNOISE_LANE(0),  REQNOISE_LANE(1),  REQNOISE_LANE(2),  REQNOISE_LANE(3),
                    REQNOISE_LANE(4),  REQNOISE_LANE(5),  REQNOISE_LANE(6),  REQNOISE_LANE(7),
                    REQNOISE_LANE(8),  REQNOISE_LANE(9),  REQNOISE_LANE(10), REQNOISE_LANE(11),
                    REQNOISE_LANE(12), REQNOISE_LANE(13), REQNOISE_LANE(14), REQNOISE_LANE(15)};
#undef REQNOISE_LANE
  return (vNu)_mm512_shuffle_epi8(_mm512_broadcast_i32x4(x), (__m512i)pick);
#else
  return fp_e4m3_block_high(src, blk);
#endif
}

// Four blocks of codes (each < 2^BITS) packed into 4*BITS bytes at dst: each block's code j put in byte i of
// lane j, then one byte transposition (for 4 bits, neighbouring lanes first joined as nibbles).
template <int BITS>
inline void fp_pack_unit(const v8u* c, uint8_t* dst) {
  const v8u x = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
  if constexpr (BITS == 8) {
    // In each 128-bit half, block i's four codes to dword i; then dwords to block order.
#define REQNOISE_B(o) 16 * ((o) / 16) + 4 * ((o) % 4) + ((o) % 16) / 4
    const v32b t = __builtin_shufflevector(
        (v32b)x, (v32b)x, REQNOISE_B(0), REQNOISE_B(1), REQNOISE_B(2), REQNOISE_B(3), REQNOISE_B(4), REQNOISE_B(5),
        REQNOISE_B(6), REQNOISE_B(7), REQNOISE_B(8), REQNOISE_B(9), REQNOISE_B(10), REQNOISE_B(11), REQNOISE_B(12),
        REQNOISE_B(13), REQNOISE_B(14), REQNOISE_B(15), REQNOISE_B(16), REQNOISE_B(17), REQNOISE_B(18), REQNOISE_B(19),
        REQNOISE_B(20), REQNOISE_B(21), REQNOISE_B(22), REQNOISE_B(23), REQNOISE_B(24), REQNOISE_B(25), REQNOISE_B(26),
        REQNOISE_B(27), REQNOISE_B(28), REQNOISE_B(29), REQNOISE_B(30), REQNOISE_B(31));
#undef REQNOISE_B
    const v8u y = __builtin_shufflevector((v8u)t, (v8u)t, 0, 4, 1, 5, 2, 6, 3, 7);
    std::memcpy(dst, &y, 32);
  } else {
    // Lanes 2k and 2k+1 joined in the low dword of 64-bit lane k (the codes' high nibbles are 0).
    v4q q = (v4q)x;
    q |= q >> 28;
    typedef uint8_t v16b __attribute__((vector_size(16)));
#define REQNOISE_B(o) 8 * ((o) % 4) + (o) / 4
    const v16b y = __builtin_shufflevector((v32b)q, (v32b)q, REQNOISE_B(0), REQNOISE_B(1), REQNOISE_B(2), REQNOISE_B(3),
                                           REQNOISE_B(4), REQNOISE_B(5), REQNOISE_B(6), REQNOISE_B(7), REQNOISE_B(8),
                                           REQNOISE_B(9), REQNOISE_B(10), REQNOISE_B(11), REQNOISE_B(12),
                                           REQNOISE_B(13), REQNOISE_B(14), REQNOISE_B(15));
#undef REQNOISE_B
    std::memcpy(dst, &y, 16);
  }
}

// Pass 1 of the mxfp8 groups of [g0, g0 + m) whose scale is outside the fast form's range (``fast`` 0): the
// product rounded to bfloat16 as fp_dequantize_group rounds it. Out of line: such scales (2^-98 and below,
// 2^120 and above) are rare.
template <bool DELTA>
__attribute__((noinline)) void fp_e4m3_groups_general(const uint8_t* src, const uint8_t* scales8, const float* delta,
                                                      int64_t g0, int m, const int32_t* fast, float* w, v8u* gmax) {
  for (int i = 0; i < m; ++i) {
    if (fast[i]) continue;
    const int64_t gi = g0 + i;
    const v8f vs = fp_splat(round_bf16(e8m0_value(scales8[gi])));
    v8u mx = {};
    for (int b = 0; b < 4; ++b) {
      const int64_t j = (gi * 4 + b) * 8;
      v8f y = round_bf16_v(fp_e4m3_value_v(fp_e4m3_block_high(src, gi * 4 + b) >> 24) * vs);
      if constexpr (DELTA) {
        v8f d;
        std::memcpy(&d, delta + j, sizeof(d));
        y = round_bf16_v(y + round_bf16_v(d + 0.0f));
      }
      std::memcpy(w + j, &y, sizeof(y));
      const v8u u = fp_bits_v(y) & 0x7FFFFFFFu;
      mx = mx < u ? u : mx;
    }
    gmax[gi] = mx;
  }
}

// Pass 1: w (dequantized, plus the delta, rounded as fp_dequantize_group rounds) and each group's partial
// maxima of |w|'s bits. The products are exact in bfloat16 where the round is left out: an E2M1 magnitude (2
// significant bits) times a power of two at least 2^-127 or an E4M3 value (4 bits, at least 2^-9) is a
// bfloat16 value or overflows to inf; an E4M3 value times 2^k for k in [-97, 119] is a normal float32 with 4
// significant bits. A NaN scale or code gives a NaN here, flagged as non-finite for pass 2.
template <int MODE, bool DELTA>
void fp_pass1_bf16(const uint8_t* __restrict src, const uint8_t* __restrict scales8, const float* __restrict delta,
                   int64_t n, float* __restrict w, v8u* __restrict gmax) {
  constexpr int G = group_of(MODE), kBlocks = G / 8;
  const int64_t n_groups = n / G;
  for (int64_t g0 = 0; g0 < n_groups; g0 += 8) {
    // The scales of eight groups at once (a scalar decode per group would cost as much as a block).
    const int m = int(n_groups - g0 < 8 ? n_groups - g0 : 8);
    uint64_t raw = 0;
    std::memcpy(&raw, scales8 + g0, m);
    const v8u byte = unpack_block_codes<8>(raw);
    float sc[8];
    uint32_t bias[8];
    int32_t fast[8];
    if constexpr (MODE == kMxfp8) {
      // 2^k with k = byte - 127 in [-97, 119]: a normal code's value times 2^k by adding k to its exponent,
      // a subnormal code's (m * 2^-9) as (m * 2^20) times 2^(k-29) (never a subnormal operand).
      const v8u b = byte;
      const v8i f = (v8i)(b - 30u <= 216u);
      const v8u bi = (b - 7u) << 23;
      const v8u sb = (b - 29u) << 23;
      std::memcpy(fast, &f, sizeof(fast));
      std::memcpy(bias, &bi, sizeof(bias));
      std::memcpy(sc, &sb, sizeof(sc));
    } else {
      // A bfloat16 value (the round of fp_dequantize_group changes nothing), or NaN: flagged below.
      const v8f s = MODE == kNvfp4 ? fp_e4m3_value_v(byte) : fp_float_v(byte == 0u ? v8u{} + 0x00400000u : byte << 23);
      std::memcpy(sc, &s, sizeof(sc));
    }
    for (int i = 0; i < m; ++i) {
      const int64_t gi = g0 + i;
      vNu mx = {};
      auto finish = [&](vNf y, int64_t j) {
        if constexpr (DELTA) {
          vNf d;
          std::memcpy(&d, delta + j, sizeof(d));
          y = round_bf16_v(y + round_bf16_v(d + 0.0f));  // + 0: see fp_dequantize_group
        }
        std::memcpy(w + j, &y, sizeof(y));
        const vNu u = fp_bits_v(y) & 0x7FFFFFFFu;
        mx = mx < u ? u : mx;
      };
      // kLanes / 8 blocks per vector.
      if constexpr (MODE == kMxfp8) {
        // Every group the fast way (unconditionally: no branch in the loop), those outside its range redone below.
        const vNu vb = vNu{} + bias[i];
        const vNf vs = vNf{} + sc[i];
#pragma GCC unroll 4
        for (int b = 0; b < kBlocks; b += kLanes / 8) {
          const vNu t = fp_e4m3_lanes_high(src, gi * kBlocks + b);
          const vNu a20 = (t << 1) >> 5;  // the code's low 7 bits at bit 20
          vNu u = a20 + vb;
          u = (vNi)a20 < 0x00800000 ? fp_bits_v(__builtin_convertvector((vNi)a20, vNf) * vs) : u;
          u = a20 == 0x07F00000u ? vNu{} + 0x7FC00000u : u;
          finish(fp_float_v(u | (t & 0x80000000u)), (gi * kBlocks + b) * 8);
        }
      } else {
#if defined(REQNOISE_LANES16)
        // Two words of eight codes: lanes 0-7 shift the first, lanes 8-15 the second.
        const vNu sh = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
        const vNu sh_sign = {28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0};
#else
        const vNu sh = {0, 4, 8, 12, 16, 20, 24, 28};
        const vNu sh_sign = {28, 24, 20, 16, 12, 8, 4, 0};  // each code's bit 3 to bit 31
#endif
#if defined(REQNOISE_PERMUTE_TABLE)
        // Entry e: the magnitude of code e mod 8 times the scale (the permute reads an index's low 3 or 4 bits,
        // and bit 3 is the code's sign).
        constexpr float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
        vNf tab;
        for (int e = 0; e < kLanes; ++e) tab[e] = kMagnitude[e & 7];
        tab *= sc[i];
#else
        const vNf vs = vNf{} + sc[i];
#endif
#pragma GCC unroll 4
        for (int b = 0; b < kBlocks; b += kLanes / 8) {
          vNu x;
#if defined(REQNOISE_LANES16)
          uint32_t words[2];
          std::memcpy(words, src + (gi * kBlocks + b) * 4, 8);
          x = vNu{words[0], words[0], words[0], words[0], words[0], words[0], words[0], words[0],
                  words[1], words[1], words[1], words[1], words[1], words[1], words[1], words[1]};
#else
          uint32_t word;
          std::memcpy(&word, src + (gi * kBlocks + b) * 4, 4);
          x = vNu{} + word;  // each lane shifts its own code down
#endif
#if defined(REQNOISE_PERMUTE_TABLE)
          const vNf y = __builtin_shuffle(tab, (vNi)(x >> sh));  // indices mod kLanes
#else
          const vNu k = (x >> sh) & 7u;
          vNu u = 0x3F800000u + ((k - 2u) << 22);  // e2m1_value
          u = k == 1u ? vNu{} + 0x3F000000u : u;
          u = k == 0u ? vNu{} : u;
          const vNf y = fp_float_v(u) * vs;
#endif
          finish(fp_float_v(fp_bits_v(y) ^ ((x << sh_sign) & 0x80000000u)), (gi * kBlocks + b) * 8);
        }
      }
      gmax[gi] = fold_to_8<true>(mx);
    }
    if constexpr (MODE == kMxfp8) {
      uint64_t any_slow = 0;
      for (int i = 0; i < 8; ++i) any_slow |= uint64_t(fast[i] == 0 && i < m) << i;
      if (any_slow) fp_e4m3_groups_general<DELTA>(src, scales8, delta, g0, m, fast, w, gmax);
    }
  }
}

// A group the fast form does not cover, exactly as dequantize_fp_row (when REDO: it held a non-finite value,
// so pass 1's unchecked roundings are redone) and fp_quantize compute it: codes into ``codes``, the scale byte
// returned.
template <int MODE, bool DELTA>
uint8_t fp_exact_group(const uint32_t* wq, const uint8_t* scales8_in, const float* delta, int64_t gi, bool redo,
                       float* w, uint32_t* codes) {
  using bf16 = mlx::core::bfloat16_t;
  constexpr int G = group_of(MODE);
  if (redo) {
    uint32_t cg[G];
    unpack_group<MODE>(wq, gi, cg);
    const float sc = round_to<bf16>(scale_value(MODE, scales8_in[gi]));
    fp_dequantize_group<bf16, MODE, DELTA>(cg, sc, DELTA ? delta + gi * G : nullptr, w + gi * G);
  }
  const FpScale s = fp_scale<bf16, MODE>(group_amax<G>(w + gi * G));
  fp_encode_fresh<bf16, MODE, uint32_t>(w + gi * G, s.p, s.inv, codes + gi * G);
  return s.byte;
}

// One group's codes in pass 3 from w at the group's multiplier 1/p (exact for e8m0, rounded for nvfp4; see
// fp_pass23_bf16), into c[0, kBlocks); nvfp4 quotients that e2m1_encode_near does not cover are flagged in ``far``.
template <int MODE>
inline void fp_group_codes_fast(const float* __restrict wg, float mult, v8u* c, v8i& far) {
  constexpr int kBlocks = group_of(MODE) / 8;
  const v8f vm = fp_splat(mult);
#pragma GCC unroll 4
  for (int b = 0; b < kBlocks; ++b) {
    v8f x;
    std::memcpy(&x, wg + 8 * b, sizeof(x));
    if constexpr (MODE == kMxfp8) {
      c[b] = fp_e4m3_encode_v<false>(x * vm);
    } else if constexpr (MODE == kMxfp4) {
      c[b] = fp_e2m1_encode_v<false, false>(x * vm, far);
    } else {
      c[b] = fp_e2m1_encode_v<true, true>(x * vm, far);
    }
  }
}

// Pass 3 for groups [g0, g0 + m) when some are exact (their codes from ``codes``, fp_exact_group's) or far
// (nvfp4 quotients beyond e2m1_encode_near, re-encoded here by fp_encode_fresh): 32 codes packed at a time,
// the last 16 codes of an nvfp4 row alone. Out of line, so that the fast form's code stays one straight line.
template <int MODE>
__attribute__((noinline)) void fp_codes_checked(const float* w, int64_t g0, int m, const float* mults, const float* ps,
                                                const int32_t* exact, uint32_t* codes, uint8_t* dst) {
  constexpr int G = group_of(MODE), kBlocks = G / 8, BITS = MODE == kMxfp8 ? 8 : 4;
  constexpr int kPerUnit = 32 / G;
  auto group = [&](int i, v8u* c) {
    const int64_t gi = g0 + i;
    if (!exact[i]) {
      v8i far = {};
      fp_group_codes_fast<MODE>(w + gi * G, mults[i], c, far);
      if (MODE != kNvfp4 || !fp_is_far(far)) return;
      fp_encode_fresh<mlx::core::bfloat16_t, MODE, uint32_t>(w + gi * G, ps[i], 0.0f, codes + gi * G);
    }
    for (int b = 0; b < kBlocks; ++b) std::memcpy(&c[b], codes + gi * G + 8 * b, sizeof(v8u));
  };
  int i0 = 0;
  for (; i0 + kPerUnit <= m; i0 += kPerUnit) {
    v8u c[4];
    for (int j = 0; j < kPerUnit; ++j) group(i0 + j, c + j * kBlocks);
    fp_pack_unit<BITS>(c, dst + (g0 + i0) * G / 8 * BITS);
  }
  if (i0 < m) {  // the last 16 codes of an nvfp4 row
    v8u c[4] = {};
    group(i0, c);
    uint8_t tmp[16];
    fp_pack_unit<BITS>(c, tmp);
    std::memcpy(dst + (g0 + i0) * G / 8 * BITS, tmp, 8);
  }
}

// Pass 2's results for eight groups (a chunk), read by pass 3: 1/p, p (nvfp4's far groups) and whether the
// group is exact (fp_exact_group's codes); ``any``: whether some group of the chunk is.
struct alignas(32) FpChunk {
  float mult[8], p[8];
  int32_t exact[8];
  int32_t any;
};

// v8u's of scratch that the two passes need for a row of n_groups groups: the group maxima, then the chunks.
inline int64_t fp_scratch_vectors(int64_t n_groups) {
  return n_groups + 1 + int64_t(sizeof(FpChunk) / sizeof(v8u)) * ((n_groups + 7) / 8);
}

// Passes 2 and 3. Pass 2 is fp_scale_fast on eight groups' lanes; a lane is slow (fp_exact_group) for a
// non-finite group and, for the e8m0 modes, where fp_scale_fast reports a special scale or the scale is 2^127
// (no normal reciprocal). For the others the quotient x / p is x * (1/p), exact: x is a bfloat16 value and
// 1/p a normal power of two, so the product is x's bits with a new exponent, or a value below 2^-126 whose
// code is +-0 however it is rounded; it is then below 6.03 (resp. 448 * 1.004) in magnitude, as
// p >= round_bf16(amax / L) >= amax / L * (1 - 2^-8), so no E2M1 value is far and no E4M3 value saturates.
// nvfp4's p is not a power of two: its quotients are x * fl(1/p), whose codes are round_bf16(x / p)'s by the
// margins of fp_e2m1_encode_v (ROUND), and a group with a far quotient (p = 0 included) is redone by
// fp_encode_fresh. Pass 3 computes codes sixteen at a time on 16-bit lanes (fp_e2m1_encode_v16,
// fp_e4m3_encode_v16); a chunk of groups with an exact group, a far quotient or (mxfp8) a value whose code is
// subnormal takes the checked form (fp_codes_checked), on 32-bit lanes.
template <int MODE, bool DELTA>
void fp_pass23_bf16(const uint32_t* wq, const uint8_t* scales8_in, const float* delta, float* __restrict w,
                    v8u* __restrict gmax, int64_t n, uint32_t* __restrict codes, uint8_t* dst,
                    uint8_t* __restrict scales8_out) {
  constexpr int G = group_of(MODE), BITS = MODE == kMxfp8 ? 8 : 4;
  constexpr int kPerUnit = 32 / G;  // groups per 32 codes (one packed unit)
  typedef uint8_t v8b __attribute__((vector_size(8)));
  const int64_t n_groups = n / G;
  FpChunk* chunks = reinterpret_cast<FpChunk*>(gmax + n_groups + 1);
  // Pass 2 over the whole row first: the chunks' chains of dependent operations (fold, divide, round, encode,
  // reciprocal) are independent of each other, so they overlap, rather than each waiting before its codes.
  for (int64_t g0 = 0; g0 < n_groups; g0 += 8) {
    const int m = int(n_groups - g0 < 8 ? n_groups - g0 : 8);
    v8u gm[8];
    if (m == 8) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) gm[i] = gmax[g0 + i];  // not a memcpy: GCC copies that through the stack
    } else {
      for (int i = 0; i < 8; ++i) gm[i] = gmax[g0 + (i < m ? i : 0)];
    }
    const v8u amax_bits = fold8<true>(gm);
    const v8i non_finite = (v8i)(amax_bits >= 0x7F800000u);
    const v8f s = round_bf16_v(fp_float_v(amax_bits) / largest_code(MODE));
    v8u byte;
    v8f mult, p;  // 1/p and p (nvfp4)
    v8i slow = non_finite;
    if constexpr (MODE == kNvfp4) {
      byte = fp_e4m3_encode_v<true>(s);
      p = fp_e4m3_value_v(byte);
      mult = 1.0f / p;
    } else {
      const v8u u = fp_bits_v(s);
      const v8u n127 = u == 0u ? v8u{} + 127u : (u >> 23) - (v8u)((u & 0x7FFFFFu) != 0u);
      byte = n127 & 0xFFu;
      mult = fp_float_v((254u - n127) << 23);
      p = mult;  // unused
      slow |= (v8i)(u - 1u < 0x7FFFFFu) | (v8i)(n127 >= 254u);
    }
    FpChunk& k = chunks[g0 / 8];
    std::memcpy(k.mult, &mult, sizeof(k.mult));
    std::memcpy(k.p, &p, sizeof(k.p));
    std::memcpy(k.exact, &slow, sizeof(k.exact));
    // One byte per lane: the scale bytes, and the slow flags (all eight tested at once).
    v8b bytes = __builtin_shufflevector((v32b)byte, (v32b)byte, 0, 4, 8, 12, 16, 20, 24, 28);
    const v8b slow8 = __builtin_shufflevector((v32b)slow, (v32b)slow, 0, 4, 8, 12, 16, 20, 24, 28);
    uint64_t any_slow;
    std::memcpy(&any_slow, &slow8, 8);
    k.any = any_slow != 0;
    if (any_slow) {
      for (int i = 0; i < m; ++i) {
        if (k.exact[i]) bytes[i] = fp_exact_group<MODE, DELTA>(wq, scales8_in, delta, g0 + i, non_finite[i], w, codes);
      }
    }
    if (m == 8) {
      std::memcpy(scales8_out + g0, &bytes, 8);
    } else {
      for (int i = 0; i < m; ++i) scales8_out[g0 + i] = bytes[i];
    }
  }
  // Pass 3: runs of full chunks without exact groups in one loop (its constants stay in registers), the rest
  // (a row's last chunk, exact or far groups) through the checked form, out of line.
  for (int64_t g0 = 0; g0 < n_groups;) {
    int64_t g1 = g0;
    while (g1 + 8 <= n_groups && !chunks[g1 / 8].any) g1 += 8;
    v16s flag = {};  // nvfp4: the largest |quotient| (far test); mxfp8: values fp_e4m3_encode_v16 leaves out
    for (int64_t g = g0; g < g1; g += 8) {
      const FpChunk& k = chunks[g / 8];
#pragma GCC unroll 8
      for (int u = 0; u < 8 / kPerUnit; ++u) {
        // 32 quotients (one group, or two of nvfp4), then their codes sixteen at a time.
        v8f q[4];
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) {
          v8f x;
          std::memcpy(&x, w + (g + u * kPerUnit) * G + 8 * b, sizeof(x));
          q[b] = x * fp_splat(k.mult[u * kPerUnit + b * kPerUnit / 4]);
        }
        uint8_t* out = dst + (g + u * kPerUnit) * G / 8 * BITS;
        if constexpr (MODE == kMxfp8) {
          fp_pack_unit16_e4m3(fp_e4m3_encode_v16(q[0], q[1], flag), fp_e4m3_encode_v16(q[2], q[3], flag), out);
        } else {
          constexpr bool kRound = MODE == kNvfp4;
          const v16s c01 = fp_e2m1_encode_v16<kRound, kRound>(q[0], q[1], flag);
          const v16s c23 = fp_e2m1_encode_v16<kRound, kRound>(q[2], q[3], flag);
          fp_pack_unit16(c01, c23, out);
        }
      }
      if constexpr (MODE == kMxfp8) {  // rare (a few chunks in a hundred): per chunk
        if (fp_any((v8u)flag)) {
          fp_codes_checked<MODE>(w, g, 8, k.mult, k.p, k.exact, codes, dst);
          flag = v16s{};
        }
      }
    }
    if (MODE == kNvfp4 && g1 > g0 && fp_is_far16(flag)) {  // rarer still (p = 0): per run
      for (int64_t g = g0; g < g1; g += 8) {
        const FpChunk& k = chunks[g / 8];
        fp_codes_checked<MODE>(w, g, 8, k.mult, k.p, k.exact, codes, dst);
      }
    }
    if (g1 == g0) {
      const int m = int(n_groups - g0 < 8 ? n_groups - g0 : 8);
      const FpChunk& k = chunks[g0 / 8];
      fp_codes_checked<MODE>(w, g0, m, k.mult, k.p, k.exact, codes, dst);
      g1 = g0 + m;
    }
    g0 = g1;
  }
}

using FpPass1 = void (*)(const uint8_t*, const uint8_t*, const float*, int64_t, float*, v8u*);
using FpPass23 = void (*)(const uint32_t*, const uint8_t*, const float*, float*, v8u*, int64_t, uint32_t*, uint8_t*,
                          uint8_t*);

template <int MODE>
FpPass1 fp_pass1_for(bool delta) {
  return delta ? fp_pass1_bf16<MODE, true> : fp_pass1_bf16<MODE, false>;
}

template <int MODE>
FpPass23 fp_pass23_for(bool delta) {
  return delta ? fp_pass23_bf16<MODE, true> : fp_pass23_bf16<MODE, false>;
}

inline FpPass1 fp_pass1_for(int mode, bool delta) {
  return mode == kMxfp4 ? fp_pass1_for<kMxfp4>(delta)
                        : (mode == kNvfp4 ? fp_pass1_for<kNvfp4>(delta) : fp_pass1_for<kMxfp8>(delta));
}

inline FpPass23 fp_pass23_for(int mode, bool delta) {
  return mode == kMxfp4 ? fp_pass23_for<kMxfp4>(delta)
                        : (mode == kNvfp4 ? fp_pass23_for<kNvfp4>(delta) : fp_pass23_for<kMxfp8>(delta));
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
  // bfloat16 fresh rows into their own mode take the three-pass form; the rest the general one.
  const bool three_pass =
      std::is_same_v<T, mlx::core::bfloat16_t> && !keep && !spec.dora && !aff_in && spec.out_mode == spec.mode;
  FpPass1 pass1 = nullptr;
  FpPass23 pass23 = nullptr;
  v8u* gmax = nullptr;
  if (three_pass) {
    pass1 = fp_pass1_for(spec.mode, r > 0);
    pass23 = fp_pass23_for(spec.mode, r > 0);
    gmax = static_cast<v8u*>(std::aligned_alloc(sizeof(v8u), sizeof(v8u) * fp_scratch_vectors(groups_in)));
    if (!gmax) throw std::bad_alloc();
  }
  const FreeOnExit hold{gmax};
  auto one_row = [&](int64_t row, const float* a, const float* delta) {
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
    if (three_pass) {
      pass1(reinterpret_cast<const uint8_t*>(one.wq), one.scales8, delta, in_dim, s.w, gmax);
      pass23(one.wq, one.scales8, delta, s.w, gmax, in_dim, s.codes, reinterpret_cast<uint8_t*>(one.wq_out),
             one.scales8_out);
      return;
    }
    fp_one_row<T>(spec, in_dim, one, s, delta);
  };
  // The delta in tiles of rows of one expert, as the affine kernel computes it (lowrank_delta.h).
  for_each_row(spec, out_dim, in_dim, row_begin, row_end, buf.A, buf.B, one_row);
}

#define REQNOISE_INSTANTIATE(T)                                                                             \
  template void fp_row_range<T>(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, \
                                const RowScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise::REQNOISE_ISA
