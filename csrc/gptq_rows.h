// The calibrated fuse's row work, shared by the dispatcher (gptq_kernel.cpp) and the per-instruction-set copies
// of the column loop (gptq_rows.cpp). Plain structs only: the per-ISA copies include nothing that could emit
// out-of-line code.
#pragma once

#include <cstdint>

namespace reqnoise {

struct GptqSpec {
  int bits = 4;
  int group_size = 64;
  float scale = 1.0f;  // delta = scale * B @ A
  int rank = 0;        // 0: zero delta
  bool dora = false;
  int block = 128;      // GPTQ's lazy-batch width: columns whose updates are applied to the rest at once
  int num_threads = 0;  // 0: hardware concurrency
  int mode = 0;         // QuantModeId (fuse_kernel.h): affine, or an fp mode with uint8 scales and no biases
};

// Buffers of one call, row-major and contiguous: wq [E, out, in*bits/32]; scales/biases [E, out, in/gs] in T
// (affine), or scales8 [E, out, in/gs] uint8 (the fp modes; scales and biases null);
// A [E, rank, in], B [E, out, rank], mag [E, out], U [E, in, in] (upper triangle read), all float32;
// feedback [E]: 0 rounds that expert without error feedback (keep-grid; U is not read); wq_out like wq.
template <typename T>
struct GptqBuffers {
  const uint32_t* wq;
  const T* scales;
  const T* biases;
  const float* A;
  const float* B;
  const float* mag;
  const float* U;
  const uint8_t* feedback;
  uint32_t* wq_out;
  const uint8_t* scales8 = nullptr;
};

// One thread's scratch for a tile of up to kGptqTileRows rows: w, q [kGptqTileRows, in], err [kGptqTileRows,
// block], delta [in] (float32), codes [in]. Never a dense copy of an expert.
inline constexpr int kGptqTileRows = 8;
struct GptqScratch {
  float* w;
  float* q;
  float* err;
  float* delta;
  uint32_t* codes;
};

// Columns per panel of the blocked factorisation (inverse_hessian_factor's scratch c is kFactorPanel * n).
inline constexpr int kFactorPanel = 32;

// The column loop, compiled once per instruction-set level (identical bytes: no FMA contraction, the same
// order of operations per element); gptq_rows (gptq_kernel.cpp) picks the copy the CPU runs. Rows [r0, r1)
// of expert e, r1 - r0 <= kGptqTileRows.
#define REQNOISE_DECLARE_GPTQ_ISA(ns)                                                                             \
  namespace ns {                                                                                                  \
  template <typename T>                                                                                           \
  void gptq_tile(const GptqSpec& spec, int64_t out_dim, int64_t in_dim, int64_t e, int64_t r0, int64_t r1,        \
                 const GptqBuffers<T>& buf, const GptqScratch& s);                                                \
  template <typename T>                                                                                           \
  bool inverse_hessian_factor(const float* h, int64_t n, double damping, double min_pivot, float* u, T* a, T* c); \
  }
REQNOISE_DECLARE_GPTQ_ISA(baseline)
REQNOISE_DECLARE_GPTQ_ISA(v3)
#undef REQNOISE_DECLARE_GPTQ_ISA

}  // namespace reqnoise
