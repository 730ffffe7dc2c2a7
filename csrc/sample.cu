/*
 * sample: one token per row of logits from logits_to_probs' distribution, without a sort. CUDA
 * kernel: one block of 1024 threads per row, one launch for all rows.
 *
 * Math: as in sample.cpp (temperature, top-k, top-p, then the exponential race over the kept
 * tokens' weights e_i = exp(x_i), x_i = (l_i - max l) / temperature), and why it is exact.
 * The two thresholds are found by radix select, most significant 8-bit digit first, 4 passes
 * over the row each:
 * - top-k over x: float bits mapped to an unsigned key that orders like the values (negative:
 *   all bits flipped; positive: sign bit set); a histogram of counts per digit among the tokens
 *   that share the digits found so far picks the digit holding the k-th largest key. The final
 *   key is that of the k-th largest x; kept: key >= it (ties with it kept, as in the reference).
 * - top-p over e: weights are non-negative, so their raw bits order like the values; a histogram
 *   of mass per digit picks, digit by digit, the largest bit pattern tau with
 *   sum_{e_j >= tau} e_j >= top_p * Z: the smallest weight of the nucleus; kept: e >= tau (ties
 *   kept). Masses are float32 sums in atomic order: a boundary within rounding of top_p * Z can
 *   fall one token either way, run to run.
 * Histograms live in shared memory; a warp adds one count per distinct digit among its lanes
 * (__match_any_sync), and one mass when all its lanes share a digit (the common case for flat
 * distributions, where per-lane atomics on one bin would serialise).
 *
 * Memory layout: logits (B, V) rows contiguous with row stride ld (any float dtype), race (B, V)
 * float32 contiguous, out (B,) int64. The row, as float32, stays in shared memory between the
 * passes when it fits (V <= ~56,000 on Hopper's 227 KB), else in a float32 (B, V) workspace.
 * No host synchronisation: the launch is CUDA-graph safe.
 *
 * Dtypes: logits float32, bfloat16, float16; math in float32.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace optimus {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kPasses = 32 / kDigitBits;
constexpr unsigned kFull = 0xffffffffu;

struct SampleArgs {
  int V;
  int64_t ld;  // row stride of logits
  float temperature;
  int top_k;   // 0: keep all
  float top_p;
  bool cached;  // row in shared memory (else in `work`)
};

// Unsigned key with the order of the float values; NaN gets 0 (the lowest: never kept by top-k),
// -0 the key of +0 (they compare equal: a -0 logit tied with a +0 k-th one is kept).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return f != f ? 0u : f == 0.f ? 0x80000000u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Block-wide max or sum of one float per thread; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(kFull, x, o);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = red[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(kFull, x, o);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // red is reused by the next reduction
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sample_kernel(const T* __restrict__ logits, const float* __restrict__ race, float* __restrict__ work,
              int64_t* __restrict__ out, const SampleArgs a) {
  extern __shared__ float cached_row[];
  __shared__ float red[kWarps];
  __shared__ int red_index[kWarps];
  __shared__ unsigned int counts[kBins];
  __shared__ float masses[kBins];
  __shared__ uint32_t chosen_prefix;
  __shared__ int need_count;
  __shared__ float need_mass;

  const int b = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* e = a.cached ? cached_row : work + static_cast<int64_t>(b) * a.V;
  const T* row = logits + b * a.ld;
  const float* noise = race + static_cast<int64_t>(b) * a.V;

  // Pass 1: the row as float32, and its max. Each thread touches only its own elements until the
  // radix passes, so no barrier is needed between these loops.
  float mx = -INFINITY;
  for (int i = tid; i < a.V; i += kThreads) {
    const float v = static_cast<float>(row[i]);
    e[i] = v;
    mx = fmaxf(mx, v);
  }
  mx = block_reduce<true>(mx, red);
  for (int i = tid; i < a.V; i += kThreads) e[i] = (e[i] - mx) / a.temperature;  // x, max 0

  // top-k: the key of the k-th largest x (0 keeps every token).
  uint32_t kth_key = 0;
  if (a.top_k > 0 && a.top_k < a.V) {
    uint32_t prefix = 0, mask = 0;
    int need = a.top_k;
    for (int pass = 0; pass < kPasses; ++pass) {
      const int shift = 32 - kDigitBits * (pass + 1);
      for (int i = tid; i < kBins; i += kThreads) counts[i] = 0;
      __syncthreads();
      for (int base = warp * 32; base < a.V; base += kThreads) {  // whole warps: __match_any_sync
        const int i = base + lane;
        int digit = -1;
        if (i < a.V) {
          const uint32_t key = order_key(e[i]);
          if ((key & mask) == prefix) digit = static_cast<int>((key >> shift) & (kBins - 1));
        }
        const unsigned peers = __match_any_sync(kFull, digit);
        if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&counts[digit], __popc(peers));
      }
      __syncthreads();
      if (tid == 0) {  // the largest digit whose bin and the bins above hold >= need keys
        int above = 0, d = kBins - 1;
        for (; d > 0 && above + static_cast<int>(counts[d]) < need; --d) above += counts[d];
        need_count = need - above;
        chosen_prefix = prefix | (static_cast<uint32_t>(d) << shift);
      }
      __syncthreads();
      need = need_count;
      prefix = chosen_prefix;
      mask |= static_cast<uint32_t>(kBins - 1) << shift;
    }
    kth_key = prefix;
  }

  // Weights e = exp(x) of the tokens top-k keeps, and their sum Z.
  float z = 0.f;
  for (int i = tid; i < a.V; i += kThreads) {
    const float x = e[i];
    const float w = x == x && order_key(x) >= kth_key ? expf(x) : 0.f;
    e[i] = w;
    z += w;
  }
  const float Z = block_reduce<false>(z, red);  // its barrier also orders the writes of e above

  // top-p: tau, the smallest weight of the nucleus, as bits (1: every positive weight).
  uint32_t tau = 1;
  if (a.top_p < 1.f) {
    uint32_t prefix = 0, mask = 0;
    float need = a.top_p * Z;
    for (int pass = 0; pass < kPasses; ++pass) {
      const int shift = 32 - kDigitBits * (pass + 1);
      for (int i = tid; i < kBins; i += kThreads) masses[i] = 0.f;
      __syncthreads();
      for (int base = warp * 32; base < a.V; base += kThreads) {
        const int i = base + lane;
        int digit = -1;
        float w = 0.f;
        if (i < a.V) {
          w = e[i];
          const uint32_t bits = __float_as_uint(w);
          if (w > 0.f && (bits & mask) == prefix) digit = static_cast<int>((bits >> shift) & (kBins - 1));
        }
        const unsigned peers = __match_any_sync(kFull, digit);
        if (peers == kFull) {
          const float sum = warp_sum(w);
          if (lane == 0 && digit >= 0) atomicAdd(&masses[digit], sum);
        } else if (digit >= 0) {
          atomicAdd(&masses[digit], w);
        }
      }
      __syncthreads();
      if (tid == 0) {  // the largest digit whose bin and the bins above hold >= need mass
        float above = 0.f;
        int d = kBins - 1, lowest = 0;
        bool found = false;
        for (; d >= 0; --d) {
          if (masses[d] > 0.f) lowest = d;
          if (above + masses[d] >= need) {
            found = true;
            break;
          }
          above += masses[d];
        }
        // Rounding left the bucket short of need: keep all of it (its lowest digits from here on).
        if (!found) d = lowest;
        need_mass = found ? need - above : INFINITY;
        chosen_prefix = prefix | (static_cast<uint32_t>(d) << shift);
      }
      __syncthreads();
      need = need_mass;
      prefix = chosen_prefix;
      mask |= static_cast<uint32_t>(kBins - 1) << shift;
    }
    tau = prefix;
  }

  // The exponential race among kept tokens: argmax e_i / race_i, the lowest index on a tie.
  float best = -1.f;
  int best_i = 0;
  for (int i = tid; i < a.V; i += kThreads) {
    const float w = e[i];
    if (w > 0.f && __float_as_uint(w) >= tau) {
      const float s = w / noise[i];
      if (s > best) best = s, best_i = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float s = __shfl_xor_sync(kFull, best, o);
    const int j = __shfl_xor_sync(kFull, best_i, o);
    if (s > best || (s == best && j < best_i)) best = s, best_i = j;
  }
  if (lane == 0) red[warp] = best, red_index[warp] = best_i;
  __syncthreads();
  if (warp == 0) {
    best = red[lane];
    best_i = red_index[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float s = __shfl_xor_sync(kFull, best, o);
      const int j = __shfl_xor_sync(kFull, best_i, o);
      if (s > best || (s == best && j < best_i)) best = s, best_i = j;
    }
    if (lane == 0) out[b] = best_i;
  }
}

template <typename T>
cudaError_t launch(const at::Tensor& logits, const at::Tensor& race, SampleArgs a, at::Tensor& out) {
  int optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device());
  if (err != cudaSuccess) return err;
  constexpr size_t kStatic = sizeof(float) * (2 * kWarps + 2 * kBins) + 64;  // the kernel's static arrays, rounded up
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(a.V);
  a.cached = row_bytes + kStatic <= static_cast<size_t>(optin);
  at::Tensor work;
  if (!a.cached) work = at::empty({logits.size(0), a.V}, logits.options().dtype(at::kFloat));
  const size_t smem = a.cached ? row_bytes : 0;
  auto kernel = sample_kernel<T>;
  // Raised once per size (on the first, uncaptured calls), not at every call of a CUDA graph capture.
  static size_t smem_allowed = 48 << 10;
  if (smem > smem_allowed) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    smem_allowed = smem;
  }
  kernel<<<static_cast<unsigned int>(logits.size(0)), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(logits.const_data_ptr()), race.const_data_ptr<float>(),
      a.cached ? nullptr : work.mutable_data_ptr<float>(), out.mutable_data_ptr<int64_t>(), a);
  return cudaGetLastError();
}

}  // namespace

// Arguments checked by sample.cpp: logits (B, V) float32/bf16/fp16 with unit column stride, race
// (B, V) float32 contiguous, on the current device; temperature > 0 (already clamped), V < 2^31.
cudaError_t sample_cuda(const at::Tensor& logits, const at::Tensor& race, float temperature, int64_t top_k,
                        float top_p, at::Tensor& out) {
  SampleArgs a{};
  a.V = static_cast<int>(logits.size(1));
  a.ld = logits.stride(0);
  a.temperature = temperature;
  a.top_k = top_k >= a.V ? 0 : static_cast<int>(top_k);
  a.top_p = top_p;
  switch (logits.scalar_type()) {
    case at::kBFloat16: return launch<c10::BFloat16>(logits, race, a, out);
    case at::kHalf: return launch<c10::Half>(logits, race, a, out);
    default: return launch<float>(logits, race, a, out);
  }
}

}  // namespace optimus
