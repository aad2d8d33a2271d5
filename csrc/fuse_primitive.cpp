#include "fuse_primitive.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mx = mlx::core;

namespace reqnoise {
namespace {

void require_row_contiguous(const mx::array& x, const char* what) {
  if (!x.flags().row_contiguous) {
    throw std::invalid_argument(std::string("reqnoise fuse: ") + what + " must be row-contiguous");
  }
}

template <typename T>
void run(const FuseSpec& spec, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const auto& wq = in[0];
  const bool aff_in = spec.mode == kAffine, aff_out = spec.out_mode == kAffine;
  const int bits = aff_in ? spec.bits : (spec.mode == kMxfp8 ? 8 : 4);
  const int64_t E = wq.shape(0), out_dim = wq.shape(1);
  const int64_t in_dim = int64_t(wq.shape(2)) * 32 / bits;
  const size_t f = aff_in ? 3 : 2;  // first factor input
  FuseBuffers<T> buf{wq.data<uint32_t>(),
                     aff_in ? in[1].data<T>() : nullptr,
                     aff_in ? in[2].data<T>() : nullptr,
                     spec.rank ? in[f].data<float>() : nullptr,
                     spec.rank ? in[f + 1].data<float>() : nullptr,
                     spec.dora ? in[spec.rank ? f + 2 : f].data<float>() : nullptr,
                     out[0].data<uint32_t>(),
                     (spec.keep_grid || !aff_out) ? nullptr : out[1].data<T>(),
                     (spec.keep_grid || !aff_out) ? nullptr : out[2].data<T>()};
  if (!aff_in) buf.scales8 = in[1].data<uint8_t>();
  if (!spec.keep_grid && !aff_out) buf.scales8_out = out[1].data<uint8_t>();
  fuse_rows<T>(spec, E, out_dim, in_dim, buf);
}

// An output of many megabytes is written once, front to back, by the kernel threads: on Linux with transparent
// huge pages in "madvise" mode (a common default) its first writes would fault in 4 KiB pages one at a time,
// which at 3 bits cost about as much as a fifth of the fuse. Asking for huge pages over the buffer's whole 2 MiB
// spans turns that into a few hundred faults. Advice only: nothing changes if the kernel declines.
void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data, (void)nbytes;
#endif
}

}  // namespace

void FuseQuantized::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (size_t i = 0; i < inputs.size(); ++i) require_row_contiguous(inputs[i], "every input");
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    advise_huge_pages(o.data<void>(), o.nbytes());
    encoder.set_output_array(o);
  }
  std::vector<mx::array> ins, outs;
  for (const auto& x : inputs) {
    encoder.set_input_array(x);
    ins.push_back(mx::array::unsafe_weak_copy(x));
  }
  for (const auto& o : outputs) outs.push_back(mx::array::unsafe_weak_copy(o));
  encoder.dispatch([spec = spec_, dtype = dtype_, ins = std::move(ins), outs = std::move(outs)]() mutable {
    switch (dtype) {
      case mx::float32:
        return run<float>(spec, ins, outs);
      case mx::float16:
        return run<mx::float16_t>(spec, ins, outs);
      case mx::bfloat16:
        return run<mx::bfloat16_t>(spec, ins, outs);
      default:
        throw std::invalid_argument("reqnoise fuse: scales must be float32, float16 or bfloat16");
    }
  });
}

void FuseQuantized::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("reqnoise fuse runs on the CPU stream only");
}

bool FuseQuantized::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const FuseQuantized*>(&other);
  if (!o) return false;
  const auto &x = spec_, &y = o->spec_;
  return x.bits == y.bits && x.group_size == y.group_size && x.out_bits == y.out_bits &&
         x.out_group_size == y.out_group_size && x.keep_grid == y.keep_grid && x.scale == y.scale && x.rank == y.rank &&
         x.dora == y.dora && x.num_threads == y.num_threads && x.mode == y.mode && x.out_mode == y.out_mode &&
         dtype_ == o->dtype_;
}

std::vector<mx::array> fuse_quantized(const mx::array& wq, const mx::array& scales,
                                      const std::optional<mx::array>& biases, const std::optional<mx::array>& a,
                                      const std::optional<mx::array>& b, const std::optional<mx::array>& mag,
                                      FuseSpec spec, mx::Dtype dtype) {
  // The kernel is plain C++ over host memory: pin it to the CPU stream on every platform (memory is
  // unified on Apple silicon, so this costs no copy there).
  auto s = mx::default_stream(mx::Device::cpu);
  auto prep = [&](const mx::array& x, mx::Dtype dt) { return mx::contiguous(mx::astype(x, dt, s), false, s); };
  const bool aff_in = spec.mode == kAffine, aff_out = spec.out_mode == kAffine;
  if (wq.ndim() != 3 || scales.ndim() != 3 || (biases && biases->ndim() != 3)) {
    throw std::invalid_argument("reqnoise fuse: the native op takes 3-D [E, out, ...] arrays");
  }
  if (aff_in != biases.has_value()) {
    throw std::invalid_argument("reqnoise fuse: biases are given exactly for the affine mode");
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

  const int bits = aff_in ? spec.bits : (spec.mode == kMxfp8 ? 8 : 4);
  const int out_bits = aff_out ? spec.out_bits : (spec.out_mode == kMxfp8 ? 8 : 4);
  const int E = wq.shape(0), out_dim = wq.shape(1);
  const int in_dim = wq.shape(2) * 32 / bits;
  auto prim = std::make_shared<FuseQuantized>(s, spec, aff_in ? scales.dtype() : dtype);
  if (spec.keep_grid) {
    return mx::array::make_arrays({wq.shape()}, {mx::uint32}, prim, inputs);
  }
  mx::Shape wshape = {E, out_dim, in_dim * out_bits / 32};
  mx::Shape sshape = {E, out_dim, in_dim / spec.out_group_size};
  if (!aff_out) return mx::array::make_arrays({wshape, sshape}, {mx::uint32, mx::uint8}, prim, inputs);
  const mx::Dtype sd = aff_in ? scales.dtype() : dtype;
  return mx::array::make_arrays({wshape, sshape, sshape}, {mx::uint32, sd, sd}, prim, inputs);
}

}  // namespace reqnoise
