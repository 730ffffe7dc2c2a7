/*
 * adamw_step: the global-norm gradient clip and AdamW over a list of float32 parameters. CUDA
 * kernels. The math is adamw.cpp's opening comment (and adamw_step_ref in optimus.py).
 *
 * Why: the trainer's step was the norm of the gradients (torch's _foreach_norm and a few small
 * kernels) and torch's fused AdamW dividing by the clip factor: 1.53 ms for the default model's
 * 141.7M parameters on the H200 against the 1.06 ms its memory traffic takes at the copy rate
 * (32 bytes a parameter: the norm reads the gradient, the update reads the weight, gradient and
 * two moments and writes three of them). Both passes here are plain streams of 16-byte accesses
 * over contiguous ranges, the whole GPU busy until the last one: 1.38 ms in tools/bench_adamw.py,
 * 1.29 in bench.py's opt:optimizer-ext (torch's 1.53 in both; H200, 2026-12-03).
 *
 * Launches: a squares and an update launch per group of up to kMaxTensors tensors (more tensors:
 * more groups), one norm launch between them:
 *   squares: every block sums the squares of its range of gradients into one float32 partial
 *            (a grid of as many blocks as fit the GPU at once); block 0 adds 1 to the group's
 *            step counters (the update reads them after, in stream order).
 *   norm:    one block adds every group's partials in a fixed order, in float64, and writes the
 *            norm (float32): the same bits on every run, which resume's exactness needs.
 *   update:  AdamW, each gradient times the clip factor min(1, max_norm / (norm + 1e-6)) (1 when
 *            max_norm <= 0), read from the norm on the device: no host synchronisation, so the
 *            step can be captured in a CUDA graph.
 * The tensors of a group are one index space of 4-float vectors, tensor after tensor; each block
 * of a launch takes one contiguous range of it (so of at most a few tensors) and its threads
 * stride through the range, several vectors of each array in flight per thread. A
 * tensor's last vector, when its size is not a multiple of 4, and a tensor any of whose four
 * arrays is not 16-byte aligned, go element by element.
 *
 * The group's table (pointers, sizes, weight decays) travels in the kernel's parameters, whose
 * classic limit is 4 KB: kMaxTensors is what fits in it.
 *
 * Layout: every tensor contiguous, float32; the step counters float32 scalars and lr a float32
 * scalar, all on the parameters' device.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace optimus {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 48;  // a group's table: 48 x 64 bytes, under the 4 KB of kernel parameters
// Vectors per thread per round, all in flight before the first use: the squares' 4 loads, the
// update's 4 x 4 (p, g, m, v). H200, 2026-12-03 (tools/bench_adamw.py, the step of the default
// model): the first version's squares had one load a thread in flight on 2 blocks a
// multiprocessor (8 KB a multiprocessor), and the whole step took 1.71 ms against torch's 1.80;
// with 4 loads and a full grid, updates of 1, 2 and 4 vectors a thread took 1.42, 1.40 and 1.38
// ms (torch: 1.53), streaming (.cs) accesses 1.42 at 2, and capping the registers for more blocks
// a multiprocessor (1 vector at 6 blocks, 2 at 4) 2.10 and 1.53.
constexpr int kSquaresIlp = 4;
constexpr int kIlp = 4;
constexpr int kVec = 4;  // floats per 16-byte access
constexpr float kClipEps = 1e-6f;  // clip_grad_norm_'s: max_norm / (norm + 1e-6)

struct Slot {  // one tensor of a group
  float* p;
  const float* g;
  float* m;
  float* v;
  float* step;
  int64_t numel;
  int64_t start;  // its first vector in the group's index space
  float weight_decay;
  int vec;  // all four arrays 16-byte aligned
};

struct Table {
  Slot s[kMaxTensors];
  int count;
  int64_t total;  // vectors in the group
};

__host__ __device__ __forceinline__ int64_t vectors(int64_t numel) {
  return (numel + kVec - 1) / kVec;
}

// Calls f(slot, first, last) for each tensor's share [first, last) (vectors of that tensor) of
// the block's range of the group. Block-uniform: every thread takes the same path.
template <typename F>
__device__ __forceinline__ void for_each_share(const Table& t, F&& f) {
  const int64_t per_block = (t.total + gridDim.x - 1) / gridDim.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < t.total ? begin + per_block : t.total;
  int i = 0;
  while (i + 1 < t.count && t.s[i + 1].start <= begin) ++i;
  for (int64_t at = begin; at < end && i < t.count; ++i) {
    const Slot& s = t.s[i];
    const int64_t stop = s.start + vectors(s.numel) < end ? s.start + vectors(s.numel) : end;
    if (stop > at) f(s, at - s.start, stop - s.start);
    at = stop > at ? stop : at;
  }
}

__device__ float block_sum(float v, float* shared) {  // shared: kThreads / 32 floats
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;  // thread 0's
}

__global__ void __launch_bounds__(kThreads) adamw_squares_kernel(const __grid_constant__ Table t, float* partial) {
  __shared__ float shared[kThreads / 32];
  float acc = 0.0f;
  for_each_share(t, [&](const Slot& s, int64_t first, int64_t last) {
    const bool vec = s.vec != 0;
    for (int64_t i0 = first + threadIdx.x; i0 < last; i0 += kSquaresIlp * kThreads) {
      float4 g[kSquaresIlp];
      bool whole[kSquaresIlp];
#pragma unroll
      for (int u = 0; u < kSquaresIlp; ++u) {
        const int64_t i = i0 + u * kThreads;
        whole[u] = vec && i < last && (i + 1) * kVec <= s.numel;
        if (whole[u]) g[u] = __ldcs(reinterpret_cast<const float4*>(s.g) + i);
      }
#pragma unroll
      for (int u = 0; u < kSquaresIlp; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (whole[u]) {
          acc += g[u].x * g[u].x + g[u].y * g[u].y + g[u].z * g[u].z + g[u].w * g[u].w;
        } else if (i < last) {
          for (int64_t k = i * kVec; k < s.numel && k < (i + 1) * kVec; ++k) acc += s.g[k] * s.g[k];
        }
      }
    }
  });
  const float total = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < t.count; i += kThreads) *t.s[i].step += 1.0f;
}

// norm = sqrt(sum of the partials), in float64, in a fixed order: thread j takes partials j,
// j + kThreads, ...; then thread 0 adds the threads' sums in order.
__global__ void __launch_bounds__(kThreads) adamw_norm_kernel(const float* partial, int n, float* norm) {
  __shared__ double sums[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kThreads) acc += partial[i];
  sums[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int i = 0; i < kThreads; ++i) total += sums[i];
    *norm = static_cast<float>(sqrt(total));
  }
}

struct Hyper {
  float beta1, beta2, eps, max_norm;
};

__device__ __forceinline__ void adamw(float& p, float g, float& m, float& v, float decay, float beta1, float beta2,
                                      float step_size, float bc2_sqrt, float eps) {
  p = p * decay;
  m = beta1 * m + (1.0f - beta1) * g;
  v = beta2 * v + (1.0f - beta2) * g * g;
  p = p - step_size * m / (sqrtf(v) / bc2_sqrt + eps);
}

__global__ void __launch_bounds__(kThreads) adamw_update_kernel(const __grid_constant__ Table t, const float* norm,
                                                          const float* lr_ptr, Hyper h) {
  const float lr = *lr_ptr;
  float clip = 1.0f;
  if (h.max_norm > 0.0f) {
    const float c = h.max_norm / (*norm + kClipEps);
    clip = c > 1.0f ? 1.0f : c;  // a NaN norm stays NaN, as in clip_grad_norm_
  }
  for_each_share(t, [&](const Slot& s, int64_t first, int64_t last) {
    // The bias corrections in float32, as torch's fused AdamW computes them.
    const float step = *s.step;
    const float step_size = lr / (1.0f - powf(h.beta1, step));
    const float bc2_sqrt = sqrtf(1.0f - powf(h.beta2, step));
    const float decay = 1.0f - lr * s.weight_decay;
    const bool vec = s.vec != 0;
    for (int64_t i0 = first + threadIdx.x; i0 < last; i0 += kIlp * kThreads) {
      float4 p[kIlp], g[kIlp], m[kIlp], v[kIlp];
      bool whole[kIlp];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = i0 + u * kThreads;
        whole[u] = vec && i < last && (i + 1) * kVec <= s.numel;
        if (whole[u]) {
          p[u] = reinterpret_cast<const float4*>(s.p)[i];
          g[u] = reinterpret_cast<const float4*>(s.g)[i];
          m[u] = reinterpret_cast<const float4*>(s.m)[i];
          v[u] = reinterpret_cast<const float4*>(s.v)[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (whole[u]) {
          adamw(p[u].x, g[u].x * clip, m[u].x, v[u].x, decay, h.beta1, h.beta2, step_size, bc2_sqrt, h.eps);
          adamw(p[u].y, g[u].y * clip, m[u].y, v[u].y, decay, h.beta1, h.beta2, step_size, bc2_sqrt, h.eps);
          adamw(p[u].z, g[u].z * clip, m[u].z, v[u].z, decay, h.beta1, h.beta2, step_size, bc2_sqrt, h.eps);
          adamw(p[u].w, g[u].w * clip, m[u].w, v[u].w, decay, h.beta1, h.beta2, step_size, bc2_sqrt, h.eps);
          reinterpret_cast<float4*>(s.p)[i] = p[u];
          reinterpret_cast<float4*>(s.m)[i] = m[u];
          reinterpret_cast<float4*>(s.v)[i] = v[u];
        } else if (i < last) {
          for (int64_t k = i * kVec; k < s.numel && k < (i + 1) * kVec; ++k)
            adamw(s.p[k], s.g[k] * clip, s.m[k], s.v[k], decay, h.beta1, h.beta2, step_size, bc2_sqrt, h.eps);
        }
      }
    }
  });
}

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(float)) == 0;
}

}  // namespace

// Checked by adamw.cpp: lists of one length, float32 contiguous tensors on the current device,
// p / g / m / v of one shape each, steps and lr float32 scalars there. Writes the norm (0-dim).
cudaError_t adamw_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            const std::vector<at::Tensor>& steps, const at::Tensor& lr,
                            const std::vector<double>& weight_decays, double beta1, double beta2, double eps,
                            double max_norm, at::Tensor& norm) {
  std::vector<Table> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    if (groups.empty() || groups.back().count == kMaxTensors) groups.push_back(Table{});
    Table& t = groups.back();
    Slot& s = t.s[t.count++];
    s.p = static_cast<float*>(params[i].mutable_data_ptr());
    s.g = static_cast<const float*>(grads[i].const_data_ptr());
    s.m = static_cast<float*>(exp_avgs[i].mutable_data_ptr());
    s.v = static_cast<float*>(exp_avg_sqs[i].mutable_data_ptr());
    s.step = static_cast<float*>(steps[i].mutable_data_ptr());
    s.numel = params[i].numel();
    s.start = t.total;
    s.weight_decay = static_cast<float>(weight_decays[i]);
    s.vec = aligned(s.p) && aligned(s.g) && aligned(s.m) && aligned(s.v);
    t.total += vectors(s.numel);
  }
  // Both passes fill the GPU: as many blocks as fit at once (the squares' count fixes the
  // partials, so the norm's bits, for a given GPU and build).
  int device = 0, sms = 1, squares_per_sm = 1, update_per_sm = 1;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&squares_per_sm, adamw_squares_kernel, kThreads, 0) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&update_per_sm, adamw_update_kernel, kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query only costs a smaller grid
  }
  const int norm_blocks = std::max(sms, 1) * std::max(squares_per_sm, 1);
  const int update_blocks = std::max(sms, 1) * std::max(update_per_sm, 1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* norm_ptr = static_cast<float*>(norm.mutable_data_ptr());
  if (groups.empty()) return cudaMemsetAsync(norm_ptr, 0, sizeof(float), stream);
  const int partials = static_cast<int>(groups.size()) * norm_blocks;
  at::Tensor partial = at::empty({partials}, norm.options());
  float* partial_ptr = static_cast<float*>(partial.mutable_data_ptr());
  for (size_t i = 0; i < groups.size(); ++i) {
    adamw_squares_kernel<<<norm_blocks, kThreads, 0, stream>>>(groups[i], partial_ptr + i * norm_blocks);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  adamw_norm_kernel<<<1, kThreads, 0, stream>>>(partial_ptr, partials, norm_ptr);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const Hyper h{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                static_cast<float>(max_norm)};
  for (const Table& t : groups) {
    adamw_update_kernel<<<update_blocks, kThreads, 0, stream>>>(t, norm_ptr, static_cast<const float*>(lr.const_data_ptr()), h);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace optimus
