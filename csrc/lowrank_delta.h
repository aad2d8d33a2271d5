// The low-rank delta scale * B @ A for a tile of rows of one expert: shared by the affine row kernel
// (fuse_kernel.cpp) and the floating-point one (fp_kernel.cpp), which must sum in the same order.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "affine_codec.h"
#include "fuse_kernel.h"

namespace reqnoise::REQNOISE_ISA {
// Internal to each including file: fuse_kernel.cpp and fp_kernel.cpp are compiled with different flags
// (CMakeLists.txt), so the linker must not pick one file's copy for the other.
namespace {

// Rows of one expert share A: the delta is computed for a tile of up to kTile rows at once, so each element
// of A is loaded once per tile instead of once per row (A is [rank, in] floats: 48 KiB at rank 16, in 768,
// more than L1 holds, so per-row streaming would re-read it from L2 every row). Each tile row's column block
// is one chain of dependent adds: 8 rows in the 16-lane copy keep 8 chains in flight, as 4 rows of two 8-lane
// vectors do elsewhere (at rank 16, 4 rows of 16 lanes: 0.24 -> 0.19 CPU ns/weight with 8).
constexpr int kTile = kLanes == 16 ? 8 : 4;

// Scaled B values a tile keeps per row: the rank when it is a compile-time constant R, else up to 256 (ranks
// above take the plain form after the blocks).
template <int R>
constexpr int kMaxRank = R ? R : 256;

// One column block of kLanes * V values of a tile's deltas (sb: the tile's scaled B rows, r of them).
template <int TILE, int R, int V>
inline void delta_block(const float (*sb)[kMaxRank<R>], int r, const float* __restrict a, int64_t n, int64_t j0,
                        float* __restrict delta) {
  // TILE * V partial sums in registers (AVX2 has 16, NEON and AVX-512 32).
  vNf acc[TILE][V];
  vNf av[V];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) std::memcpy(&av[v], a + j0 + kLanes * v, sizeof(vNf));
#pragma GCC unroll 8
  for (int t = 0; t < TILE; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[t][v] = sb[t][0] * av[v];
  }
#pragma GCC unroll 16
  for (int k = 1; k < r; ++k) {
    const float* ak = a + int64_t(k) * n + j0;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) std::memcpy(&av[v], ak + kLanes * v, sizeof(vNf));
#pragma GCC unroll 8
    for (int t = 0; t < TILE; ++t) {
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[t][v] = acc[t][v] + sb[t][k] * av[v];
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TILE; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) std::memcpy(delta + t * n + j0 + kLanes * v, &acc[t][v], sizeof(vNf));
  }
}

// delta[t][j] = sum_k (scale * b_t[k]) * A[k, j] for the tile's rows t, summed in k order in float32 (as a
// rank-r matmul of the pre-scaled B would); each scaled b[k] is rounded to float32 first, like MLX's
// `scale * lora_b`. Columns go in blocks whose TILE x block partial sums stay in registers while k runs.
// The order of operations per element is the same for any tile size, block and rank form, so none changes
// a bit. R > 0: the rank as a compile-time constant, so the k loop unrolls and the sums never leave
// registers; R = 0: any rank, read at run time.
template <int TILE, int R>
inline void delta_tile_rank(const FuseSpec& spec, const float* __restrict a, const float* __restrict b, int64_t n,
                            float* __restrict delta) {
  constexpr int max_rank = kMaxRank<R>;
  float sb[TILE][max_rank];
  const int r = R ? R : (spec.rank < max_rank ? spec.rank : max_rank);
  for (int t = 0; t < TILE; ++t) {
    for (int k = 0; k < r; ++k) sb[t][k] = spec.scale * b[t * spec.rank + k];
  }
  // Rows are multiples of 16 values (32 in affine modes). With 16 lanes, blocks of 32 columns: each B
  // broadcast then serves two vectors (blocks of 16 took 9 loads per 8 multiplies at rank 16: load-bound).
  // With 8 lanes, blocks of 16 (AVX2's 16 registers hold 4 rows x 2 vectors of sums, not x 4).
  constexpr int kCols = kLanes == 16 ? 32 : 16;
  int64_t j0 = 0;
  for (; j0 + kCols <= n; j0 += kCols) delta_block<TILE, R, kCols / kLanes>(sb, r, a, n, j0, delta);
  if (j0 < n) delta_block<TILE, R, 16 / kLanes>(sb, r, a, n, j0, delta);
  if constexpr (R == 0) {
    for (int k = max_rank; k < spec.rank; ++k) {  // ranks above 256: the plain form, same order of operations
      const float* ak = a + int64_t(k) * n;
      for (int t = 0; t < TILE; ++t) {
        const float s = spec.scale * b[t * spec.rank + k];
        float* d = delta + t * n;
        for (int64_t j = 0; j < n; ++j) d[j] = d[j] + s * ak[j];
      }
    }
  }
}

// Ranks up to 4 take the unrolled form (3-bit rank 2: delta 0.12 -> 0.07 CPU ns/weight). At 8 and 16 GCC
// hoists every broadcast of the scaled B out of the column loop and spills them, which was slower than the
// run-time loop, so larger ranks take that.
template <int TILE>
inline void delta_tile(const FuseSpec& spec, const float* __restrict a, const float* __restrict b, int64_t n,
                       float* __restrict delta) {
  switch (spec.rank) {
    case 1:
      return delta_tile_rank<TILE, 1>(spec, a, b, n, delta);
    case 2:
      return delta_tile_rank<TILE, 2>(spec, a, b, n, delta);
    case 3:
      return delta_tile_rank<TILE, 3>(spec, a, b, n, delta);
    case 4:
      return delta_tile_rank<TILE, 4>(spec, a, b, n, delta);
    default:
      return delta_tile_rank<TILE, 0>(spec, a, b, n, delta);
  }
}

// One row's delta: the tile form with a tile of one (the rows left over at the end of an expert or a block).
inline void delta_row(const FuseSpec& spec, const float* a, const float* b, int64_t n, float* delta) {
  delta_tile<1>(spec, a, b, n, delta);
}

// Frees a malloc'd scratch buffer on every way out of a scope. Not std::unique_ptr, whose out-of-line template
// code could be shared between the instruction-set copies.
struct FreeOnExit {
  void* p;
  ~FreeOnExit() { std::free(p); }
};

// Rows [row_begin, row_end) of a stack of experts of out_dim rows each, in tiles of up to kTile rows that
// never cross an expert (a tile's rows share A): each tile's deltas at once, then row_fn(row, a, delta) for
// each of its rows (a: its expert's [rank, n] A; delta: its n floats of scale * B @ A; both nullptr at rank 0).
template <typename F>
inline void for_each_row(const FuseSpec& spec, int64_t out_dim, int64_t n, int64_t row_begin, int64_t row_end,
                         const float* A, const float* B, F&& row_fn) {
  const int r = spec.rank;
  float* tile = r ? static_cast<float*>(std::malloc(sizeof(float) * kTile * n)) : nullptr;  // kTile rows of deltas
  if (r && !tile) throw std::bad_alloc();
  const FreeOnExit hold{tile};
  for (int64_t row0 = row_begin; row0 < row_end;) {
    const int64_t e = row0 / out_dim;
    const int64_t expert_end = (e + 1) * out_dim;
    int64_t tile_end = row0 + kTile;
    tile_end = tile_end < row_end ? tile_end : row_end;
    tile_end = tile_end < expert_end ? tile_end : expert_end;
    const float* a = r ? A + e * r * n : nullptr;
    if (r) {
      if (tile_end - row0 == kTile) {
        delta_tile<kTile>(spec, a, B + row0 * r, n, tile);
      } else {
        for (int64_t row = row0; row < tile_end; ++row) delta_row(spec, a, B + row * r, n, tile + (row - row0) * n);
      }
    }
    for (int64_t row = row0; row < tile_end; ++row) row_fn(row, a, r ? tile + (row - row0) * n : nullptr);
    row0 = tile_end;
  }
}

}  // namespace
}  // namespace reqnoise::REQNOISE_ISA
