// Per-phase profile of the affine row kernel (a bench build, not part of the extension).
//
// Includes the kernel's translation unit so that its internal helpers can be timed one phase at a time over
// the same rows; each phase runs over every row before the next starts, so the timings are of each phase in
// isolation (their sum is an upper bound on the fused row loop, which keeps a row in L1 between phases).
// Also times the whole row loop (fuse_row_range) at 1 and 2 threads. Prints one JSON object.
//
//   g++ -std=c++20 -O3 -ffp-contract=off -fno-math-errno [-march=x86-64-v3] -DREQNOISE_ISA=v3 \
//       -I csrc -I $(python -m mlx --cmake-dir)/include bench/kernel_phases.cpp -o /tmp/kp -lpthread
//   /tmp/kp [experts=16] [bits=3] [rank=16] [reps=5]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "fuse_kernel.cpp"

namespace k = reqnoise::REQNOISE_ISA;
#define REQNOISE_STR2(x) #x
#define REQNOISE_STR(x) REQNOISE_STR2(x)
using bf16 = mlx::core::bfloat16_t;

// Thread CPU time, not wall time: the phases run on one thread, and on a shared machine the wall clock
// mostly measures the other tenants. The two-thread row loop uses wall time (see below).
static double cpu_now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}
static double wall_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
  const int64_t E = argc > 1 ? atoi(argv[1]) : 16;
  const int bits = argc > 2 ? atoi(argv[2]) : 3;
  const int rank = argc > 3 ? atoi(argv[3]) : 16;
  const int reps = argc > 4 ? atoi(argv[4]) : 5;
  const int64_t out_dim = 2048, in_dim = 768, g = 64;
  const int64_t rows = E * out_dim, words = in_dim * bits / 32, groups = in_dim / g;
  std::mt19937 rng(0);
  std::vector<uint32_t> wq(rows * words), wq_out(rows * words);
  for (auto& x : wq) x = rng();
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<bf16> sc(rows * groups), bi(rows * groups), sc_out(rows * groups), bi_out(rows * groups);
  for (int64_t i = 0; i < rows * groups; ++i) {
    k::store_value(&sc[i], 0.004f + 0.001f * nd(rng));
    k::store_value(&bi[i], -0.02f + 0.002f * nd(rng));
  }
  std::vector<float> A(E * rank * in_dim), B(rows * rank);
  for (auto& x : A) x = 0.01f * nd(rng);
  for (auto& x : B) x = 0.01f * nd(rng);
  reqnoise::FuseSpec spec;
  spec.bits = spec.out_bits = bits;
  spec.group_size = spec.out_group_size = int(g);
  spec.rank = rank;
  spec.scale = 2.0f;
  const reqnoise::FuseBuffers<bf16> buf{
      wq.data(),     sc.data(),     bi.data(),    rank ? A.data() : nullptr, rank ? B.data() : nullptr, nullptr,
      wq_out.data(), sc_out.data(), bi_out.data()};
  std::vector<float> f(3 * in_dim);
  std::vector<uint32_t> codes(in_dim);
  std::vector<uint8_t> packed(in_dim + 8);
  reqnoise::RowScratch s{f.data(), f.data() + in_dim, f.data() + 2 * in_dim, codes.data(), packed.data()};

  const double n_w = double(rows) * in_dim;
  auto ns_per_weight = [&](auto&& fn, double (*now)() = cpu_now) {
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
      const double t0 = now();
      fn();
      t.push_back(now() - t0);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2] * 1e9 / n_w;
  };
  const double whole1 = ns_per_weight([&] { k::fuse_row_range<bf16>(spec, out_dim, in_dim, 0, rows, buf, s); });
  const double whole1_wall =
      ns_per_weight([&] { k::fuse_row_range<bf16>(spec, out_dim, in_dim, 0, rows, buf, s); }, wall_now);
  const double whole2 = ns_per_weight(
      [&] {
        std::thread t([&] {
          std::vector<float> f2(3 * in_dim);
          std::vector<uint32_t> c2(in_dim);
          std::vector<uint8_t> p2(in_dim + 8);
          reqnoise::RowScratch s2{f2.data(), f2.data() + in_dim, f2.data() + 2 * in_dim, c2.data(), p2.data()};
          k::fuse_row_range<bf16>(spec, out_dim, in_dim, rows / 2, rows, buf, s2);
        });
        k::fuse_row_range<bf16>(spec, out_dim, in_dim, 0, rows / 2, buf, s);
        t.join();
      },
      wall_now);
  // The phases, each alone over all rows (same helpers the row loop calls).
  const double unpack = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) k::unpack_any(bits, wq.data() + r * words, in_dim, s.q);
  });
  const double delta = ns_per_weight([&] {
    std::vector<float> d(k::kTile * in_dim);
    for (int64_t r = 0; r < rows; r += k::kTile)
      k::delta_tile<k::kTile>(spec, A.data() + (r / out_dim) * rank * in_dim, B.data() + r * rank, in_dim, d.data());
  });
  const double dequant = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) {
      k::dequantize_row<bf16, 64>(&sc[r * groups], &bi[r * groups], s.q, rank ? s.delta : nullptr, in_dim, s.w);
    }
  });
  const double quant = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t gi = 0; gi < groups; ++gi) {
        float so, bo;
        k::quantize_group(s.w + gi * g, int(g), bits, s.codes + gi * g, so, bo);
        k::store_value(&sc_out[r * groups + gi], so);
        k::store_value(&bi_out[r * groups + gi], bo);
      }
    }
  });
  const double pack = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) k::pack_any(bits, s.codes, in_dim, wq_out.data() + r * words);
  });
  const double copy = ns_per_weight([&] { std::memcpy(wq_out.data(), wq.data(), wq.size() * 4); });
  std::printf(
      "{\"isa\": \"%s\", \"experts\": %ld, \"bits\": %d, \"rank\": %d, \"cpu_ns_per_weight\": {\"row_loop\": %.3f, "
      "\"unpack\": %.3f, \"delta\": %.3f, \"dequant_bf16\": %.3f, \"minmax_quantize\": %.3f, \"pack\": %.3f, "
      "\"memcpy_codes\": %.3f}, \"wall_ns_per_weight\": {\"row_loop_1t\": %.3f, \"row_loop_2t\": %.3f}, "
      "\"thread_scaling_1_to_2\": %.2f}\n",
      REQNOISE_STR(REQNOISE_ISA), long(E), bits, rank, whole1, unpack, delta, dequant, quant, pack, copy, whole1_wall,
      whole2, whole1_wall / whole2);
}
