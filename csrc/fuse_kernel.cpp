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

// The fresh requantization of a bfloat16 row in three passes over L1-resident scratch, each value's path held
// in registers within a pass: (1) unpack, dequantize, add the delta, with each 32-value block's extremes
// (vectors of eight partial maxima and minima); (2) the scales and biases of eight output groups at a time,
// their extremes folded by a transposition; (3) the codes of each group straight into the packed output row.
// The bytes are those of dequantize_row and quantize_group: the same per-value operations (max and min are
// order-free for finite values, and a block with a non-finite value takes the exact path of both).
constexpr int kSub = 32;  // values per extremes block: the smallest group size

#if defined(__AVX2__) && !defined(REQNOISE_LANES16)
// 4-bit codes under AVX2 (8 lanes; the 16-lane copy looks all 16 values up in one permute): the group's 16 dequantized
// values are bfloat16 numbers (float32 bits whose low half is zero), so their upper halves fit two 16-byte tables (low
// and high byte of each), and 32 codes, one per byte, look up 32 values in two vpshufb, against two vpermps and a blend
// per eight. Lane 0 of the byte vector holds codes 0-3, 8-11, 16-19, 24-27 and lane 1 the rest, so that the in-lane
// interleaves that widen the looked-up bytes to 32-bit lanes (byte pairs to words, words to the upper halves of dwords)
// leave four vectors of eight values in code order.
struct NibbleTables {
  __m256i lo, hi;  // bytes 2 and 3 of value c at byte c of each 128-bit lane
};

// t0, t1: the values of codes 0-7 and 8-15.
inline NibbleTables nibble_tables(v8f t0, v8f t1) {
  // Upper halves as words, in code order after the pack's lane interleave is undone.
  __m256i w = _mm256_packus_epi32(_mm256_srli_epi32((__m256i)t0, 16), _mm256_srli_epi32((__m256i)t1, 16));
  w = _mm256_permute4x64_epi64(w, 0xD8);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12,
                                         14, 1, 3, 5, 7, 9, 11, 13, 15);
  // Quadwords: low bytes of values 0-7, 8-15, high bytes of 0-7, 8-15.
  const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xD8);
  return {_mm256_permute4x64_epi64(b, 0x44), _mm256_permute4x64_epi64(b, 0xEE)};
}

// The values of the 32 codes in the 16 bytes at p, as four vectors of eight in code order.
inline void nibble_lookup(const NibbleTables& t, const uint8_t* p, v8f* y) {
  __m128i x;
  std::memcpy(&x, p, sizeof(x));
  // Each byte twice: the first copy's low nibble, the second's high nibble is a code.
  const __m256i dup = _mm256_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13, 2, 2, 3, 3, 6, 6, 7, 7, 10,
                                       10, 11, 11, 14, 14, 15, 15);
  const __m256i b = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(x), dup);
  // vpshufb reads an index's low four bits and zeroes on bit 7, so the codes are masked.
  const __m256i c = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x000F)),
                                    _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi16(0x0F00)));
  const __m256i lo = _mm256_shuffle_epi8(t.lo, c), hi = _mm256_shuffle_epi8(t.hi, c);
  const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
  const __m256i z = _mm256_setzero_si256();
  y[0] = (v8f)_mm256_unpacklo_epi16(z, w0);
  y[1] = (v8f)_mm256_unpackhi_epi16(z, w0);
  y[2] = (v8f)_mm256_unpacklo_epi16(z, w1);
  y[3] = (v8f)_mm256_unpackhi_epi16(z, w1);
}
#define REQNOISE_NIBBLE_TABLE 1
constexpr bool kNibbleTable = true;
#else
constexpr bool kNibbleTable = false;
#endif

// The same rounding in three float operations instead of five integer ones, by Veltkamp's split: with
// g = x * (2^16 + 1), g - (g - x) is x rounded to 24 - 16 = 8 significant bits. Checked against round_bf16_v on
// every float32 (ties included): equal for every normal x below 2^111 (exponent field 1-237); a NaN from
// 2^111 up (x * 65537 overflows), which the non-finite check sends down the exact path; wrong only for
// subnormal x off the bfloat16 grid. So it is used only on a product q * s or on a sum of two bfloat16 values:
// such a sum or product, if subnormal, is exact and a multiple of 2^-133, so already a bfloat16 number, which
// the split leaves unchanged. A delta from the float32 matmul can be any float and takes round_bf16_v.
// (Needs -ffp-contract=off, like everything here: a fused x * 65537 - x would change g - x.)
template <typename V>
inline V round_bf16_sum_v(V x) {
  const V g = x * 65537.0f;
  return g - (g - x);
}

// MLX's bfloat16 dequantize of codes q (a vector): q * s rounded, then + b rounded.
template <typename V>
inline V dequantize_bf16_v(V q, float sc, float bi) {
  return round_bf16_sum_v(round_bf16_sum_v(q * sc) + bi);
}

// What pass 1 needs of one input group: for the table widths the group's dequantized value of every code,
// computed once with the same operations per value as the arithmetic path (t0, t1: codes 0-7 and 8-15, or
// the two byte tables of NibbleTables; with 16 lanes t: codes 0-15), otherwise the scale and bias. Built for several
// groups ahead of their lookups (see dequantize_row_bf16), the tables' chain of dependent operations (scale load, two
// roundings, the byte table's shuffles) stays off each group's critical path.
struct GroupLookup {
#if defined(REQNOISE_LANES16)
  vNf t;
#else
  v8f t0, t1;
#endif
  float sc, bi;
};

template <int BITS>
inline GroupLookup group_lookup(float sc, float bi) {
  GroupLookup g;
  g.sc = sc, g.bi = bi;
#if defined(REQNOISE_NIBBLE_TABLE)
  if constexpr (BITS == 4) {
    const v8f code = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f};
    const NibbleTables nt = nibble_tables(dequantize_bf16_v(code, sc, bi), dequantize_bf16_v(code + 8.0f, sc, bi));
    g.t0 = (v8f)nt.lo, g.t1 = (v8f)nt.hi;
    return g;
  }
#endif
#if defined(REQNOISE_PERMUTE_TABLE) && defined(REQNOISE_LANES16)
  if constexpr (BITS <= 4) {
    // Entry i holds code i mod 2^BITS: the lookups index by a lane's low four bits unmasked, which for codes
    // narrower than 4 bits include a neighbouring code's bits.
    constexpr int m = (1 << BITS) - 1;
    vNf code;
    for (int i = 0; i < 16; ++i) code[i] = float(i & m);
    g.t = dequantize_bf16_v(code, sc, bi);
  }
#elif defined(REQNOISE_PERMUTE_TABLE)
  if constexpr (BITS <= 4) {
    v8f tab[2] = {};
    for (int h = 0; h < (BITS == 4 ? 2 : 1); ++h) {
      // Entry i holds code i mod 2^BITS: the lookups below index by a lane's low three bits unmasked, which
      // for 2-bit codes include a neighbouring code's bit.
      constexpr int m = (1 << BITS) - 1;
      const v8f code = {float((0 + 8 * h) & m), float((1 + 8 * h) & m), float((2 + 8 * h) & m), float((3 + 8 * h) & m),
                        float((4 + 8 * h) & m), float((5 + 8 * h) & m), float((6 + 8 * h) & m), float((7 + 8 * h) & m)};
      tab[h] = dequantize_bf16_v(code, sc, bi);
    }
    g.t0 = tab[0], g.t1 = tab[1];
  }
#endif
  return g;
}

// The dequantized values of the kLanes codes whose bytes start at p (WHOLE as for unpack_lanes) by a permuted
// table (widths up to 4 bits, GCC + AVX2) or the arithmetic. 4 bits under 8-lane AVX2 take the byte tables
// instead (dequantize_group_bf16).
template <int BITS, bool WHOLE>
inline vNf dequantize_lanes_bf16(const uint8_t* p, const GroupLookup& gl) {
#if defined(REQNOISE_PERMUTE_TABLE)
  if constexpr (BITS <= 4) {
    const vNi c = (vNi)unpack_lanes<BITS, false, WHOLE>(p);
#if defined(REQNOISE_LANES16)
    return __builtin_shuffle(gl.t, c);  // indices mod 16: one vpermps
#else
    // Unmasked: the permutes read bits 0-2 of each lane, and the shift below drops the bits above 3.
    const v8f y = __builtin_shuffle(gl.t0, c);  // indices mod 8
    // Code bit 3 moved to the sign bit: the select is then one vblendvps (no compare, no zero register).
    if constexpr (BITS == 4) return (c << 28) < 0 ? __builtin_shuffle(gl.t1, c) : y;
    return y;
#endif
  }
#endif
  return dequantize_bf16_v(__builtin_convertvector((vNi)unpack_lanes<BITS, true, WHOLE>(p), vNf), gl.sc, gl.bi);
}

// One input group of pass 1 (TAIL: a group at the row's end holding blocks from ``direct`` on, whose reads of
// kLaneRead bytes would pass the row's end: they read through a zero-padded copy instead). Returns nf plus the
// sum of the group's values, lane by lane: a sum is non-finite if any term is (an infinity stays one or meets
// its opposite in a NaN, and a NaN stays), and a finite one only overflows for values near the float32 limit,
// which then take the exact path for nothing. One add per vector instead of a mask and a max (the largest
// magnitude's bits).
template <int BITS, int G, bool DELTA, bool TAIL>
inline vNf dequantize_group_bf16(const uint8_t* __restrict src, int64_t gi, int64_t direct, const GroupLookup& gl,
                                 const float* __restrict delta, float* __restrict w, v8f* __restrict vmax,
                                 v8f* __restrict vmin, vNf nf) {
#if defined(REQNOISE_NIBBLE_TABLE)
  const NibbleTables nt = {(__m256i)gl.t0, (__m256i)gl.t1};
#endif
#pragma GCC unroll 4
  for (int sb = 0; sb < G / kSub; ++sb) {
    const int64_t j0 = gi * G + sb * kSub;
    vNf mx, mn, sum;
#if defined(REQNOISE_NIBBLE_TABLE)
    v8f y4[4];
    // A block's 16 bytes lie inside the row: no tail case.
    if constexpr (BITS == 4) nibble_lookup(nt, src + j0 / 2, y4);
#endif
#pragma GCC unroll 4
    for (int k = 0; k < kSub / kLanes; ++k) {
      const int64_t blk = j0 / 8 + k * (kLanes / 8);  // the first of the vector's blocks
      vNf y;
      if constexpr (BITS == 4 && kNibbleTable) {
#if defined(REQNOISE_NIBBLE_TABLE)
        y = y4[k];
#endif
      } else if (!TAIL || blk < direct) {
        y = dequantize_lanes_bf16<BITS, true>(src + blk * BITS, gl);
      } else {
        y = dequantize_lanes_bf16<BITS, false>(src + blk * BITS, gl);
      }
      if constexpr (DELTA) {
        vNf d;
        std::memcpy(&d, delta + j0 + kLanes * k, sizeof(d));
        y = round_bf16_sum_v(y + round_bf16_v(d));
      }
      std::memcpy(w + j0 + kLanes * k, &y, sizeof(y));
      if (k == 0) {
        mx = y, mn = y, sum = y;
      } else {
        mx = mx < y ? y : mx;
        mn = y < mn ? y : mn;
        sum += y;
      }
    }
    vmax[j0 / kSub] = fold_to_8<true>(mx);
    vmin[j0 / kSub] = fold_to_8<false>(mn);
    nf += sum;
  }
  return nf;
}

// Pass 1 for input groups of G values: w and the extremes of each 32-value block. Returns whether a value came
// out non-finite; then the blocks that hold one are recomputed the exact way and flagged in ``special`` (pass
// 2 quantizes their groups with quantize_group); otherwise ``special`` is left as it is.
template <int BITS, int G, bool DELTA>
bool dequantize_row_bf16(const uint8_t* __restrict src, const mlx::core::bfloat16_t* scales,
                         const mlx::core::bfloat16_t* biases, const float* __restrict delta, int64_t n,
                         float* __restrict w, v8f* __restrict vmax, v8f* __restrict vmin, uint8_t* __restrict special) {
  using bf16 = mlx::core::bfloat16_t;
  const int64_t n_bytes = n / 8 * BITS;
  // Blocks from which a whole read of kLaneRead bytes stays inside the row, and the leading groups all of whose
  // reads are whole (the rest, at the row's end, read their last blocks through a zero-padded copy).
  const int64_t direct = n_bytes >= kLaneRead ? (n_bytes - kLaneRead) / BITS + 1 : 0;
  const int64_t n_groups = n / G;
  int64_t n_whole = (direct - 1 + kLanes / 8) / (G / 8);
  n_whole = n_whole < n_groups ? n_whole : n_groups;
  vNf nf = {};
  auto group = [&](int64_t gi, const GroupLookup& look) {
    if (gi < n_whole) {
      nf = dequantize_group_bf16<BITS, G, DELTA, false>(src, gi, direct, look, delta, w, vmax, vmin, nf);
    } else {
      nf = dequantize_group_bf16<BITS, G, DELTA, true>(src, gi, direct, look, delta, w, vmax, vmin, nf);
    }
  };
#if defined(REQNOISE_PERMUTE_TABLE)
  constexpr bool kTables = BITS <= 4;
#else
  constexpr bool kTables = BITS == 4 && kNibbleTable;
#endif
  if constexpr (kTables) {
    constexpr int kAhead = 8;  // groups whose tables are built before any of them is dequantized
    GroupLookup look[kAhead];
    for (int64_t g0 = 0; g0 < n_groups; g0 += kAhead) {
      const int m = int(n_groups - g0 < kAhead ? n_groups - g0 : kAhead);
      for (int i = 0; i < m; ++i) {
        look[i] = group_lookup<BITS>(load_value(scales + g0 + i), load_value(biases + g0 + i));
      }
      for (int i = 0; i < m; ++i) group(g0 + i, look[i]);
    }
  } else {
    // The arithmetic widths: nothing to build ahead (building the scale and bias ahead costs more than it saves).
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      group(gi, group_lookup<BITS>(load_value(scales + gi), load_value(biases + gi)));
    }
  }
  vNu nfu;
  std::memcpy(&nfu, &nf, sizeof(nfu));
  const vNu hit = (vNu)((nfu & 0x7FFFFFFFu) >= 0x7F800000u);  // some value is inf or NaN (or the sum overflowed)
  uint64_t h[kLanes / 2];
  std::memcpy(h, &hit, sizeof(h));
  uint64_t any_hit = 0;
  for (int i = 0; i < kLanes / 2; ++i) any_hit |= h[i];
  if (!any_hit) return false;
  for (int64_t b = 0; b < n / kSub; ++b) {
    uint32_t any = 0;
    for (int j = 0; j < kSub; ++j) any |= is_non_finite(w[b * kSub + j]);
    special[b] = uint8_t(any);
    if (!any) continue;
    const int64_t gi = b * kSub / G;
    float q[kSub];
    for (int k = 0; k < kSub / 8; ++k) {
      const int64_t blk = b * kSub / 8 + k;
      uint64_t v = 0;
      std::memcpy(&v, src + blk * BITS, blk * BITS + 8 <= n_bytes ? 8 : BITS);
      const v8f f = unpack_block<BITS>(v);
      std::memcpy(q + 8 * k, &f, sizeof(f));
    }
    dequantize_group<bf16, kSub, DELTA>(q, DELTA ? delta + b * kSub : nullptr, load_value(scales + gi),
                                        load_value(biases + gi), w + b * kSub);
  }
  return true;
}

// Pass 3 for one group of G values at scale ``so`` and bias ``bo``: codes (from w, or from ``codes`` where
// quantize_group made them) packed straight into dst (a row of ``row_bytes``), four blocks at a time. Their
// 16-byte stores spill into bytes that the next blocks overwrite, except near the row's end, where only the
// blocks' own bytes are written (a neighbouring row, another thread's, is never written).
//
// The clamp of (w - bias) / scale to [0, n_bins] is done on the quotient's bits as signed integers: for
// non-negative floats (+inf included) their order is the values' order, and every negative float (-0.0
// included) clamps to +0.0, whose code is -0.0's. So the codes are quantize_group's for every quotient but a
// NaN, which cannot occur here: w and bias are finite and scale is finite and nonzero, or +-inf with a zero
// bias. Two integer max/min, against a compare and select per bound in float, which GCC does not vectorize for
// AArch64 without -fno-trapping-math (the compares may trap), and on x86 it turns the clamp to zero into a
// compare and a mask rather than one max.
template <int BITS, int G>
inline void quantize_group_bf16(const float* __restrict w, int64_t gi, float so, float bo, bool exact,
                                const uint32_t* __restrict codes, uint8_t* __restrict dst, int64_t row_bytes) {
  constexpr float n_bins = float((1 << BITS) - 1);
  constexpr int32_t n_bins_bits = __builtin_bit_cast(int32_t, n_bins);
  const vNf vs = vNf{} + so, vb = vNf{} + bo;
#pragma GCC unroll 4
  for (int k4 = 0; k4 < G / 32; ++k4) {
    vNu c[32 / kLanes];  // the four blocks' codes
#pragma GCC unroll 4
    for (int k = 0; k < 32 / kLanes; ++k) {
      const int64_t blk = gi * (G / 8) + 4 * k4 + k * (kLanes / 8);  // the first of the vector's blocks
      vNu ck;
      if (exact) {
        // quantize_group's code of a NaN quotient is out of range; pack_codes keeps its low BITS bits.
        std::memcpy(&ck, codes + blk * 8, sizeof(ck));
        ck &= (1u << BITS) - 1;
      } else {
        vNf v;
        std::memcpy(&v, w + blk * 8, sizeof(v));
        v = (v - vb) / vs;
        vNi b;
        std::memcpy(&b, &v, sizeof(b));
#if defined(__AVX2__)
        // 8 bits, 8 lanes: no clamp at zero, the pack's unsigned saturation clamps every negative code (a
        // negative quotient rounds to a negative integer, or to INT_MIN below -2^31) to quantize_group's code 0.
        if constexpr (BITS != 8 || kLanes == 16) b = b < 0 ? vNi{} : b;
        b = n_bins_bits < b ? vNi{} + n_bins_bits : b;
        std::memcpy(&v, &b, sizeof(v));
        // code_of on all lanes in one vcvtps2dq: the default rounding mode (to nearest even), as its add.
#if defined(REQNOISE_LANES16)
        ck = (vNu)_mm512_cvtps_epi32((__m512)v);
#else
        ck = (vNu)_mm256_cvtps_epi32((__m256)v);
#endif
#else
        b = b < 0 ? vNi{} : b;
        b = n_bins_bits < b ? vNi{} + n_bins_bits : b;
        std::memcpy(&v, &b, sizeof(v));
        const vNf t = v + 12582912.0f;  // code_of on all lanes
        std::memcpy(&ck, &t, sizeof(ck));
        ck -= 0x4B400000u;
#endif
      }
      c[k] = ck;
    }
    const int64_t at = (gi * (G / 32) + k4) * 4 * BITS;
#if defined(REQNOISE_LANES16)
    if (at + 2 * BITS + 16 <= row_bytes) {
      pack_32_codes<BITS, true>(c[0], c[1], dst + at);
    } else {
      pack_32_codes<BITS, false>(c[0], c[1], dst + at);
    }
#else
    if (at + 2 * BITS + 16 <= row_bytes) {
      pack_4_blocks<BITS, true>(c, dst + at);
    } else {
      pack_4_blocks<BITS, false>(c, dst + at);
    }
#endif
  }
}

// The first m (<= 8) lanes of x stored as bfloat16 with round_bf16's bits for every non-NaN lane (a NaN lane
// belongs to a group that quantize_group redoes and stores itself): one narrowing store for eight groups; near
// the row's end only the row's own m values are written.
inline void store_bf16_8(mlx::core::bfloat16_t* p, v8f x, int m) {
  typedef uint16_t v8h __attribute__((vector_size(16)));
  v8u u;
  const v8f r = round_bf16_v(x);
  std::memcpy(&u, &r, sizeof(u));
  const v8h h = __builtin_convertvector(u >> 16, v8h);
  if (m == 8) {
    std::memcpy(p, &h, sizeof(h));
  } else {
    for (int i = 0; i < m; ++i) std::memcpy(p + i, reinterpret_cast<const uint16_t*>(&h) + i, 2);
  }
}

// Passes 2 and 3 for output groups of G values (BITS wide) from pass 1's w and block extremes: quantize_group's
// scale and bias for eight groups at a time, then each group's codes packed straight into dst. ``special``
// (pass 1's block flags) is read only when ``any_special``.
//
// Pass 2 runs for a chunk of up to kChunk groups (a whole row of 768 or 4096 values at group 64) before pass 3
// codes any of them. A group's scale ends a long chain of dependent operations (extremes, fold, three
// divisions); with each batch of eight followed directly by their codes, the core's window filled with that
// work before the next batch's chain could start. The batches of a chunk are independent, so their chains
// overlap, and pass 3 reads each scale back from L1 (passes 2 + 3 alone: 0.161 -> 0.129 one-thread CPU ns per
// weight at 3 bits, 0.120 -> 0.088 at 8; the row loop, where the next row's pass 1 hid part of the wait: 0.329 ->
// 0.312; docs/kernel-speed.md).
template <int BITS, int G>
void quantize_row_bf16(const float* __restrict w, const v8f* __restrict bmax, const v8f* __restrict bmin,
                       bool any_special, const uint8_t* __restrict special, int64_t n, uint32_t* __restrict codes,
                       uint8_t* dst, mlx::core::bfloat16_t* scales_out, mlx::core::bfloat16_t* biases_out) {
  constexpr int kBlocks = G / kSub;  // extremes blocks per group
  constexpr int kChunk = 64;         // groups per chunk: a multiple of 8
  constexpr float n_bins = float((1 << BITS) - 1);
  const int64_t n_groups = n / G;
  alignas(32) float chunk_scale[kChunk], chunk_bias[kChunk];
  for (int64_t c0 = 0; c0 < n_groups; c0 += kChunk) {
    const int64_t c_end = n_groups - c0 < kChunk ? n_groups : c0 + kChunk;
    uint64_t exact = 0;  // groups of the chunk that quantize_group handles (a non-finite value)
    for (int64_t g0 = c0; g0 < c_end; g0 += 8) {
      const int m = int(c_end - g0 < 8 ? c_end - g0 : 8);
      v8f gmax[8], gmin[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const int64_t b0 = (g0 + (i < m ? i : 0)) * kBlocks;
        v8f mx = bmax[b0], mn = bmin[b0];
        for (int k = 1; k < kBlocks; ++k) {
          mx = mx < bmax[b0 + k] ? bmax[b0 + k] : mx;
          mn = bmin[b0 + k] < mn ? bmin[b0 + k] : mn;
        }
        gmax[i] = mx;
        gmin[i] = mn;
      }
      if (any_special) {
        for (int i = 0; i < m; ++i) {
          for (int k = 0; k < kBlocks; ++k) exact |= uint64_t(special[(g0 + i) * kBlocks + k] != 0) << (g0 - c0 + i);
        }
      }
      const v8f w_max = fold8<true>(gmax), w_min = fold8<false>(gmin);
      // quantize_group's scale and bias, lane by lane.
      const v8u abs_mask = v8u{} + 0x7FFFFFFFu;
      v8u umax, umin;
      std::memcpy(&umax, &w_max, sizeof(umax));
      std::memcpy(&umin, &w_min, sizeof(umin));
      const v8i mask = (v8i)(umin & abs_mask) > (v8i)(umax & abs_mask);  // |w_min| > |w_max| (both finite)
      v8f scale = (w_max - w_min) / n_bins;
      scale = scale < 1e-7f ? v8f{} + 1e-7f : scale;
      scale = mask ? scale : -scale;
      const v8f edge = mask ? w_min : w_max;
      const v8f t = edge / scale;
      // rint(t): the sign of a zero result does not matter (only q0 != 0 and edge / q0 are used).
      v8u ut;
      std::memcpy(&ut, &t, sizeof(ut));
      const v8f big = (v8f)((ut & 0x80000000u) | 0x4B000000u);  // +-2^23
      const v8i small = (v8i)(ut & abs_mask) < 0x4B000000;
      const v8f q0 = small ? (t + big) - big : t;
      const v8i nz = q0 != 0.0f;
      scale = nz ? edge / q0 : scale;
      const v8f bias = nz ? edge : v8f{};
      std::memcpy(chunk_scale + (g0 - c0), &scale, sizeof(scale));
      std::memcpy(chunk_bias + (g0 - c0), &bias, sizeof(bias));
      store_bf16_8(scales_out + g0, scale, m);
      store_bf16_8(biases_out + g0, bias, m);
    }
    for (int64_t gi = c0; gi < c_end; ++gi) {
      float so = chunk_scale[gi - c0], bo = chunk_bias[gi - c0];
      const bool ex = exact >> (gi - c0) & 1u;
      if (ex) {
        quantize_group(w + gi * G, G, BITS, codes + gi * G, so, bo);
        store_value(scales_out + gi, so);
        store_value(biases_out + gi, bo);
      }
      quantize_group_bf16<BITS, G>(w, gi, so, bo, ex, codes, dst, n / 8 * BITS);
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

using Pass1 = bool (*)(const uint8_t*, const mlx::core::bfloat16_t*, const mlx::core::bfloat16_t*, const float*,
                       int64_t, float*, v8f*, v8f*, uint8_t*);
using Pass23 = void (*)(const float*, const v8f*, const v8f*, bool, const uint8_t*, int64_t, uint32_t*, uint8_t*,
                        mlx::core::bfloat16_t*, mlx::core::bfloat16_t*);

template <int BITS>
Pass1 pass1_for(int g, bool delta) {
  if (g == 32) return delta ? dequantize_row_bf16<BITS, 32, true> : dequantize_row_bf16<BITS, 32, false>;
  if (g == 64) return delta ? dequantize_row_bf16<BITS, 64, true> : dequantize_row_bf16<BITS, 64, false>;
  return delta ? dequantize_row_bf16<BITS, 128, true> : dequantize_row_bf16<BITS, 128, false>;
}

template <int BITS>
Pass23 pass23_for(int g) {
  if (g == 32) return quantize_row_bf16<BITS, 32>;
  if (g == 64) return quantize_row_bf16<BITS, 64>;
  return quantize_row_bf16<BITS, 128>;
}

inline Pass1 pass1_for(int bits, int g, bool delta) {
  return with_bits(bits, [&](auto b) { return pass1_for<b()>(g, delta); });
}

inline Pass23 pass23_for(int bits, int g) {
  return with_bits(bits, [&](auto b) { return pass23_for<b()>(g); });
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
  // bfloat16 fresh requantization (the common case) takes the three-pass form; the rest the general one.
  const bool three_pass = std::is_same_v<T, mlx::core::bfloat16_t> && !spec.keep_grid && !spec.dora;
  Pass1 pass1 = nullptr;
  Pass23 pass23 = nullptr;
  v8f* extremes = nullptr;  // per 32-value block: partial maxima, then partial minima
  uint8_t* special = nullptr;
  if (three_pass) {
    pass1 = pass1_for(spec.bits, spec.group_size, r > 0);
    pass23 = pass23_for(spec.out_bits, spec.out_group_size);
    const int64_t n_sub = in_dim / kSub;
    extremes = static_cast<v8f*>(std::aligned_alloc(sizeof(v8f), sizeof(v8f) * (3 * n_sub + 1)));
    if (!extremes) throw std::bad_alloc();
    special = reinterpret_cast<uint8_t*>(extremes + 2 * n_sub);
  }
  const FreeOnExit hold{extremes};
  auto one_row = [&](int64_t row, const float* a, const float* delta) {
    const FuseBuffers<T> one{buf.wq + row * words_in,
                             buf.scales + row * groups_in,
                             buf.biases + row * groups_in,
                             a,
                             r ? buf.B + row * r : nullptr,
                             buf.mag ? buf.mag + row : nullptr,
                             buf.wq_out + row * words_out,
                             spec.keep_grid ? nullptr : buf.scales_out + row * groups_out,
                             spec.keep_grid ? nullptr : buf.biases_out + row * groups_out};
    if constexpr (std::is_same_v<T, mlx::core::bfloat16_t>) {
      if (three_pass) {
        const int64_t n_sub = in_dim / kSub;
        const bool any_special = pass1(reinterpret_cast<const uint8_t*>(one.wq), one.scales, one.biases, delta, in_dim,
                                       s.w, extremes, extremes + n_sub, special);
        pass23(s.w, extremes, extremes + n_sub, any_special, special, in_dim, s.codes,
               reinterpret_cast<uint8_t*>(one.wq_out), one.scales_out, one.biases_out);
        return;
      }
    }
    fuse_one_row<T>(spec, in_dim, one, s, delta);
  };
  for_each_row(spec, out_dim, in_dim, row_begin, row_end, buf.A, buf.B, one_row);
}

#define REQNOISE_INSTANTIATE(T)                                                                               \
  template void fuse_row_range<T>(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, \
                                  const RowScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise::REQNOISE_ISA
