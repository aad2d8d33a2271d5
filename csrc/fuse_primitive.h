// A lazy, multi-output MLX primitive wrapping the fuse kernel; it always runs on the CPU stream.
#pragma once

#include <optional>
#include <vector>

#include "fuse_kernel.h"
#include "mlx/array.h"
#include "mlx/primitives.h"

namespace reqnoise {

class FuseQuantized : public mlx::core::Primitive {
 public:
  FuseQuantized(mlx::core::Stream stream, FuseSpec spec, mlx::core::Dtype dtype)
      : mlx::core::Primitive(stream), spec_(spec), dtype_(dtype) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs, std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>& inputs, std::vector<mlx::core::array>& outputs) override;
  const char* name() const override { return "ReqnoiseFuseQuantized"; }
  bool is_equivalent(const mlx::core::Primitive& other) const override;

 private:
  FuseSpec spec_;
  mlx::core::Dtype dtype_;  // the values' dtype: the affine scales' dtype, or the fp modes' dequantized dtype
};

// Inputs as validated by the Python layer: wq uint32 [E, out, in*bits/32]; scales [E, out, in/gs] (uint8
// for the fp modes), biases likewise (affine only: none for the fp modes); a float32 [E, r, in] and b float32
// [E, out, r] (both or neither); mag float32 [E, out] or none. ``dtype``: the dtype an fp-mode input is
// dequantized to (for affine input it must be the scales' dtype). Returns (wq, scales[, biases]) for fresh
// (biases for an affine output), (wq) for keep-grid (the grid is unchanged).
std::vector<mlx::core::array> fuse_quantized(const mlx::core::array& wq, const mlx::core::array& scales,
                                             const std::optional<mlx::core::array>& biases,
                                             const std::optional<mlx::core::array>& a,
                                             const std::optional<mlx::core::array>& b,
                                             const std::optional<mlx::core::array>& mag, FuseSpec spec,
                                             mlx::core::Dtype dtype);

}  // namespace reqnoise
