// The fused dequantize -> add low-rank delta -> requantize kernel over rows of an MLX affine weight.
#pragma once

#include <cstdint>

namespace reqnoise {

// The widths and group sizes the kernel implements: MLX's affine mode without its 1-bit width. The Python
// side's list (reqnoise.kernel.formats) must be the same; tests/test_formats.py compares them through _core.
inline constexpr int kSupportedBits[] = {2, 3, 4, 5, 6, 8};
inline constexpr int kSupportedGroupSizes[] = {32, 64, 128};

// MLX's quantization modes; the floating-point ones fix their width and group size (mxfp4: 4 bits, 32;
// nvfp4: 4, 16; mxfp8: 8, 32), store one uint8 scale per group and no bias (csrc/fp_codec.h).
enum QuantModeId : int { kAffine = 0, kMxfp4 = 1, kNvfp4 = 2, kMxfp8 = 3 };

struct FuseSpec {
  int bits = 4;             // input code width
  int group_size = 64;      // input group size
  int out_bits = 4;         // output code width (== bits for keep-grid)
  int out_group_size = 64;  // output group size (== group_size for keep-grid)
  bool keep_grid = false;   // re-encode against the stored scale/bias instead of requantizing
  float scale = 1.0f;       // delta = scale * B @ A
  int rank = 0;             // 0: zero delta (no factors passed)
  bool dora = false;        // magnitude vector passed: row-normalise W + delta to it
  int num_threads = 0;      // 0: hardware concurrency
  int mode = kAffine;       // input mode (QuantModeId)
  int out_mode = kAffine;   // output mode (== mode for keep-grid)
};

// One thread's scratch: a row of each intermediate (in_dim values), never a dense copy of the weight.
struct RowScratch {
  float* q;         // codes of the row as floats
  float* w;         // dequantized (+ delta) row
  float* delta;     // the row of scale * B @ A (the fp kernel; the affine kernel keeps a tile of rows)
  uint32_t* codes;  // new codes
};

// The nine buffers of one call. T is the scales' dtype: float, mlx::core::float16_t or mlx::core::bfloat16_t.
// For a whole call (fuse_rows, fuse_row_range) each points at the start of a row-major, contiguous array:
// wq [E, out, in*bits/32], scales/biases [E, out, in/group_size], A [E, rank, in], B [E, out, rank],
// mag [E, out] (all float32), outputs likewise at the output width. Inside the row loop the same struct
// holds one row's pointers (A: its expert's matrix).
template <typename T>
struct FuseBuffers {
  const uint32_t* wq;
  const T* scales;
  const T* biases;
  const float* A;    // null when rank == 0 (zero delta)
  const float* B;    // null when rank == 0
  const float* mag;  // null unless DoRA
  uint32_t* wq_out;
  T* scales_out;  // null for keep-grid: the grid is the input's
  T* biases_out;  // null for keep-grid
  // The floating-point modes' uint8 scales (input, output), used in place of scales/biases for that side;
  // T is then the dtype the values are dequantized to and requantized from (mx.dequantize's dtype).
  const uint8_t* scales8 = nullptr;
  uint8_t* scales8_out = nullptr;
};

// The row loop is compiled once per instruction-set level, each copy in its own namespace so that the
// linker can never mix them; fuse_rows (kernel_dispatch.cpp) picks one at run time. The copies compute
// identical bytes: no contraction into FMA, IEEE conversions in both.
#define REQNOISE_DECLARE_ISA(ns)                                                                                 \
  namespace ns {                                                                                                 \
  template <typename T>                                                                                          \
  void fuse_row_range(const FuseSpec& spec, int64_t out_dim, int64_t in_dim, int64_t row_begin, int64_t row_end, \
                      const FuseBuffers<T>& buf, const RowScratch& s);                                           \
  template <typename T>                                                                                          \
  void fp_row_range(const FuseSpec& spec, int64_t out_dim, int64_t in_dim, int64_t row_begin, int64_t row_end,   \
                    const FuseBuffers<T>& buf, const RowScratch& s);                                             \
  }
REQNOISE_DECLARE_ISA(baseline)
REQNOISE_DECLARE_ISA(v3)
REQNOISE_DECLARE_ISA(v4)
#undef REQNOISE_DECLARE_ISA

// Which copy fuse_rows runs: "x86-64-v4", "x86-64-v3" or "baseline" (the calibrated rows run the v3 copy
// wherever this is not "baseline").
const char* kernel_isa();

// Fuses every row of ``buf`` (shapes above). Rows are split over threads in contiguous blocks, so the bytes
// written never depend on the thread count. Throws std::invalid_argument for a width or group size outside
// kSupportedBits/kSupportedGroupSizes or an input width they do not divide.
template <typename T>
void fuse_rows(const FuseSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const FuseBuffers<T>& buf);

}  // namespace reqnoise
