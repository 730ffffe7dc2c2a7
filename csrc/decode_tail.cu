/*
 * decode_tail: what follows a decoding step's attention in a block, and the next block's QKV
 * projection, for one row, in one persistent launch. CUDA kernel. The math is decode_tail.cpp's
 * (three or four decode_linear steps); for one row this kernel computes exactly the numbers the
 * decode_linear launches it replaces compute (the same sums in the same order: below).
 *
 * Why: at batch 1 a layer's four projections were four launches of a few microseconds each, every
 * one a chain of latencies (wait for the kernel before, read x, normalise, multiply, store) around
 * 2-12 MB of weights that alone would stream in 0.5-2.7 us. Here each block's weights are all
 * requested at once, when the kernel starts (while the attention before it still runs), into
 * shared memory: the default model's 19.3 MB a layer plus the next QKV's 3.1 MB are 172 KB of
 * slices per block on 128 blocks (190 KB with the staged row and the gains). The projections then
 * run out of shared memory, separated by grid barriers instead of kernel boundaries. H200,
 * 2026-12-03 (tools/gpu_session5.sh): the batch-1 step 0.248 -> 0.228 ms; the kernel alone,
 * eager, 17.3 us a layer against 20.5 for the four launches.
 *
 * Work split: block b owns rows [b r, (b + 1) r) of each matrix (r = ceil(N / SMs) per matrix, so
 * every slice is one contiguous range of weight rows, copied by cp.async in one group per
 * matrix). Phases, a grid barrier between each and the next:
 *   C: x1 = x + y @ wo^T                       (rows of wo)
 *   D: h = swiglu(norm2(x1) @ [gate; up]^T)    (rows of gate and the same rows of up)
 *   E: out = x1 + h @ wdown^T                  (rows of wdown)
 *   F: qkv = next_norm(out) @ next_wqkv^T      (rows of next_wqkv; only with a next block)
 * Each phase first stages its input row in shared memory (read with ld.global.cg: other blocks
 * wrote it during this kernel, so it must not come from a stale L1 line), normalised where the
 * step has a norm, as T: a lane's 16-byte pack of x then lies next to its neighbours'. (Staged as
 * float32, as decode_linear_kernel stages it, lanes 32 bytes apart put eight lanes on each bank:
 * the gate-up phase took 8.8 of the kernel's 29.4 us a layer.) x1 and h live in global scratch
 * between phases.
 *
 * Same bits as decode_linear_kernel with one row (decode_linear.cu): a column is one warp's dot
 * product, lane l summing packs l, l + 32, ... in order, each pack's elements in order, then the
 * same xor-shuffle tree; the norm's sum of squares is taken by the first 128 threads in that
 * kernel's order (thread t: elements t, t + 128, ...; four warp sums added in order); the
 * roundings are the same, and every staged value is a value of T in both kernels. So the fused
 * step and the unfused one agree bit for bit, which the CUDA tests check.
 *
 * Grid barrier: a counter per barrier in device memory; each block's thread 0 adds itself
 * (release) and waits until all have (acquire); the last block past its last barrier zeroes the
 * counters. It needs every block resident at once: the grid is at most one block per
 * multiprocessor, and nothing can take a multiprocessor from it for good (the kernels before it
 * finish on their own; the ones after it start, through programmatic dependent launch, only once
 * every block has passed the last barrier and called pdl_launch_dependents()). One launch at a
 * time per device: the counters are module globals, so two of these kernels running at once on
 * two streams would share them (the Decoder runs its step on one stream).
 *
 * Programmatic dependent launch (pdl.h): the weight copies are issued before pdl_wait() (no
 * kernel of the step writes a weight), y and x are read after it.
 *
 * Layout: y (1, A), x (1, D) rows; wo (D, A), gate-up (2 Hd, D) = [gate; up], wdown (D, Hd),
 * next_wqkv (Nq, D) contiguous; gains (D,). Dtypes: float32, bfloat16, float16, one for all.
 * Taken when every K (A, D, Hd) is a whole number of 16-byte packs, the weights are 16-byte
 * aligned and the block's slices fit in shared memory; otherwise (and for more than one row)
 * the launcher returns cudaErrorNotSupported and decode_tail.cpp runs the decode_linear steps.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "pdl.h"
#include "phase_clocks.h"

namespace optimus {
namespace {

constexpr int kWarps = 16;  // warps per block: 512 threads
constexpr int kThreads = kWarps * 32;
constexpr int kNormThreads = 128;  // decode_linear_kernel's block: its norm's order of summation
constexpr int kPackBytes = 16;
constexpr int kMatrices = 5;  // wo, gate, up, wdown, next_wqkv: one shared-memory slice each
constexpr int kMaxStagedPacks = 4;  // 16-byte packs of a staged row per thread: K up to 16,384 (bf16)
// A grid barrier waits microseconds; one still waiting after this long means a block can never
// arrive (the grid was not all resident), and the kernel traps rather than hang the process.
constexpr uint64_t kBarrierTimeoutNs = 2'000'000'000;

// The grid barriers' counters: [0, 3) one per barrier of a launch, [3] the blocks done waiting.
__device__ unsigned int barrier_count[4] = {0, 0, 0, 0};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {  // the value of v once stored as T
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
__device__ __forceinline__ float load_cg(const T* p) {  // an L2 (coherent) load, widened
  if constexpr (sizeof(T) == 4) {
    return __ldcg(reinterpret_cast<const float*>(p));
  } else {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &bits, sizeof(v));
    return static_cast<float>(v);
  }
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Barrier i of a launch: the block's writes are out once its threads have synchronised; thread 0
// then adds the block to counter i with release semantics and waits (acquire) until every block
// has. Measured on the H200 against a barrier whose last arrival bumps a generation the others
// wait for: 0.6 us less a barrier (27.5 against 29.4 us a layer, tools/bench_decode_tail.py, in the
// first version of the kernel).
__device__ __forceinline__ void grid_barrier(int i) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int* count = &barrier_count[i];
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
    const uint64_t start = global_ns();
    unsigned int arrived = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(arrived) : "l"(count) : "memory");
      if (arrived < gridDim.x && global_ns() - start > kBarrierTimeoutNs) __trap();
    } while (arrived < gridDim.x);
  }
  __syncthreads();
}

// After a block's last barrier: the last block to get here (every other one is past all its
// waits) zeroes the counters for the next launch.
__device__ __forceinline__ void barriers_done() {
  if (threadIdx.x == 0 && atomicAdd(&barrier_count[3], 1u) == gridDim.x - 1) {
    for (int i = 0; i < 4; ++i) barrier_count[i] = 0;
    __threadfence();
  }
}

template <int Pending>
__device__ __forceinline__ void wait_copies() {  // all but the Pending newest groups have landed, block-wide
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
  __syncthreads();
}

template <typename T>
struct Args {
  const T* y;          // (A,) the attention's output
  const T* x;          // (D,) the residual stream
  const T* w[kMatrices];  // wo, gate rows, up rows, wdown, next_wqkv (nullptr: no next block)
  const T* norm2;      // (D,)
  const T* next_norm;  // (D,) or nullptr
  T* x1;               // (D,) scratch: x after the attention's residual add
  T* h;                // (Hd,) scratch: the SwiGLU output
  T* out;              // (D,)
  T* qkv;              // (Nq,)
  int A, D, Hd, Nq;
  float eps, next_eps;
  int rows[kMatrices];          // rows per block of each matrix
  int smem_offset[kMatrices];   // bytes: where each slice starts in shared memory
  int xs_offset, gain_offset;   // bytes: the staged input row (T, max K), the two gains (float, 2 D)
};

// xs = row (K,), normalised as decode_linear_kernel's prologue does when gain is given; held as T
// (the opening comment says why).
template <typename T, int V>
__device__ void stage_row(T* xs, const T* row, int K, const float* gain, float eps, float* partial) {
  uint4 packs[kMaxStagedPacks];  // all requested before any is stored (at most a few a thread)
#pragma unroll
  for (int i = 0; i < kMaxStagedPacks; ++i) {
    const int p = threadIdx.x + i * kThreads;
    if (p < K / V) packs[i] = __ldcg(reinterpret_cast<const uint4*>(row) + p);
  }
#pragma unroll
  for (int i = 0; i < kMaxStagedPacks; ++i) {
    const int p = threadIdx.x + i * kThreads;
    if (p < K / V) reinterpret_cast<uint4*>(xs)[p] = packs[i];
  }
  __syncthreads();
  if (gain == nullptr) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x < kNormThreads) {
    float squares = 0.0f;
    for (int k = threadIdx.x; k < K; k += kNormThreads) {
      const float v = static_cast<float>(xs[k]);
      squares += v * v;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    if (lane == 0) partial[warp] = squares;
  }
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
  const float scale = rsqrtf(total / K + eps);
  for (int k = threadIdx.x; k < K; k += kThreads)
    xs[k] = static_cast<T>(gain[k] * round_to<T>(static_cast<float>(xs[k]) * scale));
  __syncthreads();
}

// One column: the warp's dot product of xs (K,) with a weight row in shared memory, in
// decode_linear_kernel's order; every lane gets the sum.
template <typename T, int V>
__device__ __forceinline__ float warp_dot(const T* xs, const T* row, int K) {
  const int lane = threadIdx.x % 32;
  const Pack<T, V>* xp = reinterpret_cast<const Pack<T, V>*>(xs);
  const Pack<T, V>* wp = reinterpret_cast<const Pack<T, V>*>(row);
  float acc = 0.0f;
#pragma unroll 4
  for (int p = lane; p < K / V; p += 32) {
    const Pack<T, V> w = wp[p], xv = xp[p];
#pragma unroll
    for (int e = 0; e < V; ++e) acc += static_cast<float>(xv.v[e]) * static_cast<float>(w.v[e]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  return acc;
}

// ----------------------------------------------------------------------------- kernel

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1) decode_tail_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float partial[kNormThreads / 32];
  PHASE_CLOCKS_BEGIN();  // tools/phase_clocks.py names the points
  const T* slice[kMatrices];
  int first[kMatrices], count[kMatrices];
  const int Ns[kMatrices] = {a.D, a.Hd, a.Hd, a.D, a.Nq};
  const int Ks[kMatrices] = {a.A, a.D, a.D, a.Hd, a.D};
  // Each matrix's slice: one cp.async group (an empty one without a next block), in the order the
  // phases use them; gate and up are one group.
#pragma unroll
  for (int m = 0; m < kMatrices; ++m) {
    first[m] = blockIdx.x * a.rows[m];
    count[m] = a.w[m] == nullptr ? 0 : max(0, min(a.rows[m], Ns[m] - first[m]));
    slice[m] = reinterpret_cast<const T*>(smem + a.smem_offset[m]);
    const int64_t packs = int64_t{count[m]} * Ks[m] * sizeof(T) / kPackBytes;
    const char* src = reinterpret_cast<const char*>(a.w[m] + int64_t{first[m]} * Ks[m]);
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem + a.smem_offset[m]));
    for (int64_t i = threadIdx.x; i < packs; i += kThreads)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + static_cast<uint32_t>(i * kPackBytes)),
                   "l"(src + i * kPackBytes)
                   : "memory");
    if (m != 1) asm volatile("cp.async.commit_group;" ::: "memory");
  }
  T* xs = reinterpret_cast<T*>(smem + a.xs_offset);
  float* gain2 = reinterpret_cast<float*>(smem + a.gain_offset);
  float* gain_next = gain2 + a.D;
  for (int k = threadIdx.x; k < a.D; k += kThreads) {  // weights too: before the wait
    gain2[k] = static_cast<float>(a.norm2[k]);
    if (a.next_norm != nullptr) gain_next[k] = static_cast<float>(a.next_norm[k]);
  }
  PHASE_CLOCK();
  pdl_wait();  // y and x are earlier kernels' output
  PHASE_CLOCK();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // C: x1 = x + y @ wo^T
  stage_row<T, V>(xs, a.y, a.A, nullptr, 0.0f, partial);
  PHASE_CLOCK();
  wait_copies<3>();
  PHASE_CLOCK();
  for (int i = warp; i < count[0]; i += kWarps) {
    const int j = first[0] + i;
    const float residual = lane == 0 ? load_cg(a.x + j) : 0.0f;  // in flight during the sum
    const float acc = warp_dot<T, V>(xs, slice[0] + int64_t{i} * a.A, a.A);
    if (lane == 0) a.x1[j] = static_cast<T>(residual + round_to<T>(acc));
  }
  PHASE_CLOCK();
  grid_barrier(0);
  PHASE_CLOCK();

  // D: h = swiglu(norm2(x1) @ [gate; up]^T)
  stage_row<T, V>(xs, a.x1, a.D, gain2, a.eps, partial);
  PHASE_CLOCK();
  wait_copies<2>();
  PHASE_CLOCK();
  for (int i = warp; i < count[1]; i += kWarps) {
    const float g = round_to<T>(warp_dot<T, V>(xs, slice[1] + int64_t{i} * a.D, a.D));
    const float u = round_to<T>(warp_dot<T, V>(xs, slice[2] + int64_t{i} * a.D, a.D));
    if (lane == 0) a.h[first[1] + i] = static_cast<T>(g / (1.0f + __expf(-g)) * u);
  }
  PHASE_CLOCK();
  grid_barrier(1);
  PHASE_CLOCK();
  const bool following = a.w[4] != nullptr;
  if (!following) barriers_done();

  // E: out = x1 + h @ wdown^T
  stage_row<T, V>(xs, a.h, a.Hd, nullptr, 0.0f, partial);
  PHASE_CLOCK();
  wait_copies<1>();
  PHASE_CLOCK();
  for (int i = warp; i < count[3]; i += kWarps) {
    const int j = first[3] + i;
    const float residual = lane == 0 ? load_cg(a.x1 + j) : 0.0f;
    const float acc = warp_dot<T, V>(xs, slice[3] + int64_t{i} * a.Hd, a.Hd);
    if (lane == 0) a.out[j] = static_cast<T>(residual + round_to<T>(acc));
  }
  PHASE_CLOCK();
  if (!following) {
    pdl_launch_dependents();
    PHASE_CLOCKS_PRINT("decode_tail", blockIdx.x, blockIdx.x == 0 || blockIdx.x == gridDim.x - 1);
    return;
  }
  grid_barrier(2);
  PHASE_CLOCK();
  barriers_done();
  pdl_launch_dependents();  // every block is past the last barrier: the next kernel may take SMs

  // F: qkv = next_norm(out) @ next_wqkv^T
  stage_row<T, V>(xs, a.out, a.D, gain_next, a.next_eps, partial);
  wait_copies<0>();
  for (int i = warp; i < count[4]; i += kWarps) {
    const float acc = warp_dot<T, V>(xs, slice[4] + int64_t{i} * a.D, a.D);
    if (lane == 0) a.qkv[first[4] + i] = static_cast<T>(acc);
  }
  PHASE_CLOCK();
  PHASE_CLOCKS_PRINT("decode_tail", blockIdx.x, blockIdx.x == 0 || blockIdx.x == gridDim.x - 1);
}

// ----------------------------------------------------------------------------- launcher

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0;
}

bool enabled() {  // OPTIMUS_DECODE_TAIL=0 takes the decode_linear launches (read per call, for measuring)
  const char* v = std::getenv("OPTIMUS_DECODE_TAIL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

template <typename T>
cudaError_t launch(const at::Tensor& y, const at::Tensor& x, const at::Tensor& wo, const at::Tensor& norm2,
                   const at::Tensor& wgu, const at::Tensor& wdown, const at::Tensor* next_norm,
                   const at::Tensor* next_wqkv, double eps, double next_eps, at::Tensor& out, at::Tensor& qkv) {
  constexpr int V = kPackBytes / sizeof(T);
  Args<T> a{};
  a.A = static_cast<int>(y.size(1));
  a.D = static_cast<int>(x.size(1));
  a.Hd = static_cast<int>(wgu.size(0) / 2);
  a.Nq = next_wqkv ? static_cast<int>(next_wqkv->size(0)) : 0;
  const T* gu = static_cast<const T*>(wgu.const_data_ptr());
  const T* weights[kMatrices] = {static_cast<const T*>(wo.const_data_ptr()), gu, gu + int64_t{a.Hd} * a.D,
                                 static_cast<const T*>(wdown.const_data_ptr()),
                                 next_wqkv ? static_cast<const T*>(next_wqkv->const_data_ptr()) : nullptr};
  const int Ns[kMatrices] = {a.D, a.Hd, a.Hd, a.D, a.Nq};
  const int Ks[kMatrices] = {a.A, a.D, a.D, a.Hd, a.D};
  for (int m = 0; m < kMatrices; ++m)
    if (Ks[m] % V != 0 || (weights[m] != nullptr && !aligned(weights[m]))) return cudaErrorNotSupported;
  // The staged rows: 16-byte aligned, at most kMaxStagedPacks packs a thread.
  if (!aligned(y.const_data_ptr()) || !aligned(x.const_data_ptr()) ||
      std::max({a.A, a.D, a.Hd}) / V > kMaxStagedPacks * kThreads)
    return cudaErrorNotSupported;

  int device = 0, sms = 1, limit = 48 * 1024;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  // Rows per block: the fewest that put every matrix on at most one block per multiprocessor;
  // the grid is then the most blocks any matrix needs.
  int blocks = 1;
  for (int m = 0; m < kMatrices; ++m) {
    a.rows[m] = std::max(1, (Ns[m] + sms - 1) / sms);
    if (Ns[m] > 0) blocks = std::max(blocks, (Ns[m] + a.rows[m] - 1) / a.rows[m]);
  }
  size_t bytes = 0;
  for (int m = 0; m < kMatrices; ++m) {
    a.smem_offset[m] = static_cast<int>(bytes);
    if (weights[m] != nullptr) bytes += static_cast<size_t>(a.rows[m]) * Ks[m] * sizeof(T);
  }
  a.xs_offset = static_cast<int>(bytes);
  bytes += (std::max({a.A, a.D, a.Hd}) * sizeof(T) + kPackBytes - 1) / kPackBytes * kPackBytes;
  a.gain_offset = static_cast<int>(bytes);
  bytes += sizeof(float) * 2 * a.D;
  if (bytes > static_cast<size_t>(limit)) return cudaErrorNotSupported;

  auto kernel = decode_tail_kernel<T, V>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  int per_sm = 0;
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, bytes);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorNotSupported;

  at::Tensor x1 = at::empty({a.D}, x.options()), h = at::empty({a.Hd}, x.options());
  a.y = static_cast<const T*>(y.const_data_ptr());
  a.x = static_cast<const T*>(x.const_data_ptr());
  for (int m = 0; m < kMatrices; ++m) a.w[m] = weights[m];
  a.norm2 = static_cast<const T*>(norm2.const_data_ptr());
  a.next_norm = next_norm ? static_cast<const T*>(next_norm->const_data_ptr()) : nullptr;
  a.x1 = static_cast<T*>(x1.mutable_data_ptr());
  a.h = static_cast<T*>(h.mutable_data_ptr());
  a.out = static_cast<T*>(out.mutable_data_ptr());
  a.qkv = static_cast<T*>(qkv.mutable_data_ptr());
  a.eps = static_cast<float>(eps);
  a.next_eps = static_cast<float>(next_eps);
  return launch_pdl(kernel, dim3(blocks), dim3(kThreads), bytes, at::cuda::getCurrentCUDAStream(), a);
}

}  // namespace

// Checked by decode_tail.cpp: shapes, one dtype and device, contiguous tensors. Launches the fused
// kernel for one row, or returns cudaErrorNotSupported (nothing launched) where it does not apply.
cudaError_t decode_tail_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& wo, const at::Tensor& norm2,
                             const at::Tensor& wgu, const at::Tensor& wdown, const at::Tensor* next_norm,
                             const at::Tensor* next_wqkv, double eps, double next_eps, at::Tensor& out,
                             at::Tensor& qkv) {
  if (x.size(0) != 1 || !enabled()) return cudaErrorNotSupported;
  switch (x.scalar_type()) {
    case at::kBFloat16:
      return launch<c10::BFloat16>(y, x, wo, norm2, wgu, wdown, next_norm, next_wqkv, eps, next_eps, out, qkv);
    case at::kHalf:
      return launch<c10::Half>(y, x, wo, norm2, wgu, wdown, next_norm, next_wqkv, eps, next_eps, out, qkv);
    default:
      return launch<float>(y, x, wo, norm2, wgu, wdown, next_norm, next_wqkv, eps, next_eps, out, qkv);
  }
}

}  // namespace optimus
