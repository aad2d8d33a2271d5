#include "gptq_kernel.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fuse_kernel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mx = mlx::core;

namespace reqnoise {

template <typename T>
void gptq_rows(const GptqSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const GptqBuffers<T>& buf) {
  const bool fp = spec.mode != kAffine;
  if (!fp) {
    if (std::ranges::find(kSupportedBits, spec.bits) == std::end(kSupportedBits)) {
      throw std::invalid_argument("unsupported bits");
    }
    if (std::ranges::find(kSupportedGroupSizes, spec.group_size) == std::end(kSupportedGroupSizes)) {
      throw std::invalid_argument("unsupported group size");
    }
  } else if (spec.mode > kMxfp8 || spec.bits != (spec.mode == kMxfp8 ? 8 : 4) ||
             spec.group_size != (spec.mode == kNvfp4 ? 16 : 32)) {
    throw std::invalid_argument("unsupported floating-point mode, bits or group size");
  }
  if (in_dim % (fp ? 16 : 32) || in_dim % spec.group_size) {
    throw std::invalid_argument("input width must divide by the group size");
  }
  if (spec.block < 1) throw std::invalid_argument("block must be positive");
  const int64_t n_rows = n_experts * out_dim;
  static const bool v3 = std::strcmp(kernel_isa(), "baseline") != 0;  // v4 CPUs run v3 here
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<float> f(kGptqTileRows * (2 * in_dim + spec.block) + in_dim);
    std::vector<uint32_t> codes(in_dim);
    const GptqScratch s{f.data(), f.data() + kGptqTileRows * in_dim, f.data() + 2 * kGptqTileRows * in_dim,
                        f.data() + kGptqTileRows * (2 * in_dim + spec.block), codes.data()};
    for (int64_t row = begin; row < end;) {
      const int64_t e = row / out_dim, r0 = row % out_dim;
      const int64_t r1 = std::min<int64_t>({r0 + kGptqTileRows, out_dim, r0 + (end - row)});
#if defined(REQNOISE_HAVE_V3)
      if (v3) {
        v3::gptq_tile<T>(spec, out_dim, in_dim, e, r0, r1, buf, s);
        row += r1 - r0;
        continue;
      }
#endif
      baseline::gptq_tile<T>(spec, out_dim, in_dim, e, r0, r1, buf, s);
      row += r1 - r0;
    }
  };
  int n_threads = spec.num_threads > 0 ? spec.num_threads : int(std::thread::hardware_concurrency());
  n_threads = int(std::clamp<int64_t>(std::min<int64_t>(n_threads, n_rows / kGptqTileRows), 1, 256));
  if (n_threads == 1) return work(0, n_rows);
  std::vector<std::thread> pool;
  std::exception_ptr error;
  std::mutex error_mutex;
  for (int t = 0; t < n_threads; ++t) {
    const int64_t begin = n_rows * t / n_threads, end = n_rows * (t + 1) / n_threads;
    pool.emplace_back([&, begin, end] {
      try {
        work(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

// A float32 pivot below this fraction of its diagonal entry has lost more than 12 of float32's 24 bits to
// cancellation: the factorisation is redone in float64.
constexpr double kMinPivot32 = 1.0 / 4096;

int gptq_factor(const float* h, int64_t n, double damping, float* u) {
  double mean_diag = 0.0;
  for (int64_t i = 0; i < n; ++i) mean_diag += double(h[i * n + i]);
  mean_diag /= double(n);
  if (!(mean_diag > 0.0) || !(mean_diag < __builtin_huge_val())) return 0;
  static const bool v3 = std::strcmp(kernel_isa(), "baseline") != 0;  // v4 CPUs run v3 here
  std::vector<float> c32(size_t(kFactorPanel) * size_t(n));
  std::vector<double> c64;
  std::optional<mx::allocator::Data> work64;
  int attempt = 0;
  for (double factor : {1.0, 10.0, 100.0}) {
    const double d = damping * factor * mean_diag;
    ++attempt;
    // float32 in place in u; float64 in an allocator buffer (so that MLX's peak memory counts it) when needed
#if defined(REQNOISE_HAVE_V3)
    if (v3 ? v3::inverse_hessian_factor<float>(h, n, d, kMinPivot32, u, u, c32.data())
           : baseline::inverse_hessian_factor<float>(h, n, d, kMinPivot32, u, u, c32.data())) {
      return attempt;
    }
#else
    if (baseline::inverse_hessian_factor<float>(h, n, d, kMinPivot32, u, u, c32.data())) return attempt;
#endif
    ++attempt;
    if (c64.empty()) {
      c64.resize(size_t(kFactorPanel) * size_t(n));
      work64.emplace(mx::allocator::malloc(size_t(n) * size_t(n) * sizeof(double)));
    }
    auto* a = static_cast<double*>(work64->buffer().raw_ptr());
#if defined(REQNOISE_HAVE_V3)
    if (v3 ? v3::inverse_hessian_factor<double>(h, n, d, 0.0, u, a, c64.data())
           : baseline::inverse_hessian_factor<double>(h, n, d, 0.0, u, a, c64.data())) {
      return attempt;
    }
#else
    if (baseline::inverse_hessian_factor<double>(h, n, d, 0.0, u, a, c64.data())) return attempt;
#endif
  }
  return 0;
}

namespace {

template <typename T>
void run(const GptqSpec& spec, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const auto& wq = in[0];
  const int64_t E = wq.shape(0), out_dim = wq.shape(1);
  const int64_t in_dim = int64_t(wq.shape(2)) * 32 / spec.bits;
  const bool fp = spec.mode != kAffine;
  size_t k = fp ? 2 : 3;
  const float* A = spec.rank ? in[k++].data<float>() : nullptr;
  const float* B = spec.rank ? in[k++].data<float>() : nullptr;
  const float* mag = spec.dora ? in[k++].data<float>() : nullptr;
  const float* U = in[k++].data<float>();
  const uint8_t* fb = in[k].data<uint8_t>();
  GptqBuffers<T> buf{
      wq.data<uint32_t>(),    fp ? nullptr : in[1].data<T>(), fp ? nullptr : in[2].data<T>(), A, B, mag, U, fb,
      out[0].data<uint32_t>()};
  if (fp) buf.scales8 = in[1].data<uint8_t>();
  gptq_rows<T>(spec, E, out_dim, in_dim, buf);
}

}  // namespace

void FuseCalibrated::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (const auto& x : inputs) {
    if (!x.flags().row_contiguous)
      throw std::invalid_argument("reqnoise calibrated fuse: inputs must be row-contiguous");
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    encoder.set_output_array(o);
  }
  std::vector<mx::array> ins, outs;
  for (const auto& x : inputs) {
    encoder.set_input_array(x);
    ins.push_back(mx::array::unsafe_weak_copy(x));
  }
  for (const auto& o : outputs) outs.push_back(mx::array::unsafe_weak_copy(o));
  encoder.dispatch([spec = spec_, ins = std::move(ins), outs = std::move(outs)]() mutable {
    if (spec.mode != kAffine) return run<float>(spec, ins, outs);  // uint8 scales; no value dtype in the loop
    switch (ins[1].dtype()) {
      case mx::float32:
        return run<float>(spec, ins, outs);
      case mx::float16:
        return run<mx::float16_t>(spec, ins, outs);
      case mx::bfloat16:
        return run<mx::bfloat16_t>(spec, ins, outs);
      default:
        throw std::invalid_argument("reqnoise calibrated fuse: scales must be float32, float16 or bfloat16");
    }
  });
}

void FuseCalibrated::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("reqnoise calibrated fuse runs on the CPU stream only");
}

bool FuseCalibrated::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const FuseCalibrated*>(&other);
  if (!o) return false;
  const auto &x = spec_, &y = o->spec_;
  return x.bits == y.bits && x.group_size == y.group_size && x.scale == y.scale && x.rank == y.rank &&
         x.dora == y.dora && x.block == y.block && x.num_threads == y.num_threads && x.mode == y.mode;
}

mx::array fuse_calibrated(const mx::array& wq, const mx::array& scales, const std::optional<mx::array>& biases,
                          const std::optional<mx::array>& a, const std::optional<mx::array>& b,
                          const std::optional<mx::array>& mag, const mx::array& u, const mx::array& feedback,
                          GptqSpec spec) {
  auto s = mx::default_stream(mx::Device::cpu);
  auto prep = [&](const mx::array& x, mx::Dtype dt) { return mx::contiguous(mx::astype(x, dt, s), false, s); };
  if (wq.ndim() != 3 || scales.ndim() != 3 || (biases && biases->ndim() != 3) || u.ndim() != 3) {
    throw std::invalid_argument("reqnoise calibrated fuse: the native op takes 3-D [E, ...] arrays");
  }
  if (biases.has_value() != (spec.mode == kAffine)) {
    throw std::invalid_argument("reqnoise calibrated fuse: biases are given for the affine mode only");
  }
  if (spec.mode != kAffine && scales.dtype() != mx::uint8) {
    throw std::invalid_argument("reqnoise calibrated fuse: fp-mode scales must be uint8");
  }
  std::vector<mx::array> inputs = {mx::contiguous(wq, false, s), mx::contiguous(scales, false, s)};
  if (biases) inputs.push_back(mx::contiguous(*biases, false, s));
  spec.rank = 0;
  if (a && b) {
    spec.rank = a->shape(1);
    inputs.push_back(prep(*a, mx::float32));
    inputs.push_back(prep(*b, mx::float32));
  }
  spec.dora = mag.has_value();
  if (mag) inputs.push_back(prep(*mag, mx::float32));
  inputs.push_back(prep(u, mx::float32));
  inputs.push_back(prep(feedback, mx::uint8));
  auto prim = std::make_shared<FuseCalibrated>(s, spec);
  return mx::array(wq.shape(), mx::uint32, prim, inputs);
}

#define REQNOISE_INSTANTIATE(T) \
  template void gptq_rows<T>(const GptqSpec&, int64_t, int64_t, int64_t, const GptqBuffers<T>&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise
