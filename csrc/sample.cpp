/*
 * sample: one token per row of logits, drawn from logits_to_probs(logits, temperature, top_p,
 * top_k) (optimus.py) without building the probabilities. CPU kernel, and the op (checks, then
 * the CPU loop or the CUDA launcher of sample.cu).
 *
 * Math, per row of V logits l:
 *   x_i = (l_i - max l) / max(temperature, MIN_TEMPERATURE)       (float32; max x = 0)
 *   top-k: keep x_i >= the k-th largest x (every token tied with it too); 0 or k >= V keeps all
 *   e_i = exp(x_i) for kept tokens, 0 otherwise; Z = sum e
 *   top-p: keep e_i >= tau, tau the largest value with sum_{e_j >= tau} e_j >= top_p * Z (the
 *     smallest probability in the nucleus: every token tied with it is kept); 1 keeps all
 *   token = argmax over kept i of e_i / race_i,  race_i ~ Exp(1) independent.
 * Why it is exact: the kept set and the weights e_i are logits_to_probs' (its probabilities are
 * e_i / Z' over the same set, Z' their sum), and for independent E_i ~ Exp(1),
 * P(argmax_i w_i / E_i = j) = w_j / sum_i w_i (the exponential race: E_i / w_i ~ Exp(w_i), the
 * smallest of independent exponentials is the j-th with probability w_j / sum w). Sums are
 * float32 (CUDA) or float64 (CPU) in their own order, so a cumulative mass within rounding of
 * top_p * Z can put the boundary one token off from the reference's cumsum.
 * Here (CPU) the thresholds come from std::nth_element and std::sort of a row copy; the CUDA
 * kernel finds them by radix select (sample.cu).
 *
 * Memory layout: logits (B, V) with contiguous rows, any row stride (the LM head's output cut
 * to the real vocabulary is a view: no copy); race (B, V) float32
 * contiguous (torch's exponential_, so seeded generators and CUDA graphs work); returns (B,)
 * int64. A row whose logits are all NaN or -inf returns token 0.
 *
 * Dtypes: logits float32, bfloat16, float16; math in float32 (sums in float64 on CPU).
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
#include <functional>
#include <limits>
#include <vector>

#include "text.h"

namespace optimus {
namespace {

constexpr const char* kOp = "optimus::sample";

// ----------------------------------------------------------------------------- kernels

template <typename scalar_t>
void sample_kernel(const at::Tensor& logits, const at::Tensor& race, float temperature, int64_t top_k, double top_p,
                   at::Tensor& out) {
  const int64_t B = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const scalar_t* l_ptr = logits.const_data_ptr<scalar_t>();
  const float* r_ptr = race.const_data_ptr<float>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(V), scratch(V);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = l_ptr + b * ld;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < V; ++i) mx = std::fmax(mx, static_cast<float>(row[i]));
      for (int64_t i = 0; i < V; ++i) x[i] = (static_cast<float>(row[i]) - mx) / temperature;
      float kth = -std::numeric_limits<float>::infinity();
      if (top_k > 0 && top_k < V) {  // the k-th largest x; NaN sorts last
        std::copy(x.begin(), x.end(), scratch.begin());
        const auto greater = [](float a, float b) { return a > b || (!std::isnan(a) && std::isnan(b)); };
        std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(), greater);
        kth = scratch[top_k - 1];
      }
      double Z = 0;
      for (int64_t i = 0; i < V; ++i) {
        x[i] = x[i] >= kth ? std::exp(x[i]) : 0.f;  // x now holds e; NaN compares false: dropped
        Z += x[i];
      }
      float tau = 0.f;  // keep e >= tau (and e > 0)
      if (top_p < 1) {
        std::copy(x.begin(), x.end(), scratch.begin());
        std::sort(scratch.begin(), scratch.end(), std::greater<float>());
        double before = 0;
        for (int64_t n = 0; n < V && before < top_p * Z; ++n) {
          tau = scratch[n];
          before += scratch[n];
        }
      }
      int64_t best = 0;
      float best_score = -1.f;
      for (int64_t i = 0; i < V; ++i) {
        if (x[i] > 0.f && x[i] >= tau) {
          const float score = x[i] / r_ptr[b * V + i];
          if (score > best_score) best_score = score, best = i;
        }
      }
      out_ptr[b] = best;
    }
  });
}

// ----------------------------------------------------------------------------- checks

void check_args(const at::Tensor& logits, const at::Tensor& race, double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, kOp, ": logits must be (B, V) with V > 0, got shape ",
              shape(logits.sizes()));
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp, ": logits dtype ", dtype,
              " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(race.sizes() == logits.sizes() && race.scalar_type() == at::kFloat && race.is_contiguous(), kOp,
              ": race must be a contiguous float32 tensor of logits' shape ", shape(logits.sizes()), ", got ",
              race.scalar_type(), " of shape ", shape(race.sizes()));
  TORCH_CHECK(race.device() == logits.device(), kOp, ": race is on ", race.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(temperature > 0, kOp, ": temperature must be > 0 (use argmax for 0)");
  TORCH_CHECK(top_k >= 0, kOp, ": top_k must be >= 0 (0 keeps all tokens), got ", num(top_k));
  TORCH_CHECK(top_p > 0 && top_p <= 1, kOp, ": top_p must be in (0, 1]");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int>::max(), kOp, ": a vocabulary of ", num(logits.size(1)),
              " exceeds the kernel's 32-bit index");
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (sample.cu): it only launches, and returns the launch's error code.
cudaError_t sample_cuda(const at::Tensor& logits, const at::Tensor& race, float temperature, int64_t top_k,
                        float top_p, at::Tensor& out);

namespace {
#endif

at::Tensor sample_op(const at::Tensor& logits, const at::Tensor& race, double temperature, int64_t top_k,
                     double top_p) {
  check_args(logits, race, temperature, top_k, top_p);
  const c10::OptionalDeviceGuard device_guard(logits.device());
  const at::Tensor l = logits.stride(1) == 1 && logits.stride(0) >= logits.size(1) ? logits : logits.contiguous();
  // logits_to_probs' divisor: max(temperature, smallest normal float32), rounded to float32.
  const float t = std::max(static_cast<float>(temperature), std::numeric_limits<float>::min());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return out;
#ifdef OPTIMUS_WITH_CUDA
  if (logits.is_cuda()) {
    C10_CUDA_CHECK(sample_cuda(l, race, t, top_k, static_cast<float>(top_p), out));
    return out;
  }
#endif
  AT_DISPATCH_V2(logits.scalar_type(), "sample_cpu", AT_WRAP([&] {
    sample_kernel<scalar_t>(l, race, t, top_k, top_p, out);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("sample", &optimus::sample_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("sample", &optimus::sample_op);
}
#endif
