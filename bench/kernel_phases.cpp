// Per-phase profile of the row kernels (a bench build, not part of the extension): the affine kernel
// (fuse_kernel.cpp) or the floating-point one (fp_kernel.cpp) on a [E, 2048, 768] bfloat16 stack.
//
// Includes the kernels' translation units so that their internal helpers can be timed one phase at a time
// over the same rows; each phase runs over every row before the next starts, so the timings are of each phase
// in isolation (their sum is an upper bound on the fused row loop, which keeps a row in L1 between phases).
// Also times the whole row loop at 1 and 2 threads. Prints one JSON object. The phases unpack ... pack are the
// general row form's (float16/float32 scales, keep-grid, DoRA, and for the fp modes the cross-mode rows); bfloat16
// fresh rows (affine, or an fp mode into itself) take the three-pass form, timed as pass1_* and pass23_*.
//
//   g++ -std=c++20 -O3 -ffp-contract=off -fno-math-errno -fno-trapping-math [-march=x86-64-v3] \
//       -DREQNOISE_ISA=v3 -I csrc -I $(python -m mlx --cmake-dir)/include bench/kernel_phases.cpp -o /tmp/kp
//   /tmp/kp [mode=affine|mxfp4|nvfp4|mxfp8] [experts=16] [bits=3] [rank=16] [reps=5]
//   /tmp/kp affine 2 3 2 1 hash    # the row loop once; prints a hash of the output bytes (compare ISA builds)
//   /tmp/kp mxfp8 2 8 16 1 loop   # the one-thread row loop once, nothing else (for callgrind:
//   valgrind --tool=callgrind --toggle-collect='*fp_row_range*' /tmp/kp mxfp8 2 8 16 1 loop)
// (-fno-trapping-math is the kernel copies' flag in CMakeLists.txt.)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fuse_kernel.cpp"
#undef REQNOISE_INSTANTIATE
#include "fp_kernel.cpp"

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
  const std::string mode_name = argc > 1 ? argv[1] : "affine";
  const int mode = mode_name == "mxfp4"   ? reqnoise::kMxfp4
                   : mode_name == "nvfp4" ? reqnoise::kNvfp4
                   : mode_name == "mxfp8" ? reqnoise::kMxfp8
                                          : reqnoise::kAffine;
  const bool fp = mode != reqnoise::kAffine;
  const int64_t E = argc > 2 ? atoi(argv[2]) : 16;
  const int bits = fp ? (mode == reqnoise::kMxfp8 ? 8 : 4) : (argc > 3 ? atoi(argv[3]) : 3);
  const int rank = argc > 4 ? atoi(argv[4]) : 16;
  const int reps = argc > 5 ? atoi(argv[5]) : 5;
  const bool loop_only = argc > 6 && std::string(argv[6]) == "loop";
  const int64_t out_dim = 2048, in_dim = 768, g = fp ? k::group_of(mode) : 64;
  const int64_t rows = E * out_dim, words = in_dim * bits / 32, groups = in_dim / g;
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint32_t> wq(rows * words), wq_out(rows * words);
  std::vector<bf16> sc(rows * groups), bi(rows * groups), sc_out(rows * groups), bi_out(rows * groups);
  std::vector<uint8_t> sc8(rows * groups), sc8_out(rows * groups);
  if (fp) {
    // Realistic codes and scales: those of mx.quantize on N(0, 0.02) weights, quantized here by the kernel's
    // own quantizer (its bytes are MLX's; tests/test_kernel_fp.py).
    std::vector<float> w(in_dim);
    std::vector<uint32_t> c(in_dim);
    for (int64_t r = 0; r < rows; ++r) {
      for (auto& x : w) x = k::round_bf16(0.02f * nd(rng));
      uint8_t* b = &sc8[r * groups];
      if (mode == reqnoise::kMxfp4) k::fp_quantize<bf16, reqnoise::kMxfp4>(w.data(), in_dim, c.data(), b);
      if (mode == reqnoise::kNvfp4) k::fp_quantize<bf16, reqnoise::kNvfp4>(w.data(), in_dim, c.data(), b);
      if (mode == reqnoise::kMxfp8) k::fp_quantize<bf16, reqnoise::kMxfp8>(w.data(), in_dim, c.data(), b);
      k::pack_codes(bits, c.data(), in_dim, wq.data() + r * words);
    }
  } else {
    for (auto& x : wq) x = rng();
    for (int64_t i = 0; i < rows * groups; ++i) {
      k::store_value(&sc[i], 0.004f + 0.001f * nd(rng));
      k::store_value(&bi[i], -0.02f + 0.002f * nd(rng));
    }
  }
  std::vector<float> A(E * rank * in_dim), B(rows * rank);
  for (auto& x : A) x = 0.01f * nd(rng);
  for (auto& x : B) x = 0.01f * nd(rng);
  reqnoise::FuseSpec spec;
  spec.bits = spec.out_bits = bits;
  spec.group_size = spec.out_group_size = int(g);
  spec.mode = spec.out_mode = mode;
  spec.rank = rank;
  spec.scale = 2.0f;
  reqnoise::FuseBuffers<bf16> buf{
      wq.data(),     sc.data(),     bi.data(),    rank ? A.data() : nullptr, rank ? B.data() : nullptr, nullptr,
      wq_out.data(), sc_out.data(), bi_out.data()};
  if (fp) {
    buf.scales = buf.biases = buf.scales_out = buf.biases_out = nullptr;
    buf.scales8 = sc8.data();
    buf.scales8_out = sc8_out.data();
  }
  std::vector<float> f(3 * in_dim);
  std::vector<uint32_t> codes(in_dim);
  reqnoise::RowScratch s{f.data(), f.data() + in_dim, f.data() + 2 * in_dim, codes.data()};
  auto row_loop = [&](int64_t begin, int64_t end, const reqnoise::RowScratch& scratch) {
    if (fp) {
      k::fp_row_range<bf16>(spec, out_dim, in_dim, begin, end, buf, scratch);
    } else {
      k::fuse_row_range<bf16>(spec, out_dim, in_dim, begin, end, buf, scratch);
    }
  };
  if (loop_only) {
    row_loop(0, rows, s);
    return 0;
  }
  if (argc > 6 && std::string(argv[6]) == "hash") {
    // The output bytes' FNV-1a hash: equal across ISA builds (x86-64 copies, AArch64 under qemu) means the
    // paths MLX's op chain is not run against here compute the same bytes as the tested one.
    row_loop(0, rows, s);
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](const void* p, size_t n) {
      for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 1099511628211ull;
    };
    mix(wq_out.data(), wq_out.size() * 4);
    if (fp) {
      mix(sc8_out.data(), sc8_out.size());
    } else {
      mix(sc_out.data(), sc_out.size() * sizeof(bf16));
      mix(bi_out.data(), bi_out.size() * sizeof(bf16));
    }
    std::printf("{\"mode\": \"%s\", \"bits\": %d, \"rank\": %d, \"hash\": \"%016llx\"}\n", mode_name.c_str(), bits,
                rank, static_cast<unsigned long long>(h));
    return 0;
  }

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
  const double whole1 = ns_per_weight([&] { row_loop(0, rows, s); });
  const double whole1_wall = ns_per_weight([&] { row_loop(0, rows, s); }, wall_now);
  const double whole2 = ns_per_weight(
      [&] {
        std::thread t([&] {
          std::vector<float> f2(3 * in_dim);
          std::vector<uint32_t> c2(in_dim);
          reqnoise::RowScratch s2{f2.data(), f2.data() + in_dim, f2.data() + 2 * in_dim, c2.data()};
          row_loop(rows / 2, rows, s2);
        });
        row_loop(0, rows / 2, s);
        t.join();
      },
      wall_now);
  // The phases, each alone over all rows (the helpers the row loop calls). The dequantize phase includes
  // adding the (cast) delta, and for the fp modes their unpacking (the unpack phase is affine's); the quantize
  // phase includes the groups' scale choice.
  // -1 (printed null): not a separate phase of this mode's row loop (fp codes are unpacked inside the
  // dequantize phase, E4M3 codes are written as bytes by the quantize phase).
  const double unpack = fp ? -1.0 : ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) k::unpack_codes(bits, wq.data() + r * words, in_dim, s.q);
  });
  std::vector<float> d(k::kTile * in_dim);
  const double delta = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; r += k::kTile)
      k::delta_tile<k::kTile>(spec, A.data() + (r / out_dim) * rank * in_dim, B.data() + r * rank, in_dim, d.data());
  });
  const float* dd = rank ? d.data() : nullptr;
  const double dequant = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) {
      switch (mode) {
        case reqnoise::kMxfp4:
          k::dequantize_fp_row<bf16, reqnoise::kMxfp4>(false, wq.data() + r * words, &sc8[r * groups], dd, in_dim, s.w);
          break;
        case reqnoise::kNvfp4:
          k::dequantize_fp_row<bf16, reqnoise::kNvfp4>(false, wq.data() + r * words, &sc8[r * groups], dd, in_dim, s.w);
          break;
        case reqnoise::kMxfp8:
          k::dequantize_fp_row<bf16, reqnoise::kMxfp8>(false, wq.data() + r * words, &sc8[r * groups], dd, in_dim, s.w);
          break;
        default:
          k::dequantize_row<bf16, 64>(&sc[r * groups], &bi[r * groups], s.q, dd, in_dim, s.w);
      }
    }
  });
  const double quant = ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) {
      switch (mode) {
        case reqnoise::kMxfp4:
          k::fp_quantize<bf16, reqnoise::kMxfp4>(s.w, in_dim, s.codes, &sc8_out[r * groups]);
          break;
        case reqnoise::kNvfp4:
          k::fp_quantize<bf16, reqnoise::kNvfp4>(s.w, in_dim, s.codes, &sc8_out[r * groups]);
          break;
        case reqnoise::kMxfp8:
          k::fp_quantize<bf16, reqnoise::kMxfp8>(s.w, in_dim, reinterpret_cast<uint8_t*>(wq_out.data() + r * words),
                                                 &sc8_out[r * groups]);
          break;
        default:
          for (int64_t gi = 0; gi < groups; ++gi) {
            float so, bo;
            k::quantize_group(s.w + gi * g, int(g), bits, s.codes + gi * g, so, bo);
            k::store_value(&sc_out[r * groups + gi], so);
            k::store_value(&bi_out[r * groups + gi], bo);
          }
      }
    }
  });
  const double pack = mode == reqnoise::kMxfp8 ? -1.0 : ns_per_weight([&] {
    for (int64_t r = 0; r < rows; ++r) k::pack_codes(bits, s.codes, in_dim, wq_out.data() + r * words);
  });
  // The bfloat16 fresh rows' three-pass form (fuse_kernel.cpp, fp_kernel.cpp), each pass alone over every row:
  // pass 1 (unpack, dequantize, delta, block extremes or group maxima) and passes 2+3 (scales, codes, pack).
  double pass1_t = -1.0, pass23_t = -1.0;
  if (fp) {
    std::vector<k::v8u> gm(k::fp_scratch_vectors(groups));
    const auto p1 = k::fp_pass1_for(mode, rank > 0);
    const auto p23 = k::fp_pass23_for(mode, rank > 0);
    pass1_t = ns_per_weight([&] {
      for (int64_t r = 0; r < rows; ++r)
        p1(reinterpret_cast<const uint8_t*>(wq.data() + r * words), &sc8[r * groups], dd, in_dim, s.w, gm.data());
    });
    pass23_t = ns_per_weight([&] {
      for (int64_t r = 0; r < rows; ++r)
        p23(wq.data() + r * words, &sc8[r * groups], dd, s.w, gm.data(), in_dim, s.codes,
            reinterpret_cast<uint8_t*>(wq_out.data() + r * words), &sc8_out[r * groups]);
    });
  } else {
    const int64_t n_sub = in_dim / k::kSub;
    std::vector<k::v8f> ext(2 * n_sub);
    std::vector<uint8_t> special(n_sub);
    const auto p1 = k::pass1_for(bits, int(g), rank > 0);
    const auto p23 = k::pass23_for(bits, int(g));
    pass1_t = ns_per_weight([&] {
      for (int64_t r = 0; r < rows; ++r)
        p1(reinterpret_cast<const uint8_t*>(wq.data() + r * words), &sc[r * groups], &bi[r * groups], dd, in_dim, s.w,
           ext.data(), ext.data() + n_sub, special.data());
    });
    pass23_t = ns_per_weight([&] {
      for (int64_t r = 0; r < rows; ++r)
        p23(s.w, ext.data(), ext.data() + n_sub, false, special.data(), in_dim, s.codes,
            reinterpret_cast<uint8_t*>(wq_out.data() + r * words), &sc_out[r * groups], &bi_out[r * groups]);
    });
  }
  const double copy = ns_per_weight([&] { std::memcpy(wq_out.data(), wq.data(), wq.size() * 4); });
  auto num = [](double x) {
    char b[32];
    std::snprintf(b, sizeof(b), "%.3f", x);
    return x < 0 ? std::string("null") : std::string(b);
  };
  std::printf(
      "{\"isa\": \"%s\", \"mode\": \"%s\", \"experts\": %ld, \"bits\": %d, \"rank\": %d, \"cpu_ns_per_weight\": "
      "{\"row_loop\": %.3f, \"unpack\": %s, \"delta\": %.3f, \"dequant_bf16\": %.3f, \"scale_quantize\": %.3f, "
      "\"pack\": %s, \"pass1_unpack_dequant_delta_extremes\": %s, \"pass23_scales_quantize_pack\": %s, "
      "\"memcpy_codes\": %.3f}, \"wall_ns_per_weight\": {\"row_loop_1t\": %.3f, \"row_loop_2t\": "
      "%.3f}, \"thread_scaling_1_to_2\": %.2f}\n",
      REQNOISE_STR(REQNOISE_ISA), mode_name.c_str(), long(E), bits, rank, whole1, num(unpack).c_str(), delta, dequant,
      quant, num(pack).c_str(), num(pass1_t).c_str(), num(pass23_t).c_str(), copy, whole1_wall, whole2,
      whole1_wall / whole2);
}
