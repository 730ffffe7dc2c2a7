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
 * The one-token kernel (G * T <= kWarpQueries and hd a multiple of 32 up to 256: a decoding
 * step's shape) keeps everything in registers instead: each warp takes every kWarps-th group of
 * kSlots slots of its split, its lanes hold hd / 32 dims of each query and of its accumulators,
 * the kSlots key and value rows of a group are loaded at once (one coalesced row per warp load),
 * a score is a lane-wise product summed by shuffles, and the online softmax rescales once per
 * group. The block's warps merge their (m, l, acc) through shared memory at the end, then write
 * the output or the split's part as above. There is no tile barrier in the slot loop, so the
 * block's loads are never serialised behind its arithmetic; the tiled kernel stays for longer
 * query blocks (up to 64 queries per kv head) and odd head dims.
 * The one-token kernel and the merge kernel are launched with programmatic dependent launch
 * (pdl.h): their launch overlaps the previous kernel's tail; each waits before reading anything.
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

#include "pdl.h"

namespace optimus {
namespace {

constexpr int kThreads = 128;   // threads per block: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;      // slots per shared-memory tile: one warp's lanes in the softmax step
constexpr int kPackBytes = 16;  // widest global load a thread can issue
constexpr int kBlocksPerSm = 2; // splits aim at this many blocks per SM
constexpr int kWarpQueries = 8; // the one-token kernel's most queries per block (G * T)
constexpr int kWarpMaxDim = 256;

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
__device__ __forceinline__ void load_tile(const T* src, float* __restrict__ tile, int n, int hd) {
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
decode_attention_split_kernel(const T* q, const T* k_cache, const T* v_cache,
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

// One-token kernel (see the opening comment). Q: most queries per block (G * T), D: most dims
// per lane (hd / 32); the actual a.GT and a.hd / 32 may be smaller (loops guarded, unrolled).
template <typename T, int Q, int D>
__global__ void __launch_bounds__(kThreads)
decode_attention_warp_kernel(const T* q, const T* k_cache, const T* v_cache,
                             const int64_t* __restrict__ pos, float* __restrict__ part_acc,
                             float* __restrict__ part_ml, T* __restrict__ out, int* __restrict__ status,
                             const DecodeArgs a) {
  __shared__ float w_acc[kWarps][Q][D * 32];  // each warp's accumulators, then merged
  __shared__ float w_m[kWarps][Q], w_l[kWarps][Q];
  const int split = blockIdx.x, bk = blockIdx.y, b = bk / a.KV, kvh = bk % a.KV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int GT = a.GT, dl = a.hd / 32;  // dims per lane: lane holds d = lane * dl + i
  const int64_t row0 = (static_cast<int64_t>(b) * a.H + kvh * a.G) * a.T;  // output row of query 0
  pdl_wait();  // q and the newest cache slot are rope_kv_append's output
  pdl_launch_dependents();

  int lim[Q];  // last visible slot of each query (uniform over the warp)
  int last = -1;
#pragma unroll
  for (int qi = 0; qi < Q; ++qi) {
    lim[qi] = -1;
    if (qi < GT) {
      const int64_t p = pos[static_cast<int64_t>(b) * a.T + qi % a.T];
      if ((p < 0 || p >= a.S) && split == 0 && kvh == 0 && lane == 0 && warp == 0) *status = 1;
      lim[qi] = static_cast<int>(min(max(p, int64_t{0}), int64_t{a.S - 1}));
      last = max(last, lim[qi]);
    }
  }
  float qr[Q][D], acc[Q][D], m[Q], l[Q];
#pragma unroll
  for (int qi = 0; qi < Q; ++qi) {
    m[qi] = -INFINITY;
    l[qi] = 0.f;
#pragma unroll
    for (int i = 0; i < D; ++i) {
      acc[qi][i] = 0.f;
      qr[qi][i] = (qi < GT && i < dl) ? static_cast<float>(q[(row0 + qi) * a.hd + lane * dl + i]) * a.scale : 0.f;
    }
  }
  constexpr int kSlots = 4;  // slots per warp per round: their rows are loaded together
  const int start = split * a.split_len, end = min(start + a.split_len, last + 1);
  const T* k_base = k_cache + static_cast<int64_t>(bk) * a.S * a.hd + lane * dl;
  const T* v_base = v_cache + static_cast<int64_t>(bk) * a.S * a.hd + lane * dl;
  for (int c0 = start + warp * kSlots; c0 < end; c0 += kWarps * kSlots) {
    float kv[kSlots][D], vv[kSlots][D];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const bool in = c0 + j < end;
#pragma unroll
      for (int i = 0; i < D; ++i) {
        kv[j][i] = (in && i < dl) ? static_cast<float>(k_base[static_cast<int64_t>(c0 + j) * a.hd + i]) : 0.f;
        vv[j][i] = (in && i < dl) ? static_cast<float>(v_base[static_cast<int64_t>(c0 + j) * a.hd + i]) : 0.f;
      }
    }
#pragma unroll
    for (int qi = 0; qi < Q; ++qi) {
      if (qi >= GT) break;
      float sc[kSlots];
      float m_new = m[qi];
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        float x = 0.f;
#pragma unroll
        for (int i = 0; i < D; ++i) x = fmaf(qr[qi][i], kv[j][i], x);
        x = warp_sum(x);
        sc[j] = c0 + j <= lim[qi] && c0 + j < end ? x : -INFINITY;
        m_new = fmaxf(m_new, sc[j]);
      }
      if (m_new == -INFINITY) continue;  // nothing visible to this query yet
      const float c = expf(m[qi] - m_new);  // 0 when m was -inf
      l[qi] *= c;
#pragma unroll
      for (int i = 0; i < D; ++i) acc[qi][i] *= c;
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const float pj = expf(sc[j] - m_new);  // 0 for a masked slot
        l[qi] += pj;
#pragma unroll
        for (int i = 0; i < D; ++i) acc[qi][i] = fmaf(pj, vv[j][i], acc[qi][i]);
      }
      m[qi] = m_new;
    }
  }
  // Merge the warps: M = max m_w, acc = sum_w exp(m_w - M) acc_w, l likewise.
#pragma unroll
  for (int qi = 0; qi < Q; ++qi) {
    if (qi >= GT) break;
    if (lane == 0) {
      w_m[warp][qi] = m[qi];
      w_l[warp][qi] = l[qi];
    }
#pragma unroll
    for (int i = 0; i < D; ++i)
      if (i < dl) w_acc[warp][qi][lane * dl + i] = acc[qi][i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < GT * a.hd; e += kThreads) {
    const int qi = e / a.hd, d = e % a.hd;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, w_m[w][qi]);
    float x = 0.f, L = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = w_m[w][qi] == -INFINITY ? 0.f : expf(w_m[w][qi] - M);
        x += f * w_acc[w][qi][d];
        L += f * w_l[w][qi];
      }
    }
    if (a.splits == 1) {
      out[(row0 + qi) * a.hd + d] = static_cast<T>(x / L);  // split 0 holds slot 0: L > 0
    } else {
      part_acc[((row0 + qi) * a.splits + split) * a.hd + d] = x;
      if (d == 0) {
        part_ml[((row0 + qi) * a.splits + split) * 2] = M;
        part_ml[((row0 + qi) * a.splits + split) * 2 + 1] = L;
      }
    }
  }
}

// One block per output row: merges the splits' (acc, m, l). A split with no visible slot has
// m = -inf and weight 0; split 0 always holds slot 0, so the total weight is positive.
template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_attention_reduce_kernel(const float* part_acc, const float* part_ml,
                               T* __restrict__ out, const DecodeArgs a) {
  pdl_wait();  // the parts are the split kernel's output
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

// The merge of the splits' parts, launched so that it may start while the split kernel drains.
template <typename T>
cudaError_t launch_reduce(const at::Tensor& part_acc, const at::Tensor& part_ml, at::Tensor& out, const DecodeArgs& a,
                          int64_t rows, cudaStream_t stream) {
  return launch_pdl(decode_attention_reduce_kernel<T>, dim3(static_cast<unsigned int>(rows)), dim3(kThreads), 0, stream,
                    part_acc.const_data_ptr<float>(), part_ml.const_data_ptr<float>(),
                    static_cast<T*>(out.mutable_data_ptr()), a);
}

template <typename T, int Q, int D>
cudaError_t launch_warp(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                        at::Tensor& status, const DecodeArgs& a, at::Tensor& out) {
  const int64_t rows = q.size(0) * a.H * a.T;
  at::Tensor part_acc, part_ml;
  if (a.splits > 1) {
    part_acc = at::empty({rows, a.splits, a.hd}, q.options().dtype(at::kFloat));
    part_ml = at::empty({rows, a.splits, 2}, q.options().dtype(at::kFloat));
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(a.splits, static_cast<unsigned int>(q.size(0) * a.KV));
  const cudaError_t err = launch_pdl(
      decode_attention_warp_kernel<T, Q, D>, grid, dim3(kThreads), 0, stream, static_cast<const T*>(q.const_data_ptr()),
      static_cast<const T*>(k_cache.const_data_ptr()), static_cast<const T*>(v_cache.const_data_ptr()),
      pos.const_data_ptr<int64_t>(), a.splits > 1 ? part_acc.mutable_data_ptr<float>() : nullptr,
      a.splits > 1 ? part_ml.mutable_data_ptr<float>() : nullptr, static_cast<T*>(out.mutable_data_ptr()),
      status.mutable_data_ptr<int>(), a);
  if (err != cudaSuccess || a.splits == 1) return err;
  return launch_reduce<T>(part_acc, part_ml, out, a, rows, stream);
}

template <typename T, int V>
cudaError_t launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                   at::Tensor& status, const DecodeArgs& a, at::Tensor& out) {
  if (a.GT <= kWarpQueries && a.hd % 32 == 0 && a.hd <= kWarpMaxDim) {
    if (a.hd <= 128) {
      return a.GT <= 4 ? launch_warp<T, 4, 4>(q, k_cache, v_cache, pos, status, a, out)
                       : launch_warp<T, kWarpQueries, 4>(q, k_cache, v_cache, pos, status, a, out);
    }
    return a.GT <= 4 ? launch_warp<T, 4, 8>(q, k_cache, v_cache, pos, status, a, out)
                     : launch_warp<T, kWarpQueries, 8>(q, k_cache, v_cache, pos, status, a, out);
  }
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
  return launch_reduce<T>(part_acc, part_ml, out, a, rows, stream);
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
