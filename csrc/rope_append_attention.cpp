/*
 * rope_append_attention: a decoding step's attention for one new token per row, straight from
 * the QKV projection's output: the rotary embedding on q and k, the cache write of k and v, and
 * the attention of q over the cache up to the row's position. The op (checks), and its CPU path.
 *
 * Math: exactly rope_kv_append (q and k rotated at p = pos[b, 0], float32, one rounding; k and v
 * written into the caches at p), then decode_attention of the rotated q (scores
 * scale * q . k_j for slots j <= p, softmax and the sum over v in float32, one rounding):
 * rope_append_attention_ref in optimus.py. On CPU, and on CUDA for shapes the fused kernel does
 * not take (rope_append_attention.cu says which), the op runs those two ops in turn.
 *
 * Memory layout:
 *   qkv (B, (H + 2 KV) hd): one row per batch row with unit stride along it, [q heads | k heads |
 *     v heads] (the packed QKV projection's output; a row-slice of a wider tensor is fine).
 *   cos, sin (S_table, hd / 2) float32; pos (B, 1) int64.
 *   k_cache, v_cache (B, KV, S, hd) contiguous, written in place at [b, :, pos[b, 0]].
 *   status (1,) int32: the CUDA kernels' error flag.
 *   counts (B * KV,) int32: the CUDA kernel's merge counters, zero before and after every call
 *     (the cache allocates them zeroed; the CPU path never touches them).
 *   returns: a new (B, H hd) tensor, the attention's output rows, ready for the output projection.
 * Bounds: as rope_kv_append's: every position in [0, min(S, S_table)); on CPU IndexError before
 * anything is written.
 *
 * Dtypes: qkv and the caches share one of float32, bfloat16, float16. Math in float32.
 */
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#ifdef OPTIMUS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

#include <cstdint>
#include <limits>

#include "text.h"

namespace optimus {
namespace {

constexpr const char* kOp = "optimus::rope_append_attention";
constexpr int64_t kCudaMaxGridY = 65535;  // blocks (split, b * KV + kvh): gridDim.y's limit

void check_args(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& status,
                const at::Tensor& counts, int64_t num_heads) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) > 0 && k_cache.size(2) > 0 && k_cache.size(3) > 0 &&
                  k_cache.size(3) % 2 == 0,
              kOp, ": k_cache must be (B, KV, S, hd) with an even hd, got ", shape(k_cache.sizes()));
  const int64_t B = k_cache.size(0), KV = k_cache.size(1), hd = k_cache.size(3);
  TORCH_CHECK(num_heads > 0 && num_heads % KV == 0, kOp, ": num_heads (", num(num_heads),
              ") must be a positive multiple of the cache's ", num(KV), " kv heads");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache must have k_cache's shape ", shape(k_cache.sizes()),
              ", got ", shape(v_cache.sizes()));
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), kOp,
              ": k_cache and v_cache must be contiguous (B, KV, S, hd) buffers");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == (num_heads + 2 * KV) * hd, kOp,
              ": qkv must be (B, (H + 2 KV) hd) = (", num(B), ", ", num((num_heads + 2 * KV) * hd), "), got ",
              shape(qkv.sizes()));
  TORCH_CHECK(qkv.size(1) <= 1 || qkv.stride(1) == 1, kOp, ": qkv's rows must be contiguous (unit stride along a row)");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp, ": dtype ", dtype,
              " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype, kOp, ": qkv is ", dtype,
              " but the caches are ", k_cache.scalar_type(), " and ", v_cache.scalar_type(), "; they must share one dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == hd / 2 && cos.size(0) > 0 && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              kOp, ": cos and sin must be float32 (S_table, hd / 2) = (S_table, ", num(hd / 2), ") tables, got ",
              shape(cos.sizes()), " and ", shape(sin.sizes()));
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == 1 && pos.scalar_type() == at::kLong, kOp,
              ": pos must be int64 (B, 1) = (", num(B), ", 1): one new token per row, got ", shape(pos.sizes()));
  TORCH_CHECK(status.numel() == 1 && status.scalar_type() == at::kInt, kOp,
              ": status must be a one-element int32 tensor, got ", status.scalar_type(), " of shape ",
              shape(status.sizes()));
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == B * KV && counts.scalar_type() == at::kInt &&
                  counts.is_contiguous(),
              kOp, ": counts must be a contiguous int32 (B x KV,) = (", num(B * KV), ",) tensor of zeros, got ",
              counts.scalar_type(), " of shape ", shape(counts.sizes()));
  for (const at::Tensor* t : {&cos, &sin, &pos, &k_cache, &v_cache, &status, &counts}) {
    TORCH_CHECK(t->device() == qkv.device(), kOp, ": an argument is on ", t->device(), " but qkv is on ",
                qkv.device(), "; move all arguments to one device");
  }
  if (qkv.is_cuda()) {
    TORCH_CHECK(B * KV <= kCudaMaxGridY, kOp, ": B x KV = ", num(B * KV), " exceeds the CUDA grid's ",
                num(kCudaMaxGridY), " rows of blocks; split the batch");
    TORCH_CHECK(k_cache.size(2) < std::numeric_limits<int>::max() / 2, kOp, ": the cache is too long for the kernel");
  }
}

// The two ops the fused kernel stands for, in turn.
at::Tensor rope_then_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& status,
                               int64_t num_heads, double scale) {
  static const auto rope = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("optimus::rope_kv_append", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 at::Tensor&, at::Tensor&, at::Tensor&)>();
  static const auto attention = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("optimus::decode_attention", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, at::Tensor&, double)>();
  const int64_t B = qkv.size(0), KV = k_cache.size(1), hd = k_cache.size(3), H = num_heads;
  const at::Tensor q = qkv.narrow(1, 0, H * hd).view({B, 1, H, hd});             // (B, T=1, H, hd)
  const at::Tensor k = qkv.narrow(1, H * hd, KV * hd).view({B, 1, KV, hd});      // (B, 1, KV, hd)
  const at::Tensor v = qkv.narrow(1, (H + KV) * hd, KV * hd).view({B, 1, KV, hd});
  const at::Tensor q_rot = rope.call(q, k, v, cos, sin, pos, k_cache, v_cache, status);  // (B, H, 1, hd)
  return attention.call(q_rot, k_cache, v_cache, pos, status, scale).view({B, H * hd});
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher and its shape test (rope_append_attention.cu).
bool rope_append_attention_cuda_takes(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      int64_t num_heads);
cudaError_t rope_append_attention_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache,
                                       at::Tensor& status, at::Tensor& counts, int64_t num_heads, double scale,
                                       at::Tensor& out);

namespace {
#endif

at::Tensor rope_append_attention_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                    const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache,
                                    at::Tensor& status, at::Tensor& counts, int64_t num_heads, double scale) {
  check_args(qkv, cos, sin, pos, k_cache, v_cache, status, counts, num_heads);
  const c10::OptionalDeviceGuard device_guard(qkv.device());
#ifdef OPTIMUS_WITH_CUDA
  if (qkv.is_cuda() && rope_append_attention_cuda_takes(qkv, k_cache, v_cache, num_heads)) {
    at::Tensor out = at::empty({qkv.size(0), num_heads * k_cache.size(3)}, qkv.options());  // (B, H hd)
    if (qkv.size(0) == 0) return out;
    C10_CUDA_CHECK(rope_append_attention_cuda(qkv, cos.contiguous(), sin.contiguous(), pos.contiguous(), k_cache,
                                              v_cache, status, counts, num_heads, scale, out));
    return out;
  }
#endif
  return rope_then_attention(qkv, cos, sin, pos, k_cache, v_cache, status, num_heads, scale);
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("rope_append_attention", &optimus::rope_append_attention_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("rope_append_attention", &optimus::rope_append_attention_op);
}
#endif
