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

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef REQNOISE_ISA
#error "affine_codec.h is compiled once per instruction-set level: define REQNOISE_ISA"
#endif

// Everything here lives in the per-ISA namespace and avoids out-of-line library templates (std::max and
// friends are written as plain comparisons), so that no function compiled for one instruction set can be
// merged by the linker into the copy for another.
namespace reqnoise::REQNOISE_ISA {

// A native IEEE binary16 type where the compiler has one, for conversions that vectorise (F16C on x86-64-v3,
// FCVT on AArch64). GCC before 13 defines __FLT16_MAX__ on AArch64 but rejects _Float16 in C++; its __fp16
// is the same IEEE format there.
#if defined(__FLT16_MAX__) && (defined(__clang__) || !defined(__aarch64__) || __GNUC__ >= 13)
#define REQNOISE_HAVE_HALF 1
typedef _Float16 half_native;
#elif defined(__aarch64__)
#define REQNOISE_HAVE_HALF 1
typedef __fp16 half_native;
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "MLX's packed layout is defined on little-endian hosts");

// GCC/Clang vector extensions (no intrinsics): the same source becomes AVX2 in the x86-64-v3 copy, NEON on
// AArch64 and SSE2 in the x86-64 baseline. Eight 32-bit lanes are one AVX2 register or two NEON registers.
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

// Lanes of the per-value arithmetic of bfloat16 fresh rows and of the delta tiles: 16 (one 512-bit register)
// in the x86-64-v4 copy, 8 elsewhere. Codes keep their 8-code blocks (below); a 16-lane vector holds two.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define REQNOISE_LANES16 1
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef uint32_t vNu __attribute__((vector_size(4 * kLanes)));
typedef int32_t vNi __attribute__((vector_size(4 * kLanes)));
typedef float vNf __attribute__((vector_size(4 * kLanes)));

// Codes are handled in 8-code blocks: BITS bytes of the little-endian, LSB-first bitstream, read or written
// as one unaligned 8-byte word. Groups are multiples of 32 values, so a row is a whole number of blocks.
// Codes 0-3 of a block lie in its low 4*BITS bits and codes 4-7 in the next 4*BITS (at most 24 bits each
// for BITS <= 6, 32 for 8), so each half fits a 32-bit lane: one broadcast, one per-lane shift and one mask
// unpack the whole block, also for the widths whose codes straddle bytes (3, 5, 6).
typedef uint64_t v4q __attribute__((vector_size(32)));
typedef uint8_t v32b __attribute__((vector_size(32)));

// Where a byte shuffle is one instruction (SSSE3's pshufb within each 128-bit half, NEON's tbl), lane j takes
// the two bytes that hold code j (bit j*BITS of the block; a code never spans more than two bytes) from a
// broadcast of the block, then one per-lane shift and mask. Elsewhere (the SSE2 baseline) the halves of the
// block are broadcast to four lanes each.
#if defined(__SSSE3__) || defined(__aarch64__)
#define REQNOISE_BYTE_SHUFFLE 1
#endif

// MASKED = false leaves the bits above each code (its neighbours') in the lane, for callers that read only
// the code's low bits.
template <int BITS, bool MASKED = true>
inline v8u unpack_block_codes(uint64_t v) {
  constexpr uint32_t m = (uint32_t(1) << BITS) - 1;
#if defined(__AVX2__)
  if constexpr (BITS == 8) {
    // One code per byte: one vpmovzxbd, folded into the load of the word. GCC 12 lowers neither the byte
    // shuffle below (a broadcast, a vpshufb and a vpor) nor __builtin_convertvector from 8 bytes (scalar
    // extracts) to it.
    return (v8u)_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v)));
  }
#endif
#if defined(REQNOISE_BYTE_SHUFFLE)
  if constexpr (BITS == 8) {
    // One code per byte: its lane's other bytes taken from a zero vector, so no mask follows (one in-lane
    // vpshufb; with don't-care bytes GCC lowers this width to a cross-lane permute).
    const v4q b = {v, v, v, v};
    const v32b z = {};
#define REQNOISE_LANE(j) 16 * (j / 4) + j, 32, 32, 32
    return (v8u)__builtin_shufflevector((v32b)b, z, REQNOISE_LANE(0), REQNOISE_LANE(1), REQNOISE_LANE(2),
                                        REQNOISE_LANE(3), REQNOISE_LANE(4), REQNOISE_LANE(5), REQNOISE_LANE(6),
                                        REQNOISE_LANE(7));
#undef REQNOISE_LANE
  }
  const v4q b = {v, v, v, v};
#define REQNOISE_LANE(j) 16 * (j / 4) + (j * BITS) / 8, 16 * (j / 4) + (j * BITS) / 8 + 1, 0, 0
  const v32b x =
      __builtin_shufflevector((v32b)b, (v32b)b, REQNOISE_LANE(0), REQNOISE_LANE(1), REQNOISE_LANE(2), REQNOISE_LANE(3),
                              REQNOISE_LANE(4), REQNOISE_LANE(5), REQNOISE_LANE(6), REQNOISE_LANE(7));
#undef REQNOISE_LANE
  const v8u sh = {
      0, BITS % 8, (2 * BITS) % 8, (3 * BITS) % 8, (4 * BITS) % 8, (5 * BITS) % 8, (6 * BITS) % 8, (7 * BITS) % 8};
  const v8u c = MASKED ? ((v8u)x >> sh) & m : (v8u)x >> sh;
#else
  const uint32_t lo = uint32_t(v), hi = uint32_t(v >> (4 * BITS));
  const v8u x = {lo, lo, lo, lo, hi, hi, hi, hi};
  const v8u sh = {0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS};
  const v8u c = MASKED ? (x >> sh) & m : x >> sh;
#endif
  return c;
}

template <int BITS>
inline v8f unpack_block(uint64_t v) {
  // codes < 2^8: the signed conversion is exact and cheaper
  return __builtin_convertvector((v8i)unpack_block_codes<BITS>(v), v8f);
}

// Bytes one read of kLanes codes takes: a whole 8-byte word per block, or 16 bytes for the two blocks of a
// 16-lane vector (2 * BITS <= 16 of them are the codes').
constexpr int kLaneRead = kLanes == 16 ? 16 : 8;

// The kLanes codes (kLanes / 8 blocks) whose bytes start at p. WHOLE: kLaneRead bytes from p lie inside the
// row; otherwise only the codes' own bytes are read. MASKED as for unpack_block_codes.
template <int BITS, bool MASKED, bool WHOLE>
inline vNu unpack_lanes(const uint8_t* p) {
#if defined(REQNOISE_LANES16)
  static_assert(kLanes == 16);
  __m128i x = _mm_setzero_si128();
  std::memcpy(&x, p, WHOLE ? 16 : 2 * BITS);
  // One code per byte: one vpmovzxbd from 16 bytes.
  if constexpr (BITS == 8) return (vNu)_mm512_cvtepu8_epi32(x);
  // The 16 bytes in each 128-bit lane; dword j (in lane j / 4) takes the two bytes that hold code j (a code
  // never spans more than two) and zeros, then one per-lane shift: one vpshufb and one vpsrlvd for 16 codes.
#define REQNOISE_PAIR(j) ((j) * BITS / 8 | ((j) * BITS / 8 + 1) << 8 | 0x80800000u)
  const vNu pick = {REQNOISE_PAIR(0),  REQNOISE_PAIR(1),  REQNOISE_PAIR(2),  REQNOISE_PAIR(3),
                    REQNOISE_PAIR(4),  REQNOISE_PAIR(5),  REQNOISE_PAIR(6),  REQNOISE_PAIR(7),
                    REQNOISE_PAIR(8),  REQNOISE_PAIR(9),  REQNOISE_PAIR(10), REQNOISE_PAIR(11),
                    REQNOISE_PAIR(12), REQNOISE_PAIR(13), REQNOISE_PAIR(14), REQNOISE_PAIR(15)};
#undef REQNOISE_PAIR
#define REQNOISE_SHIFT(j) ((j) * BITS % 8)
  const vNu sh = {REQNOISE_SHIFT(0),  REQNOISE_SHIFT(1),  REQNOISE_SHIFT(2),  REQNOISE_SHIFT(3),
                  REQNOISE_SHIFT(4),  REQNOISE_SHIFT(5),  REQNOISE_SHIFT(6),  REQNOISE_SHIFT(7),
                  REQNOISE_SHIFT(8),  REQNOISE_SHIFT(9),  REQNOISE_SHIFT(10), REQNOISE_SHIFT(11),
                  REQNOISE_SHIFT(12), REQNOISE_SHIFT(13), REQNOISE_SHIFT(14), REQNOISE_SHIFT(15)};
#undef REQNOISE_SHIFT
  const vNu c = (vNu)_mm512_shuffle_epi8(_mm512_broadcast_i32x4(x), (__m512i)pick) >> sh;
  return MASKED ? c & ((1u << BITS) - 1) : c;
#else
  static_assert(kLanes == 8);
  uint64_t v = 0;
  std::memcpy(&v, p, WHOLE ? 8 : BITS);
  return unpack_block_codes<BITS, MASKED>(v);
#endif
}

// Inverse of unpack_block: codes (each < 2^BITS) shifted into place and OR-folded within each half.
template <int BITS>
inline uint64_t pack_block(v8u c) {
  constexpr uint32_t m = (uint32_t(1) << BITS) - 1;
  const v8u sh = {0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS};
  v8u x = (c & m) << sh;
  x |= __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  x |= __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  return uint64_t(x[0]) | (uint64_t(x[4]) << (4 * BITS));
}

// Max (MAX) or min of each of eight vectors, as one vector (lane i: vector i's): three rounds of pairing lanes.
// V: v8f (float order) or v8u (the bits' unsigned order, e.g. magnitudes).
template <bool MAX, typename V>
inline V fold8(const V* a) {
  auto pick = [](V x, V y) -> V {
    if constexpr (MAX) return x < y ? y : x;
    return y < x ? y : x;
  };
  V p[4], q[2];
  for (int i = 0; i < 4; ++i) {
    p[i] = pick(__builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14),
                __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15));
  }
  for (int i = 0; i < 2; ++i) {
    q[i] = pick(__builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13),
                __builtin_shufflevector(p[2 * i], p[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15));
  }
  return pick(__builtin_shufflevector(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11),
              __builtin_shufflevector(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15));
}

// Eight partial extremes (MAX: maxima) of a kLanes-lane vector V: vNf (float order) or vNu (the bits' unsigned
// order); in the 16-lane copy the halves' lane-wise extremes, elsewhere the vector itself.
template <bool MAX, typename V>
inline auto fold_to_8(V x) {
#if defined(REQNOISE_LANES16)
  const auto lo = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  const auto hi = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  if constexpr (MAX) return lo < hi ? hi : lo;
  return hi < lo ? hi : lo;
#else
  return x;
#endif
}

// Four blocks' halves as 32-bit lanes (lane 2i: block i's codes 0-3 packed into its low 4*BITS bits, lane
// 2i + 1: codes 4-7), written as the blocks' 4*BITS bytes: each block's halves joined in its 64-bit lane, the
// four blocks' bytes made contiguous by a byte shuffle per 128-bit half. WHOLE as for pack_4_blocks.
template <int BITS, bool WHOLE>
inline void store_block_halves(v4q q, uint8_t* dst) {
  if constexpr (BITS != 8) q = (q & 0xFFFFFFFFu) | ((q >> 32) << (4 * BITS));
  // Block i's BITS bytes are bytes 8i.. of q; bytes past them are don't-care (0).
#define REQNOISE_B(o) ((o) < 2 * BITS ? 8 * ((o) / BITS) + (o) % BITS : 0)
  typedef uint8_t v16b __attribute__((vector_size(16)));
  const v32b qb = (v32b)q;
  const v16b lo =
      __builtin_shufflevector(qb, qb, REQNOISE_B(0), REQNOISE_B(1), REQNOISE_B(2), REQNOISE_B(3), REQNOISE_B(4),
                              REQNOISE_B(5), REQNOISE_B(6), REQNOISE_B(7), REQNOISE_B(8), REQNOISE_B(9), REQNOISE_B(10),
                              REQNOISE_B(11), REQNOISE_B(12), REQNOISE_B(13), REQNOISE_B(14), REQNOISE_B(15));
#undef REQNOISE_B
#define REQNOISE_B(o) ((o) < 2 * BITS ? 16 + 8 * ((o) / BITS) + (o) % BITS : 16)
  const v16b hi =
      __builtin_shufflevector(qb, qb, REQNOISE_B(0), REQNOISE_B(1), REQNOISE_B(2), REQNOISE_B(3), REQNOISE_B(4),
                              REQNOISE_B(5), REQNOISE_B(6), REQNOISE_B(7), REQNOISE_B(8), REQNOISE_B(9), REQNOISE_B(10),
                              REQNOISE_B(11), REQNOISE_B(12), REQNOISE_B(13), REQNOISE_B(14), REQNOISE_B(15));
#undef REQNOISE_B
  if constexpr (WHOLE) {
    std::memcpy(dst, &lo, 16);
    std::memcpy(dst + 2 * BITS, &hi, 16);
  } else {
    std::memcpy(dst, &lo, 2 * BITS);
    std::memcpy(dst + 2 * BITS, &hi, 2 * BITS);
  }
}

// Four blocks (32 codes, each < 2^BITS: not masked here) packed at once into 4*BITS bytes: the per-block OR-folds
// of pack_block done for the four together by pairing lanes across blocks, each block's halves joined in a 64-bit
// lane, the four blocks' bytes made contiguous by a byte shuffle per 128-bit half. WHOLE: the 16-byte stores of the
// two halves may write past the 4*BITS bytes (the caller's next blocks overwrite that); otherwise only those bytes
// are written. Under AVX2, 4 and 8 bits take saturating narrowings instead (for 8 bits a negative code packs as 0).
template <int BITS, bool WHOLE>
inline void pack_4_blocks(const v8u* c, uint8_t* dst) {
#if defined(__AVX2__)
  if constexpr (BITS == 8) {
    // One code per byte: two saturating narrowings and one permute to undo their per-128-bit-lane order. Codes
    // below 256 pass unchanged, and negative lanes (as signed) become 0, which the fuse kernel's pass 3 uses as
    // its clamp at zero. The 32 bytes are the blocks' own: WHOLE or not, nothing else is written.
    const __m256i w01 = _mm256_packus_epi32((__m256i)c[0], (__m256i)c[1]);
    const __m256i w23 = _mm256_packus_epi32((__m256i)c[2], (__m256i)c[3]);
    // Bytes, 128-bit lane 0: codes 0-3 of blocks 0, 1, 2, 3; lane 1: codes 4-7 of each.
    const __m256i b = _mm256_packus_epi16(w01, w23);
    const __m256i r = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    std::memcpy(dst, &r, 32);
    return;
  }
  if constexpr (BITS == 4) {
    // Codes to bytes as for 8 bits (lane 0: codes 0-3 of each block, lane 1: codes 4-7), then each pair of
    // neighbouring codes into one byte by vpmaddubsw (even + 16 * odd), and the blocks' halves interleaved:
    // 16 bytes, the blocks' own.
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32((__m256i)c[0], (__m256i)c[1]),
                                          _mm256_packus_epi32((__m256i)c[2], (__m256i)c[3]));
    const __m256i p = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x1001));
    const __m256i q = _mm256_packus_epi16(p, p);  // 16-bit unit i of lane 0 (1): block i's codes 0-3 (4-7)
    const __m128i r = _mm_unpacklo_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    std::memcpy(dst, &r, 16);
    return;
  }
#endif
  const v8u sh = {0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS};
  const v8u x0 = c[0] << sh, x1 = c[1] << sh, x2 = c[2] << sh, x3 = c[3] << sh;
  // p01 lanes: block 0's code pairs (0|1, 2|3, 4|5, 6|7) interleaved with block 1's.
  const v8u p01 = __builtin_shufflevector(x0, x1, 0, 8, 2, 10, 4, 12, 6, 14) |
                  __builtin_shufflevector(x0, x1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8u p23 = __builtin_shufflevector(x2, x3, 0, 8, 2, 10, 4, 12, 6, 14) |
                  __builtin_shufflevector(x2, x3, 1, 9, 3, 11, 5, 13, 7, 15);
  // r lanes: low half (codes 0-3), high half (codes 4-7) of blocks 0, 1, 2, 3.
  const v8u r = __builtin_shufflevector(p01, p23, 0, 4, 1, 5, 8, 12, 9, 13) |
                __builtin_shufflevector(p01, p23, 2, 6, 3, 7, 10, 14, 11, 15);
  store_block_halves<BITS, WHOLE>((v4q)r, dst);
}

#if defined(REQNOISE_LANES16)
// pack_4_blocks for the 16-lane copy: 32 codes (c0: 0-15, c1: 16-31, each < 2^BITS) narrowed to one byte each
// (two vpmovdb), neighbouring codes joined by multiply-adds (vpmaddubsw: pairs, vpmaddwd: fours, exact as
// integers), then per width: 2 and 4 bits are whole bytes (one more narrowing), 8 bits need no join, the rest
// take store_block_halves. WHOLE as for pack_4_blocks.
template <int BITS, bool WHOLE>
inline void pack_32_codes(vNu c0, vNu c1, uint8_t* dst) {
  const __m128i b0 = _mm512_cvtepi32_epi8((__m512i)c0), b1 = _mm512_cvtepi32_epi8((__m512i)c1);
  if constexpr (BITS == 8) {
    std::memcpy(dst, &b0, 16);
    std::memcpy(dst + 16, &b1, 16);
  } else {
    static_assert(BITS <= 6, "the pair multiplier 2^BITS must fit a signed byte");
    const __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
    const __m256i pairs = _mm256_maddubs_epi16(b, _mm256_set1_epi16(int16_t(1 | (1 << BITS) << 8)));
    const __m256i fours = _mm256_madd_epi16(pairs, _mm256_set1_epi32(1 | (1 << 2 * BITS) << 16));
    if constexpr (BITS == 2) {
      const __m128i r = _mm256_cvtepi32_epi8(fours);
      std::memcpy(dst, &r, 8);
    } else if constexpr (BITS == 4) {
      const __m128i r = _mm256_cvtepi32_epi16(fours);
      std::memcpy(dst, &r, 16);
    } else {
      store_block_halves<BITS, WHOLE>((v4q)fours, dst);
    }
  }
}
#endif

// One row of n codes (n a multiple of 8) straight from the packed source: whole-word reads while 8 bytes
// remain in the row, the last blocks through a zero-padded word, so nothing past the row is touched.
template <int BITS>
inline void unpack_row(const uint8_t* __restrict src, int64_t n, float* __restrict codes) {
  const int64_t n_blocks = n / 8, n_bytes = n_blocks * BITS;
  const int64_t direct = n_bytes >= 8 ? (n_bytes - 8) / BITS + 1 : 0;
  int64_t b = 0;
  for (; b < direct; ++b) {
    uint64_t v;
    std::memcpy(&v, src + b * BITS, 8);
    const v8f f = unpack_block<BITS>(v);
    std::memcpy(codes + 8 * b, &f, sizeof(f));
  }
  for (; b < n_blocks; ++b) {
    uint64_t v = 0;
    std::memcpy(&v, src + b * BITS, BITS);
    const v8f f = unpack_block<BITS>(v);
    std::memcpy(codes + 8 * b, &f, sizeof(f));
  }
}

// Packs n codes into dst. Blocks are written in order as whole words (each word's spill is overwritten by
// the next block) while the word stays inside the row; the last blocks write only their own BITS bytes, so
// a neighbouring row (another thread's) is never written.
template <int BITS>
inline void pack_row(const uint32_t* __restrict codes, int64_t n, uint8_t* __restrict dst) {
  const int64_t n_blocks = n / 8, n_bytes = n_blocks * BITS;
  const int64_t direct = n_bytes >= 8 ? (n_bytes - 8) / BITS + 1 : 0;
  int64_t b = 0;
  for (; b < direct; ++b) {
    v8u c;
    std::memcpy(&c, codes + 8 * b, sizeof(c));
    const uint64_t v = pack_block<BITS>(c);
    std::memcpy(dst + b * BITS, &v, 8);
  }
  for (; b < n_blocks; ++b) {
    v8u c;
    std::memcpy(&c, codes + 8 * b, sizeof(c));
    const uint64_t v = pack_block<BITS>(c);
    std::memcpy(dst + b * BITS, &v, BITS);
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

// round_bf16 without the NaN case: the same bits for every non-NaN x (an overflow still carries into +-inf).
// A NaN can come out as a NaN or an infinity, never as a finite value, so a result that is finite everywhere
// proves no NaN was rounded along the way (see dequantize_group).
inline float round_bf16_non_nan(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t r = (u + ((u >> 16) & 1u) + 0x7FFFu) & 0xFFFF0000u;
  float y;
  std::memcpy(&y, &r, 4);
  return y;
}

// round_bf16_non_nan lane by lane (V: a vector of floats).
template <typename V>
inline V round_bf16_v(V x) {
  typedef uint32_t U __attribute__((vector_size(sizeof(V))));
  U u;
  std::memcpy(&u, &x, sizeof(u));
  u = (u + ((u >> 16) & 1u) + 0x7FFFu) & 0xFFFF0000u;
  std::memcpy(&x, &u, sizeof(u));
  return x;
}

// GCC's variable-index __builtin_shuffle is one permute (vpermps) with AVX2; Clang has no such builtin, and
// other targets would expand it lane by lane. Both kernels look codes up in a per-group table of values with it.
#if defined(__AVX2__) && !defined(__clang__)
#define REQNOISE_PERMUTE_TABLE 1
#endif

inline uint32_t is_non_finite(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x7F800000u) == 0x7F800000u ? 1u : 0u;
}

template <typename T>
inline float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
    return round_bf16(x);
  } else {
#if defined(REQNOISE_HAVE_HALF)
    // IEEE binary16 conversion (F16C where the target has it): the same round-to-nearest-even as mlx's.
    return static_cast<float>(static_cast<half_native>(x));
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
#if defined(REQNOISE_HAVE_HALF)
    half_native h;
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
#if defined(REQNOISE_HAVE_HALF)
    const half_native h = static_cast<half_native>(x);
    std::memcpy(p, &h, 2);
#else
    *p = T(x);
#endif
  }
}

// Round-half-to-even of a value in [0, 2^22), as a float (fp_codec.h's small E4M3 codes and the calibrated
// loop's encode in gptq_kernel.cpp); the affine quantizer below uses the integer form, code_of.
inline float rint_small(float x) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

// Round-half-to-even of a value already clamped to [0, 255], as an integer code: for 0 <= x < 2^22, x + 1.5*2^23
// rounds (default rounding mode) to 1.5*2^23 + rint(x), whose bit pattern is 0x4B400000 + rint(x). One add
// and one integer subtract, which vectorise everywhere (a float -> uint32 conversion has no AVX2
// instruction, and std::rint may become a library call). clamp-then-round equals MLX's round-then-clamp
// because the bounds are integers.
inline uint32_t code_of(float x) {
  const float t = x + 12582912.0f;  // 1.5 * 2^23
  uint32_t u;
  std::memcpy(&u, &t, 4);
  return u - 0x4B400000u;
}

// One group, exactly as mlx::core quantize() on the CPU stream: float32 arithmetic, scale and bias from the
// group's extremes, 0.0 put on the grid, codes from the unrounded float32 scale and bias.
inline void quantize_group(const float* __restrict x, int g, int bits, uint32_t* __restrict codes, float& scale_out,
                           float& bias_out) {
  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  // Eight independent lanes (one vector register), then a fold: the same extremes as MLX's sequential scan
  // (max and min are order-free for non-NaN values; a signed zero's sign cannot change scale, bias or codes).
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
  for (int j = 0; j < g; ++j) {  // hot-loop: quantize
    float v = (x[j] - bias) / scale;
    v = v < 0.0f ? 0.0f : v;
    v = n_bins < v ? n_bins : v;
    codes[j] = code_of(v);
  }
  scale_out = scale;
  bias_out = bias;
}

// Re-encode a group against a fixed (stored) scale and bias: the keep-grid requantizer.
inline void encode_group(const float* __restrict x, int g, int bits, float scale, float bias, const float* old_codes,
                         uint32_t* codes) {
  const float n_bins = float((1 << bits) - 1);
  if (scale == 0.0f) {
    // A zero step cannot express any change; the group keeps its codes.
    for (int j = 0; j < g; ++j) codes[j] = static_cast<uint32_t>(old_codes[j]);
    return;
  }
  for (int j = 0; j < g; ++j) {  // hot-loop: keep-grid encode
    float v = (x[j] - bias) / scale;
    v = v < 0.0f ? 0.0f : v;
    v = n_bins < v ? n_bins : v;
    codes[j] = code_of(v);
  }
}

// Calls f(std::integral_constant<int, BITS>{}) for a run-time width (validated before dispatch: 8 is the
// default), so that each width's code is compiled once per caller and chosen by one switch.
template <typename F>
inline decltype(auto) with_bits(int bits, F&& f) {
  switch (bits) {
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

// A row of codes of a run-time width, straight between the packed row and float/uint32 codes (no padded copy:
// unpack_row and pack_row stay inside the row). Every kernel dispatches through these two.
inline void unpack_codes(int bits, const uint32_t* row, int64_t n, float* q) {
  const auto* src = reinterpret_cast<const uint8_t*>(row);
  with_bits(bits, [&](auto b) { unpack_row<b()>(src, n, q); });
}

inline void pack_codes(int bits, const uint32_t* codes, int64_t n, uint32_t* row) {
  auto* dst = reinterpret_cast<uint8_t*>(row);
  with_bits(bits, [&](auto b) { pack_row<b()>(codes, n, dst); });
}

}  // namespace reqnoise::REQNOISE_ISA
