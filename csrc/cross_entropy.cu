/*
 * cross_entropy_fwd_bwd: per-row cross-entropy of a chunk of LM-head logits, and the logits
 * overwritten in place with the loss's gradient. CUDA kernel.
 *
 * Math (see cross_entropy.cpp; V = vocab_size, s = scale[0], t = targets[r]):
 *   loss[r] = logsumexp(x[:V]) - x[t];  x[j] <- (softmax(x[:V])_j - [j == t]) * s for j < V,
 *   x[j] <- 0 for V <= j < cols; target ignore_index (-100): loss 0, zero row; any other target
 *   outside [0, V): loss NaN, zero row (the op cannot raise without a host sync).
 * All in float32. exp is exp2f of a pre-scaled argument (2 ulp), so the row's log-sum-exp is
 * within about 1e-6 relative of the exact one.
 *
 * Memory layout: logits (rows, cols) contiguous; one block per row. Pass 1 reads the row once
 * and keeps each thread's running (max, sum of exp(x - max)), merged across the block; pass 2
 * reads the row again (a 100 KB bf16 row of the GPT-2 vocabulary is still in L2) and writes the
 * gradient over it. DRAM traffic is about one read and one write of the chunk. Threads move
 * 16-byte packs (8 bf16/fp16 or 4 fp32) when the row starts on a 16-byte boundary and cols is a
 * multiple of the pack, else single elements.
 *
 * Dtypes: float32, bfloat16, float16 logits; float32 scale and loss.
 */
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace optimus {
namespace {

constexpr int kThreads = 512;      // threads per block (one block per row)
constexpr int kWarps = kThreads / 32;
constexpr int kPackBytes = 16;     // widest global load/store a thread can issue
constexpr int64_t kIgnoreIndex = -100;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The (max, sum of exp(x - max)) pair of two parts of a row, merged. A part with no elements
// has max -inf and sum 0, and contributes nothing (exp2f(-inf) would be fine, -inf - -inf not).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  s = (m == -INFINITY ? 0.0f : s * exp2f((m - mx) * kLog2e)) + (m2 == -INFINITY ? 0.0f : s2 * exp2f((m2 - mx) * kLog2e));
  m = mx;
}

// One row per block: the loss into loss[row], the gradient over the row.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
cross_entropy_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, const float* __restrict__ scale,
                     float* __restrict__ loss, int64_t cols, int64_t vocab) {
  using P = Pack<T, V>;
  const int64_t row = blockIdx.x;
  T* x = logits + row * cols;
  P* xp = reinterpret_cast<P*>(x);
  const int64_t packs = cols / V;  // cols % V == 0 when V > 1 (the launcher checks)
  const int64_t target = targets[row];
  const bool ignored = target == kIgnoreIndex;
  const bool valid = !ignored && target >= 0 && target < vocab;
  __shared__ float shared_m[kWarps], shared_s[kWarps];
  __shared__ float row_lse;

  if (valid) {
    float m = -INFINITY, s = 0.0f;
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      const P p = xp[i];
      float pack_max = -INFINITY;
      float f[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        f[e] = static_cast<float>(p.v[e]);
        if (i * V + e >= vocab) f[e] = -INFINITY;  // padded vocabulary: no part in the softmax
        pack_max = fmaxf(pack_max, f[e]);
      }
      if (pack_max == -INFINITY) continue;  // a pack of padding only
      const float mx = fmaxf(m, pack_max);
      float sum = 0.0f;
#pragma unroll
      for (int e = 0; e < V; ++e) sum += exp2f((f[e] - mx) * kLog2e);
      s = (m == -INFINITY ? 0.0f : s * exp2f((m - mx) * kLog2e)) + sum;
      m = mx;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
      merge(m, s, m2, s2);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      shared_m[warp] = m;
      shared_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      m = lane < kWarps ? shared_m[lane] : -INFINITY;
      s = lane < kWarps ? shared_s[lane] : 0.0f;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        merge(m, s, m2, s2);
      }
      if (lane == 0) {
        const float lse = m + logf(s);
        row_lse = lse;
        loss[row] = lse - static_cast<float>(x[target]);  // read before any thread overwrites it
      }
    }
    __syncthreads();  // row_lse is set, and x[target] was read
  } else if (threadIdx.x == 0) {
    loss[row] = ignored ? 0.0f : NAN;
  }

  const float lse = valid ? row_lse : 0.0f;
  const float s = valid ? scale[0] : 0.0f;
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    P p = xp[i];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t j = i * V + e;
      float g = 0.0f;
      if (valid && j < vocab) g = (exp2f((static_cast<float>(p.v[e]) - lse) * kLog2e) - (j == target ? 1.0f : 0.0f)) * s;
      p.v[e] = static_cast<T>(g);
    }
    xp[i] = p;
  }
}

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0;
}

template <typename T>
void launch(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale, at::Tensor& loss, int64_t vocab) {
  constexpr int V = kPackBytes / sizeof(T);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  T* x = static_cast<T*>(logits.mutable_data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* t = static_cast<const int64_t*>(targets.const_data_ptr());
  const auto* s = static_cast<const float*>(scale.const_data_ptr());
  auto* out = static_cast<float*>(loss.mutable_data_ptr());
  const unsigned int blocks = static_cast<unsigned int>(rows);  // rows < 2^31: checked by the caller
  if (aligned(x) && cols % V == 0) {
    cross_entropy_kernel<T, V><<<blocks, kThreads, 0, stream>>>(x, t, s, out, cols, vocab);
  } else {
    cross_entropy_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(x, t, s, out, cols, vocab);
  }
}

}  // namespace

// Arguments checked by cross_entropy.cpp: contiguous 2-D logits of float32, bfloat16 or float16
// with at least one row, int64 targets (rows,), a one-element float32 scale, a float32 loss
// (rows,), all on the current device, 1 <= vocab <= cols.
cudaError_t cross_entropy_fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale,
                                       at::Tensor& loss, int64_t vocab_size) {
  switch (logits.scalar_type()) {
    case at::kBFloat16: launch<c10::BFloat16>(logits, targets, scale, loss, vocab_size); break;
    case at::kHalf: launch<c10::Half>(logits, targets, scale, loss, vocab_size); break;
    default: launch<float>(logits, targets, scale, loss, vocab_size); break;
  }
  return cudaGetLastError();
}

}  // namespace optimus
