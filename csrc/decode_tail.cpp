/*
 * decode_tail: the rest of a decoding step's block after its attention (the output projection and
 * its residual add, the MLP with its norm and residual add), then the next block's norm and QKV
 * projection. The op (checks, allocation), its CPU path, and the dispatch to decode_tail.cu.
 *
 * Math, in decode_linear's terms (decode_linear.cpp), for rows y (B, A) and x (B, D):
 *   x1  = decode_linear(y, wo, residual=x)                     (B, D)
 *   h   = decode_linear(x1, wgu, norm=norm2, swiglu)           (B, Hd), wgu = [gate; up] (2 Hd, D)
 *   out = decode_linear(h, wdown, residual=x1)                 (B, D)
 *   qkv = decode_linear(out, next_wqkv, norm=next_norm)        (B, Nq); (B, 0) without a next block
 * Returns (out, qkv). The eps of norm2 and of next_norm are given apart.
 *
 * Memory layout: every tensor contiguous (copies are made of any that is not); dtypes float32,
 * bfloat16, float16, one for all, as decode_linear.
 *
 * CPU, and CUDA where the fused kernel does not apply (more than one row, shapes it does not
 * take, slices that would not fit in shared memory; decode_tail.cu's opening comment): the steps
 * above, each one decode_linear op. With one row on CUDA: one persistent launch that computes the
 * same bits.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#ifdef OPTIMUS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

#include <optional>
#include <tuple>

#include "text.h"

namespace optimus {

at::Tensor decode_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& residual, double eps, bool swiglu);

#ifdef OPTIMUS_WITH_CUDA
// The CUDA launcher (decode_tail.cu): cudaErrorNotSupported, with nothing launched, where the fused
// kernel does not apply.
cudaError_t decode_tail_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& wo, const at::Tensor& norm2,
                             const at::Tensor& wgu, const at::Tensor& wdown, const at::Tensor* next_norm,
                             const at::Tensor* next_wqkv, double eps, double next_eps, at::Tensor& out,
                             at::Tensor& qkv);
#endif

namespace {

void check_matrix(const at::Tensor& x, const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device() == x.device(), "optimus::decode_tail: ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; move both to one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "optimus::decode_tail: ", name, " is ", t.scalar_type(),
              " but x is ", x.scalar_type(), "; pass tensors of one dtype");
  const bool ok = rows < 0 ? t.dim() == 1 && t.size(0) == cols : t.dim() == 2 && t.size(0) == rows && t.size(1) == cols;
  TORCH_CHECK(ok, "optimus::decode_tail: ", name, " must be (", rows < 0 ? "" : num(rows) + ", ", num(cols),
              "), got ", shape(t.sizes()));
}

std::tuple<at::Tensor, at::Tensor> decode_tail_op(const at::Tensor& y, const at::Tensor& x, const at::Tensor& wo,
                                                  const at::Tensor& norm2, const at::Tensor& wgu,
                                                  const at::Tensor& wdown, const std::optional<at::Tensor>& next_norm,
                                                  const std::optional<at::Tensor>& next_wqkv, double eps,
                                                  double next_eps) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0), "optimus::decode_tail: y must be (B, A) and x "
              "(B, D) with the same B, got ", shape(y.sizes()), " and ", shape(x.sizes()));
  TORCH_CHECK(wgu.dim() == 2 && wgu.size(0) % 2 == 0, "optimus::decode_tail: wgu must be [gate; up], (2 Hd, D), got ",
              shape(wgu.sizes()));
  TORCH_CHECK(next_norm.has_value() == next_wqkv.has_value(), "optimus::decode_tail: pass next_norm and next_wqkv "
              "together (the next block's) or neither (the last block)");
  const int64_t B = x.size(0), D = x.size(1), A = y.size(1), Hd = wgu.size(0) / 2;
  check_matrix(x, y, "y", B, A);
  check_matrix(x, wo, "wo", D, A);
  check_matrix(x, norm2, "norm2", -1, D);
  check_matrix(x, wgu, "wgu", 2 * Hd, D);
  check_matrix(x, wdown, "wdown", D, Hd);
  if (next_wqkv) {
    check_matrix(x, *next_norm, "next_norm", -1, D);
    TORCH_CHECK(next_wqkv->dim() == 2, "optimus::decode_tail: next_wqkv must be (Nq, ", num(D), "), got ",
                shape(next_wqkv->sizes()));
    check_matrix(x, *next_wqkv, "next_wqkv", next_wqkv->size(0), D);
  }
  const c10::OptionalDeviceGuard device_guard(x.device());
#ifdef OPTIMUS_WITH_CUDA
  if (x.is_cuda() && B > 0) {
    const at::Tensor nn = next_norm ? next_norm->contiguous() : at::Tensor(), nq = next_wqkv ? next_wqkv->contiguous() : at::Tensor();
    at::Tensor out = at::empty({B, D}, x.options()), qkv = at::empty({B, next_wqkv ? nq.size(0) : 0}, x.options());
    const cudaError_t err = decode_tail_cuda(y.contiguous(), x.contiguous(), wo.contiguous(), norm2.contiguous(),
                                             wgu.contiguous(), wdown.contiguous(), next_norm ? &nn : nullptr,
                                             next_wqkv ? &nq : nullptr, eps, next_eps, out, qkv);
    if (err == cudaSuccess) return {out, qkv};
    if (err != cudaErrorNotSupported) C10_CUDA_CHECK(err);
  }
#endif
  const at::Tensor x1 = decode_linear_op(y.contiguous(), wo, std::nullopt, x, eps, false);
  const at::Tensor h = decode_linear_op(x1, wgu, norm2, std::nullopt, eps, true);
  at::Tensor out = decode_linear_op(h, wdown, std::nullopt, x1, eps, false);
  at::Tensor qkv = next_wqkv ? decode_linear_op(out, *next_wqkv, next_norm, std::nullopt, next_eps, false)
                             : at::empty({B, 0}, x.options());
  return {out, qkv};
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("decode_tail", &optimus::decode_tail_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("decode_tail", &optimus::decode_tail_op);
}
#endif
