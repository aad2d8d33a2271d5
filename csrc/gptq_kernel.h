// Calibrated fuse: error-feedback rounding (GPTQ's column loop) onto each group's fixed, stored grid.
//
// The target of a row is W_hat + delta (float32 dequantization plus the adapter's delta, DoRA applied), as
// keep-grid forms it; the codes are then chosen column by column, each column's rounding error pushed onto the
// columns not yet rounded through U, the upper Cholesky factor of the inverse Hessian (H = X^T X / n + damping).
// Scales and biases are never touched, so a zero delta (every column already on its grid, zero error) returns
// the input codes bit for bit, and an expert without a Hessian is keep-grid exactly.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace reqnoise {

struct GptqSpec {
  int bits = 4;
  int group_size = 64;
  float scale = 1.0f;  // delta = scale * B @ A
  int rank = 0;        // 0: zero delta
  bool dora = false;
  int block = 128;      // GPTQ's lazy-batch width: columns whose updates are applied to the rest at once
  int num_threads = 0;  // 0: hardware concurrency
};

// Buffers of one call, row-major and contiguous: wq [E, out, in*bits/32]; scales/biases [E, out, in/gs] in T;
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
};

// Every row of every expert. Rows are independent given U and each row's arithmetic is fixed, so the bytes
// never depend on the thread count or the row tiling. Throws std::invalid_argument on an unsupported format.
template <typename T>
void gptq_rows(const GptqSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const GptqBuffers<T>& buf);

class FuseCalibrated : public mlx::core::Primitive {
 public:
  FuseCalibrated(mlx::core::Stream stream, GptqSpec spec) : mlx::core::Primitive(stream), spec_(spec) {}
  void eval_cpu(const std::vector<mlx::core::array>& inputs, std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>& inputs, std::vector<mlx::core::array>& outputs) override;
  const char* name() const override { return "ReqnoiseFuseCalibrated"; }
  bool is_equivalent(const mlx::core::Primitive& other) const override;

 private:
  GptqSpec spec_;
};

// Lazy op on 3-D stacks (validated by reqnoise.kernel.op): returns the new wq only; the grid is the input's.
mlx::core::array fuse_calibrated(const mlx::core::array& wq, const mlx::core::array& scales,
                                 const mlx::core::array& biases, const std::optional<mlx::core::array>& a,
                                 const std::optional<mlx::core::array>& b, const std::optional<mlx::core::array>& mag,
                                 const mlx::core::array& u, const mlx::core::array& feedback, GptqSpec spec);

}  // namespace reqnoise
