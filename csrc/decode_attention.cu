/*
 * decode_attention: few-token queries against the static KV cache, split over the sequence and
 * reduced (flash-decoding). CUDA kernels.
 *
 * Math: as in decode_attention.cpp: query row (b, h, t) at p = pos[b, t] attends to slots 0..p
 * of kv head h / (H / KV), softmax(scale * q . k) @ v in float32, one rounding to the dtype.
 *
 * Work split: block (split, b * KV + kvh) takes the G = H / KV query heads x T tokens that share
 * kv head kvh (each key and value row is read from memory once for all of them) and the slots
 * [split * split_len, (split + 1) * split_len), clipped to the largest position among its
 * queries: a block past every position exits at once, so only the slots up to the positions are
 * read, whatever max_seq_len. Within a block, tiles of kChunk slots go to shared memory (keys and
 * values as float32, rows padded by one float against bank conflicts); one thread per (query,
 * slot) computes a score; one warp per query keeps the online softmax (running max m, sum l,
 * rescale factor); one thread per (query, dim) updates the float32 accumulator. Each split
 * writes (acc, m, l); a second kernel merges the splits of a row:
 *   out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,  M = max_s m_s.
 * With a single split the first kernel writes the output itself. The number of splits is fixed
 * by (B, KV, S) and the SM count (so the grid does not change inside a CUDA graph): about two
 * blocks per SM when the positions fill the cache.
 *
 * Memory layout: q (B, H, T, hd), caches (B, KV, S, hd), out (B, H, T, hd), all contiguous;
 * pos (B, T) int64. A tile of slots is one contiguous run of the cache: 16-byte loads when hd is
 * a multiple of 8 (bf16/fp16) or 4 (fp32) and the caches are 16-byte aligned, else per element.
 *
 * Bounds: a position outside [0, S) sets status[0] = 1 (raising would need a host sync every
 * layer; the Decoder checks status) and the row attends up to its position clamped into [0, S).
 *
 * Dtypes: float32, bfloat16, float16; math in float32.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace optimus {
namespace {

constexpr int kThreads = 128;   // threads per block: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;      // slots per shared-memory tile: one warp's lanes in the softmax step
constexpr int kPackBytes = 16;  // widest global load a thread can issue
constexpr int kBlocksPerSm = 2; // splits aim at this many blocks per SM

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

struct DecodeArgs {
  int H, KV, T, S, hd, G, GT;  // GT = G * T queries per block
  int splits, split_len;
  float scale;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Copies n consecutive cache rows (n * hd elements from src) into a padded float32 tile.
template <typename T, int V>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, float* __restrict__ tile, int n, int hd) {
  const int count = n * hd / V;
  for (int i = threadIdx.x; i < count; i += kThreads) {
    const Pack<T, V> p = reinterpret_cast<const Pack<T, V>*>(src)[i];
    const int e = i * V, j = e / hd, d = e % hd;  // hd % V == 0: a pack never straddles two rows
#pragma unroll
    for (int u = 0; u < V; ++u) tile[j * (hd + 1) + d + u] = static_cast<float>(p.v[u]);
  }
}

// ----------------------------------------------------------------------------- kernels

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
decode_attention_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                              const int64_t* __restrict__ pos, float* __restrict__ part_acc,
                              float* __restrict__ part_ml, T* __restrict__ out, int* __restrict__ status,
                              const DecodeArgs a) {
  extern __shared__ float smem[];
  const int hd = a.hd, GT = a.GT;
  float* qs = smem;                       // (GT, hd) queries, pre-scaled
  float* acc = qs + GT * hd;              // (GT, hd) running sums of p * v
  float* ks = acc + GT * hd;              // (kChunk, hd + 1) keys of the tile
  float* vs = ks + kChunk * (hd + 1);     // (kChunk, hd + 1) values of the tile
  float* ps = vs + kChunk * (hd + 1);     // (GT, kChunk) scores, then their exp
  float* m = ps + GT * kChunk;            // (GT,) running max
  float* l = m + GT;                      // (GT,) running sum
  float* corr = l + GT;                   // (GT,) rescale of acc for this tile
  int* lim = reinterpret_cast<int*>(corr + GT);  // (GT,) last visible slot
  __shared__ int last_slot;

  const int split = blockIdx.x, bk = blockIdx.y, b = bk / a.KV, kvh = bk % a.KV;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) last_slot = -1;
  __syncthreads();
  for (int qi = tid; qi < GT; qi += kThreads) {  // query qi = g * T + t: head kvh * G + g, token t
    const int64_t p = pos[static_cast<int64_t>(b) * a.T + qi % a.T];
    if ((p < 0 || p >= a.S) && split == 0 && kvh == 0) *status = 1;
    lim[qi] = static_cast<int>(min(max(p, int64_t{0}), int64_t{a.S - 1}));
    m[qi] = -INFINITY;
    l[qi] = 0.f;
    atomicMax(&last_slot, lim[qi]);
  }
  const int64_t row0 = (static_cast<int64_t>(b) * a.H + kvh * a.G) * a.T;  // output row of query 0
  for (int i = tid; i < GT * hd; i += kThreads) {
    qs[i] = static_cast<float>(q[row0 * hd + i]) * a.scale;  // the block's queries are one run of q
    acc[i] = 0.f;
  }
  __syncthreads();
  const int start = split * a.split_len, end = min(start + a.split_len, last_slot + 1);
  const T* k_base = k_cache + (static_cast<int64_t>(bk) * a.S) * hd;
  const T* v_base = v_cache + (static_cast<int64_t>(bk) * a.S) * hd;
  for (int c0 = start; c0 < end; c0 += kChunk) {
    const int n = min(kChunk, end - c0);
    load_tile<T, V>(k_base + static_cast<int64_t>(c0) * hd, ks, n, hd);
    load_tile<T, V>(v_base + static_cast<int64_t>(c0) * hd, vs, n, hd);
    __syncthreads();
    for (int i = tid; i < GT * kChunk; i += kThreads) {
      const int qi = i / kChunk, j = i % kChunk;
      float s = -INFINITY;
      if (j < n && c0 + j <= lim[qi]) {
        const float* qr = qs + qi * hd;
        const float* kr = ks + j * (hd + 1);
        s = 0.f;
        for (int d = 0; d < hd; ++d) s = fmaf(qr[d], kr[d], s);
      }
      ps[i] = s;
    }
    __syncthreads();
    for (int qi = warp; qi < GT; qi += kWarps) {  // online softmax, one warp per query
      const float s = ps[qi * kChunk + lane];
      const float m_old = m[qi], m_new = fmaxf(m_old, warp_max(s));
      const bool any = m_new != -INFINITY;  // some visible slot so far
      const float p = any ? expf(s - m_new) : 0.f;
      const float sum = warp_sum(p);
      ps[qi * kChunk + lane] = p;
      if (lane == 0) {
        const float c = any ? expf(m_old - m_new) : 1.f;
        corr[qi] = c;
        l[qi] = l[qi] * c + sum;
        m[qi] = m_new;
      }
    }
    __syncthreads();
    for (int i = tid; i < GT * hd; i += kThreads) {
      const int qi = i / hd, d = i % hd;
      const float* pr = ps + qi * kChunk;
      float x = acc[i] * corr[qi];
      for (int j = 0; j < n; ++j) x = fmaf(pr[j], vs[j * (hd + 1) + d], x);
      acc[i] = x;
    }
    __syncthreads();
  }
  if (a.splits == 1) {
    for (int i = tid; i < GT * hd; i += kThreads) out[row0 * hd + i] = static_cast<T>(acc[i] / l[i / hd]);
    return;
  }
  for (int i = tid; i < GT * hd; i += kThreads) {  // part_acc[row, split, d], rows row0 .. row0 + GT
    const int qi = i / hd, d = i % hd;
    part_acc[((row0 + qi) * a.splits + split) * hd + d] = acc[i];
  }
  for (int qi = tid; qi < GT; qi += kThreads) {
    part_ml[((row0 + qi) * a.splits + split) * 2] = m[qi];
    part_ml[((row0 + qi) * a.splits + split) * 2 + 1] = l[qi];
  }
}

// One block per output row: merges the splits' (acc, m, l). A split with no visible slot has
// m = -inf and weight 0; split 0 always holds slot 0, so the total weight is positive.
template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_attention_reduce_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                               T* __restrict__ out, const DecodeArgs a) {
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * a.splits * 2;
  float M = -INFINITY;
  for (int s = 0; s < a.splits; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < a.splits; ++s) L += ml[2 * s] == -INFINITY ? 0.f : expf(ml[2 * s] - M) * ml[2 * s + 1];
  for (int d = threadIdx.x; d < a.hd; d += kThreads) {
    float x = 0.f;
    for (int s = 0; s < a.splits; ++s) {
      if (ml[2 * s] != -INFINITY) x += expf(ml[2 * s] - M) * part_acc[(row * a.splits + s) * a.hd + d];
    }
    out[row * a.hd + d] = static_cast<T>(x / L);
  }
}

// ----------------------------------------------------------------------------- launchers
// Called by decode_attention.cpp once every argument is checked (one dtype, contiguous tensors on
// the current device, G * T <= 64, hd <= 256, 32-bit indices suffice).

template <typename T, int V>
cudaError_t launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                   at::Tensor& status, const DecodeArgs& a, at::Tensor& out) {
  const int64_t rows = q.size(0) * a.H * a.T;
  at::Tensor part_acc, part_ml;
  if (a.splits > 1) {
    part_acc = at::empty({rows, a.splits, a.hd}, q.options().dtype(at::kFloat));
    part_ml = at::empty({rows, a.splits, 2}, q.options().dtype(at::kFloat));
  }
  const size_t smem = sizeof(float) * (2 * static_cast<size_t>(a.GT) * a.hd + 2 * kChunk * (a.hd + 1) +
                                       static_cast<size_t>(a.GT) * kChunk + 4 * a.GT);
  auto kernel = decode_attention_split_kernel<T, V>;
  // Raised once per size (on the first, uncaptured calls), not at every call of a CUDA graph capture.
  static size_t smem_allowed = 48 << 10;
  cudaError_t err = cudaSuccess;
  if (smem > smem_allowed) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    smem_allowed = smem;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(a.splits, static_cast<unsigned int>(q.size(0) * a.KV));
  kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k_cache.const_data_ptr()),
      static_cast<const T*>(v_cache.const_data_ptr()), pos.const_data_ptr<int64_t>(),
      a.splits > 1 ? part_acc.mutable_data_ptr<float>() : nullptr,
      a.splits > 1 ? part_ml.mutable_data_ptr<float>() : nullptr, static_cast<T*>(out.mutable_data_ptr()),
      status.mutable_data_ptr<int>(), a);
  err = cudaGetLastError();
  if (err != cudaSuccess || a.splits == 1) return err;
  decode_attention_reduce_kernel<T><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
      part_acc.const_data_ptr<float>(), part_ml.const_data_ptr<float>(), static_cast<T*>(out.mutable_data_ptr()), a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_packed(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& pos, at::Tensor& status, const DecodeArgs& a, at::Tensor& out) {
  constexpr int V = kPackBytes / sizeof(T);
  const bool vec = a.hd % V == 0 && reinterpret_cast<uintptr_t>(k_cache.const_data_ptr()) % kPackBytes == 0 &&
                   reinterpret_cast<uintptr_t>(v_cache.const_data_ptr()) % kPackBytes == 0;
  return vec ? launch<T, V>(q, k_cache, v_cache, pos, status, a, out)
             : launch<T, 1>(q, k_cache, v_cache, pos, status, a, out);
}

}  // namespace

cudaError_t decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& pos, at::Tensor& status, double scale, at::Tensor& out) {
  DecodeArgs a{};
  const int B = static_cast<int>(q.size(0));
  a.H = static_cast<int>(q.size(1));
  a.T = static_cast<int>(q.size(2));
  a.hd = static_cast<int>(q.size(3));
  a.KV = static_cast<int>(k_cache.size(1));
  a.S = static_cast<int>(k_cache.size(2));
  a.G = a.H / a.KV;
  a.GT = a.G * a.T;
  a.scale = static_cast<float>(scale);
  const int chunks = (a.S + kChunk - 1) / kChunk;
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device());
  if (err != cudaSuccess) return err;
  const int want = std::max(1, (kBlocksPerSm * sms + B * a.KV - 1) / (B * a.KV));
  const int chunks_per_split = (chunks + std::min(want, chunks) - 1) / std::min(want, chunks);
  a.split_len = chunks_per_split * kChunk;
  a.splits = (a.S + a.split_len - 1) / a.split_len;
  switch (q.scalar_type()) {
    case at::kBFloat16: return launch_packed<c10::BFloat16>(q, k_cache, v_cache, pos, status, a, out);
    case at::kHalf: return launch_packed<c10::Half>(q, k_cache, v_cache, pos, status, a, out);
    default: return launch_packed<float>(q, k_cache, v_cache, pos, status, a, out);
  }
}

}  // namespace optimus
