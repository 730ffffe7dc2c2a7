/*
 * add_rms_norm: a residual add and the RMSNorm after it, in one pass. CPU kernel, and the op
 * (checks, then the CPU loop or the CUDA launcher of add_rms_norm.cu).
 *
 * Math, per row of `dim` elements, as RMSNorm.forward and the residual add compute them
 * (add_rms_norm_ref in optimus.py):
 *   s = x + delta                         (rounded to the dtype; s = x when delta is absent)
 *   y = s * rsqrt(mean(s^2) + eps)        (float32, rounded to the dtype)
 *   out = weight * y                      (the product in float32, rounded to the dtype)
 * returns (s, out). In the cached (inference) path each block then runs two of these instead of
 * two adds and two norms of about six kernels each.
 *
 * Memory layout: x, delta (..., dim) contiguous; weight (dim,) contiguous; both outputs new
 * contiguous tensors of x's shape.
 *
 * Dtypes: x, delta, weight share one of float32, bfloat16, float16 (mixed dtypes take the
 * reference path in optimus.py); math in float32.
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

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "text.h"

namespace optimus {
namespace {

constexpr const char* kOp = "optimus::add_rms_norm";

template <typename scalar_t>
void add_rms_norm_kernel(const at::Tensor& x, const scalar_t* delta, const at::Tensor& weight, double eps,
                         at::Tensor& sum, at::Tensor& out) {
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  scalar_t* s_ptr = sum.mutable_data_ptr<scalar_t>();
  scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float squares = 0.f;
      for (int64_t i = r * dim; i < (r + 1) * dim; ++i) {
        const scalar_t s = delta ? static_cast<scalar_t>(static_cast<float>(x_ptr[i]) + static_cast<float>(delta[i]))
                                 : x_ptr[i];
        s_ptr[i] = s;
        squares += static_cast<float>(s) * static_cast<float>(s);
      }
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(dim) + static_cast<float>(eps));
      for (int64_t i = r * dim, j = 0; j < dim; ++i, ++j) {
        const scalar_t y = static_cast<scalar_t>(static_cast<float>(s_ptr[i]) * scale);
        o_ptr[i] = static_cast<scalar_t>(static_cast<float>(w_ptr[j]) * static_cast<float>(y));
      }
    }
  });
}

void check_args(const at::Tensor& x, const std::optional<at::Tensor>& delta, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, kOp, ": x must be (..., dim) with dim > 0, got shape ", shape(x.sizes()));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp, ": dtype ", dtype,
              " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), kOp, ": weight must be (dim,) = (", num(x.size(-1)),
              ",), got ", shape(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == dtype, kOp, ": weight is ", weight.scalar_type(), " but x is ", dtype,
              "; they must share one dtype");
  TORCH_CHECK(weight.device() == x.device(), kOp, ": weight is on ", weight.device(), " but x is on ", x.device());
  if (delta) {
    TORCH_CHECK(delta->sizes() == x.sizes(), kOp, ": delta must have x's shape ", shape(x.sizes()), ", got ",
                shape(delta->sizes()));
    TORCH_CHECK(delta->scalar_type() == dtype, kOp, ": delta is ", delta->scalar_type(), " but x is ", dtype,
                "; they must share one dtype");
    TORCH_CHECK(delta->device() == x.device(), kOp, ": delta is on ", delta->device(), " but x is on ", x.device());
  }
  TORCH_CHECK(x.numel() / x.size(-1) < std::numeric_limits<int>::max() && x.size(-1) < std::numeric_limits<int>::max(),
              kOp, ": too many rows for the kernel's 32-bit grid; split the call");
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (add_rms_norm.cu): it only launches, and returns the launch's error code.
cudaError_t add_rms_norm_cuda(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps,
                              at::Tensor& sum, at::Tensor& out);

namespace {
#endif

std::tuple<at::Tensor, at::Tensor> add_rms_norm_op(const at::Tensor& x, const std::optional<at::Tensor>& delta,
                                                   const at::Tensor& weight, double eps) {
  check_args(x, delta, weight);
  const c10::OptionalDeviceGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor dc = delta ? delta->contiguous() : at::Tensor();
  at::Tensor sum = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {sum, out};
#ifdef OPTIMUS_WITH_CUDA
  if (x.is_cuda()) {
    C10_CUDA_CHECK(add_rms_norm_cuda(xc, delta ? &dc : nullptr, wc, eps, sum, out));
    return {sum, out};
  }
#endif
  AT_DISPATCH_V2(x.scalar_type(), "add_rms_norm_cpu", AT_WRAP([&] {
    add_rms_norm_kernel<scalar_t>(xc, delta ? dc.const_data_ptr<scalar_t>() : nullptr, wc, eps, sum, out);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return {sum, out};
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("add_rms_norm", &optimus::add_rms_norm_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("add_rms_norm", &optimus::add_rms_norm_op);
}
#endif
