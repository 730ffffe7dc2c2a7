/*
 * rope_kv_append: rotary embedding on q and k at positions `pos`, and the KV-cache write, in one
 * pass. CPU kernel, and the op (checks, allocation) that runs it or the CUDA launcher of
 * rope_kv_append.cu.
 *
 * Math (rotate-half convention, half = hd / 2): each head row x of q and k, at the position
 * p = pos[b, t] of its token, with c = cos[p, i] and s = sin[p, i], becomes
 *   out[i]        = x[i] * c - x[i + half] * s
 *   out[i + half] = x[i + half] * c + x[i] * s        for 0 <= i < half,
 * in float32, rounded once to the tensors' dtype: the numbers of rotate_half_ref in optimus.py.
 *
 * Memory layout:
 *   q (B, T, H, hd), k and v (B, T, KV, hd): any strides whose last one is 1 (q, k, v can be
 *     views into one fused projection); a strided last dimension is copied first.
 *   cos, sin (S_table, half) float32, pos (B, T) int64: small, made contiguous.
 *   k_cache, v_cache (B, KV, S, hd), contiguous, written in place: row [b, h, pos[b, t]] gets
 *     the rotated k (and the plain v) of token (b, t), head h. Other rows are untouched. Two
 *     tokens of one batch row at one position: one of them lands, which one is unspecified.
 *   returns: q rotated, a new contiguous (B, H, T, hd) tensor, ready for attention.
 *   status (1,) int32: the CUDA kernel's error flag; the CPU kernel never writes it.
 * Bounds: every position must lie in [0, min(S, S_table)). On CPU the op raises IndexError,
 * naming the range and the offending positions, before it writes anything.
 *
 * Dtypes: q, k, v and the caches share one of float32, bfloat16, float16. Math in float32.
 */
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <c10/core/DeviceGuard.h>
#ifdef OPTIMUS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <string>

#include "text.h"

namespace optimus {
namespace {

// Elements per parallel task: below this, threading costs more than it saves (ATen's value).
constexpr int64_t kGrainSize = 32768;
// Offending positions quoted in the out-of-range message.
constexpr int64_t kQuotedPositions = 4;

// ----------------------------------------------------------------------------- kernels

template <typename scalar_t>
inline void rotate_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const float* __restrict__ c,
                       const float* __restrict__ s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
    out[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
    out[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
  }
}

template <typename scalar_t>
void rope_kv_append_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& pos, at::Tensor& q_out, at::Tensor& k_cache,
                           at::Tensor& v_cache) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3);
  const int64_t KV = k.size(2), S = k_cache.size(2), half = hd / 2;
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
  const float* cos_ptr = cos.const_data_ptr<float>();
  const float* sin_ptr = sin.const_data_ptr<float>();
  const int64_t* pos_ptr = pos.const_data_ptr<int64_t>();
  scalar_t* q_out_ptr = q_out.mutable_data_ptr<scalar_t>();
  scalar_t* k_cache_ptr = k_cache.mutable_data_ptr<scalar_t>();
  scalar_t* v_cache_ptr = v_cache.mutable_data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t tokens_per_task = std::max<int64_t>(1, kGrainSize / ((H + 2 * KV) * hd));
  at::parallel_for(0, B * T, tokens_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {  // token n = b * T + t
      const int64_t b = n / T, t = n % T, p = pos_ptr[n];
      const float* c = cos_ptr + p * half;
      const float* s = sin_ptr + p * half;
      for (int64_t h = 0; h < H; ++h) {
        rotate_row(q_ptr + b * qs0 + t * qs1 + h * qs2, q_out_ptr + ((b * H + h) * T + t) * hd, c, s, half);
      }
      for (int64_t h = 0; h < KV; ++h) {
        const int64_t slot = ((b * KV + h) * S + p) * hd;  // k_cache[b, h, p, :]
        rotate_row(k_ptr + b * ks0 + t * ks1 + h * ks2, k_cache_ptr + slot, c, s, half);
        std::copy_n(v_ptr + b * vs0 + t * vs1 + h * vs2, hd, v_cache_ptr + slot);
      }
    }
  });
}

// ----------------------------------------------------------------------------- launchers

// IndexError naming the valid range and the first offending positions, if any is outside it.
void check_positions(const at::Tensor& pos, int64_t S, int64_t table) {
  const int64_t limit = std::min(S, table);
  const int64_t* p = pos.const_data_ptr<int64_t>();
  const int64_t n = pos.numel(), T = pos.size(1);
  int64_t bad = 0;
  std::string quoted;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= 0 && p[i] < limit) continue;
    if (bad < kQuotedPositions) {
      quoted += (bad ? ", " : "") + num(p[i]) + " at pos[" + num(i / T) + ", " + num(i % T) + "]";
    }
    ++bad;
  }
  TORCH_CHECK_INDEX(bad == 0, "optimus::rope_kv_append: KV cache position out of range: positions must lie in [0, ",
                    num(limit), ") (cache length ", num(S), ", rotary table length ", num(table), "), got ", quoted,
                    bad > kQuotedPositions ? ", ..." : "", " (", num(bad), " of ", num(n), " positions)");
}

}  // namespace

// Checks the arguments of rope_kv_append for both devices:
// shapes, dtypes, one device, caches contiguous. Messages name the argument and the fix.
void check_rope_kv_append_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& pos, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& status) {
  constexpr const char* op = "optimus::rope_kv_append";
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, T, H, hd), got shape ", shape(q.sizes()));
  const int64_t B = q.size(0), T = q.size(1), hd = q.size(3);
  TORCH_CHECK(hd > 0 && hd % 2 == 0, op, ": head dim must be even and positive for rotary, got ", num(hd));
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == T && k.size(3) == hd, op,
              ": k must be (B, T, KV, hd) = (", num(B), ", ", num(T), ", KV, ", num(hd), ") like q, got ", shape(k.sizes()));
  const int64_t KV = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", shape(k.sizes()), ", got ", shape(v.sizes()));
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == hd / 2 && cos.size(0) > 0, op,
              ": cos must be (S_table, hd/2) = (S_table, ", num(hd / 2), "), got ", shape(cos.sizes()));
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", shape(cos.sizes()), ", got ", shape(sin.sizes()));
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, op,
              ": cos and sin must be float32 (a bf16 table loses precision), got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == T, op, ": pos must be (B, T) = (", num(B), ", ", num(T),
              "), got ", shape(pos.sizes()));
  TORCH_CHECK(pos.scalar_type() == at::kLong, op, ": pos must be int64, got ", pos.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == KV && k_cache.size(3) == hd &&
                  k_cache.size(2) > 0,
              op, ": k_cache must be (B, KV, S, hd) = (", num(B), ", ", num(KV), ", S, ", num(hd), "), got ",
              shape(k_cache.sizes()));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", shape(k_cache.sizes()),
              ", got ", shape(v_cache.sizes()));
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op,
              ": k_cache and v_cache must be contiguous (they are written in place, so they cannot be copied)");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": dtype ", dtype,
              " is not supported (float32, bfloat16, float16)");
  const auto same_dtype = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " is ", t.scalar_type(), " but q is ", dtype,
                "; q, k, v and the caches must share one dtype");
  };
  same_dtype("k", k);
  same_dtype("v", v);
  same_dtype("k_cache", k_cache);
  same_dtype("v_cache", v_cache);
  TORCH_CHECK(status.numel() == 1 && status.scalar_type() == at::kInt, op,
              ": status must be a one-element int32 tensor, got ", status.scalar_type(), " of shape ", shape(status.sizes()));
  const auto same_device = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device(),
                "; move all arguments to one device");
  };
  same_device("k", k);
  same_device("v", v);
  same_device("cos", cos);
  same_device("sin", sin);
  same_device("pos", pos);
  same_device("k_cache", k_cache);
  same_device("v_cache", v_cache);
  same_device("status", status);
}

namespace {

// A view whose last dimension is contiguous (the kernels index the other dimensions by stride).
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (rope_kv_append.cu): it only launches, and returns the launch's error code.
cudaError_t rope_kv_append_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& pos, at::Tensor& q_out, at::Tensor& k_cache,
                                at::Tensor& v_cache, at::Tensor& status);

namespace {
#endif

// The CUDA kernel indexes rows and positions with 32-bit integers.
void check_cuda_index_range(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_cache) {
  constexpr int64_t kMaxIndex = std::numeric_limits<int>::max();
  TORCH_CHECK(k_cache.size(2) <= kMaxIndex, "optimus::rope_kv_append: a cache of ", num(k_cache.size(2)),
              " positions exceeds the kernel's 32-bit index");
  const int64_t threads = q.size(0) * q.size(1) * (q.size(2) + 2 * k.size(2)) * (q.size(3) / 2);  // 1-element packs
  TORCH_CHECK(threads <= kMaxIndex, "optimus::rope_kv_append: ", num(threads),
              " rows x packs exceed the kernel's 32-bit index; split the call into smaller batches");
}

// One function for both devices: checks and allocation, then the CPU kernel or the CUDA launcher.
at::Tensor rope_kv_append_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache,
                             at::Tensor& status) {
  check_rope_kv_append_args(q, k, v, cos, sin, pos, k_cache, v_cache, status);
  const c10::OptionalDeviceGuard device_guard(q.device());
  const at::Tensor p = pos.contiguous();
  if (q.is_cuda()) {
    check_cuda_index_range(q, k, k_cache);  // positions: the kernel checks them (status)
  } else {
    check_positions(p, k_cache.size(2), cos.size(0));
  }
  const at::Tensor qc = rows_contiguous(q), kc = rows_contiguous(k), vc = rows_contiguous(v);
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor q_out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());  // (B, H, T, hd)
#ifdef OPTIMUS_WITH_CUDA
  if (q.is_cuda()) {
    C10_CUDA_CHECK(rope_kv_append_cuda(qc, kc, vc, c, s, p, q_out, k_cache, v_cache, status));
    return q_out;
  }
#endif
  AT_DISPATCH_V2(q.scalar_type(), "rope_kv_append_cpu", AT_WRAP([&] {
    rope_kv_append_kernel<scalar_t>(qc, kc, vc, c, s, p, q_out, k_cache, v_cache);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return q_out;
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("rope_kv_append", &optimus::rope_kv_append_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("rope_kv_append", &optimus::rope_kv_append_op);
}
#endif
