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
    const T* __restrict__ x, int64_t x_stride, int nb, const T* __restrict__ w, const T* __restrict__ norm_w,
    const T* __restrict__ residual, T* __restrict__ out, int K, int n_out, int half, float eps) {
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
