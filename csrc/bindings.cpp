// Python bindings. mx.array objects cross the boundary as they are: this module shares nanobind's type
// registry with mlx (NB_DOMAIN mlx in CMakeLists.txt), so `import mlx.core` must come first.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "fuse_primitive.h"
#include "gptq_kernel.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

NB_MODULE(_core, m) {
  m.doc() = "reqnoise native core: fused dequantize -> add LoRA delta -> requantize for MLX quantized weights";

  m.def("kernel_isa", &reqnoise::kernel_isa, "Instruction-set copy of the row kernel in use.");
  m.def(
      "supported_bits",
      [] { return std::vector<int>(std::begin(reqnoise::kSupportedBits), std::end(reqnoise::kSupportedBits)); },
      "Code widths the native kernel accepts.");
  m.def(
      "supported_group_sizes",
      [] {
        return std::vector<int>(std::begin(reqnoise::kSupportedGroupSizes), std::end(reqnoise::kSupportedGroupSizes));
      },
      "Group sizes the native kernel accepts.");

  m.def(
      "fuse_quantized",
      [](const mx::array& wq, const mx::array& scales, std::optional<mx::array> biases, std::optional<mx::array> a,
         std::optional<mx::array> b, std::optional<mx::array> mag, int bits, int group_size, int out_bits,
         int out_group_size, bool keep_grid, float scale, int num_threads, int mode, int out_mode,
         std::optional<mx::Dtype> dtype) {
        reqnoise::FuseSpec spec;
        spec.bits = bits;
        spec.group_size = group_size;
        spec.out_bits = out_bits;
        spec.out_group_size = out_group_size;
        spec.keep_grid = keep_grid;
        spec.scale = scale;
        spec.num_threads = num_threads;
        spec.mode = mode;
        spec.out_mode = out_mode;
        return reqnoise::fuse_quantized(wq, scales, biases, a, b, mag, spec, dtype.value_or(scales.dtype()));
      },
      "wq"_a, "scales"_a, "biases"_a.none(), "a"_a.none(), "b"_a.none(), "mag"_a.none(), nb::kw_only(), "bits"_a,
      "group_size"_a, "out_bits"_a, "out_group_size"_a, "keep_grid"_a, "scale"_a, "num_threads"_a = 0, "mode"_a = 0,
      "out_mode"_a = 0, "dtype"_a.none() = nb::none(),
      "Lazy fused op on 3-D stacks; arguments must already be validated (see reqnoise.kernel). Returns a "
      "list of mx.array: [wq, scales, biases] (fresh; no biases for an fp output mode) or [wq] (keep-grid). "
      "mode/out_mode: 0 affine, 1 mxfp4, 2 nvfp4, 3 mxfp8; dtype: what an fp-mode input dequantizes to.");
  m.def(
      "fuse_calibrated",
      [](const mx::array& wq, const mx::array& scales, const mx::array& biases, std::optional<mx::array> a,
         std::optional<mx::array> b, std::optional<mx::array> mag, const mx::array& u, const mx::array& feedback,
         int bits, int group_size, float scale, int block, int num_threads) {
        reqnoise::GptqSpec spec;
        spec.bits = bits;
        spec.group_size = group_size;
        spec.scale = scale;
        spec.block = block;
        spec.num_threads = num_threads;
        return reqnoise::fuse_calibrated(wq, scales, biases, a, b, mag, u, feedback, spec);
      },
      "wq"_a, "scales"_a, "biases"_a, "a"_a.none(), "b"_a.none(), "mag"_a.none(), "u"_a, "feedback"_a, nb::kw_only(),
      "bits"_a, "group_size"_a, "scale"_a, "block"_a = 128, "num_threads"_a = 0,
      "Lazy calibrated (error-feedback, fixed-grid) fuse on 3-D stacks; u: [E, in, in] upper Cholesky factor of "
      "each expert's inverse Hessian; feedback: [E] (0: keep-grid for that expert). Returns the new wq.");
}
