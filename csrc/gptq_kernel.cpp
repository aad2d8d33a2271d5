#include "gptq_kernel.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "fuse_kernel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

// One copy, compiled for the baseline instruction set in its own namespace (affine_codec.h is per-ISA).
#define REQNOISE_ISA gptq_baseline
#include "affine_codec.h"

namespace mx = mlx::core;

namespace reqnoise {
namespace {

using reqnoise::gptq_baseline::load_value;
using reqnoise::gptq_baseline::pack_codes;
using reqnoise::gptq_baseline::rint_small;
using reqnoise::gptq_baseline::unpack_codes;

// A group's fixed grid as the column loop sees it: the code a value rounds to and that code's value. This is
// the whole codec interface of the loop; a floating-point mode (no bias, codes through a value table) is one
// more struct with the same three members.
struct AffineGrid {
  float scale, bias, n_bins;

  template <typename T>
  static AffineGrid load(const T* scales, const T* biases, int64_t gi, int bits) {
    return {load_value(scales + gi), load_value(biases + gi), float((1 << bits) - 1)};
  }
  // keep-grid's encode_group, one value: nearest code on the grid, clamped to it; a zero step keeps the code.
  float encode(float x, float old_code) const {
    if (scale == 0.0f) return old_code;
    float v = (x - bias) / scale;
    v = v < 0.0f ? 0.0f : v;
    v = n_bins < v ? n_bins : v;
    return rint_small(v);
  }
  // The float32 dequantization keep-grid forms its target with, so a code on the grid decodes to the target.
  float decode(float code) const { return code * scale + bias; }
};

constexpr int kTileRows = 8;  // rows sharing each pass over U (U's rows are reused from cache kTileRows times)

struct Scratch {
  std::vector<float> w, q, err, acc, delta;
  std::vector<uint32_t> codes;
  Scratch(int64_t in_dim, int block)
      : w(kTileRows * in_dim),
        q(kTileRows * in_dim),
        err(kTileRows * block),
        acc(kTileRows * in_dim),
        delta(in_dim),
        codes(in_dim) {}
};

// The target row W_hat + delta, with keep-grid's arithmetic (fuse_kernel.cpp): float32 q*s+b, the delta summed
// over the rank in order from the float32-rounded scale*b[k], DoRA's row factor from a float64 norm.
template <typename T>
void target_row(const GptqSpec& spec, int64_t in_dim, const T* scales, const T* biases, const float* a, const float* b,
                const float* mag, const float* q, float* delta, float* w) {
  const int g = spec.group_size;
  for (int64_t gi = 0; gi < in_dim / g; ++gi) {
    const float sc = load_value(scales + gi), bi = load_value(biases + gi);
    for (int j = 0; j < g; ++j) w[gi * g + j] = q[gi * g + j] * sc + bi;
  }
  if (spec.rank > 0) {
    const float sb0 = spec.scale * b[0];
    for (int64_t j = 0; j < in_dim; ++j) delta[j] = sb0 * a[j];
    for (int k = 1; k < spec.rank; ++k) {
      const float s = spec.scale * b[k];
      const float* ak = a + int64_t(k) * in_dim;
      for (int64_t j = 0; j < in_dim; ++j) delta[j] = delta[j] + s * ak[j];
    }
    for (int64_t j = 0; j < in_dim; ++j) w[j] = w[j] + delta[j];
  }
  if (spec.dora) {
    double ss = 0.0;
    for (int64_t j = 0; j < in_dim; ++j) ss += double(w[j]) * double(w[j]);
    const float row_scale = static_cast<float>(double(*mag) / __builtin_sqrt(ss));
    for (int64_t j = 0; j < in_dim; ++j) w[j] = row_scale * w[j];
  }
}

// Rows [r0, r1) of expert e (r1 - r0 <= kTileRows).
template <typename T>
void tile(const GptqSpec& spec, int64_t out_dim, int64_t in_dim, int64_t e, int64_t r0, int64_t r1,
          const GptqBuffers<T>& buf, Scratch& s) {
  const int64_t words = in_dim * spec.bits / 32, n_groups = in_dim / spec.group_size;
  const int g = spec.group_size, nr = int(r1 - r0);
  auto grid = [&](int r, int64_t col) {
    const int64_t row = e * out_dim + r0 + r;
    return AffineGrid::load(buf.scales + row * n_groups, buf.biases + row * n_groups, col / g, spec.bits);
  };
  for (int r = 0; r < nr; ++r) {
    const int64_t row = e * out_dim + r0 + r;
    float* q = s.q.data() + r * in_dim;
    unpack_codes(spec.bits, buf.wq + row * words, in_dim, q);
    target_row<T>(spec, in_dim, buf.scales + row * n_groups, buf.biases + row * n_groups,
                  spec.rank ? buf.A + e * spec.rank * in_dim : nullptr, spec.rank ? buf.B + row * spec.rank : nullptr,
                  spec.dora ? buf.mag + row : nullptr, q, s.delta.data(), s.w.data() + r * in_dim);
  }

  if (buf.feedback[e]) {
    const float* U = buf.U + e * in_dim * in_dim;
    for (int64_t b0 = 0; b0 < in_dim; b0 += spec.block) {
      const int64_t b1 = std::min<int64_t>(b0 + spec.block, in_dim);
      // Inside the block: round a column, push its error onto the block's later columns at once.
      for (int r = 0; r < nr; ++r) {
        float* w = s.w.data() + r * in_dim;
        float* q = s.q.data() + r * in_dim;
        float* err = s.err.data() + r * spec.block;
        for (int64_t i = b0; i < b1; ++i) {
          const AffineGrid gr = grid(r, i);
          const float c = gr.encode(w[i], q[i]);
          q[i] = c;
          // A column on its grid has exactly zero error, and w - 0*U == w, so skipping it changes no byte.
          const float ei = (w[i] - gr.decode(c)) / U[i * in_dim + i];
          err[i - b0] = ei;
          if (ei == 0.0f) continue;
          const float* ui = U + i * in_dim;
          for (int64_t j = i + 1; j < b1; ++j) w[j] = w[j] - ei * ui[j];
        }
      }
      if (b1 == in_dim) break;
      // Lazy batch: the block's errors reach the remaining columns as one sum per column, taken over the
      // block's columns in order (acc = acc + e_i * U[i, j]), then subtracted once.
      for (int r = 0; r < nr; ++r) std::fill(s.acc.begin() + r * in_dim + b1, s.acc.begin() + (r + 1) * in_dim, 0.0f);
      for (int64_t i = b0; i < b1; ++i) {
        const float* ui = U + i * in_dim;
        for (int r = 0; r < nr; ++r) {
          const float ei = s.err[r * spec.block + (i - b0)];
          if (ei == 0.0f) continue;
          float* acc = s.acc.data() + r * in_dim;
          for (int64_t j = b1; j < in_dim; ++j) acc[j] = acc[j] + ei * ui[j];
        }
      }
      for (int r = 0; r < nr; ++r) {
        float* w = s.w.data() + r * in_dim;
        const float* acc = s.acc.data() + r * in_dim;
        for (int64_t j = b1; j < in_dim; ++j) w[j] = w[j] - acc[j];
      }
    }
  } else {
    // Too few calibration tokens for this expert: nearest code on the fixed grid, i.e. keep-grid.
    for (int r = 0; r < nr; ++r) {
      float* w = s.w.data() + r * in_dim;
      float* q = s.q.data() + r * in_dim;
      for (int64_t i = 0; i < in_dim; ++i) q[i] = grid(r, i).encode(w[i], q[i]);
    }
  }

  for (int r = 0; r < nr; ++r) {
    const float* q = s.q.data() + r * in_dim;
    for (int64_t i = 0; i < in_dim; ++i) s.codes[i] = static_cast<uint32_t>(q[i]);
    pack_codes(spec.bits, s.codes.data(), in_dim, buf.wq_out + (e * out_dim + r0 + r) * words);
  }
}

}  // namespace

template <typename T>
void gptq_rows(const GptqSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const GptqBuffers<T>& buf) {
  if (std::ranges::find(kSupportedBits, spec.bits) == std::end(kSupportedBits)) {
    throw std::invalid_argument("unsupported bits");
  }
  if (spec.group_size != 32 && spec.group_size != 64 && spec.group_size != 128) {
    throw std::invalid_argument("unsupported group size");
  }
  if (in_dim % 32 || in_dim % spec.group_size) throw std::invalid_argument("input width must divide by the group size");
  if (spec.block < 1) throw std::invalid_argument("block must be positive");
  const int64_t n_rows = n_experts * out_dim;
  auto work = [&](int64_t begin, int64_t end) {
    Scratch s(in_dim, spec.block);
    for (int64_t row = begin; row < end;) {
      const int64_t e = row / out_dim, r0 = row % out_dim;
      const int64_t r1 = std::min<int64_t>({r0 + kTileRows, out_dim, r0 + (end - row)});
      tile<T>(spec, out_dim, in_dim, e, r0, r1, buf, s);
      row += r1 - r0;
    }
  };
  int n_threads = spec.num_threads > 0 ? spec.num_threads : int(std::thread::hardware_concurrency());
  n_threads = int(std::clamp<int64_t>(std::min<int64_t>(n_threads, n_rows / kTileRows), 1, 256));
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

namespace {

template <typename T>
void run(const GptqSpec& spec, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const auto& wq = in[0];
  const int64_t E = wq.shape(0), out_dim = wq.shape(1);
  const int64_t in_dim = int64_t(wq.shape(2)) * 32 / spec.bits;
  size_t k = 3;
  const float* A = spec.rank ? in[k++].data<float>() : nullptr;
  const float* B = spec.rank ? in[k++].data<float>() : nullptr;
  const float* mag = spec.dora ? in[k++].data<float>() : nullptr;
  const float* U = in[k++].data<float>();
  const uint8_t* fb = in[k].data<uint8_t>();
  const GptqBuffers<T> buf{wq.data<uint32_t>(),    in[1].data<T>(), in[2].data<T>(), A, B, mag, U, fb,
                           out[0].data<uint32_t>()};
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
         x.dora == y.dora && x.block == y.block && x.num_threads == y.num_threads;
}

mx::array fuse_calibrated(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                          const std::optional<mx::array>& a, const std::optional<mx::array>& b,
                          const std::optional<mx::array>& mag, const mx::array& u, const mx::array& feedback,
                          GptqSpec spec) {
  auto s = mx::default_stream(mx::Device::cpu);
  auto prep = [&](const mx::array& x, mx::Dtype dt) { return mx::contiguous(mx::astype(x, dt, s), false, s); };
  if (wq.ndim() != 3 || scales.ndim() != 3 || biases.ndim() != 3 || u.ndim() != 3) {
    throw std::invalid_argument("reqnoise calibrated fuse: the native op takes 3-D [E, ...] arrays");
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
