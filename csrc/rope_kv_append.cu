/*
 * rope_kv_append: rotary embedding on q and k at positions `pos`, and the KV-cache write, in one
 * kernel launch. CUDA kernel.
 *
 * Math (rotate-half convention, half = hd / 2): each head row x of q and k, at the position
 * p = pos[b, t] of its token, with c = cos[p, i] and s = sin[p, i], becomes
 *   out[i]        = x[i] * c - x[i + half] * s
 *   out[i + half] = x[i + half] * c + x[i] * s        for 0 <= i < half,
 * in float32 with every product and sum rounded on its own (no fused multiply-add), then
 * rounded once to the tensors' dtype: bit for bit the numbers of rotate_half_ref in optimus.py.
 *
 * Memory layout: as in rope_kv_append.cpp. q (B, T, H, hd), k and v (B, T, KV, hd) with any
 * strides whose last one is 1; cos, sin (S_table, half) float32; pos (B, T) int64; the caches
 * (B, KV, S, hd) contiguous, written in place at row [b, h, pos[b, t]]; q is returned rotated as
 * a new contiguous (B, H, T, hd) tensor.
 * One thread per (token, head row, pack): the H query rows, KV key rows and KV value rows of
 * all tokens are one flat index space, so q, k and v take one launch. A thread moves one pack of
 * V elements from each half of its row (16-byte accesses: V = 8 for bf16/fp16, 4 for fp32) with
 * the matching 2 x V floats of cos and sin; consecutive threads take consecutive packs of a row,
 * so a warp reads and writes whole rows. The source packs do not depend on the position, so they
 * are loaded alongside pos: a thread waits on memory twice (pos and its packs, then the cos/sin
 * row) before it stores. When hd/2 is not a multiple of V, or a pointer or stride is not 16-byte
 * aligned, the same kernel runs with 1-element packs.
 *
 * Bounds: a position outside [0, min(S, S_table)) is never written: its token's k and v rows
 * are skipped and status[0] is set to 1 (raising would need a host sync every layer; callers
 * check status once, e.g. after generation). The call's in-range tokens are still written (the
 * reference writes none of them; either way a call that sets status is invalid as a whole). Its
 * q rows are rotated at the position clamped into the table, as in the reference.
 *
 * Dtypes: q, k, v and the caches share one of float32, bfloat16, float16. Math in float32.
 *
 * Launched with programmatic dependent launch (pdl.h; inside a CUDA graph only): the launch
 * overlaps the QKV projection's tail, and the kernel waits for it before reading anything.
 */
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "pdl.h"

namespace optimus {
namespace {

constexpr int kThreads = 256;   // threads per block
constexpr int kPackBytes = 16;  // widest global load/store a thread can issue

// `V` consecutive elements, moved as one aligned load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Sizes and element strides the kernel needs; strides of size-1 dimensions are 0.
struct RopeArgs {
  int64_t q_stride[3], k_stride[3], v_stride[3];  // (b, t, head)
  int T, H, KV, hd, S;
  int limit;    // min(S, S_table): positions must lie in [0, limit)
  int packs;    // packs per half row: hd / 2 / V
  int threads;  // B * T * (H + 2 * KV) * packs
};

// ----------------------------------------------------------------------------- kernels

// Pack <-> float32 registers, element by element (c10's conversions round to nearest even).
template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& p, float (&f)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) f[e] = static_cast<float>(p.v[e]);
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> pack(const float (&f)[V]) {
  Pack<T, V> p;
#pragma unroll
  for (int e = 0; e < V; ++e) p.v[e] = static_cast<T>(f[e]);
  return p;
}

// V floats of a cos/sin row, 16 bytes at a time when V allows.
template <int V>
__device__ __forceinline__ void load_floats(const float* __restrict__ src, float (&f)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V / 4; ++j) {
      const float4 x = reinterpret_cast<const float4*>(src)[j];
      f[4 * j] = x.x;
      f[4 * j + 1] = x.y;
      f[4 * j + 2] = x.z;
      f[4 * j + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = src[e];
  }
}

// Rotates the two packs (x1 from the first half of a row, x2 from the second) by the angles
// whose cos and sin start at `cos_row` and `sin_row`, in place.
template <int V>
__device__ __forceinline__ void rotate(float (&x1)[V], float (&x2)[V], const float* __restrict__ cos_row,
                                       const float* __restrict__ sin_row) {
  float c[V], s[V];
  load_floats<V>(cos_row, c);
  load_floats<V>(sin_row, s);
#pragma unroll
  for (int e = 0; e < V; ++e) {  // _rn intrinsics: no fused multiply-add, the reference's roundings
    const float a = x1[e], b = x2[e];
    x1[e] = __fsub_rn(__fmul_rn(a, c[e]), __fmul_rn(b, s[e]));
    x2[e] = __fadd_rn(__fmul_rn(b, c[e]), __fmul_rn(a, s[e]));
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
rope_kv_append_kernel(const T* q, const T* k, const T* v,
                      const float* __restrict__ cos, const float* __restrict__ sin, const int64_t* __restrict__ pos,
                      T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                      int* __restrict__ status, const RopeArgs a) {
  using P = Pack<T, V>;
  pdl_wait();  // q, k and v are the QKV projection's output (pdl.h)
  pdl_launch_dependents();
  const int thread = blockIdx.x * kThreads + threadIdx.x;
  if (thread >= a.threads) return;
  const int rows_per_token = a.H + 2 * a.KV;  // H query rows, then KV key rows, then KV value rows
  const int pack_index = thread % a.packs;
  const int row = (thread / a.packs) % rows_per_token;
  const int token = thread / a.packs / rows_per_token;  // b * T + t
  const int b = token / a.T, t = token % a.T;
  const int half = a.hd / 2, i = pack_index * V;
  const bool is_q = row < a.H, is_k = !is_q && row < a.H + a.KV;
  const int h = is_q ? row : (row - a.H) % a.KV;  // head within q, or within k / v

  // The source packs do not depend on the position: their loads are in flight while pos arrives.
  const T* src = is_q ? q + b * a.q_stride[0] + t * a.q_stride[1] + h * a.q_stride[2]
               : is_k ? k + b * a.k_stride[0] + t * a.k_stride[1] + h * a.k_stride[2]
                      : v + b * a.v_stride[0] + t * a.v_stride[1] + h * a.v_stride[2];
  const P lo = *reinterpret_cast<const P*>(src + i), hi = *reinterpret_cast<const P*>(src + half + i);
  const int64_t p = pos[token];
  const bool in_range = p >= 0 && p < a.limit;
  if (!in_range && row == 0 && pack_index == 0) *status = 1;  // once per bad token; all write 1
  if (!is_q && !in_range) return;  // never write outside the cache

  T* dst;
  if (is_q) {
    dst = q_out + ((static_cast<int64_t>(b) * a.H + h) * a.T + t) * a.hd;  // q_out[b, h, t, :]
  } else {
    dst = (is_k ? k_cache : v_cache) + ((static_cast<int64_t>(b) * a.KV + h) * a.S + p) * a.hd;  // [b, h, p, :]
  }
  if (is_q || is_k) {  // q at the position clamped into the table (it only matters when out of range)
    const int64_t p_table = min(max(p, int64_t{0}), int64_t{a.limit - 1});
    float x1[V], x2[V];
    unpack(lo, x1);
    unpack(hi, x2);
    rotate<V>(x1, x2, cos + p_table * half + i, sin + p_table * half + i);
    *reinterpret_cast<P*>(dst + i) = pack<T, V>(x1);
    *reinterpret_cast<P*>(dst + half + i) = pack<T, V>(x2);
  } else {
    *reinterpret_cast<P*>(dst + i) = lo;
    *reinterpret_cast<P*>(dst + half + i) = hi;
  }
}

// ----------------------------------------------------------------------------- launchers
// Called by rope_kv_append.cpp once every argument is checked: argument checks and errors live in one
// place for the CPU and CUDA kernels, and the launchers only launch, returning the launch's error
// code for the caller to raise.

bool aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kPackBytes == 0;
}

// (b, t, head) element strides of a (B, T, heads, hd) tensor; 0 for size-1 dimensions.
void copy_strides(const at::Tensor& t, int64_t (&out)[3]) {
  for (int d = 0; d < 3; ++d) out[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

// Whether every row of `t` starts on a 16-byte boundary (its packs of V elements too).
bool rows_aligned(const at::Tensor& t, const int64_t (&strides)[3], int V) {
  return aligned(t.const_data_ptr()) && strides[0] % V == 0 && strides[1] % V == 0 && strides[2] % V == 0;
}

template <typename T, int V>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
            const at::Tensor& sin, const at::Tensor& pos, at::Tensor& q_out, at::Tensor& k_cache,
            at::Tensor& v_cache, at::Tensor& status, RopeArgs args) {
  args.packs = args.hd / 2 / V;
  args.threads = static_cast<int>(q.size(0) * q.size(1) * (args.H + 2 * args.KV) * args.packs);  // < 2^31: checked
  if (args.threads == 0) return;  // an empty batch: nothing to launch
  const unsigned int blocks = static_cast<unsigned int>((args.threads + kThreads - 1) / kThreads);
  (void)launch_pdl(rope_kv_append_kernel<T, V>, dim3(blocks), dim3(kThreads), 0, at::cuda::getCurrentCUDAStream(),
      static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k.const_data_ptr()),
      static_cast<const T*>(v.const_data_ptr()), static_cast<const float*>(cos.const_data_ptr()),
      static_cast<const float*>(sin.const_data_ptr()), static_cast<const int64_t*>(pos.const_data_ptr()),
      static_cast<T*>(q_out.mutable_data_ptr()), static_cast<T*>(k_cache.mutable_data_ptr()),
      static_cast<T*>(v_cache.mutable_data_ptr()), static_cast<int*>(status.mutable_data_ptr()), args);
}

template <typename T>
void launch_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& pos, at::Tensor& q_out, at::Tensor& k_cache,
                   at::Tensor& v_cache, at::Tensor& status, const RopeArgs& args) {
  constexpr int V = kPackBytes / sizeof(T);
  const bool vec = (args.hd / 2) % V == 0 && rows_aligned(q, args.q_stride, V) && rows_aligned(k, args.k_stride, V) &&
                   rows_aligned(v, args.v_stride, V) && aligned(cos.const_data_ptr()) && aligned(sin.const_data_ptr()) &&
                   aligned(k_cache.const_data_ptr()) && aligned(v_cache.const_data_ptr());  // q_out is fresh: aligned
  if (vec) launch<T, V>(q, k, v, cos, sin, pos, q_out, k_cache, v_cache, status, args);
  else launch<T, 1>(q, k, v, cos, sin, pos, q_out, k_cache, v_cache, status, args);
}

}  // namespace

// Arguments checked by rope_kv_append.cpp: one dtype (float32, bfloat16 or float16), rows with a
// contiguous last dimension, contiguous cos/sin/pos/caches, all on the current device, and
// B * T * (H + 2 KV) * hd / 2 < 2^31.
cudaError_t rope_kv_append_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& pos, at::Tensor& q_out, at::Tensor& k_cache,
                                at::Tensor& v_cache, at::Tensor& status) {
  RopeArgs args{};
  copy_strides(q, args.q_stride);
  copy_strides(k, args.k_stride);
  copy_strides(v, args.v_stride);
  args.T = static_cast<int>(q.size(1));
  args.H = static_cast<int>(q.size(2));
  args.KV = static_cast<int>(k.size(2));
  args.hd = static_cast<int>(q.size(3));
  args.S = static_cast<int>(k_cache.size(2));
  args.limit = static_cast<int>(std::min(k_cache.size(2), cos.size(0)));
  switch (q.scalar_type()) {
    case at::kBFloat16: launch_packed<c10::BFloat16>(q, k, v, cos, sin, pos, q_out, k_cache, v_cache, status, args); break;
    case at::kHalf: launch_packed<c10::Half>(q, k, v, cos, sin, pos, q_out, k_cache, v_cache, status, args); break;
    default: launch_packed<float>(q, k, v, cos, sin, pos, q_out, k_cache, v_cache, status, args); break;
  }
  return cudaGetLastError();
}

}  // namespace optimus
