#include "fuse_primitive.h"

#include <stdexcept>
#include <string>

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
  const int64_t E = wq.shape(0), out_dim = wq.shape(1);
  const int64_t in_dim = int64_t(wq.shape(2)) * 32 / spec.bits;
  const FuseBuffers<T> buf{wq.data<uint32_t>(),
                           in[1].data<T>(),
                           in[2].data<T>(),
                           spec.rank ? in[3].data<float>() : nullptr,
                           spec.rank ? in[4].data<float>() : nullptr,
                           spec.dora ? in[spec.rank ? 5 : 3].data<float>() : nullptr,
                           out[0].data<uint32_t>(),
                           spec.keep_grid ? nullptr : out[1].data<T>(),
                           spec.keep_grid ? nullptr : out[2].data<T>()};
  fuse_rows<T>(spec, E, out_dim, in_dim, buf);
}

}  // namespace

void FuseQuantized::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (size_t i = 0; i < inputs.size(); ++i) require_row_contiguous(inputs[i], "every input");
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
    switch (ins[1].dtype()) {
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
         x.dora == y.dora && x.num_threads == y.num_threads;
}

std::vector<mx::array> fuse_quantized(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                                      const std::optional<mx::array>& a, const std::optional<mx::array>& b,
                                      const std::optional<mx::array>& mag, FuseSpec spec) {
  // The kernel is plain C++ over host memory: pin it to the CPU stream on every platform (memory is
  // unified on Apple silicon, so this costs no copy there).
  auto s = mx::default_stream(mx::Device::cpu);
  auto prep = [&](const mx::array& x, mx::Dtype dt) { return mx::contiguous(mx::astype(x, dt, s), false, s); };
  if (wq.ndim() != 3 || scales.ndim() != 3 || biases.ndim() != 3) {
    throw std::invalid_argument("reqnoise fuse: the native op takes 3-D [E, out, ...] arrays");
  }
  std::vector<mx::array> inputs = {mx::contiguous(wq, false, s), mx::contiguous(scales, false, s),
                                   mx::contiguous(biases, false, s)};
  spec.rank = 0;
  if (a && b) {
    spec.rank = a->shape(1);
    inputs.push_back(prep(*a, mx::float32));
    inputs.push_back(prep(*b, mx::float32));
  }
  spec.dora = mag.has_value();
  if (mag) inputs.push_back(prep(*mag, mx::float32));

  const int E = wq.shape(0), out_dim = wq.shape(1);
  const int in_dim = wq.shape(2) * 32 / spec.bits;
  auto prim = std::make_shared<FuseQuantized>(s, spec);
  if (spec.keep_grid) {
    return mx::array::make_arrays({wq.shape()}, {mx::uint32}, prim, inputs);
  }
  mx::Shape wshape = {E, out_dim, in_dim * spec.out_bits / 32};
  mx::Shape sshape = {E, out_dim, in_dim / spec.out_group_size};
  return mx::array::make_arrays({wshape, sshape, sshape}, {mx::uint32, scales.dtype(), scales.dtype()}, prim, inputs);
}

}  // namespace reqnoise
