/*
 * swiglu: the SwiGLU activation of the MLP, forward and backward. CUDA kernels.
 *
 * Math (s = sigmoid(gate) = 1 / (1 + exp(-gate)); the backward recomputes s from the saved
 * gate, so the forward keeps no activation for it):
 *   out    = silu(gate) * up = gate * s * up
 *   d_up   = grad * gate * s
 *   d_gate = grad * up * s * (1 + gate * (1 - s))
 * exp and the reciprocal use the hardware's approximations (__expf: at most 2 + 1.173 |x| ulp;
 * __fdividef: 2 ulp), so s is within 2e-6 relative of the exact value for |gate| < 10: far
 * below the bf16/fp16 rounding that follows, and within the float32 tests' 1e-5. The correctly rounded reciprocal (__frcp_rn) would call a slow path that costs
 * registers and spills (ptxas -v: 64 registers and a stack frame against 48, none). Infinities
 * and NaN come out as in PyTorch's silu (silu(-inf) = NaN, silu(inf) = inf).
 *
 * Memory layout: every operand is (rows, cols) with its own row stride and contiguous rows
 * (swiglu.cpp collapses the leading dimensions; gate and up can be the two halves of one packed
 * (..., 2H) projection, and the backward can write d_gate and d_up into the halves of one packed
 * gradient). Contiguous operands are one flat row. The kernels are memory-bound: each thread
 * moves 16-byte packs (8 bf16/fp16 or 4 fp32 elements), several packs per operand in flight, in a
 * grid-stride loop over a grid that just fills the GPU. Flat: the elements past the last whole
 * pack are done one by one by the first threads. Strided: a pack's row is its index divided by
 * the packs per row. When a row start is not 16-byte aligned (a view at an odd offset, or cols
 * not a multiple of the pack), the whole tensor goes through the same kernel with 1-element packs.
 *
 * Dtypes: float32, bfloat16, float16. Each element is computed in float32 and rounded once,
 * when stored, to the input dtype: the same numbers as swiglu_ref in optimus.py (to an ulp).
 */
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace optimus {
namespace {

constexpr int kThreads = 256;        // threads per block
constexpr int kForwardUnroll = 4;    // packs per operand in flight per thread: 8 x 16-byte loads
constexpr int kBackwardUnroll = 2;   // 6 x 16-byte loads in flight, fewer registers (3 inputs)
constexpr int kPackBytes = 16;       // widest global load/store a thread can issue

// `V` consecutive elements, moved as one aligned load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ----------------------------------------------------------------------------- kernels

// Pack <-> float32 registers, two 16-bit elements (one 32-bit word) at a time, which keeps the
// halves out of registers of their own (ptxas -v: 48 registers against 80 for bf16, element by
// element). A bf16 is the top half of a float32, so it widens with a shift or a mask; narrowing
// rounds to nearest even, one instruction per pair on sm_80+.
__device__ __forceinline__ float2 widen2(uint32_t w, c10::BFloat16) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ float2 widen2(uint32_t w, c10::Half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
__device__ __forceinline__ uint32_t narrow2(float a, float b, c10::BFloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t narrow2(float a, float b, c10::Half) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& p, float (&f)[V]) {
  if constexpr (sizeof(T) == 2 && V % 2 == 0) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p.v);
#pragma unroll
    for (int e = 0; e < V / 2; ++e) {
      const float2 x = widen2(w[e], T{});
      f[2 * e] = x.x;
      f[2 * e + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = static_cast<float>(p.v[e]);
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> pack(const float (&f)[V]) {
  Pack<T, V> p;
  if constexpr (sizeof(T) == 2 && V % 2 == 0) {
    uint32_t* w = reinterpret_cast<uint32_t*>(p.v);
#pragma unroll
    for (int e = 0; e < V / 2; ++e) w[e] = narrow2(f[2 * e], f[2 * e + 1], T{});
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) p.v[e] = static_cast<T>(f[e]);
  }
  return p;
}

__device__ __forceinline__ float sigmoid_f32(float x) {
  return __fdividef(1.0f, 1.0f + __expf(-x));
}

// The forward of one element, in float32: silu(x) * y.
__device__ __forceinline__ float swiglu_f32(float x, float y) {
  return x * sigmoid_f32(x) * y;
}

// The backward of one element, in float32: returns d_gate, and d_up in `du`.
__device__ __forceinline__ float swiglu_backward_f32(float dy, float x, float y, float& du) {
  const float s = sigmoid_f32(x);
  du = dy * (x * s);
  return dy * y * s * (1.0f + x * (1.0f - s));
}

// Where the operands of one kernel sit: `rows` rows of `cols` elements, row r of operand k at
// base_k + r * stride[k]. Flat (Strided == false): rows == 1 and the row is the whole tensor.
struct Layout {
  int64_t rows, cols;
  int64_t stride[5];  // forward: gate, up, out; backward: grad, gate, up, d_gate, d_up
};

// Element offset of pack i (of V elements) in operand k.
template <int V, bool Strided>
__device__ __forceinline__ int64_t offset(const Layout& l, int64_t i, int k, int64_t packs_per_row) {
  if constexpr (!Strided) {
    return i * V;
  } else {
    const int64_t r = i / packs_per_row;
    return r * l.stride[k] + (i - r * packs_per_row) * V;
  }
}

// out = silu(gate) * up; packs of V elements, V == 1 when unaligned.
template <typename T, int V, bool Strided>
__global__ void __launch_bounds__(kThreads)
swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, Layout l) {
  using P = Pack<T, V>;
  const int64_t packs_per_row = l.cols / V;
  const int64_t packs = l.rows * packs_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kForwardUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kForwardUnroll + threadIdx.x;
       base < packs; base += step) {
    P a[kForwardUnroll], b[kForwardUnroll];
#pragma unroll
    for (int k = 0; k < kForwardUnroll; ++k) {  // all loads first: they overlap in flight
      const int64_t i = base + k * kThreads;
      if (i < packs) {
        a[k] = *reinterpret_cast<const P*>(gate + offset<V, Strided>(l, i, 0, packs_per_row));
        b[k] = *reinterpret_cast<const P*>(up + offset<V, Strided>(l, i, 1, packs_per_row));
      }
    }
#pragma unroll
    for (int k = 0; k < kForwardUnroll; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < packs) {
        float x[V], y[V];
        unpack(a[k], x);
        unpack(b[k], y);
#pragma unroll
        for (int e = 0; e < V; ++e) x[e] = swiglu_f32(x[e], y[e]);
        *reinterpret_cast<P*>(out + offset<V, Strided>(l, i, 2, packs_per_row)) = pack<T, V>(x);
      }
    }
  }
  if constexpr (!Strided) {
    const int64_t tail = packs * V + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (tail < l.cols) {  // the last cols % V elements, one per thread of the first block
      out[tail] = static_cast<T>(swiglu_f32(static_cast<float>(gate[tail]), static_cast<float>(up[tail])));
    }
  }
}

// (d_gate, d_up); same layout and pack scheme as the forward.
template <typename T, int V, bool Strided>
__global__ void __launch_bounds__(kThreads)
swiglu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ gate, const T* __restrict__ up,
                       T* __restrict__ d_gate, T* __restrict__ d_up, Layout l) {
  using P = Pack<T, V>;
  const int64_t packs_per_row = l.cols / V;
  const int64_t packs = l.rows * packs_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kBackwardUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kBackwardUnroll + threadIdx.x;
       base < packs; base += step) {
    P a[kBackwardUnroll], b[kBackwardUnroll], c[kBackwardUnroll];
#pragma unroll
    for (int k = 0; k < kBackwardUnroll; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < packs) {
        a[k] = *reinterpret_cast<const P*>(grad + offset<V, Strided>(l, i, 0, packs_per_row));
        b[k] = *reinterpret_cast<const P*>(gate + offset<V, Strided>(l, i, 1, packs_per_row));
        c[k] = *reinterpret_cast<const P*>(up + offset<V, Strided>(l, i, 2, packs_per_row));
      }
    }
#pragma unroll
    for (int k = 0; k < kBackwardUnroll; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < packs) {
        float grad_f[V], x[V], y[V], dx[V], dy[V];
        unpack(a[k], grad_f);
        unpack(b[k], x);
        unpack(c[k], y);
#pragma unroll
        for (int e = 0; e < V; ++e) dx[e] = swiglu_backward_f32(grad_f[e], x[e], y[e], dy[e]);
        *reinterpret_cast<P*>(d_gate + offset<V, Strided>(l, i, 3, packs_per_row)) = pack<T, V>(dx);
        *reinterpret_cast<P*>(d_up + offset<V, Strided>(l, i, 4, packs_per_row)) = pack<T, V>(dy);
      }
    }
  }
  if constexpr (!Strided) {
    const int64_t tail = packs * V + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (tail < l.cols) {
      float du;
      d_gate[tail] = static_cast<T>(swiglu_backward_f32(static_cast<float>(grad[tail]), static_cast<float>(gate[tail]),
                                                        static_cast<float>(up[tail]), du));
      d_up[tail] = static_cast<T>(du);
    }
  }
}

// ----------------------------------------------------------------------------- launchers
// Called by swiglu.cpp once every argument is checked: argument checks and errors live in one
// place for the CPU and CUDA kernels, and the launchers only launch, returning the launch's error
// code for the caller to raise.

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0;
}

// Blocks for a grid-stride loop over `work` items, `work_per_block` per block and pass: enough
// to cover the work, at most as many as are resident at once (more would only queue behind the
// first wave). Residency is measured once per kernel, on the first device it runs on: all GPUs
// of a host are assumed alike (a wrong guess changes the grid size, never the result).
template <auto kernel>
unsigned int grid_size(int64_t work, int64_t work_per_block) {
  static const int64_t resident = [] {
    int device = 0, sms = 1, per_sm = 1;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // a failed query only costs a smaller grid
    }
    return static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  }();
  const int64_t needed = (work + work_per_block - 1) / work_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, resident)));
}

// The operands as a Layout: one flat row when all are contiguous, else their row strides (the
// caller guarantees each is a (rows, cols) view with contiguous rows).
Layout layout(std::initializer_list<const at::Tensor*> operands, bool& strided) {
  const at::Tensor& first = **operands.begin();
  const int64_t cols = first.dim() == 0 ? 1 : first.size(-1);
  strided = false;
  for (const at::Tensor* t : operands) strided = strided || !t->is_contiguous();
  Layout l{};
  l.rows = strided ? first.numel() / cols : 1;
  l.cols = strided ? cols : first.numel();
  int k = 0;
  for (const at::Tensor* t : operands) l.stride[k++] = strided && t->dim() >= 2 ? t->stride(-2) : l.cols;
  return l;
}

// Whether every row of every operand starts on a 16-byte boundary (V elements per pack).
bool rows_aligned(std::initializer_list<const at::Tensor*> operands, const Layout& l, int V) {
  const bool flat = l.rows == 1;  // flat: a tail loop takes the elements past the last pack
  bool ok = flat || l.cols % V == 0;
  int k = 0;
  for (const at::Tensor* t : operands) {
    ok = ok && aligned(t->const_data_ptr()) && (flat || l.stride[k] % V == 0);
    ++k;
  }
  return ok;
}

template <typename T, int V, bool Strided>
void launch_forward(const at::Tensor& g, const at::Tensor& u, at::Tensor& out, const Layout& l) {
  const unsigned int blocks =
      grid_size<swiglu_forward_kernel<T, V, Strided>>(l.rows * (l.cols / V), int64_t{kThreads} * kForwardUnroll);
  swiglu_forward_kernel<T, V, Strided><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(g.const_data_ptr()), static_cast<const T*>(u.const_data_ptr()),
      static_cast<T*>(out.mutable_data_ptr()), l);
}

template <typename T, int V, bool Strided>
void launch_backward(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& d_gate,
                     at::Tensor& d_up, const Layout& l) {
  const unsigned int blocks =
      grid_size<swiglu_backward_kernel<T, V, Strided>>(l.rows * (l.cols / V), int64_t{kThreads} * kBackwardUnroll);
  swiglu_backward_kernel<T, V, Strided><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(dy.const_data_ptr()), static_cast<const T*>(g.const_data_ptr()),
      static_cast<const T*>(u.const_data_ptr()), static_cast<T*>(d_gate.mutable_data_ptr()),
      static_cast<T*>(d_up.mutable_data_ptr()), l);
}

template <typename T>
void forward_packed(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
  constexpr int V = kPackBytes / sizeof(T);
  bool strided = false;
  const Layout l = layout({&g, &u, &out}, strided);
  const bool vec = rows_aligned({&g, &u, &out}, l, V);
  if (strided) {
    if (vec) launch_forward<T, V, true>(g, u, out, l);
    else launch_forward<T, 1, true>(g, u, out, l);
  } else {
    if (vec) launch_forward<T, V, false>(g, u, out, l);
    else launch_forward<T, 1, false>(g, u, out, l);
  }
}

template <typename T>
void backward_packed(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& d_gate,
                     at::Tensor& d_up) {
  constexpr int V = kPackBytes / sizeof(T);
  bool strided = false;
  const Layout l = layout({&dy, &g, &u, &d_gate, &d_up}, strided);
  const bool vec = rows_aligned({&dy, &g, &u, &d_gate, &d_up}, l, V);
  if (strided) {
    if (vec) launch_backward<T, V, true>(dy, g, u, d_gate, d_up, l);
    else launch_backward<T, 1, true>(dy, g, u, d_gate, d_up, l);
  } else {
    if (vec) launch_backward<T, V, false>(dy, g, u, d_gate, d_up, l);
    else launch_backward<T, 1, false>(dy, g, u, d_gate, d_up, l);
  }
}

}  // namespace

// Same-shape, non-empty operands of one dtype (float32, bfloat16 or float16) on the current
// device, each contiguous or a (rows, cols) view with contiguous rows (swiglu.cpp checks all of
// it before calling).
cudaError_t swiglu_forward_cuda(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
  switch (g.scalar_type()) {
    case at::kBFloat16: forward_packed<c10::BFloat16>(g, u, out); break;
    case at::kHalf: forward_packed<c10::Half>(g, u, out); break;
    default: forward_packed<float>(g, u, out); break;
  }
  return cudaGetLastError();
}

cudaError_t swiglu_backward_cuda(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& d_gate,
                                 at::Tensor& d_up) {
  switch (g.scalar_type()) {
    case at::kBFloat16: backward_packed<c10::BFloat16>(dy, g, u, d_gate, d_up); break;
    case at::kHalf: backward_packed<c10::Half>(dy, g, u, d_gate, d_up); break;
    default: backward_packed<float>(dy, g, u, d_gate, d_up); break;
  }
  return cudaGetLastError();
}

}  // namespace optimus
