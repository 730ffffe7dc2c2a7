/*
 * decode_linear: the projections of a decoding step, with the RMSNorm before them and the
 * SwiGLU or residual add after them folded in. CPU kernel, and the op (checks, allocation) that
 * runs it or the CUDA launcher of decode_linear.cu.
 *
 * Math, for x (B, K) and weight (N, K), as the model computes it in the input dtype T:
 *   xn  = norm_weight * round_T(x * rsqrt(mean(x^2) + eps))     if norm_weight is given, else x
 *   y   = round_T(xn @ weight^T)                                 (B, N), float32 accumulation
 *   out = round_T(silu(y[:, :N/2]) * y[:, N/2:])                 if swiglu (weight packs [gate; up])
 *   out = round_T(residual + out)                                if residual (B, N_out) is given
 * Each round_T is one the model's reference code makes too (RMSNorm.forward rounds the normalised
 * x, then multiplies by its weight in T; F.linear and swiglu_ref each round once), so the op
 * agrees with decode_linear_ref in optimus.py to the ulp of T, up to summation order.
 *
 * Memory layout: x and residual are (B, K) / (B, N_out) with contiguous rows (a row stride is
 * allowed for x, so a view of the last position of a (B, T, K) tensor needs no copy); weight is
 * contiguous (N, K); out is a new contiguous (B, N_out).
 *
 * Dtypes: float32, bfloat16, float16; all tensors of one dtype. float32 accumulation.
 *
 * Why: at decode sizes (B <= 4) a projection is a matrix-vector product that reads its weight
 * once; the library's GEMM kernels for M = 1..4 reach a fraction of the memory bandwidth, and the
 * norm and the adds around them are kernels of their own (six for an eager RMSNorm). Here one
 * launch reads the weight once and does the rest on the way (bench.py's decode section measures
 * it against F.linear and the eager norm).
 */
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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
#include <optional>
#include <vector>

#include "text.h"

namespace optimus {
namespace {

// ----------------------------------------------------------------------------- kernel

template <typename scalar_t>
void decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* norm_weight,
                       const at::Tensor* residual, double eps, bool swiglu, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0), n_out = out.size(1);
  const int64_t x_stride = x.stride(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  // The (possibly normalised) inputs, as the reference holds them: values of scalar_t, widened.
  std::vector<acc_t> xn(B * K);
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* row = xp + b * x_stride;
    acc_t scale = 1;
    if (norm_weight) {
      acc_t squares = 0;
      for (int64_t k = 0; k < K; ++k) squares += static_cast<acc_t>(row[k]) * static_cast<acc_t>(row[k]);
      scale = acc_t(1) / std::sqrt(squares / K + static_cast<acc_t>(eps));
    }
    for (int64_t k = 0; k < K; ++k) {
      acc_t v = static_cast<acc_t>(row[k]);
      if (norm_weight) {
        const acc_t normed = static_cast<acc_t>(static_cast<scalar_t>(v * scale));
        v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(norm_weight->const_data_ptr<scalar_t>()[k]) * normed));
      }
      xn[b * K + k] = v;
    }
  }
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const scalar_t* res = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  const int64_t half = N / 2;
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t b = 0; b < B; ++b) {
        auto dot = [&](int64_t row) {
          acc_t acc = 0;
          const scalar_t* wr = w + row * K;
          for (int64_t k = 0; k < K; ++k) acc += xn[b * K + k] * static_cast<acc_t>(wr[k]);
          return static_cast<acc_t>(static_cast<scalar_t>(acc));
        };
        acc_t y;
        if (swiglu) {
          const acc_t g = dot(j), u = dot(j + half);
          y = static_cast<acc_t>(static_cast<scalar_t>(g / (acc_t(1) + std::exp(-g)) * u));
        } else {
          y = dot(j);
        }
        if (res) y = static_cast<acc_t>(res[b * n_out + j]) + y;
        o[b * n_out + j] = static_cast<scalar_t>(y);
      }
    }
  });
}

// ----------------------------------------------------------------------------- op

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (decode_linear.cu): it only launches, and returns the launch's error code.
cudaError_t decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* norm_weight,
                               const at::Tensor* residual, double eps, bool swiglu, at::Tensor& out);

namespace {
#endif

void check_like(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "optimus::decode_linear: ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; move both to one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "optimus::decode_linear: ", name, " is ", t.scalar_type(),
              " but x is ", x.scalar_type(), "; pass tensors of one dtype");
}

}  // namespace

// The op, also called by decode_tail.cpp for the steps its fused kernel does not take.
at::Tensor decode_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& residual, double eps, bool swiglu) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "optimus::decode_linear: dtype ", dtype, " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "optimus::decode_linear: x must be (B, K) and weight (N, K), got ",
              shape(x.sizes()), " and ", shape(weight.sizes()));
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "optimus::decode_linear: weight has ", num(weight.size(1)), " columns but x has ",
              num(K), " (weight is (N, K), x is (B, K))");
  TORCH_CHECK(K > 0, "optimus::decode_linear: K must be positive");
  TORCH_CHECK(!swiglu || N % 2 == 0, "optimus::decode_linear: swiglu needs an even number of weight rows "
              "([gate; up]), got ", num(N));
  check_like(x, weight, "weight");
  TORCH_CHECK(x.stride(1) == 1, "optimus::decode_linear: x's rows must be contiguous (stride 1 along K)");
  const int64_t n_out = swiglu ? N / 2 : N;
  if (norm_weight) {
    check_like(x, *norm_weight, "norm_weight");
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == K, "optimus::decode_linear: norm_weight must be (",
                num(K), "), got ", shape(norm_weight->sizes()));
  }
  if (residual) {
    check_like(x, *residual, "residual");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == B && residual->size(1) == n_out,
                "optimus::decode_linear: residual must be (", num(B), ", ", num(n_out), "), got ",
                shape(residual->sizes()));
  }
  const c10::OptionalDeviceGuard device_guard(x.device());
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> nw = norm_weight ? std::optional<at::Tensor>(norm_weight->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> res = residual ? std::optional<at::Tensor>(residual->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({B, n_out}, x.options());
  if (B == 0 || n_out == 0) return out;
  const at::Tensor* nw_p = nw ? &*nw : nullptr;
  const at::Tensor* res_p = res ? &*res : nullptr;
#ifdef OPTIMUS_WITH_CUDA
  if (x.is_cuda()) {
    C10_CUDA_CHECK(decode_linear_cuda(x, w, nw_p, res_p, eps, swiglu, out));
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "decode_linear_cpu", [&] {
    decode_linear_cpu<scalar_t>(x, w, nw_p, res_p, eps, swiglu, out);
  });
  return out;
}

}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("decode_linear", &optimus::decode_linear_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("decode_linear", &optimus::decode_linear_op);
}
#endif
