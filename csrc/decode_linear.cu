/*
 * decode_linear: a decoding step's projection with its RMSNorm prologue and its SwiGLU or
 * residual epilogue. CUDA kernel. The math and the rounding are in decode_linear.cpp's opening
 * comment; this kernel computes exactly that, with float32 accumulation.
 *
 * Work split: a block of kWarps warps first writes the (normalised) x rows into shared memory as
 * float32, (nb, K) with nb <= kMaxRows; then each warp takes output columns in a grid-stride loop.
 * For column j a warp reads weight row j (and row j + N/2 for SwiGLU) once, in 16-byte packs
 * spread over its 32 lanes, kUnroll packs per lane in flight before the first use, and
 * multiplies them with every x row from shared memory; a warp shuffle sums the lanes, lane 0
 * applies the epilogue and stores. The weight is the only large read (each element once), so the
 * kernel is bound by memory bandwidth; the grid just fills the GPU, so the prologue (reading x
 * and its norm, a few KB) is repeated once per resident block, not once per column.
 *
 * Layout: x rows contiguous with row stride x_stride; weight contiguous (N, K); residual and out
 * contiguous (B, N_out). More than kMaxRows rows of x: the launcher launches once per group of
 * kMaxRows (each group reads the weight again; at such batches the library's GEMMs are the
 * better choice, and the model's dispatch takes them).
 *
 * Dtypes: float32, bfloat16, float16. Packs of 16 bytes when K is a multiple of the pack and
 * every row start is 16-byte aligned, one element otherwise.
 *
 * Several rows (2..32 per launch, bf16 / fp16, K a multiple of 32, 16-byte aligned weight, x rows
 * and gain): the tensor-core kernel (decode_linear_mma_kernel) instead, since with 4+ rows the
 * kernel above is bound by its multiplies from shared memory, not by the weight stream. It stages
 * the (normalised, rounded to T) x rows in shared memory as T, (16 MT, ldx) with MT = 1 or 2 tiles
 * of 16 rows, the rows past nb zero; then mma.sync m16n8k16 (float accumulators) computes
 * x (16 x 16k) times weight^T (16k x 8): A = 16 x rows from shared memory, B = 8 weight rows (output
 * features) straight from global memory. A tile is 8 output features (8 gate and 8 up rows for
 * SwiGLU); its K is split over ks warps of a block (a block takes kMmaWarps / ks tiles at once),
 * each warp taking every ks-th chunk of 32 columns and reducing its float partial tile with the
 * others' in shared memory, where the epilogue reads it. The reduction order is fixed, so the
 * result does not vary from run to run.
 *
 * The mma fragments without a shuffle: within a chunk of 32 columns lane (g = lane / 4,
 * t = lane % 4) loads 16 bytes of weight row g at columns 8t..8t+7 and of x rows g and g + 8 at
 * the same columns, and feeds them to two mma steps s = 0, 1 as the fragments' k indices
 * 2t, 2t+1 -> columns 8t+4s, +1 and 2t+8, 2t+9 -> columns 8t+4s+2, +3. A dot product does not care
 * in which order its k run, and A and B use the same permutation (it depends only on t, which
 * names the same k group in both fragments' layouts), so each column of the chunk is multiplied
 * once, with its own x value. A warp's weight load is then 8 rows x 64 contiguous bytes (whole
 * 32-byte sectors) and its x load one 16-byte shared-memory read per row, conflict-free with the
 * row stride ldx padded to an odd multiple of 64 bytes.
 *
 * Programmatic dependent launch (pdl.h, sm_90+, inside a CUDA graph): the kernel may start while
 * the kernels before it in the stream are still running. Until pdl_wait() it touches only its
 * weights, which no kernel of the step writes: its first round of weight loads overlaps the
 * previous kernel's tail and this kernel's own launch. After the wait (every earlier kernel
 * complete, its writes visible) it reads x, the norm gain and the residual and writes out. Each
 * block lets its dependents launch once its loads are issued, so the next projection's blocks
 * take the SMs this one leaves idle and start streaming their own weights.
 */
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "pdl.h"

namespace optimus {
namespace {

constexpr int kWarps = 4;      // warps per block: 128 threads
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 4;    // x rows per launch (the batch of a decoding step, in groups)
// Weight packs per lane (per weight row) in flight before the first multiply (the kernel's U):
// kUnroll covers a row of K = 1024 bf16; kLongUnroll a whole row of K = 2816 (11 packs), for the
// down projection, whose grid (one warp per column, 1024 columns) is too small to cover the
// memory latency with 4 packs per lane. It costs registers, so only rows that long get it.
constexpr int kUnroll = 4;
constexpr int kLongUnroll = 12;
constexpr int kPackBytes = 16;
// The tensor-core kernel: warps per block, x rows per launch, and the weight chunks (32 columns of
// 8 rows, 16 bytes per lane) a warp has in flight before its first multiply: 16 take 64 registers
// a lane and cover a whole row of K = 1024 with 2 warps (K = 2816 with 8); SwiGLU loads two rows
// per chunk, so half as many.
constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaMaxRows = 32;
constexpr int kMmaUnroll = 16;
constexpr int kChunk = 32;  // columns of one chunk: 2 mma k-steps of 16

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {  // the value of v once stored as T
  return static_cast<float>(static_cast<T>(v));
}

// ----------------------------------------------------------------------------- kernel

template <typename T, int V, int NB, bool SWIGLU, int U>
__global__ void __launch_bounds__(kThreads) decode_linear_kernel(
    const T* x, int64_t x_stride, int nb, const T* __restrict__ w, const T* __restrict__ norm_w,
    const T* residual, T* __restrict__ out, int K, int n_out, int half, float eps) {
  extern __shared__ float xs[];  // (nb, K): the rows of x the weights multiply; then (K,) the gain
  float* gain = xs + static_cast<int64_t>(nb) * K;
  __shared__ float partial[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  constexpr int kRows = SWIGLU ? 2 : 1;  // weight rows per output column: gate and up, or one
  const int packs = K / V;
  const int warps_total = gridDim.x * kWarps;

  // A warp's weight packs for one round: U packs per lane of column j's row(s), from p0.
  Pack<T, V> wp[U][kRows];
  auto load = [&](int j, int p0) {
    const Pack<T, V>* rows[kRows];
    rows[0] = reinterpret_cast<const Pack<T, V>*>(w + static_cast<int64_t>(j) * K);
    if constexpr (SWIGLU) rows[1] = reinterpret_cast<const Pack<T, V>*>(w + static_cast<int64_t>(j + half) * K);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int p = p0 + u * 32;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (p < packs) wp[u][r] = rows[r][p];
    }
  };
  // The first round's loads go out before the prologue, so their latency overlaps it (a kernel
  // of a few microseconds otherwise waits for x, its norm, a barrier, then the weights in turn).
  int j = blockIdx.x * kWarps + warp;
  if (j < n_out) load(j, lane);
  if (norm_w != nullptr) {  // a weight too: into shared memory before the wait (each thread reads back its own)
    for (int k = threadIdx.x; k < K; k += kThreads) gain[k] = static_cast<float>(norm_w[k]);
  }
  pdl_launch_dependents();
  pdl_wait();  // x and the residual are earlier kernels' output

  // Prologue: x -> shared memory, normalised as RMSNorm does (float32 statistics, rounded to T,
  // times the gain in T).
  for (int b = 0; b < nb; ++b) {
    const T* row = x + b * x_stride;
    float scale = 1.0f;
    if (norm_w != nullptr) {
      float squares = 0.0f;
      for (int k = threadIdx.x; k < K; k += kThreads) {
        const float v = static_cast<float>(row[k]);
        squares += v * v;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
      if (lane == 0) partial[warp] = squares;
      __syncthreads();
      float total = 0.0f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) total += partial[i];
      scale = rsqrtf(total / K + eps);
      __syncthreads();  // partial is reused by the next row
    }
    for (int k = threadIdx.x; k < K; k += kThreads) {
      float v = static_cast<float>(row[k]);
      if (norm_w != nullptr) v = round_to<T>(gain[k] * round_to<T>(v * scale));
      xs[b * K + k] = v;
    }
  }
  __syncthreads();

  for (bool prefetched = true; j < n_out; j += warps_total, prefetched = false) {
    float acc[kRows][NB];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;
    for (int p0 = lane; p0 < packs; p0 += 32 * U) {
      if (!(prefetched && p0 == lane)) load(j, p0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int p = p0 + u * 32;
        if (p >= packs) break;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (b >= nb) break;
          const float* xv = xs + b * K + p * V;
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xe = xv[e];
#pragma unroll
            for (int r = 0; r < kRows; ++r) acc[r][b] += xe * static_cast<float>(wp[u][r].v[e]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], offset);
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (b >= nb) break;
        float y = round_to<T>(acc[0][b]);
        if constexpr (SWIGLU) {
          const float u = round_to<T>(acc[1][b]);
          y = round_to<T>(y / (1.0f + __expf(-y)) * u);
        }
        if (residual != nullptr) y = static_cast<float>(residual[static_cast<int64_t>(b) * n_out + j]) + y;
        out[static_cast<int64_t>(b) * n_out + j] = static_cast<T>(y);
      }
    }
  }
}

// ----------------------------------------------------------------------------- tensor-core kernel

// d += a (16 x 16, row-major fragment) * b (16 x 8, column-major fragment), float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<c10::BFloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<c10::Half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {  // i is a compile-time constant after unrolling
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// MT: 16-row tiles of x (nb <= 16 MT); SWIGLU: each tile multiplies 8 gate and 8 up rows.
// ks: warps per tile (a power of two dividing kMmaWarps); ldx: the row stride of the staged x.
template <typename T, int MT, bool SWIGLU>
__global__ void __launch_bounds__(kMmaThreads, 2) decode_linear_mma_kernel(
    const T* x, int64_t x_stride, int nb, const T* __restrict__ w, const T* __restrict__ norm_w,
    const T* residual, T* __restrict__ out, int K, int n_out, int half, float eps, int ks, int ldx) {
  constexpr int NW = SWIGLU ? 2 : 1;  // weight rows per output feature: gate and up, or one
  constexpr int U = kMmaUnroll / NW;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);                                                   // (16 MT, ldx)
  float* red = reinterpret_cast<float*>(smem + static_cast<size_t>(16 * MT) * ldx * sizeof(T));
  // red: (kMmaWarps, MT, NW, 16 x rows, 8 features) float partial tiles
  auto red_at = [&](int warp, int m, int r, int row, int col) -> float& {
    return red[(((warp * MT + m) * NW + r) * 16 + row) * 8 + col];
  };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int chunks = K / kChunk, tiles = (n_out + 7) / 8;
  const int slots = kMmaWarps / ks, slot = warp / ks, part = warp % ks;
  const int groups = (chunks + ks * U - 1) / (ks * U);

  // Weight chunks in flight: wr[u][r] = 16 bytes of row r (gate / up) of this lane's output
  // feature, chunk part + ks (grp U + u). Rows past n_out (the last tile) read row n_out - 1; their
  // outputs are never stored.
  uint4 wr[U][NW] = {};
  auto load = [&](int tile, int grp) {
    if (tile >= tiles) return;
    const int j = min(tile * 8 + g, n_out - 1);
    const T* rows[NW];
    rows[0] = w + static_cast<int64_t>(j) * K + 8 * t;
    if constexpr (SWIGLU) rows[1] = w + static_cast<int64_t>(j + half) * K + 8 * t;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = part + ks * (grp * U + u);
      if (c < chunks) {
#pragma unroll
        for (int r = 0; r < NW; ++r) wr[u][r] = __ldg(reinterpret_cast<const uint4*>(rows[r] + c * kChunk));
      }
    }
  };
  float acc[MT][NW][4];
  auto compute = [&](int grp) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = part + ks * (grp * U + u);
      if (c >= chunks) break;  // warp-uniform: mma.sync needs the whole warp
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const T* xr = xs + static_cast<size_t>(16 * m + g) * ldx + c * kChunk + 8 * t;
        const uint4 lo = *reinterpret_cast<const uint4*>(xr);             // x row 16m + g
        const uint4 hi = *reinterpret_cast<const uint4*>(xr + 8 * ldx);   // x row 16m + g + 8
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t a[4] = {word(lo, 2 * s), word(hi, 2 * s), word(lo, 2 * s + 1), word(hi, 2 * s + 1)};
#pragma unroll
          for (int r = 0; r < NW; ++r) mma_16816<T>(acc[m][r], a, word(wr[u][r], 2 * s), word(wr[u][r], 2 * s + 1));
        }
      }
    }
  };

  int base = blockIdx.x * slots;  // the first of the tiles this block's warps take in this round
  const int stride = gridDim.x * slots;
  load(base + slot, 0);  // before the wait: the weights are no earlier kernel's output
  pdl_launch_dependents();
  pdl_wait();  // x, the gain and the residual are

  // Prologue: x rows -> shared memory as T (rows nb..16 MT - 1 zero), then each warp normalises
  // whole rows in place (float32 statistics, rounded to T, times the gain, rounded to T). The
  // copy is cp.async (global -> shared without registers, which hold the weight chunks): every
  // pack of the block's x is in flight at once (up to 90 KB at 32 rows of K = 2816), so the
  // prologue costs one L2 round trip, not one per few packs.
  {
    using XPack = Pack<T, 8>;
    const int packs = K / 8, total = nb * packs;
    for (int i = threadIdx.x; i < total; i += kMmaThreads) {
      const int b = i / packs, p = i % packs;
      const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(xs + static_cast<size_t>(b) * ldx + p * 8));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(x + b * x_stride + p * 8) : "memory");
    }
    const int zero_packs = (16 * MT - nb) * ldx / 8;
    for (int i = threadIdx.x; i < zero_packs; i += kMmaThreads)
      reinterpret_cast<uint4*>(xs + static_cast<size_t>(nb) * ldx)[i] = make_uint4(0, 0, 0, 0);
    asm volatile("cp.async.wait_all;" ::: "memory");  // this thread's copies have landed
    if (norm_w != nullptr) {
      __syncthreads();  // and everyone's
      for (int b = warp; b < nb; b += kMmaWarps) {
        XPack* row = reinterpret_cast<XPack*>(xs + static_cast<size_t>(b) * ldx);
        float squares = 0.0f;
        for (int p = lane; p < packs; p += 32) {
          const XPack v = row[p];
#pragma unroll
          for (int e = 0; e < 8; ++e) squares += static_cast<float>(v.v[e]) * static_cast<float>(v.v[e]);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
        const float scale = rsqrtf(squares / K + eps);
        for (int p = lane; p < packs; p += 32) {  // each lane rewrites the packs it summed
          XPack v = row[p];
          const XPack gain = reinterpret_cast<const XPack*>(norm_w)[p];
#pragma unroll
          for (int e = 0; e < 8; ++e)
            v.v[e] = static_cast<T>(static_cast<float>(gain.v[e]) * round_to<T>(static_cast<float>(v.v[e]) * scale));
          row[p] = v;
        }
      }
    }
    __syncthreads();
  }

  for (; base < tiles; base += stride) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < NW; ++r)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][r][e] = 0.0f;
    for (int grp = 0; grp < groups; ++grp) {
      if (grp > 0) load(base + slot, grp);
      compute(grp);
    }
    load(base + stride + slot, 0);  // the next round's first loads fly during the reduction
    // Fragment of the accumulator: lane (g, t) holds x rows g, g + 8 of features 2t, 2t + 1.
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < NW; ++r) {
        *reinterpret_cast<float2*>(&red_at(warp, m, r, g, 2 * t)) = make_float2(acc[m][r][0], acc[m][r][1]);
        *reinterpret_cast<float2*>(&red_at(warp, m, r, g + 8, 2 * t)) = make_float2(acc[m][r][2], acc[m][r][3]);
      }
    __syncthreads();
    // Epilogue: each (tile slot, x row, feature) sums its ks partials in warp order.
    for (int i = threadIdx.x; i < slots * nb * 8; i += kMmaThreads) {
      const int col = i % 8, b = i / 8 % nb, s = i / 8 / nb;
      const int j = (base + s) * 8 + col;
      if (j >= n_out) continue;
      float y[NW];
#pragma unroll
      for (int r = 0; r < NW; ++r) {
        float sum = 0.0f;
        for (int p = 0; p < ks; ++p) sum += red_at(s * ks + p, b / 16, r, b % 16, col);
        y[r] = round_to<T>(sum);
      }
      float v = y[0];
      if constexpr (SWIGLU) v = round_to<T>(v / (1.0f + __expf(-v)) * y[1]);
      if (residual != nullptr) v = static_cast<float>(residual[static_cast<int64_t>(b) * n_out + j]) + v;
      out[static_cast<int64_t>(b) * n_out + j] = static_cast<T>(v);
    }
    __syncthreads();  // red is rewritten by the next round
  }
}

// ----------------------------------------------------------------------------- launcher

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0;
}

template <typename T, int V, int NB, bool SWIGLU, int U = kUnroll>
cudaError_t launch(const T* x, int64_t x_stride, int nb, const T* w, const T* norm_w, const T* residual, T* out,
                   int K, int n_out, int half, float eps) {
  if constexpr (!SWIGLU && U == kUnroll) {
    if (K / V > 32 * kUnroll) return launch<T, V, NB, false, kLongUnroll>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps);
  }
  auto kernel = decode_linear_kernel<T, V, NB, SWIGLU, U>;
  const size_t smem = static_cast<size_t>(nb + (norm_w != nullptr ? 1 : 0)) * K * sizeof(float);
  if (smem > 48 * 1024) {  // above the default limit a kernel must ask for its dynamic shared memory
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  int device = 0, sms = 1, per_sm = 1;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query only costs a smaller grid
  }
  const int64_t needed = (n_out + kWarps - 1) / kWarps;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t{std::max(sms, 1)} * std::max(per_sm, 1))));
  return launch_pdl(kernel, dim3(blocks), dim3(kThreads), smem, at::cuda::getCurrentCUDAStream(), x, x_stride, nb, w,
                    norm_w, residual, out, K, n_out, half, eps);
}

template <typename T, int V>
cudaError_t launch_rows(const T* x, int64_t x_stride, int nb, const T* w, const T* norm_w, const T* residual, T* out,
                        int K, int n_out, int half, float eps, bool swiglu) {
  if (nb == 1) {
    return swiglu ? launch<T, V, 1, true>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps)
                  : launch<T, V, 1, false>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps);
  }
  return swiglu ? launch<T, V, kMaxRows, true>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps)
                : launch<T, V, kMaxRows, false>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps);
}

// The staged x rows' stride: K padded to an odd multiple of 32 elements (64 bytes), so the 8 lanes
// of a quarter-warp, which read rows g and g + 1 at the same columns, hit all 32 banks once.
int mma_ldx(int K) {
  return K % 64 == 0 ? K + 32 : K;
}

size_t mma_smem(int K, int mt, bool swiglu, size_t elem) {
  return static_cast<size_t>(16 * mt) * mma_ldx(K) * elem + size_t{kMmaWarps} * mt * (swiglu ? 2 : 1) * 16 * 8 * sizeof(float);
}

template <typename T, int MT, bool SWIGLU>
cudaError_t launch_mma(const T* x, int64_t x_stride, int nb, const T* w, const T* norm_w, const T* residual, T* out,
                       int K, int n_out, int half, float eps) {
  auto kernel = decode_linear_mma_kernel<T, MT, SWIGLU>;
  const size_t smem = mma_smem(K, MT, SWIGLU, sizeof(T));
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  int device = 0, sms = 1, per_sm = 1;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMmaThreads, smem) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query only costs a smaller grid
  }
  sms = std::max(sms, 1);
  per_sm = std::max(per_sm, 1);
  // Warps per tile: the fewest whose chunks a warp holds in flight at once, doubled while the
  // tiles do not fill every multiprocessor with a block (the small matrices: 128 tiles of the
  // 1024-row ones, each then split over 8 warps, so that the whole matrix is in flight at once).
  const int chunks = K / kChunk, tiles = (n_out + 7) / 8, unroll = kMmaUnroll / (SWIGLU ? 2 : 1);
  int ks = 1;
  while (ks < kMmaWarps && chunks > ks * unroll) ks *= 2;
  while (ks < kMmaWarps && (int64_t{tiles} * ks + kMmaWarps - 1) / kMmaWarps < sms) ks *= 2;
  const int64_t needed = (int64_t{tiles} * ks + kMmaWarps - 1) / kMmaWarps;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t{sms} * per_sm)));
  return launch_pdl(kernel, dim3(blocks), dim3(kMmaThreads), smem, at::cuda::getCurrentCUDAStream(), x, x_stride, nb,
                    w, norm_w, residual, out, K, n_out, half, eps, ks, mma_ldx(K));
}

template <typename T>
cudaError_t launch_mma_rows(const T* x, int64_t x_stride, int nb, const T* w, const T* norm_w, const T* residual,
                            T* out, int K, int n_out, int half, float eps, bool swiglu) {
  if (nb <= 16) {
    return swiglu ? launch_mma<T, 1, true>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps)
                  : launch_mma<T, 1, false>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps);
  }
  return swiglu ? launch_mma<T, 2, true>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps)
                : launch_mma<T, 2, false>(x, x_stride, nb, w, norm_w, residual, out, K, n_out, half, eps);
}

// Whether B rows take the tensor-core kernel: 16-bit T, several rows, K in whole chunks, 16-byte
// aligned weight rows, x rows and gain (its packed loads), and the staged rows within the
// device's shared memory per block.
template <typename T>
bool use_mma(int64_t B, int64_t K, const T* x, int64_t x_stride, const T* w, const T* norm_w, bool swiglu) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    if (B < 2 || K % kChunk != 0 || !aligned(w) || !aligned(x) || x_stride % 8 != 0 ||
        (norm_w != nullptr && !aligned(norm_w)))
      return false;
    int device = 0, limit = 48 * 1024;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return mma_smem(static_cast<int>(K), B > 16 ? 2 : 1, swiglu, sizeof(T)) <= static_cast<size_t>(limit);
  }
}

template <typename T>
cudaError_t launch_all(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* norm_weight,
                       const at::Tensor* residual, double eps, bool swiglu, at::Tensor& out) {
  constexpr int V = kPackBytes / sizeof(T);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0), n_out = out.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* wp = static_cast<const T*>(weight.const_data_ptr());
  const T* nw = norm_weight ? static_cast<const T*>(norm_weight->const_data_ptr()) : nullptr;
  const T* res = residual ? static_cast<const T*>(residual->const_data_ptr()) : nullptr;
  T* op = static_cast<T*>(out.mutable_data_ptr());
  if constexpr (sizeof(T) == 2) {
    if (use_mma(B, K, xp, x.stride(0), wp, nw, swiglu)) {
      for (int64_t b0 = 0; b0 < B; b0 += kMmaMaxRows) {
        const int nb = static_cast<int>(std::min<int64_t>(kMmaMaxRows, B - b0));
        const cudaError_t err = launch_mma_rows<T>(xp + b0 * x.stride(0), x.stride(0), nb, wp, nw,
                                                   res ? res + b0 * n_out : nullptr, op + b0 * n_out, K, n_out,
                                                   N / 2, eps, swiglu);
        if (err != cudaSuccess) return err;
      }
      return cudaSuccess;
    }
  }
  const bool vec = K % V == 0 && aligned(wp);  // every weight row then starts 16-byte aligned
  for (int64_t b0 = 0; b0 < B; b0 += kMaxRows) {
    const int nb = static_cast<int>(std::min<int64_t>(kMaxRows, B - b0));
    const T* xb = xp + b0 * x.stride(0);
    const T* rb = res ? res + b0 * n_out : nullptr;
    T* ob = op + b0 * n_out;
    const cudaError_t err =
        vec ? launch_rows<T, V>(xb, x.stride(0), nb, wp, nw, rb, ob, K, n_out, N / 2, eps, swiglu)
            : launch_rows<T, 1>(xb, x.stride(0), nb, wp, nw, rb, ob, K, n_out, N / 2, eps, swiglu);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

// Checked by decode_linear.cpp: 2-D x with contiguous rows, contiguous weight (N, K), optional
// norm_weight (K,) and residual (B, N_out), one dtype, on the current device, B and N_out > 0.
cudaError_t decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* norm_weight,
                               const at::Tensor* residual, double eps, bool swiglu, at::Tensor& out) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return launch_all<c10::BFloat16>(x, weight, norm_weight, residual, eps, swiglu, out);
    case at::kHalf: return launch_all<c10::Half>(x, weight, norm_weight, residual, eps, swiglu, out);
    default: return launch_all<float>(x, weight, norm_weight, residual, eps, swiglu, out);
  }
}

}  // namespace optimus
