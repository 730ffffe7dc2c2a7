/*
 * rope_append_attention: a decoding step's attention for one new token per row, with the rotary
 * embedding and the cache write folded in. CUDA kernel. The math is rope_append_attention.cpp's
 * (rope_kv_append, then decode_attention); this kernel computes exactly those numbers.
 *
 * Why one kernel: at batch 1 the step's attention was three launches a layer (rope_kv_append,
 * the split attention, the merge of its splits), each a few microseconds of latency around very
 * little data (the cache up to the position: about 140 KB a kv head at 270 slots).
 *
 * Work split: block (split, b * KV + kvh) of kWarps warps takes the G = H / KV query heads of kv
 * head kvh in row b and the slots [split * split_len, (split + 1) * split_len) up to the row's
 * position p; a block past p exits at once. Every block rotates its own G query rows and the new
 * key at p from the QKV projection's output (a few hundred bytes, so repeating that is cheaper
 * than a launch); the block whose slots hold p writes the new key and value into the cache, and
 * uses them from registers rather than reading them back. Within a block, as in
 * decode_attention's one-token kernel: each warp takes every kWarps-th group of kSlots slots,
 * its lanes hold D = hd / 32 consecutive dims of each query and accumulator, a score is a
 * lane-wise product summed by shuffles (the G x kSlots sums of a group interleave), the online
 * softmax rescales once per group, and the next group's key and value rows are loaded before the
 * current one is used. The splits are short (a group or two per warp at the default model's
 * 512 slots), because the time is latency: the first group's rows are requested together with
 * the position and the QKV row, before either arrives (their addresses do not depend on them).
 * The warps merge through shared memory.
 * The merge of the splits happens in the same launch: each split writes its (acc, m, l) to the
 * parts buffer, then counts itself in counts[b * KV + kvh] (atomicInc, which wraps back to 0 on
 * the last arrival, so the counters are zero again after every call); the block that arrives last
 * reads every split's part (kMergeBatch splits' loads in flight at once, merged online) and writes
 *   out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,  M = max_s m_s.
 * With one split holding visible slots, that block writes the output itself.
 *
 * Programmatic dependent launch (pdl.h): the kernel lets its dependents launch at once (the next
 * projection only prefetches its weights before it waits). Before pdl_wait() it reads only what
 * no kernel of the step writes: the positions, and the cache slots before p (written by earlier
 * steps; this layer's cache is written in a step only by this kernel, at p), so the first group
 * of slots is in flight while the QKV projection finishes.
 *
 * Layout: qkv (B, (H + 2 KV) hd) rows, row stride qkv_stride, [q heads | k heads | v heads];
 * caches (B, KV, S, hd) contiguous; cos, sin (S_table, hd / 2) float32; pos (B,) int64 (one
 * token per row); out (B, H * hd). Rows of D elements are loaded as one vector (the launcher
 * checks the alignment). Taken for hd = 32 D with D in {1, 2, 4, 8}, G in {1, 2, 4, 8} and
 * G D <= 32 (registers); other shapes go through the two ops (rope_append_attention.cpp).
 *
 * Bounds: a position outside [0, min(S, S_table)) sets status[0] = 1, writes nothing, and the
 * row attends to the cache up to its position clamped into [0, S) (an invalid call's output).
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cstdint>

#include "pdl.h"

namespace optimus {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kSlots = 4;                       // slots per warp per group: their rows are loaded together
constexpr int kMinSplitLen = kWarps * kSlots;   // a split is a whole number of groups for every warp
// The splits aim at this many blocks per SM over the whole batch: 32 slots a split at batch 1 and
// 128 at batch 16 for the default model (512 slots). H200, position 271, the op alone replayed
// from a graph, split lengths forced: batch 1 5.1 us at 32, 6.1 at 64, 8.2 at 128; batch 16 11.5
// at 32, 10.1 at 64, 8.4 at 128 (two blocks per SM gave 64 there).
constexpr int kBlocksPerSm = 1;
constexpr int kMaxSplits = 1024;                // keeps the last block's merge short
constexpr int kMergeBatch = 16;                 // parts loaded at once by the merging block

template <typename T, int D>
struct alignas(sizeof(T) * D) Row {
  T v[D];
};

// A row of the previous kernel's output, loaded through L2 (ld.global.cg): this kernel starts
// before that output is written (programmatic launch), and a read-only (non-coherent) load of it
// is only defined for data that no kernel writes while this one runs.
template <typename T, int D>
__device__ __forceinline__ Row<T, D> load_cg(const Row<T, D>* p) {
  Row<T, D> r;
  constexpr int bytes = sizeof(Row<T, D>);  // 2 to 32
  if constexpr (bytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < bytes / 16; ++i) {
      const int4 v = __ldcg(reinterpret_cast<const int4*>(p) + i);
      memcpy(reinterpret_cast<char*>(&r) + 16 * i, &v, 16);
    }
  } else if constexpr (bytes == 8) {
    const int2 v = __ldcg(reinterpret_cast<const int2*>(p));
    memcpy(&r, &v, bytes);
  } else if constexpr (bytes == 4) {
    const int v = __ldcg(reinterpret_cast<const int*>(p));
    memcpy(&r, &v, bytes);
  } else {
    static_assert(bytes == 2, "rows of 2 to 32 bytes");
    const unsigned short v = __ldcg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&r, &v, bytes);
  }
  return r;
}

struct Args {
  int H, KV, G, S, limit, hd;  // limit = min(S, S_table)
  int splits, split_len;
  int64_t qkv_stride;
  float scale;
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {  // the value of v once stored as T
  return static_cast<float>(static_cast<T>(v));
}

// The lane's D dims of a head row rotated at the angles of table row `at` (rotate-half: lanes
// 0-15 hold the first half, lanes 16-31 the matching second half), as rope_kv_append computes
// it (float32, no fused multiply-add), rounded to T.
template <typename T, int D>
__device__ __forceinline__ void rotate(float (&x)[D], const float* cos, const float* sin, int64_t at, int half,
                                       int lane) {
  const int i0 = (lane & 15) * D;
#pragma unroll
  for (int e = 0; e < D; ++e) {
    const float other = __shfl_xor_sync(0xffffffffu, x[e], 16);
    const float c = cos[at * half + i0 + e], s = sin[at * half + i0 + e];
    x[e] = lane < 16 ? __fsub_rn(__fmul_rn(x[e], c), __fmul_rn(other, s))   // x1 c - x2 s
                     : __fadd_rn(__fmul_rn(x[e], c), __fmul_rn(other, s));  // x2 c + x1 s
    x[e] = round_to<T>(x[e]);
  }
}

template <typename T, int D>
__device__ __forceinline__ void to_floats(const Row<T, D>& r, float (&x)[D]) {
#pragma unroll
  for (int e = 0; e < D; ++e) x[e] = static_cast<float>(r.v[e]);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
rope_append_attention_kernel(const T* __restrict__ qkv, const float* __restrict__ cos, const float* __restrict__ sin,
                             const int64_t* __restrict__ pos, T* __restrict__ k_cache, T* __restrict__ v_cache,
                             int* __restrict__ status, unsigned int* __restrict__ counts, float* __restrict__ part_acc,
                             float* __restrict__ part_ml, T* __restrict__ out, const Args a) {
  __shared__ float w_acc[kWarps][G][D * 32];  // each warp's accumulators, then merged
  __shared__ float w_m[kWarps][G], w_l[kWarps][G];
  __shared__ bool s_last;
  const int split = blockIdx.x, bk = blockIdx.y, b = bk / a.KV, kvh = bk % a.KV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hd = a.hd, half = hd / 2;
  using R = Row<T, D>;

  pdl_launch_dependents();
  // The first group's rows go out before the position arrives (their addresses do not depend on
  // it; slots past it are masked below), together with the position and the QKV row.
  const int start = split * a.split_len, stop = min(start + a.split_len, a.S);
  const int64_t cache_row0 = static_cast<int64_t>(bk) * a.S;  // (b, kvh, slot 0)
  const R* k_rows = reinterpret_cast<const R*>(k_cache + cache_row0 * hd) + lane;  // lane's dims, slot 0
  const R* v_rows = reinterpret_cast<const R*>(v_cache + cache_row0 * hd) + lane;
  const int rows_per_slot = hd / D;  // Row units per cache slot (= 32)
  R kr[kSlots], vr[kSlots];
  auto load_group = [&](int c0) {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (c0 + j < stop) {
        kr[j] = k_rows[static_cast<int64_t>(c0 + j) * rows_per_slot];
        vr[j] = v_rows[static_cast<int64_t>(c0 + j) * rows_per_slot];
      }
    }
  };
  int c0 = start + warp * kSlots;
  load_group(c0);
  const int64_t p_raw = pos[b];
  const bool ok = p_raw >= 0 && p_raw < a.limit;
  const int p = static_cast<int>(min(max(p_raw, int64_t{0}), int64_t{a.S - 1}));  // the last slot read
  const int end = min(stop, p + 1);
  if (start >= end) return;  // no visible slot here: this split takes no part
  const int active = p / a.split_len + 1;  // the splits with visible slots, this one among them
  const bool mine = ok && p < stop;        // this split holds slot p, the new token's
  pdl_wait();  // qkv is the QKV projection's output

  if (!ok && split == 0 && kvh == 0 && threadIdx.x == 0) *status = 1;  // once per bad row; all write 1
  const int64_t at = min(max(p_raw, int64_t{0}), int64_t{a.limit - 1});  // the rotary table row
  const R* row = reinterpret_cast<const R*>(qkv + b * a.qkv_stride) + lane;  // the lane's dims of head 0
  R q_raw[G];
#pragma unroll
  for (int g = 0; g < G; ++g) q_raw[g] = load_cg(row + (kvh * G + g) * rows_per_slot);
  const R k_raw = load_cg(row + (a.H + kvh) * rows_per_slot), v_raw = load_cg(row + (a.H + a.KV + kvh) * rows_per_slot);
  float qr[G][D], kn[D], vn[D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    to_floats<T, D>(q_raw[g], qr[g]);
    rotate<T, D>(qr[g], cos, sin, at, half, lane);
#pragma unroll
    for (int e = 0; e < D; ++e) qr[g][e] *= a.scale;
  }
  to_floats<T, D>(k_raw, kn);
  rotate<T, D>(kn, cos, sin, at, half, lane);
  to_floats<T, D>(v_raw, vn);
  if (mine && warp == 0) {
    R kw;
#pragma unroll
    for (int e = 0; e < D; ++e) kw.v[e] = static_cast<T>(kn[e]);
    reinterpret_cast<R*>(k_cache + (cache_row0 + p) * hd)[lane] = kw;
    reinterpret_cast<R*>(v_cache + (cache_row0 + p) * hd)[lane] = v_raw;
  }

  float acc[G][D], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < D; ++e) acc[g][e] = 0.f;
  }
  for (; c0 < end; c0 += kWarps * kSlots) {
    float kf[kSlots][D], vf[kSlots][D];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (c0 + j >= end) {  // zeros, not stale registers: its weight is 0, and 0 * NaN is NaN
#pragma unroll
        for (int e = 0; e < D; ++e) kf[j][e] = vf[j][e] = 0.f;
      } else if (mine && c0 + j == p) {  // the cache row is stale: the new token's, from registers
#pragma unroll
        for (int e = 0; e < D; ++e) {
          kf[j][e] = kn[e];
          vf[j][e] = vn[e];
        }
      } else {
        to_floats<T, D>(kr[j], kf[j]);
        to_floats<T, D>(vr[j], vf[j]);
      }
    }
    if (c0 + kWarps * kSlots < end) load_group(c0 + kWarps * kSlots);  // in flight while these are used
    float sc[G][kSlots];  // G x kSlots independent dot products: their shuffles interleave
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        float x = 0.f;
#pragma unroll
        for (int e = 0; e < D; ++e) x = fmaf(qr[g][e], kf[j][e], x);
        sc[g][j] = x;
      }
    // The lanes' sums, level by level across all G x kSlots values: each level's shuffles are
    // independent and pipeline (one butterfly after another would serialise ~25 cycles a step,
    // which measured 2 us a group).
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int j = 0; j < kSlots; ++j) sc[g][j] += __shfl_xor_sync(0xffffffffu, sc[g][j], o);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        if (c0 + j >= end) sc[g][j] = -INFINITY;
        m_new = fmaxf(m_new, sc[g][j]);
      }
      const float c = __expf(m[g] - m_new);  // slot c0 < end is visible: m_new is finite; 0 when m was -inf
      l[g] *= c;
#pragma unroll
      for (int e = 0; e < D; ++e) acc[g][e] *= c;
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const float pj = __expf(sc[g][j] - m_new);  // 0 past the end
        l[g] += pj;
#pragma unroll
        for (int e = 0; e < D; ++e) acc[g][e] = fmaf(pj, vf[j][e], acc[g][e]);
      }
      m[g] = m_new;
    }
  }

  // The warps' merge: M = max m_w, acc = sum_w exp(m_w - M) acc_w, l likewise (a warp with no
  // slot has m = -inf and weight 0; warp 0 always has one).
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      w_m[warp][g] = m[g];
      w_l[warp][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < D; ++e) w_acc[warp][g][lane * D + e] = acc[g][e];
  }
  __syncthreads();
  const int64_t head0 = static_cast<int64_t>(b) * a.H + kvh * G;  // (b, first query head of kvh)
  for (int i = threadIdx.x; i < G * hd; i += kThreads) {
    const int g = i / hd, d = i % hd;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, w_m[w][g]);
    float x = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = __expf(w_m[w][g] - M);  // 0 for a warp without slots (m = -inf)
      x += f * w_acc[w][g][d];
      L += f * w_l[w][g];
    }
    if (active == 1) {
      out[(head0 + g) * hd + d] = static_cast<T>(x / L);
    } else {
      part_acc[((head0 + g) * a.splits + split) * hd + d] = x;
      if (d == 0) {
        part_ml[((head0 + g) * a.splits + split) * 2] = M;
        part_ml[((head0 + g) * a.splits + split) * 2 + 1] = L;
      }
    }
  }
  if (active == 1) return;

  // Count this split in; the last one merges (its reads see every part: each writer fenced).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicInc(&counts[bk], static_cast<unsigned int>(active - 1)) == active - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < G * hd; i += kThreads) {  // an online merge, kMergeBatch parts per round
    const int g = i / hd, d = i % hd;
    const float* ml = part_ml + (head0 + g) * a.splits * 2;
    const float* parts = part_acc + (head0 + g) * a.splits * hd + d;
    float M = -INFINITY, L = 0.f, x = 0.f;
    for (int s0 = 0; s0 < active; s0 += kMergeBatch) {
      float ms[kMergeBatch], ls[kMergeBatch], xs[kMergeBatch];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {  // every load of the round in flight at once
        const bool in = s0 + u < active;
        ms[u] = in ? __ldcg(ml + (s0 + u) * 2) : -INFINITY;
        ls[u] = in ? __ldcg(ml + (s0 + u) * 2 + 1) : 0.f;
        xs[u] = in ? __ldcg(parts + (s0 + u) * hd) : 0.f;
      }
      float M_new = M;  // an active split's m is finite; the masked ones are -inf and weigh 0
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) M_new = fmaxf(M_new, ms[u]);
      const float f_old = __expf(M - M_new);  // 0 in the first round (M = -inf)
      x *= f_old;
      L *= f_old;
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        const float f = __expf(ms[u] - M_new);
        x = fmaf(f, xs[u], x);
        L = fmaf(f, ls[u], L);
      }
      M = M_new;
    }
    out[(head0 + g) * hd + d] = static_cast<T>(x / L);
  }
}

template <typename T, int D, int G>
cudaError_t launch(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                   at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& status, at::Tensor& counts, const Args& a,
                   at::Tensor& out) {
  const int64_t B = qkv.size(0);
  at::Tensor part_acc, part_ml;
  if (a.splits > 1) {
    part_acc = at::empty({B * a.H, a.splits, a.hd}, qkv.options().dtype(at::kFloat));
    part_ml = at::empty({B * a.H, a.splits, 2}, qkv.options().dtype(at::kFloat));
  }
  return launch_pdl(rope_append_attention_kernel<T, D, G>, dim3(a.splits, static_cast<unsigned int>(B * a.KV)),
                    dim3(kThreads), 0, at::cuda::getCurrentCUDAStream(), static_cast<const T*>(qkv.const_data_ptr()),
                    cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), pos.const_data_ptr<int64_t>(),
                    static_cast<T*>(k_cache.mutable_data_ptr()), static_cast<T*>(v_cache.mutable_data_ptr()),
                    status.mutable_data_ptr<int>(), reinterpret_cast<unsigned int*>(counts.mutable_data_ptr<int>()),
                    a.splits > 1 ? part_acc.mutable_data_ptr<float>() : nullptr,
                    a.splits > 1 ? part_ml.mutable_data_ptr<float>() : nullptr,
                    static_cast<T*>(out.mutable_data_ptr()), a);
}

template <typename T, int D>
cudaError_t launch_heads(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                         at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& status, at::Tensor& counts,
                         const Args& a, at::Tensor& out) {
  switch (a.G) {  // G D <= 32 (checked): 8 only for D <= 4
    case 1: return launch<T, D, 1>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    case 2: return launch<T, D, 2>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    case 4: return launch<T, D, 4>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    default: return launch<T, D, (D <= 4 ? 8 : 4)>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
  }
}

template <typename T>
cudaError_t launch_dims(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                        at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& status, at::Tensor& counts,
                        const Args& a, at::Tensor& out) {
  switch (a.hd / 32) {
    case 1: return launch_heads<T, 1>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    case 2: return launch_heads<T, 2>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    case 4: return launch_heads<T, 4>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    default: return launch_heads<T, 8>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
  }
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace

// Whether the fused kernel takes this shape (else the op runs rope_kv_append, then
// decode_attention): hd = 32 D and G for D, G in {1, 2, 4, 8}, G D <= 32, rows of D elements aligned.
bool rope_append_attention_cuda_takes(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      int64_t num_heads) {
  const int64_t hd = k_cache.size(3), KV = k_cache.size(1), G = num_heads / KV, D = hd / 32;
  if (hd % 32 != 0 || !(D == 1 || D == 2 || D == 4 || D == 8) || !(G == 1 || G == 2 || G == 4 || G == 8) ||
      G * D > 32) {
    return false;
  }
  const size_t row_bytes = static_cast<size_t>(D) * qkv.element_size();
  return qkv.stride(0) % D == 0 && aligned(qkv.const_data_ptr(), row_bytes) &&
         aligned(k_cache.const_data_ptr(), row_bytes) && aligned(v_cache.const_data_ptr(), row_bytes);
}

// Called by rope_append_attention.cpp once every argument is checked and the shape is taken.
cudaError_t rope_append_attention_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache,
                                       at::Tensor& status, at::Tensor& counts, int64_t num_heads, double scale,
                                       at::Tensor& out) {
  Args a{};
  const int B = static_cast<int>(qkv.size(0));
  a.H = static_cast<int>(num_heads);
  a.KV = static_cast<int>(k_cache.size(1));
  a.G = a.H / a.KV;
  a.S = static_cast<int>(k_cache.size(2));
  a.limit = static_cast<int>(std::min<int64_t>(a.S, cos.size(0)));
  a.hd = static_cast<int>(k_cache.size(3));
  a.qkv_stride = qkv.stride(0);
  a.scale = static_cast<float>(scale);
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device());
  if (err != cudaSuccess) return err;
  // Splits fixed by (B, KV, S) and the SM count, so the grid never changes inside a CUDA graph.
  const int want = std::max(1, (kBlocksPerSm * sms + B * a.KV - 1) / (B * a.KV));
  int len = std::max({kMinSplitLen, (a.S + want - 1) / want, (a.S + kMaxSplits - 1) / kMaxSplits});
  len = (len + kMinSplitLen - 1) / kMinSplitLen * kMinSplitLen;
  a.split_len = len;
  a.splits = (a.S + len - 1) / len;
  switch (qkv.scalar_type()) {
    case at::kBFloat16: return launch_dims<c10::BFloat16>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    case at::kHalf: return launch_dims<c10::Half>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
    default: return launch_dims<float>(qkv, cos, sin, pos, k_cache, v_cache, status, counts, a, out);
  }
}

}  // namespace optimus
