// nvfp4's pass 3 takes each quotient as x * fl(1/p) instead of x / p: for every bfloat16 value x and every
// positive E4M3 scale p, the vector encoder's code of x * fl(1/p) must be the code that the op chain gives
// (the E2M1 code of round_bf16(x / p), fp_codec.h's scalar encoder), or the lane must be flagged far, which
// sends its group to the exact per-value form. Negative scales never occur (the scale is amax / 6 >= 0) and a
// zero one is redone exactly by pass 2. Prints one JSON object of counts.
// Built and run by tests/test_kernel_fp.py with the kernel copies' flags.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "fp_kernel.cpp"

namespace k = reqnoise::REQNOISE_ISA;
using bf16 = mlx::core::bfloat16_t;

int main() {
  uint64_t checked = 0, wrong = 0, far_missed = 0, flagged = 0;
  for (uint32_t pb = 1; pb < 0x7F; ++pb) {
    const float p = k::round_to<bf16>(k::e4m3_value(pb));
    const float mult = 1.0f / p;
    for (uint32_t xb = 0; xb < 0x10000; xb += 8) {
      k::v8f x, q;
      for (int i = 0; i < 8; ++i) {
        const uint32_t u = (xb + uint32_t(i)) << 16;
        std::memcpy(&x[i], &u, 4);
        if (x[i] != x[i] || __builtin_fabsf(x[i]) == __builtin_inff()) x[i] = 0.0f;  // finite values only
      }
      q = x * mult;
      for (int i = 0; i < 8; ++i) {
        k::v8i far = {};
        k::v8f one = k::v8f{} + q[i];
        const uint32_t got = k::fp_e2m1_encode_v<true, true>(one, far)[0];
        const bool is_far = k::fp_is_far(far);
        const float v = k::round_to<bf16>(x[i] / p);
        const uint32_t want = k::e2m1_encode<float>(v);
        ++checked;
        if (is_far) {
          ++flagged;
        } else if (k::e2m1_is_far(v)) {
          ++far_missed;
        } else if (got != want) {
          ++wrong;
        }
      }
    }
  }
  std::printf("{\"checked\": %llu, \"wrong\": %llu, \"far_missed\": %llu, \"flagged\": %llu}\n",
              (unsigned long long)checked, (unsigned long long)wrong, (unsigned long long)far_missed,
              (unsigned long long)flagged);
}
