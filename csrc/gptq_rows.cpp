// The calibrated fuse's column loop over a tile of rows (see gptq_kernel.h for the method). Compiled once per
// instruction-set level, like fuse_kernel.cpp; REQNOISE_ISA names the copy. No copy calls an out-of-line
// library template (std::min, std::vector), so the linker never merges code across the copies.
#include <cstring>
#include <type_traits>

#include "affine_codec.h"
#include "fp_codec.h"
#include "gptq_kernel.h"

namespace reqnoise::REQNOISE_ISA {
namespace {

// A group's fixed grid as the column loop sees it: the code a value rounds to, and the error of rounding the
// target to a code, which the loop pushes onto the columns not yet rounded. A target already on the grid
// rounds to its own code with zero error in every mode, so a zero delta returns the codes bit for bit.
struct AffineGrid {
  float scale, bias, n_bins;

  // keep-grid's encode_group, one value: nearest code on the grid, clamped to it; a zero step keeps the code.
  float encode(float x, float old_code) const {
    if (scale == 0.0f) return old_code;
    float v = (x - bias) / scale;
    v = v < 0.0f ? 0.0f : v;
    v = n_bins < v ? n_bins : v;
    return rint_small(v);
  }
  // Against the float32 dequantization keep-grid forms its target with.
  float error(float x, float code) const { return x - (code * scale + bias); }
};

// mxfp4 / nvfp4 / mxfp8: the group's stored e8m0 or e4m3 scale, codes through the E2M1 or E4M3 value table.
struct FpGrid {
  int mode;
  float scale;

  // keep-grid's rule, one value (fp_codec.h fp_encode_keep).
  float encode(float x, float old_code) const { return float(fp_encode_keep(mode, x, scale, uint32_t(old_code))); }
  // A code whose value times the scale is not finite (a NaN code, an infinite scale) is kept and passes no
  // error on; a zero scale keeps its codes too, and its group's error is left to the other columns.
  float error(float x, float code) const {
    const float v = code_value(mode, uint32_t(code)) * scale;
    return v - v == 0.0f ? x - v : 0.0f;
  }
};

// The target row W_hat + delta, with keep-grid's arithmetic (fuse_kernel.cpp, fp_kernel.cpp): float32 q*s+b
// (affine) or code value * scale (fp), the delta summed over the rank in order from the float32-rounded
// scale*b[k], DoRA's row factor from a float64 norm.
template <typename Rows>
void target_row(const GptqSpec& spec, int64_t in_dim, const Rows& rows, int64_t row, const float* a, const float* b,
                const float* mag, const float* q, float* delta, float* w) {
  rows.dequantize(row, in_dim, q, w);
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

// The grids of an affine stack: scales and biases [rows, in/g] in T.
template <typename T>
struct AffineRows {
  const T* scales;
  const T* biases;
  int64_t n_groups;
  int g, bits;

  AffineGrid grid(int64_t row, int64_t col) const {
    const int64_t gi = row * n_groups + col / g;
    return {load_value(scales + gi), load_value(biases + gi), float((1 << bits) - 1)};
  }
  void dequantize(int64_t row, int64_t in_dim, const float* q, float* w) const {
    for (int64_t gi = 0; gi < in_dim / g; ++gi) {
      const float sc = load_value(scales + row * n_groups + gi), bi = load_value(biases + row * n_groups + gi);
      for (int j = 0; j < g; ++j) w[gi * g + j] = q[gi * g + j] * sc + bi;
    }
  }
};

// The grids of an fp stack: uint8 scales [rows, in/g].
struct FpRows {
  const uint8_t* scales;
  int64_t n_groups;
  int g, mode;

  FpGrid grid(int64_t row, int64_t col) const { return {mode, scale_value(mode, scales[row * n_groups + col / g])}; }
  void dequantize(int64_t row, int64_t in_dim, const float* q, float* w) const {
    for (int64_t gi = 0; gi < in_dim / g; ++gi) {
      const float sc = scale_value(mode, scales[row * n_groups + gi]);
      for (int j = 0; j < g; ++j) w[gi * g + j] = code_value(mode, uint32_t(q[gi * g + j])) * sc;
    }
  }
};

// The lazy batch's vector: 8 lanes where registers hold them (AVX2, or two NEON registers), 4 on SSE2, where
// GCC would otherwise spill each broadcast of an 8-lane vector through the stack.
#if defined(__AVX__) || defined(__aarch64__)
typedef v8f vlazy;
#else
typedef float vlazy __attribute__((vector_size(16)));
#endif
constexpr int kLanes = sizeof(vlazy) / sizeof(float);
constexpr int kStrip = 16;              // columns per register tile
constexpr int kVecs = kStrip / kLanes;  // vectors per row of the register tile

// The lazy batch for RG rows and the 16 columns [j, j + 16): acc = acc + e_i * U[i, j] over the block's columns
// i in order (from zero, which adds exactly), then w = w - acc. The RG x 16 sums stay in registers while i runs,
// so each load of U serves RG rows; every element still sees the oracle's order of operations exactly.
template <int RG>
inline void lazy_cols16(const float* __restrict u, int64_t ld, int64_t nb, const float* __restrict err, int64_t err_ld,
                        float* __restrict w, int64_t w_ld) {
  vlazy acc[RG][kVecs];
  for (int r = 0; r < RG; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = vlazy{};
  }
  for (int64_t k = 0; k < nb; ++k) {
    vlazy uv[kVecs];
    for (int v = 0; v < kVecs; ++v) std::memcpy(&uv[v], u + k * ld + v * kLanes, sizeof(vlazy));
#pragma GCC unroll 8
    for (int r = 0; r < RG; ++r) {
      const vlazy e = vlazy{} + err[r * err_ld + k];
      for (int v = 0; v < kVecs; ++v) acc[r][v] = acc[r][v] + e * uv[v];
    }
  }
  for (int r = 0; r < RG; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      vlazy x;
      std::memcpy(&x, w + r * w_ld + v * kLanes, sizeof(vlazy));
      x = x - acc[r][v];
      std::memcpy(w + r * w_ld + v * kLanes, &x, sizeof(vlazy));
    }
  }
}

template <int RG>
inline void lazy_col1(const float* __restrict u, int64_t ld, int64_t nb, const float* __restrict err, int64_t err_ld,
                      float* __restrict w, int64_t w_ld) {
  for (int r = 0; r < RG; ++r) {
    float acc = 0.0f;
    for (int64_t k = 0; k < nb; ++k) acc = acc + err[r * err_ld + k] * u[k * ld];
    w[r * w_ld] = w[r * w_ld] - acc;
  }
}

// Rows per register tile of the lazy batch: 4 x 16 columns is 8 accumulators on AVX2 (16 registers), 16 on
// NEON (32) and on SSE2 (16: tight, but no spill in the loop).
constexpr int kRowGroup = 4;

// Rows [0, nr) of the scratch: their columns [b1, in_dim) receive the errors of columns [b0, b1).
inline void lazy_update(const float* U, int64_t in_dim, int64_t b0, int64_t b1, int nr, const float* err,
                        int64_t err_ld, float* w) {
  const float* ub = U + b0 * in_dim;
  const int64_t nb = b1 - b0;
  auto groups = [&](int64_t j, auto cols16) {
    int r = 0;
    for (; r + kRowGroup <= nr; r += kRowGroup) cols16(std::integral_constant<int, kRowGroup>{}, r, j);
    switch (nr - r) {
      case 3:
        return cols16(std::integral_constant<int, 3>{}, r, j);
      case 2:
        return cols16(std::integral_constant<int, 2>{}, r, j);
      case 1:
        return cols16(std::integral_constant<int, 1>{}, r, j);
      default:
        return;
    }
  };
  int64_t j = b1;
  // Column strips outermost: a strip of U (nb x 16 floats) stays in L1 while every row group of the tile uses it.
  for (; j + kStrip <= in_dim; j += kStrip) {
    groups(j, [&](auto rg, int r, int64_t jj) {
      lazy_cols16<decltype(rg)::value>(ub + jj, in_dim, nb, err + r * err_ld, err_ld, w + r * in_dim + jj, in_dim);
    });
  }
  for (; j < in_dim; ++j) {
    groups(j, [&](auto rg, int r, int64_t jj) {
      lazy_col1<decltype(rg)::value>(ub + jj, in_dim, nb, err + r * err_ld, err_ld, w + r * in_dim + jj, in_dim);
    });
  }
}

}  // namespace

namespace {

template <typename Rows>
void tile(const GptqSpec& spec, int64_t out_dim, int64_t in_dim, int64_t e, int64_t r0, int64_t r1, const Rows& rows,
          const GptqBuffers<float>& buf, const GptqScratch& s) {
  const int code_bits = spec.mode == kAffine ? spec.bits : (spec.mode == kMxfp8 ? 8 : 4);
  const int64_t words = in_dim * code_bits / 32;
  const int nr = int(r1 - r0), block = spec.block;
  for (int r = 0; r < nr; ++r) {
    const int64_t row = e * out_dim + r0 + r;
    float* q = s.q + r * in_dim;
    unpack_codes(code_bits, buf.wq + row * words, in_dim, q);
    target_row(spec, in_dim, rows, row, spec.rank ? buf.A + e * spec.rank * in_dim : nullptr,
               spec.rank ? buf.B + row * spec.rank : nullptr, spec.dora ? buf.mag + row : nullptr, q, s.delta,
               s.w + r * in_dim);
  }

  if (buf.feedback[e]) {
    const float* U = buf.U + e * in_dim * in_dim;
    for (int64_t b0 = 0; b0 < in_dim; b0 += block) {
      const int64_t b1 = b0 + block < in_dim ? b0 + block : in_dim;
      // Inside the block: round a column, push its error onto the block's later columns at once.
      for (int64_t i = b0; i < b1; ++i) {
        const float* ui = U + i * in_dim;
        for (int r = 0; r < nr; ++r) {
          float* w = s.w + r * in_dim;
          float* q = s.q + r * in_dim;
          const auto gr = rows.grid(e * out_dim + r0 + r, i);
          const float c = gr.encode(w[i], q[i]);
          q[i] = c;
          const float ei = gr.error(w[i], c) / ui[i];
          s.err[r * block + (i - b0)] = ei;
          // A column on its grid has exactly zero error, and w - 0*U == w for the codes (a zero's sign cannot
          // change a code), so skipping it changes no byte.
          if (ei == 0.0f) continue;
          for (int64_t j = i + 1; j < b1; ++j) w[j] = w[j] - ei * ui[j];
        }
      }
      // Lazy batch: the block's errors reach the remaining columns as one sum per column, taken over the
      // block's columns in order (acc = acc + e_i * U[i, j]), then subtracted once.
      if (b1 < in_dim) lazy_update(U, in_dim, b0, b1, nr, s.err, block, s.w);
    }
  } else {
    // Too few calibration tokens for this expert: nearest code on the fixed grid, i.e. keep-grid.
    for (int r = 0; r < nr; ++r) {
      float* w = s.w + r * in_dim;
      float* q = s.q + r * in_dim;
      for (int64_t i = 0; i < in_dim; ++i) q[i] = rows.grid(e * out_dim + r0 + r, i).encode(w[i], q[i]);
    }
  }

  for (int r = 0; r < nr; ++r) {
    const float* q = s.q + r * in_dim;
    for (int64_t i = 0; i < in_dim; ++i) s.codes[i] = static_cast<uint32_t>(q[i]);
    pack_codes(code_bits, s.codes, in_dim, buf.wq_out + (e * out_dim + r0 + r) * words);
  }
}

}  // namespace

template <typename T>
void gptq_tile(const GptqSpec& spec, int64_t out_dim, int64_t in_dim, int64_t e, int64_t r0, int64_t r1,
               const GptqBuffers<T>& buf, const GptqScratch& s) {
  const int64_t n_groups = in_dim / spec.group_size;
  const GptqBuffers<float> rest{buf.wq, nullptr, nullptr, buf.A, buf.B, buf.mag, buf.U, buf.feedback, buf.wq_out};
  if (spec.mode == kAffine) {
    tile(spec, out_dim, in_dim, e, r0, r1, AffineRows<T>{buf.scales, buf.biases, n_groups, spec.group_size, spec.bits},
         rest, s);
  } else {
    tile(spec, out_dim, in_dim, e, r0, r1, FpRows{buf.scales8, n_groups, spec.group_size, spec.mode}, rest, s);
  }
}

// Vectors of T for the factorisation's register tiles: 32 bytes where registers hold them, 16 on SSE2.
#if defined(__AVX__) || defined(__aarch64__)
constexpr int kFactorVecBytes = 32;
#else
constexpr int kFactorVecBytes = 16;
#endif
template <typename T>
struct FactorVec {
  typedef T type __attribute__((vector_size(kFactorVecBytes)));
  static constexpr int lanes = kFactorVecBytes / sizeof(T);
};

enum class Apply { kSubtract, kStore };

// For RG rows r and the 2 * lanes columns [j, j + S): acc_r = sum_{k < nk} x[r, k] * y[k, j..] summed over k in
// order from zero, then out_r = out_r - acc_r (kSubtract) or out_r = acc_r (kStore). x is row-major with
// leading dimension xld, y with yld, out with old. The sums stay in registers while k runs.
template <typename T, int RG, Apply OP>
inline void panel_tile(const T* __restrict x, int64_t xld, const T* __restrict y, int64_t yld, int64_t nk,
                       T* __restrict out, int64_t old) {
  typedef typename FactorVec<T>::type V;
  constexpr int L = FactorVec<T>::lanes;
  V acc[RG][2];
  for (int r = 0; r < RG; ++r) acc[r][0] = acc[r][1] = V{};
  for (int64_t k = 0; k < nk; ++k) {
    V y0, y1;
    std::memcpy(&y0, y + k * yld, sizeof(V));
    std::memcpy(&y1, y + k * yld + L, sizeof(V));
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
      const V xr = V{} + x[r * xld + k];
      acc[r][0] = acc[r][0] + xr * y0;
      acc[r][1] = acc[r][1] + xr * y1;
    }
  }
  for (int r = 0; r < RG; ++r) {
    for (int v = 0; v < 2; ++v) {
      V o = acc[r][v];
      if constexpr (OP == Apply::kSubtract) {
        std::memcpy(&o, out + r * old + v * L, sizeof(V));
        o = o - acc[r][v];
      }
      std::memcpy(out + r * old + v * L, &o, sizeof(V));
    }
  }
}

// The same sums for one column, one row at a time (the tail of a row that is not a whole tile).
template <typename T, Apply OP>
inline void panel_col(const T* __restrict x, const T* __restrict y, int64_t yld, int64_t nk, T* __restrict out) {
  T acc = T(0);
  for (int64_t k = 0; k < nk; ++k) acc = acc + x[k] * y[k * yld];
  *out = OP == Apply::kSubtract ? *out - acc : acc;
}

// Rows [i0, i1) of out, columns [col_begin(i), col_end): out[i, j] op= sum_k x[i, k] * y[k, j], k < nk(i) (see
// panel_tile). Rows go in groups of 4 from a column a multiple of the tile width at or below every row's start;
// entries left of a row's own start are computed too and must be ones nobody reads (a lower triangle).
template <typename T, Apply OP, typename ColBegin, typename NK>
void panel_product(const T* x, int64_t xld, const T* y, int64_t yld, T* out, int64_t old, int64_t i0, int64_t i1,
                   ColBegin col_begin, int64_t col_end, NK nk) {
  constexpr int S = 2 * FactorVec<T>::lanes;
  for (int64_t i = i0; i < i1;) {
    const int64_t rows = i1 - i < 4 ? i1 - i : 4;
    const int64_t j_first = col_begin(i) / S * S;
    int64_t j = j_first;
    for (; j + S <= col_end; j += S) {
      const int64_t kk = nk(j + S);
      const T* xi = x + i * xld;
      T* oi = out + i * old + j;
      switch (rows) {
        case 4:
          panel_tile<T, 4, OP>(xi, xld, y + j, yld, kk, oi, old);
          break;
        case 3:
          panel_tile<T, 3, OP>(xi, xld, y + j, yld, kk, oi, old);
          break;
        case 2:
          panel_tile<T, 2, OP>(xi, xld, y + j, yld, kk, oi, old);
          break;
        default:
          panel_tile<T, 1, OP>(xi, xld, y + j, yld, kk, oi, old);
      }
    }
    for (; j < col_end; ++j) {
      for (int64_t r = 0; r < rows; ++r)
        panel_col<T, OP>(x + (i + r) * xld, y + j, yld, nk(j + 1), out + (i + r) * old + j);
    }
    i += rows;
  }
}

// U, upper triangular with U^T U = (H + damping I)^-1, in T arithmetic on the working matrix a [n, n] (a may be
// u itself when T is float); c is scratch of kFactorPanel * n. H = R R^T with R upper (a Cholesky factorisation
// run from the last column back), then U = R^-1: the U of GPTQ's Cholesky -> inverse -> Cholesky, from two
// n^3/6 passes, each blocked by panels of kFactorPanel columns so that a pass over the matrix serves a panel
// rather than one column. Every sum has a fixed order, so the bytes depend on nothing but the inputs. Fails
// when a pivot falls below min_pivot times its diagonal entry (that many leading bits cancelled: the factor
// is no longer accurate in T) or is not positive and finite.
template <typename T>
bool inverse_hessian_factor(const float* h, int64_t n, double damping, double min_pivot, float* u, T* a, T* c) {
  constexpr int64_t P = kFactorPanel;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < n; ++k) a[i * n + k] = T(h[i * n + k]);
    a[i * n + i] = T(double(h[i * n + i]) + damping);
  }
  // Cholesky, panels from the right. Inside a panel, column by column: its pivot, its column of R, and the rank-1
  // update of the panel's remaining columns; then one rank-P update of the leading block with the panel's
  // columns of R (row i's are contiguous in a; their transpose goes to c so that the update reads rows).
  for (int64_t j1 = n; j1 > 0;) {
    const int64_t j0 = j1 > P ? j1 - P : 0;
    for (int64_t j = j1 - 1; j >= j0; --j) {
      const T d = a[j * n + j];
      if (!(d > T(0)) || !(d < T(__builtin_huge_val()))) return false;
      if (double(d) < min_pivot * (double(h[j * n + j]) + damping)) return false;
      const T r = __builtin_sqrt(d);
      a[j * n + j] = r;
      for (int64_t i = 0; i < j; ++i) a[i * n + j] = a[i * n + j] / r;
      T col[P];  // R[k, j] for the panel's rows k in [j0, j)
      for (int64_t k = j0; k < j; ++k) col[k - j0] = a[k * n + j];
      for (int64_t i = 0; i < j; ++i) {
        const T ci = a[i * n + j];
        T* __restrict ai = a + i * n;
        for (int64_t k = i > j0 ? i : j0; k < j; ++k) ai[k] = ai[k] - ci * col[k - j0];
      }
    }
    if (j0 > 0) {
      const int64_t w = j1 - j0;
      for (int64_t m = 0; m < w; ++m) {
        for (int64_t k = 0; k < j0; ++k) c[m * n + k] = a[k * n + j0 + m];
      }
      panel_product<T, Apply::kSubtract>(
          a + j0, n, c, n, a, n, 0, j0, [](int64_t i) { return i; }, j0, [w](int64_t) { return w; });
    }
    j1 = j0;
  }
  // U = R^-1, panels of rows from the bottom. Row i: U[i, j] = -(sum_{k > i} R[i, k] U[k, j]) / R[i, i]. The
  // terms from rows below the panel (final U rows, lower triangles zeroed) come first, as one product into c;
  // then the panel's own rows, bottom up, in increasing k.
  for (int64_t i1 = n; i1 > 0;) {
    const int64_t i0 = i1 > P ? i1 - P : 0;
    T* cb = c - i0 * n;  // c holds rows [i0, i1) of the sums
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = i + 1; j < i1; ++j) cb[i * n + j] = T(0);
    }
    if (i1 < n) {
      // U[k, j] = 0 for j < k: the sum for column j stops at row k = j, and columns left of i1 sum to zero
      panel_product<T, Apply::kStore>(
          a + i1, n, a + i1 * n, n, cb, n, i0, i1, [i1](int64_t) { return i1; }, n,
          [i1, n](int64_t jend) { return (jend < n ? jend : n) - i1; });
    }
    for (int64_t i = i1 - 1; i >= i0; --i) {
      T* __restrict ci = cb + i * n;
      for (int64_t k = i + 1; k < i1; ++k) {
        const T rik = a[i * n + k];
        const T* __restrict uk = a + k * n;
        for (int64_t j = k; j < n; ++j) ci[j] = ci[j] + rik * uk[j];
      }
      const T inv = T(1) / a[i * n + i];
      a[i * n + i] = inv;
      for (int64_t j = i + 1; j < n; ++j) a[i * n + j] = -(ci[j] * inv);
      for (int64_t j = 0; j < i; ++j) a[i * n + j] = T(0);
    }
    i1 = i0;
  }
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < n; ++k) {
      const float v = float(a[i * n + k]);
      u[i * n + k] = v;
      ok = ok && v - v == 0.0f;  // finite
    }
    ok = ok && u[i * n + i] > 0.0f;
  }
  return ok;
}

template bool inverse_hessian_factor<float>(const float*, int64_t, double, double, float*, float*, float*);
template bool inverse_hessian_factor<double>(const float*, int64_t, double, double, float*, double*, double*);

#define REQNOISE_INSTANTIATE(T)                                                                                   \
  template void gptq_tile<T>(const GptqSpec&, int64_t, int64_t, int64_t, int64_t, int64_t, const GptqBuffers<T>&, \
                             const GptqScratch&);
REQNOISE_INSTANTIATE(float)
REQNOISE_INSTANTIATE(mlx::core::float16_t)
REQNOISE_INSTANTIATE(mlx::core::bfloat16_t)
#undef REQNOISE_INSTANTIATE

}  // namespace reqnoise::REQNOISE_ISA
