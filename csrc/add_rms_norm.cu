/*
 * add_rms_norm: a residual add and the RMSNorm after it, in one pass. CUDA kernel.
 *
 * Math: as in add_rms_norm.cpp: s = x + delta (rounded to the dtype), y = s * rsqrt(mean(s^2)
 * + eps) in float32 rounded to the dtype, out = weight * y rounded to the dtype; returns (s, out).
 *
 * One block per row (decode rows are B x dim, e.g. 16 x 1024): each thread keeps its elements
 * of s in registers between the sum of squares and the scaling (up to kPerThread of them; longer
 * rows loop over the row twice, reading s back from the output). Loads and stores are per
 * element and coalesced across the block: the rows are a few KB, latency-bound, not bandwidth.
 *
 * Memory layout: x, delta, sum, out (rows, dim) contiguous; weight (dim,).
 * Dtypes: float32, bfloat16, float16; math in float32.
 */
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace optimus {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // elements kept in registers: rows up to 2048 in one read

template <typename T>
__global__ void __launch_bounds__(kThreads)
add_rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ weight, float eps,
                    int dim, T* __restrict__ sum, T* __restrict__ out) {
  __shared__ float red[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  float kept[kPerThread];
  float squares = 0.f;
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads;
    if (i < dim) {
      const T s = delta ? static_cast<T>(static_cast<float>(x[base + i]) + static_cast<float>(delta[base + i]))
                        : x[base + i];
      sum[base + i] = s;
      kept[u] = static_cast<float>(s);
      squares += kept[u] * kept[u];
    }
  }
  for (int i = threadIdx.x + kPerThread * kThreads; i < dim; i += kThreads) {
    const T s = delta ? static_cast<T>(static_cast<float>(x[base + i]) + static_cast<float>(delta[base + i]))
                      : x[base + i];
    sum[base + i] = s;
    squares += static_cast<float>(s) * static_cast<float>(s);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = squares;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += red[w];
  const float scale = rsqrtf(total / static_cast<float>(dim) + eps);
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = threadIdx.x + u * kThreads;
    if (i < dim) {
      const T y = static_cast<T>(kept[u] * scale);
      out[base + i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(y));
    }
  }
  for (int i = threadIdx.x + kPerThread * kThreads; i < dim; i += kThreads) {
    const T y = static_cast<T>(static_cast<float>(sum[base + i]) * scale);  // this thread's own store above
    out[base + i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(y));
  }
}

template <typename T>
cudaError_t launch(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps, at::Tensor& sum,
                   at::Tensor& out) {
  const int dim = static_cast<int>(x.size(-1));
  const unsigned int rows = static_cast<unsigned int>(x.numel() / dim);
  add_rms_norm_kernel<T><<<rows, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(x.const_data_ptr()), delta ? static_cast<const T*>(delta->const_data_ptr()) : nullptr,
      static_cast<const T*>(weight.const_data_ptr()), static_cast<float>(eps), dim, static_cast<T*>(sum.mutable_data_ptr()),
      static_cast<T*>(out.mutable_data_ptr()));
  return cudaGetLastError();
}

}  // namespace

// Arguments checked by add_rms_norm.cpp: one dtype, contiguous, on the current device, rows < 2^31.
cudaError_t add_rms_norm_cuda(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps,
                              at::Tensor& sum, at::Tensor& out) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return launch<c10::BFloat16>(x, delta, weight, eps, sum, out);
    case at::kHalf: return launch<c10::Half>(x, delta, weight, eps, sum, out);
    default: return launch<float>(x, delta, weight, eps, sum, out);
  }
}

}  // namespace optimus
