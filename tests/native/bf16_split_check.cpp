// Every float32 bit pattern through the kernel's round_bf16_sum_v (Veltkamp's split) against MLX's own
// float -> bfloat16 conversion (mlx/types/bf16.h), eight patterns at a time. Prints one JSON object of counts:
// the split must equal MLX on every normal value below 2^111 and on every subnormal that is a bfloat16 number
// (a multiple of 2^-133, which is all pass 1 ever rounds this way: products q * s and sums of two bfloat16
// values); from 2^111 up it may differ only by a non-finite result, which pass 1 sends down the exact path.
// Built and run by tests/test_kernel_vectorize.py with the kernel copies' flags.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "fuse_kernel.cpp"

namespace k = reqnoise::REQNOISE_ISA;

int main() {
  uint64_t checked = 0, bad_normal = 0, bad_grid_subnormal = 0, bad_large_finite = 0, large_non_finite = 0;
  for (uint64_t base = 0; base < (uint64_t(1) << 32); base += 8) {
    k::v8u u;
    for (int i = 0; i < 8; ++i) u[i] = uint32_t(base + i);
    k::v8f x;
    std::memcpy(&x, &u, sizeof(x));
    const k::v8f y = k::round_bf16_sum_v(x);
    k::v8u yu;
    std::memcpy(&yu, &y, sizeof(yu));
    for (int i = 0; i < 8; ++i) {
      const uint32_t e = (u[i] >> 23) & 0xFFu;
      if (e == 0xFFu) continue;  // inf and NaN never reach the split: the exact path handles them
      ++checked;
      float xi;
      std::memcpy(&xi, &u[i], 4);
      const uint32_t want = uint32_t(mlx::core::bfloat16_t(xi).bits_) << 16;
      if (yu[i] == want) continue;
      if (e == 0) {
        bad_grid_subnormal += (u[i] & 0xFFFFu) == 0;  // subnormals off the bfloat16 grid may differ
      } else if (e < 127 + 111) {
        ++bad_normal;
      } else if (((yu[i] >> 23) & 0xFFu) == 0xFFu) {
        ++large_non_finite;
      } else {
        ++bad_large_finite;
      }
    }
  }
  std::printf(
      "{\"checked\": %llu, \"bad_normal\": %llu, \"bad_grid_subnormal\": %llu, \"bad_large_finite\": %llu, "
      "\"large_non_finite\": %llu}\n",
      (unsigned long long)checked, (unsigned long long)bad_normal, (unsigned long long)bad_grid_subnormal,
      (unsigned long long)bad_large_finite, (unsigned long long)large_non_finite);
}
