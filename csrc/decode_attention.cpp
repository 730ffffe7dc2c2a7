/*
 * decode_attention: few-token queries against the static KV cache. CPU kernel, and the op
 * (checks, then the CPU loop or the CUDA launcher of decode_attention.cu).
 *
 * Math: query row (b, h, t) at position p = pos[b, t] attends to the cache slots 0..p of kv head
 * kvh = h / (H / KV) (grouped-query attention):
 *   s_j = scale * q[b, h, t] . k_cache[b, kvh, j]          for j <= p
 *   out[b, h, t] = sum_j softmax(s)_j * v_cache[b, kvh, j]
 * in float32 (scores, softmax, sums), rounded once to the dtype: decode_attention_ref in
 * optimus.py. Slots after p are never read, so the cache needs no mask and no zeroing.
 *
 * Memory layout: q (B, H, T, hd) and the caches (B, KV, S, hd) contiguous (q is rope_kv_append's
 * output, the caches KVCache's buffers); pos (B, T) int64; returns a new (B, H, T, hd) tensor.
 * status (1,) int32: the CUDA kernel's error flag; the CPU kernel never writes it.
 * Bounds: positions must lie in [0, S). On CPU the op raises IndexError naming them.
 *
 * Dtypes: q and the caches share one of float32, bfloat16, float16. Math in float32.
 */
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#ifdef OPTIMUS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "text.h"

namespace optimus {
namespace {

constexpr const char* kOp = "optimus::decode_attention";
// The CUDA kernel keeps a block's queries (H / KV heads x T tokens) and their sums in shared
// memory: these bounds keep that under Hopper's 227 KB. Longer query blocks (prefill) belong to
// F.scaled_dot_product_attention with a mask.
constexpr int64_t kCudaMaxQueriesPerKvHead = 64;
constexpr int64_t kCudaMaxHeadDim = 256;
constexpr int64_t kCudaMaxGridY = 65535;  // blocks (split, b * KV + kvh): gridDim.y's limit

// ----------------------------------------------------------------------------- kernels

template <typename scalar_t>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& pos, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  const int64_t KV = k_cache.size(1), S = k_cache.size(2), G = H / KV;
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.const_data_ptr<scalar_t>();
  const int64_t* pos_ptr = pos.const_data_ptr<int64_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hd), acc(hd), scores(S);
    for (int64_t r = begin; r < end; ++r) {  // row r = (b * H + h) * T + t
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T, p = pos_ptr[b * T + t];
      const scalar_t* qrow = q_ptr + r * hd;
      for (int64_t d = 0; d < hd; ++d) qf[d] = static_cast<float>(qrow[d]);
      const int64_t base = (b * KV + h / G) * S * hd;  // k_cache[b, h / G, 0, 0]
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= p; ++j) {
        const scalar_t* krow = k_ptr + base + j * hd;
        float s = 0.f;
        for (int64_t d = 0; d < hd; ++d) s += qf[d] * static_cast<float>(krow[d]);
        scores[j] = s * fscale;
        m = std::max(m, scores[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      for (int64_t j = 0; j <= p; ++j) {
        const float w = std::exp(scores[j] - m);
        l += w;
        const scalar_t* vrow = v_ptr + base + j * hd;
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * static_cast<float>(vrow[d]);
      }
      for (int64_t d = 0; d < hd; ++d) out_ptr[r * hd + d] = static_cast<scalar_t>(acc[d] / l);
    }
  });
}

// ----------------------------------------------------------------------------- checks

void check_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                const at::Tensor& status) {
  TORCH_CHECK(q.dim() == 4 && q.size(3) > 0, kOp, ": q must be (B, H, T, hd), got shape ", shape(q.sizes()));
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(3) == hd && k_cache.size(2) > 0 &&
                  k_cache.size(1) > 0,
              kOp, ": k_cache must be (B, KV, S, hd) = (", num(B), ", KV, S, ", num(hd), "), got ",
              shape(k_cache.sizes()));
  const int64_t KV = k_cache.size(1);
  TORCH_CHECK(H % KV == 0, kOp, ": q's ", num(H), " heads must be a multiple of the cache's ", num(KV), " kv heads");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache must have k_cache's shape ", shape(k_cache.sizes()),
              ", got ", shape(v_cache.sizes()));
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == T, kOp, ": pos must be (B, T) = (", num(B), ", ",
              num(T), "), got ", shape(pos.sizes()));
  TORCH_CHECK(pos.scalar_type() == at::kLong, kOp, ": pos must be int64, got ", pos.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), kOp,
              ": k_cache and v_cache must be contiguous (B, KV, S, hd) buffers");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp, ": dtype ", dtype,
              " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype, kOp, ": q is ", dtype,
              " but the caches are ", k_cache.scalar_type(), " and ", v_cache.scalar_type(), "; they must share one dtype");
  TORCH_CHECK(status.numel() == 1 && status.scalar_type() == at::kInt, kOp,
              ": status must be a one-element int32 tensor, got ", status.scalar_type(), " of shape ",
              shape(status.sizes()));
  for (const at::Tensor* t : {&k_cache, &v_cache, &pos, &status}) {
    TORCH_CHECK(t->device() == q.device(), kOp, ": an argument is on ", t->device(), " but q is on ", q.device(),
                "; move all arguments to one device");
  }
  if (q.is_cuda()) {
    TORCH_CHECK((H / KV) * T <= kCudaMaxQueriesPerKvHead && hd <= kCudaMaxHeadDim, kOp, ": the CUDA kernel takes up to ",
                num(kCudaMaxQueriesPerKvHead), " queries per kv head (H / KV x T = ", num((H / KV) * T),
                ") and head dims up to ", num(kCudaMaxHeadDim), " (got ", num(hd),
                "); use F.scaled_dot_product_attention with a mask for longer query blocks");
    TORCH_CHECK(B * H * T * k_cache.size(2) < std::numeric_limits<int>::max() &&
                    B * KV * k_cache.size(2) * hd < std::numeric_limits<int>::max(),
                kOp, ": the cache is too large for the kernel's 32-bit indices; split the batch");
    TORCH_CHECK(B * KV <= kCudaMaxGridY, kOp, ": B x KV = ", num(B * KV), " exceeds the CUDA grid's ",
                num(kCudaMaxGridY), " rows of blocks; split the batch");
  }
}

// IndexError naming the valid range and the first offending position, if any is outside [0, S).
void check_positions(const at::Tensor& pos, int64_t S) {
  const int64_t* p = pos.const_data_ptr<int64_t>();
  const int64_t n = pos.numel(), T = pos.size(1);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < S, kOp, ": position out of range: positions must lie in [0, ", num(S),
                      ") (the cache length), got ", num(p[i]), " at pos[", num(i / T), ", ", num(i % T), "]");
  }
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (decode_attention.cu): it only launches, and returns the launch's error code.
cudaError_t decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& pos, at::Tensor& status, double scale, at::Tensor& out);

namespace {
#endif

at::Tensor decode_attention_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& pos, at::Tensor& status, double scale) {
  check_args(q, k_cache, v_cache, pos, status);
  const c10::OptionalDeviceGuard device_guard(q.device());
  const at::Tensor qc = q.contiguous(), p = pos.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, H, T, hd)
  if (q.numel() == 0) return out;
#ifdef OPTIMUS_WITH_CUDA
  if (q.is_cuda()) {
    C10_CUDA_CHECK(decode_attention_cuda(qc, k_cache, v_cache, p, status, scale, out));
    return out;
  }
#endif
  check_positions(p, k_cache.size(2));
  AT_DISPATCH_V2(q.scalar_type(), "decode_attention_cpu", AT_WRAP([&] {
    decode_attention_kernel<scalar_t>(qc, k_cache, v_cache, p, scale, out);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("decode_attention", &optimus::decode_attention_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("decode_attention", &optimus::decode_attention_op);
}
#endif
