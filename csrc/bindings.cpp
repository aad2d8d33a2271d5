// Python bindings. mx.array objects cross the boundary as they are: this module shares nanobind's type
// registry with mlx (NB_DOMAIN mlx in CMakeLists.txt), so `import mlx.core` must come first.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include "fuse_primitive.h"
#include "gptq_kernel.h"
#include "mlx/allocator.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

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
      [](const mx::array& wq, const mx::array& scales, std::optional<mx::array> biases, std::optional<mx::array> a,
         std::optional<mx::array> b, std::optional<mx::array> mag, const mx::array& u, const mx::array& feedback,
         int bits, int group_size, float scale, int block, int num_threads, int mode) {
        reqnoise::GptqSpec spec;
        spec.mode = mode;
        spec.bits = bits;
        spec.group_size = group_size;
        spec.scale = scale;
        spec.block = block;
        spec.num_threads = num_threads;
        return reqnoise::fuse_calibrated(wq, scales, biases, a, b, mag, u, feedback, spec);
      },
      "wq"_a, "scales"_a, "biases"_a.none(), "a"_a.none(), "b"_a.none(), "mag"_a.none(), "u"_a, "feedback"_a,
      nb::kw_only(), "bits"_a, "group_size"_a, "scale"_a, "block"_a = 128, "num_threads"_a = 0, "mode"_a = 0,
      "Lazy calibrated (error-feedback, fixed-grid) fuse on 3-D stacks; u: [E, in, in] upper Cholesky factor of "
      "each expert's inverse Hessian; feedback: [E] (0: keep-grid for that expert); mode: 0 affine (biases given), "
      "1 mxfp4, 2 nvfp4, 3 mxfp8 (uint8 scales, biases None). Returns the new wq.");
  m.def(
      "inverse_hessian_factor",
      [](const mx::array& h, double damping) -> std::pair<std::optional<mx::array>, int> {
        if (h.ndim() != 2 || h.shape(0) != h.shape(1)) throw std::invalid_argument("the Hessian must be [n, n]");
        // An evaluated float32 row-major Hessian is read in place: no op is queued behind a calibrated fuse
        // still running on the CPU stream, so factoring the next expert overlaps it.
        auto hf = h;
        if (h.dtype() != mx::float32 || !h.is_available() || !h.flags().row_contiguous) {
          const auto cpu = mx::default_stream(mx::Device::cpu);
          hf = mx::contiguous(mx::astype(h, mx::float32, cpu), false, cpu);
          mx::eval(hf);
        }
        const int n = h.shape(0);
        mx::array u(mx::allocator::malloc(size_t(n) * size_t(n) * sizeof(float)), {n, n}, mx::float32);
        int attempt;
        {
          nb::gil_scoped_release release;
          attempt = reqnoise::gptq_factor(hf.data<float>(), n, damping, u.data<float>());
        }
        if (!attempt) return {std::nullopt, 0};
        return {u, attempt};
      },
      "h"_a, "damping"_a,
      "(U, attempt): upper U [n, n] float32 with U^T U = (H + d * mean(diag H) * I)^-1, d = damping, else 10x, "
      "100x; float32 first, float64 only when that fails. attempt: 1 float32 at d, 2 float64 at d, 3/4 at 10x, "
      "5/6 at 100x. (None, 0) when no attempt gives a finite factor with a positive diagonal.");
}
