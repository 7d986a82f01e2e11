// Products with int4 weights on CPUs that have AVX512-BF16: decoding, and with AMX prefills too.
//
// Same weights as PyTorch's `_weight_int4pack_mm_for_cpu`: its packed layout (per block of 64
// output rows, for each input column k, 32 bytes; byte j holds row j in its low nibble and row
// j + 32 in its high one) and format (w = (q - 8) * scale + zero, a bf16 scale and zero per
// group of inputs and output row), bf16 activations, fp32 sums. What differs is the inner loop.
// PyTorch's kernel turns every nibble into an fp32 number before its FMAs, and on a few cores
// that unpacking, not memory, sets the speed of a decode step. Here two columns' nibbles become
// a bf16 pair per row with four integer instructions per 32 weights, and the pairs meet the
// activations in `vdpbf16ps` (32 multiply-adds an instruction) or, with AMX, in `tdpbf16ps`,
// which takes the unpacking's output as its B tile and up to 16 activation rows at once.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#define UNPACK_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vbmi")))

// GCC's AMX intrinsics hide from the compiler that tile loads read memory (and that the tile
// configuration is 64 bytes), so it may drop or move the stores they depend on; these say so.
#define TILE_LOAD(tile, base, stride) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #tile ::"r"(base), "r"(static_cast<int64_t>(stride)) : "memory")
#define TILE_STORE(tile, base, stride) \
  asm volatile("tilestored %%tmm" #tile ", (%0,%1,1)" ::"r"(base), "r"(static_cast<int64_t>(stride)) : "memory")
#define TILE_DOT(sums, a, b) asm volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #sums ::)
#define TILE_ZERO(tile) asm volatile("tilezero %%tmm" #tile ::)

namespace {

using bf16 = c10::BFloat16;

constexpr int kBlockRows = 64;    // output rows per block of PyTorch's CPU int4 layout
constexpr int kPrefetch = 16384;  // bytes ahead in the weight stream (measured: 4-64 KB within 10%)
constexpr int kDotRows = 4;       // activation rows per pass, vdpbf16ps kernel (registers)
constexpr int kTileRows = 16;     // activation rows per pass, AMX kernel (a tile's rows)
constexpr int kTileColumns = 32;  // input columns per AMX tile product
constexpr int kMaxGroup = 256;    // the largest group size (PyTorch's kernel takes 32-256)
constexpr int kOffset = 128;      // see unpack

// 64 bytes of the layout (columns k and k + 1 of one block) -> four vectors of bf16 pairs,
// rows 0-15, 16-31, 32-47, 48-63: lane i holds (128 + q[row][k], 128 + q[row][k + 1]).
// A byte permutation puts bytes i, 16 + i (column k) and 32 + i, 48 + i (column k + 1) in lane i,
// so every nibble of a row sits at the same place for both columns; a shift picks the row, and
// (t & 0x000F000F) | 0x43004300 writes q into the mantissa of bf16(128), which is exact.
UNPACK_TARGET inline void unpack(const uint8_t* p, __m512i v[4]) {
  alignas(64) static const uint8_t order[64] = {
      0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
      6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
  const __m512i nibble = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
  const __m512i t = _mm512_permutexvar_epi8(_mm512_load_si512(order), _mm512_loadu_si512(p));
  const __m512i t4 = _mm512_srli_epi32(t, 4);
  v[0] = _mm512_ternarylogic_epi32(t, nibble, magic, 0xEA);  // (a & b) | c
  v[1] = _mm512_ternarylogic_epi32(_mm512_bsrli_epi128(t, 1), nibble, magic, 0xEA);
  v[2] = _mm512_ternarylogic_epi32(t4, nibble, magic, 0xEA);
  v[3] = _mm512_ternarylogic_epi32(_mm512_bsrli_epi128(t4, 1), nibble, magic, 0xEA);
}

// sums[m][0..63] = sum over one group's columns of (128 + q) * x[m], by vdpbf16ps
template <int rows>
UNPACK_TARGET void group_dot(const bf16* x, int64_t x_stride, const uint8_t* w, int64_t columns, float* sums) {
  __m512 acc[rows][4];
  for (int m = 0; m < rows; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < columns; k += 2) {
    __m512i v[4];
    unpack(w + k * 32, v);
    for (int m = 0; m < rows; ++m) {
      const __m512bh xa = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + m * x_stride + k));
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)v[r], xa);
    }
  }
  for (int m = 0; m < rows; ++m)
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(sums + m * kBlockRows + r * 16, acc[m][r]);
}

// One group's weights (`columns` inputs of a block), unpacked once for every AMX pass over the
// activation rows: buf[(tile * 4 + r) * 16 + i] is row i of B tile r (block rows 16r..16r+15)
// of the group's 32-column tile `tile`, i.e. one unpack lane.
UNPACK_TARGET void unpack_group(const uint8_t* w, int64_t columns, __m512i* buf) {
  for (int64_t i = 0; i < columns / 2; ++i) {
    __m512i v[4];
    unpack(w + i * 64, v);
    for (int r = 0; r < 4; ++r) _mm512_store_si512(buf + ((i / 16) * 4 + r) * 16 + i % 16, v[r]);
  }
}

// The sums of `group_dot` by AMX for up to 16 rows: tiles 0-3 sum block rows 0-15 .. 48-63,
// tile 4 holds 32 columns of x, tiles 5-7 take the unpacked weights.
void group_tiles(const bf16* x, int64_t x_stride, const __m512i* buf, int64_t columns, float* sums) {
  TILE_ZERO(0);
  TILE_ZERO(1);
  TILE_ZERO(2);
  TILE_ZERO(3);
  for (int64_t tile = 0; tile < columns / kTileColumns; ++tile) {
    const __m512i* b = buf + tile * 4 * 16;
    TILE_LOAD(4, x + tile * kTileColumns, x_stride * sizeof(bf16));
    TILE_LOAD(5, b, 64);
    TILE_DOT(0, 4, 5);
    TILE_LOAD(6, b + 16, 64);
    TILE_DOT(1, 4, 6);
    TILE_LOAD(7, b + 32, 64);
    TILE_DOT(2, 4, 7);
    TILE_LOAD(5, b + 48, 64);
    TILE_DOT(3, 4, 5);
  }
  TILE_STORE(0, sums, kBlockRows * sizeof(float));
  TILE_STORE(1, sums + 16, kBlockRows * sizeof(float));
  TILE_STORE(2, sums + 32, kBlockRows * sizeof(float));
  TILE_STORE(3, sums + 48, kBlockRows * sizeof(float));
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles(int rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = t <= 4 ? rows : kTileColumns / 2;  // sums and x: one row per x row
  }
  asm volatile("ldtilecfg (%0)" ::"r"(&config) : "memory");
}

void release_tiles() { asm volatile("tilerelease" ::: "memory"); }

// out[m][..] += scale * sums + (zero - (128 + 8) * scale) * sum of the group's x[m]: the weights
// are (q - 8) * scale + zero, and the sums were taken over 128 + q
UNPACK_TARGET void scale_group(const float* sums, int rows, const bf16* scales_and_zeros, const float* x_sums,
                               int64_t x_sums_stride, float* out) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int r = 0; r < 4; ++r) {
    const __m512i s = _mm512_loadu_si512(scales_and_zeros + r * 32);  // 16 rows' (scale, zero)
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(s, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(s, high_half));
    const __m512 shift = _mm512_fmadd_ps(scale, _mm512_set1_ps(-(kOffset + 8)), zero);
    for (int m = 0; m < rows; ++m) {
      float* o = out + m * kBlockRows + r * 16;
      __m512 y = _mm512_fmadd_ps(scale, _mm512_loadu_ps(sums + m * kBlockRows + r * 16), _mm512_loadu_ps(o));
      _mm512_storeu_ps(o, _mm512_fmadd_ps(shift, _mm512_set1_ps(x_sums[m * x_sums_stride]), y));
    }
  }
}

// sums[m * groups + g] = the sum of x[m]'s group g, in fp32 (each thread takes its own: cheaper
// than one more op and allocation per call, which counts in a decode step of small layers)
UNPACK_TARGET void x_group_sums(const bf16* x, int64_t x_stride, int rows, int64_t groups, int64_t group, float* sums) {
  for (int m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * x_stride + k));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
      }
      sums[m * groups + g] = _mm512_reduce_add_ps(acc);
    }
}

bool avx512_bf16() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi"); }

// AMX needs the kernel's permission for this process to use the tile registers (Linux >= 5.16)
bool amx() {
  static const bool usable = __builtin_cpu_supports("amx-bf16") && avx512_bf16() &&
                             syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return usable;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, int64_t group, const at::Tensor& scales_and_zeros,
                   bool tiles) {
  TORCH_CHECK(avx512_bf16(), "this CPU has no AVX512-BF16");
  TORCH_CHECK(!tiles || amx(), "this CPU (or kernel) does not let the process use AMX");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: a contiguous bf16 (M, K) matrix");
  const int64_t m_total = x.size(0), k_total = x.size(1), n_total = scales_and_zeros.size(1);
  TORCH_CHECK(n_total % kBlockRows == 0 && group % kTileColumns == 0 && group <= kMaxGroup && k_total % group == 0,
              "int4_mm: N must be a multiple of 64, K of the group size, the group size of 32 (at most 256)");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kByte && w.numel() == n_total * k_total / 2,
              "w: PyTorch's CPU int4 layout, (N, K / 2) bytes");
  TORCH_CHECK(scales_and_zeros.is_contiguous() && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == k_total / group,
              "scales_and_zeros: bf16 (K / group, N, 2)");
  const int64_t groups = k_total / group;
  at::Tensor y = at::empty({m_total, n_total}, x.options());
  const int pass = tiles ? kTileRows : kDotRows;
  // AMX passes take 16 rows (tiles configured for min(M, 16)); a last, partial pass of a longer
  // input reads a zero-padded copy of its rows
  const int64_t tail_rows = m_total > pass ? m_total % pass : 0;
  at::Tensor tail;
  if (tiles && tail_rows) {
    tail = at::zeros({pass, k_total}, x.options());
    tail.narrow(0, 0, tail_rows).copy_(x.narrow(0, m_total - tail_rows, tail_rows));
  }
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* tp = tail.defined() ? tail.const_data_ptr<bf16>() : nullptr;
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const bf16* szp = scales_and_zeros.const_data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  at::parallel_for(0, n_total / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float sums[kTileRows * kBlockRows];
    std::vector<float> x_sums(m_total * groups), out(m_total * kBlockRows);
    alignas(64) __m512i unpacked[kMaxGroup / 2 * 4];  // 32 KB: one group of one block, unpacked
    x_group_sums(xp, k_total, m_total, groups, group, x_sums.data());
    if (tiles) configure_tiles(std::min<int64_t>(pass, m_total));
    for (int64_t b = begin; b < end; ++b) {
      std::fill(out.begin(), out.end(), 0.0f);
      const uint8_t* wb = wp + b * kBlockRows * k_total / 2;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* wg = wb + g * group * 32;
        if (tiles) unpack_group(wg, group, unpacked);
        for (int64_t m0 = 0; m0 < m_total; m0 += pass) {
          const int rows = static_cast<int>(std::min<int64_t>(pass, m_total - m0));
          const bf16* xg = xp + m0 * k_total + g * group;
          if (tiles) group_tiles(rows < pass && tail_rows ? tp + g * group : xg, k_total, unpacked, group, sums);
          else if (rows == 4) group_dot<4>(xg, k_total, wg, group, sums);
          else if (rows == 3) group_dot<3>(xg, k_total, wg, group, sums);
          else if (rows == 2) group_dot<2>(xg, k_total, wg, group, sums);
          else group_dot<1>(xg, k_total, wg, group, sums);
          scale_group(sums, rows, szp + (g * n_total + b * kBlockRows) * 2, x_sums.data() + m0 * groups + g, groups,
                      out.data() + m0 * kBlockRows);
        }
      }
      for (int64_t m = 0; m < m_total; ++m)
        for (int i = 0; i < kBlockRows; ++i) yp[m * n_total + b * kBlockRows + i] = bf16(out[m * kBlockRows + i]);
    }
    if (tiles) release_tiles();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(cogvlm, lib) {
  lib.def("int4_mm(Tensor x, Tensor w, int group, Tensor scales_and_zeros, bool tiles) -> Tensor");
  lib.def("cpu_kernels() -> int[]", []() -> std::vector<int64_t> { return {avx512_bf16(), amx()}; });
}

TORCH_LIBRARY_IMPL(cogvlm, CPU, lib) { lib.impl("int4_mm", int4_mm); }
