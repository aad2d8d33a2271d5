// Calibrated fuse: error-feedback rounding (GPTQ's column loop) onto each group's fixed, stored grid: the affine
// scale and bias, or an fp mode's (mxfp4, nvfp4, mxfp8) e8m0/e4m3 scale with its E2M1/E4M3 code table.
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

#include "gptq_rows.h"
#include "mlx/array.h"
#include "mlx/primitives.h"

namespace reqnoise {

// Every row of every expert. Rows are independent given U and each row's arithmetic is fixed, so the bytes
// never depend on the thread count or the row tiling. Throws std::invalid_argument on an unsupported format.
template <typename T>
void gptq_rows(const GptqSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const GptqBuffers<T>& buf);

// U [n, n] (upper; the lower triangle zeroed) with U^T U = (H + d * mean(diag H) * I)^-1 for the float32
// Hessian h [n, n], row-major, of which the upper triangle is read. d = damping, then 10x and 100x it until
// the factor exists; each in float32 first, in float64 only when float32 fails. Single-threaded and in a
// fixed order, so the bytes never depend on a thread count. Returns which attempt gave U: 1 float32 at the
// damping, 2 float64 at it, 3/4 float32/float64 at 10x, 5/6 at 100x; 0 when H has no positive, finite mean
// diagonal or no attempt gives a finite factor with a positive diagonal.
int gptq_factor(const float* h, int64_t n, double damping, float* u);

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
// biases: affine only; the fp modes (spec.mode) pass their uint8 scales and no biases.
mlx::core::array fuse_calibrated(const mlx::core::array& wq, const mlx::core::array& scales,
                                 const std::optional<mlx::core::array>& biases,
                                 const std::optional<mlx::core::array>& a, const std::optional<mlx::core::array>& b,
                                 const std::optional<mlx::core::array>& mag, const mlx::core::array& u,
                                 const mlx::core::array& feedback, GptqSpec spec);

}  // namespace reqnoise
