/*
 * adamw_step: the trainer's optimizer step, the global-norm gradient clip and AdamW over lists of
 * float32 tensors, in place. CPU kernel, and the op (checks, then the CPU loops or the CUDA
 * launches of adamw.cu).
 *
 * Math (adamw_step_ref in optimus.py; torch.nn.utils.clip_grad_norm_ then torch.optim.AdamW):
 *   norm = || all gradients ||_2                            (sum of squares in float64)
 *   c    = min(1, max_norm / (norm + 1e-6))                 (1 when max_norm <= 0; NaN stays NaN)
 *   per tensor: step += 1, then per element, with g = c * grad, in float32:
 *     p  = p * (1 - lr * weight_decay)
 *     m  = beta1 m + (1 - beta1) g
 *     v  = beta2 v + (1 - beta2) g^2
 *     p  = p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
 * Returns norm (a float32 scalar). The gradients are read, never written.
 *
 * Memory layout: params, grads, exp_avgs, exp_avg_sqs: lists of one length, the i-th of each of
 * one shape, contiguous float32; steps: the i-th parameter's step counter, a float32 scalar (as
 * torch's fused AdamW keeps it); lr a float32 scalar. Everything on one device, so a CUDA step
 * reads lr and writes steps on the GPU and can be captured in a CUDA graph.
 *
 * CPU: the sum of squares is taken in fixed chunks of kChunk elements (float64 partials added in
 * order), so the norm does not depend on the number of threads: resume stays bit-exact.
 */
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
#include <vector>

#include "text.h"

namespace optimus {

#ifdef OPTIMUS_WITH_CUDA
// The CUDA launches (adamw.cu): they only launch, and return the first error.
cudaError_t adamw_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            const std::vector<at::Tensor>& steps, const at::Tensor& lr,
                            const std::vector<double>& weight_decays, double beta1, double beta2, double eps,
                            double max_norm, at::Tensor& norm);
#endif

namespace {

constexpr const char* kOp = "optimus::adamw_step";
constexpr int64_t kChunk = 1 << 15;  // elements per float64 partial of the CPU norm
constexpr float kClipEps = 1e-6f;    // clip_grad_norm_'s: max_norm / (norm + 1e-6)

void check_scalar(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, kOp, ": ", name,
              " must be a float32 scalar tensor, got ", t.scalar_type(), " of shape ", shape(t.sizes()));
  TORCH_CHECK(t.device() == device, kOp, ": ", name, " is on ", t.device(), " but the parameters are on ", device,
              "; keep the optimizer's scalars on the parameters' device");
}

void check_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList steps, const at::Tensor& lr, c10::ArrayRef<double> weight_decays) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  weight_decays.size() == n,
              kOp, ": params, grads, exp_avgs, exp_avg_sqs, steps and weight_decays must have one length, got ",
              num(n), ", ", num(grads.size()), ", ", num(exp_avgs.size()), ", ", num(exp_avg_sqs.size()), ", ",
              num(steps.size()), " and ", num(weight_decays.size()));
  const at::Device device = n ? params[0].device() : lr.device();
  check_scalar(lr, "lr", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* lists[] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
    const char* names[] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& t = *lists[k];
      TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": ", names[k], "[", num(i), "] is ", t.scalar_type(),
                  "; this step takes float32 parameters, gradients and moments (torch.optim.AdamW takes others)");
      TORCH_CHECK(t.device() == device, kOp, ": ", names[k], "[", num(i), "] is on ", t.device(), " but params[0] is on ",
                  device, "; put every tensor on one device");
      TORCH_CHECK(t.sizes() == params[i].sizes(), kOp, ": ", names[k], "[", num(i), "] has shape ", shape(t.sizes()),
                  " but params[", num(i), "] has ", shape(params[i].sizes()));
      TORCH_CHECK(t.is_contiguous(), kOp, ": ", names[k], "[", num(i), "] is not contiguous; pass contiguous tensors");
    }
    check_scalar(steps[i], "a step counter", device);
  }
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList steps, float lr, c10::ArrayRef<double> weight_decays, float beta1, float beta2, float eps,
               float clip) {
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = steps[i].mutable_data_ptr<float>();
    *step += 1.0f;
    const float step_size = lr / (1.0f - std::pow(beta1, *step));  // float32, as the CUDA kernel
    const float bc2_sqrt = std::sqrt(1.0f - std::pow(beta2, *step));
    const float decay = 1.0f - lr * static_cast<float>(weight_decays[i]);
    float* p = params[i].mutable_data_ptr<float>();
    const float* g = grads[i].const_data_ptr<float>();
    float* m = exp_avgs[i].mutable_data_ptr<float>();
    float* v = exp_avg_sqs[i].mutable_data_ptr<float>();
    at::parallel_for(0, params[i].numel(), kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const float gk = g[k] * clip;
        p[k] = p[k] * decay;
        m[k] = beta1 * m[k] + (1.0f - beta1) * gk;
        v[k] = beta2 * v[k] + (1.0f - beta2) * gk * gk;
        p[k] = p[k] - step_size * m[k] / (std::sqrt(v[k]) / bc2_sqrt + eps);
      }
    });
  }
}

double norm_cpu(at::TensorList grads) {
  double total = 0.0;
  for (const at::Tensor& grad : grads) {
    const float* g = grad.const_data_ptr<float>();
    const int64_t n = grad.numel(), chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double acc = 0.0;
        for (int64_t k = c * kChunk; k < std::min(n, (c + 1) * kChunk); ++k) acc += static_cast<double>(g[k]) * g[k];
        partial[c] = acc;
      }
    });
    for (const double part : partial) total += part;
  }
  return std::sqrt(total);
}

at::Tensor adamw_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,
                         c10::ArrayRef<double> weight_decays, double beta1, double beta2, double eps, double max_norm) {
  check_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decays);
  const c10::OptionalDeviceGuard device_guard(lr.device());
  at::Tensor norm = at::empty({}, lr.options());
#ifdef OPTIMUS_WITH_CUDA
  if (lr.is_cuda()) {
    C10_CUDA_CHECK(adamw_step_cuda(params.vec(), grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(), steps.vec(), lr,
                                   weight_decays.vec(), beta1, beta2, eps, max_norm, norm));
    return norm;
  }
#endif
  const double total = norm_cpu(grads);
  norm.fill_(total);
  float clip = 1.0f;
  if (max_norm > 0.0) {  // in float32, as clip_grad_norm_ and the CUDA kernel compute it
    const float c = static_cast<float>(max_norm) / (static_cast<float>(total) + kClipEps);
    clip = c > 1.0f ? 1.0f : c;  // a NaN norm stays NaN, as in clip_grad_norm_
  }
  adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, lr.item<float>(), weight_decays, static_cast<float>(beta1),
            static_cast<float>(beta2), static_cast<float>(eps), clip);
  return norm;
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("adamw_step", &optimus::adamw_step_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("adamw_step", &optimus::adamw_step_op);
}
#endif
