// Threads, scratch and the choice of instruction-set copy for the row kernel (compiled for the baseline).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

#include "fuse_kernel.h"
#include "mlx/types/half_types.h"

namespace reqnoise {
namespace {

enum class Isa { kBaseline, kV3, kV4 };

Isa pick_isa() {
#if defined(REQNOISE_HAVE_V3)
  // REQNOISE_KERNEL_ISA=baseline or =v3 caps the copy (the tests compare them all).
  const char* force = std::getenv("REQNOISE_KERNEL_ISA");
  if (force && std::strcmp(force, "baseline") == 0) return Isa::kBaseline;
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (!v3) return Isa::kBaseline;
  // libgcc's checks include the OS's support for the AVX-512 register state (XCR0).
  const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
  if (!v4 || (force && std::strcmp(force, "v3") == 0)) return Isa::kV3;
  return Isa::kV4;
#else
  return Isa::kBaseline;
#endif
}

const Isa kIsa = pick_isa();

}  // namespace

const char* kernel_isa() {
  switch (kIsa) {
    case Isa::kV4:
      return "x86-64-v4";
    case Isa::kV3:
      return "x86-64-v3";
    default:
      return "baseline";
  }
}

template <typename T>
void fuse_rows(const FuseSpec& spec, int64_t n_experts, int64_t out_dim, int64_t in_dim, const FuseBuffers<T>& buf) {
  const bool fp = spec.mode != kAffine || spec.out_mode != kAffine;
  for (auto [mode, b, g] : {std::tuple{spec.mode, spec.bits, spec.group_size},
                            std::tuple{spec.out_mode, spec.out_bits, spec.out_group_size}}) {
    if (mode == kAffine) {
      if (std::ranges::find(kSupportedBits, b) == std::end(kSupportedBits)) {
        throw std::invalid_argument("unsupported bits");
      }
      if (std::ranges::find(kSupportedGroupSizes, g) == std::end(kSupportedGroupSizes)) {
        throw std::invalid_argument("unsupported group size");
      }
    } else if (mode < kAffine || mode > kMxfp8 || b != (mode == kMxfp8 ? 8 : 4) || g != (mode == kNvfp4 ? 16 : 32)) {
      throw std::invalid_argument("unsupported floating-point mode, bits or group size");
    }
  }
  if (spec.keep_grid && spec.out_mode != spec.mode) throw std::invalid_argument("keep-grid cannot change the mode");
  if (in_dim % (fp ? 16 : 32) || in_dim % spec.group_size || in_dim % spec.out_group_size) {
    throw std::invalid_argument("input width must divide by the group sizes");
  }
  const int64_t n_rows = n_experts * out_dim;
  using RowRange =
      void (*)(const FuseSpec&, int64_t, int64_t, int64_t, int64_t, const FuseBuffers<T>&, const RowScratch&);
  RowRange range = fp ? baseline::fp_row_range<T> : baseline::fuse_row_range<T>;
#if defined(REQNOISE_HAVE_V3)
  if (kIsa == Isa::kV3) range = fp ? v3::fp_row_range<T> : v3::fuse_row_range<T>;
  if (kIsa == Isa::kV4) range = fp ? v4::fp_row_range<T> : v4::fuse_row_range<T>;
#endif
  // One worker: scratch allocated once, then rows [begin, end) in blocks taken from next(); each block is
  // fused independently (a row's bytes never depend on which block or thread computed it).
  auto worker = [&](auto&& next) {
    std::vector<float> f(3 * in_dim);
    std::vector<uint32_t> codes(in_dim);
    RowScratch s{f.data(), f.data() + in_dim, f.data() + 2 * in_dim, codes.data()};
    int64_t begin, end;
    while (next(begin, end)) range(spec, out_dim, in_dim, begin, end, buf, s);
  };

  int n_threads = spec.num_threads > 0 ? spec.num_threads : int(std::thread::hardware_concurrency());
  // Below a few hundred thousand values a thread's start-up costs more than it saves.
  const int64_t min_rows = std::max<int64_t>(1, 262144 / std::max<int64_t>(in_dim, 1));
  n_threads = int(std::clamp<int64_t>(std::min<int64_t>(n_threads, n_rows / min_rows), 1, 256));
  if (n_threads == 1) {
    bool done = false;
    worker([&](int64_t& b, int64_t& e) {
      if (done) return false;
      b = 0, e = n_rows, done = true;
      return true;
    });
    return;
  }
  // Rows are handed out in blocks from a shared counter rather than split in fixed halves, so a thread whose
  // core is busy with something else (a shared machine) or that started late takes fewer blocks and the
  // others are never left waiting. Blocks are multiples of 16 rows (whole delta tiles), about 32 per thread.
  const int64_t block = std::clamp<int64_t>(n_rows / (int64_t(n_threads) * 32) / 16 * 16, 16, 4096);
  std::atomic<int64_t> next_row{0};
  auto next = [&](int64_t& b, int64_t& e) {
    b = next_row.fetch_add(block, std::memory_order_relaxed);
    if (b >= n_rows) return false;
    e = std::min(b + block, n_rows);
    return true;
  };
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&] {
    try {
      worker(next);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next_row.store(n_rows);  // the others stop at their next block
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(guarded);
  guarded();  // the calling thread is one of the workers
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

#define REQNOISE_INSTANTIATE(T) \
  template void fuse_rows<T>(const FuseSpec&, int64_t, int64_t, int64_t, const FuseBuffers<T>&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)

}  // namespace reqnoise
