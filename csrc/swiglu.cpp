/*
 * swiglu: the SwiGLU activation of the MLP, forward and backward. CPU kernels, and the op
 * (checks, allocation) that runs them or the CUDA launchers of swiglu.cu.
 *
 * Math (s = sigmoid(gate) = 1 / (1 + exp(-gate)); the backward recomputes s from the saved
 * gate, so the forward keeps no activation for it):
 *   out    = silu(gate) * up = gate * s * up
 *   d_up   = grad * gate * s
 *   d_gate = grad * up * s * (1 + gate * (1 - s))
 *
 * Memory layout: gate, up and grad have one shape and are read as flat arrays. A
 * non-contiguous input is first copied to a contiguous one (one extra pass); the outputs are new
 * contiguous tensors of the same shape.
 *
 * Dtypes: float32, bfloat16, float16, and float64 (CPU only, so gradcheck can test the
 * registered autograd). Each element is computed in float32 (float64 for float64 inputs) and
 * rounded once, when stored, to the input dtype: the same numbers as swiglu_ref in optimus.py.
 *
 * Vectorisation: the loops are plain C++ that GCC/Clang vectorise at -O3. std::exp would stop
 * that (GCC vectorises libm calls only under -ffast-math), so sigmoid uses exp_neg below: a
 * Cody-Waite reduction and a polynomial, within 2.5 ulp of the exact sigmoid over all floats.
 * load_extension() builds with -fno-trapping-math, which lets GCC turn its selects into
 * vector blends.
 */
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <c10/core/DeviceGuard.h>
#ifdef OPTIMUS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "text.h"

namespace optimus {
namespace {

// Elements per parallel task: below this, threading costs more than it saves (ATen's value).
constexpr int64_t kGrainSize = 32768;

// ----------------------------------------------------------------------------- kernels

// exp(-x) for float32, in arithmetic a vectorising compiler can turn into SIMD code.
// -x = n * ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts, so n * kLn2Hi is exact), then
// e^r by its degree-7 Taylor polynomial (truncation < 1e-8 relative: below float32 rounding),
// times 2^n assembled in the exponent bits. Arguments are clamped to where 2^n is a normal
// float; beyond that the result is 0 or infinity, which is what sigmoid needs.
inline float exp_neg(float x) {
  constexpr float kLog2e = 1.44269504f;
  constexpr float kLn2Hi = 0.693359375f;   // 355/512: ln 2 = kLn2Hi - kLn2Lo
  constexpr float kLn2Lo = 2.12194440e-4f;
  constexpr float kRound = 12582912.0f;    // 1.5 * 2^23: adding and subtracting it rounds to an integer
  constexpr float kMaxArg = 88.0f;         // e^88 < FLT_MAX; above it: infinity
  constexpr float kMinArg = -87.0f;        // e^-87 > FLT_MIN; below it: 0
  const float y = -x;
  const float yc = std::min(kMaxArg, std::max(kMinArg, y));  // NaN -> kMinArg: no UB in the cast below
  const float n = (yc * kLog2e + kRound) - kRound;
  const float r = (yc - n * kLn2Hi) + n * kLn2Lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;  // the float 2^n
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  const float e = p * scale;
  return y > kMaxArg ? std::numeric_limits<float>::infinity() : (y < kMinArg ? 0.0f : e);
}

inline double exp_neg(double x) {  // float64 is for gradcheck only: libm is fine
  return std::exp(-x);
}

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_neg(x));
}

template <typename scalar_t>
void swiglu_forward_kernel(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainSize, [=](int64_t begin, int64_t end) {
    const scalar_t* __restrict__ g = gate + begin;
    const scalar_t* __restrict__ u = up + begin;
    scalar_t* __restrict__ o = out + begin;
    for (int64_t i = 0; i < end - begin; ++i) {
      const acc_t x = static_cast<acc_t>(g[i]);
      o[i] = static_cast<scalar_t>(x * sigmoid(x) * static_cast<acc_t>(u[i]));
    }
  });
}

template <typename scalar_t>
void swiglu_backward_kernel(const scalar_t* grad, const scalar_t* gate, const scalar_t* up,
                            scalar_t* d_gate, scalar_t* d_up, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainSize, [=](int64_t begin, int64_t end) {
    const scalar_t* __restrict__ dy = grad + begin;
    const scalar_t* __restrict__ g = gate + begin;
    const scalar_t* __restrict__ u = up + begin;
    scalar_t* __restrict__ dg = d_gate + begin;
    scalar_t* __restrict__ du = d_up + begin;
    for (int64_t i = 0; i < end - begin; ++i) {
      const acc_t x = static_cast<acc_t>(g[i]);
      const acc_t s = sigmoid(x);
      const acc_t dyf = static_cast<acc_t>(dy[i]);
      dg[i] = static_cast<scalar_t>(dyf * static_cast<acc_t>(u[i]) * s * (acc_t(1) + x * (acc_t(1) - s)));
      du[i] = static_cast<scalar_t>(dyf * (x * s));
    }
  });
}

// ----------------------------------------------------------------------------- launchers

void check_input(const char* op, const at::Tensor& gate, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == gate.device(), op, ": ", name, " is on ", t.device(), " but gate is on ",
              gate.device(), "; move both to one device");
  TORCH_CHECK(t.scalar_type() == gate.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
              " but gate is ", gate.scalar_type(), "; pass tensors of one dtype");
  TORCH_CHECK(t.sizes() == gate.sizes(), op, ": ", name, " has shape ", shape(t.sizes()),
              " but gate has shape ", shape(gate.sizes()), " (no broadcasting)");
}

// float32, bfloat16, float16 everywhere; float64 on the CPU too (gradcheck needs it).
void check_dtype(const char* op, const at::Tensor& gate) {
  const auto dtype = gate.scalar_type();
  const bool cpu = gate.device().is_cpu();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || (cpu && dtype == at::kDouble),
              op, ": dtype ", dtype, " is not supported on ", gate.device().type(),
              cpu ? " (float32, bfloat16, float16, float64)" : " (float32, bfloat16, float16)");
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launchers (swiglu.cu): they only launch, and return the launch's error code.
cudaError_t swiglu_forward_cuda(const at::Tensor& g, const at::Tensor& u, at::Tensor& out);
cudaError_t swiglu_backward_cuda(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& d_gate,
                                 at::Tensor& d_up);

namespace {
#endif

// One function per op for both devices: checks and allocation, then the CPU loop or the CUDA launcher.
at::Tensor swiglu_op(const at::Tensor& gate, const at::Tensor& up) {
  check_dtype("optimus::swiglu", gate);
  check_input("optimus::swiglu", gate, up, "up");
  const c10::OptionalDeviceGuard device_guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (g.numel() == 0) return out;
#ifdef OPTIMUS_WITH_CUDA
  if (g.is_cuda()) {
    C10_CUDA_CHECK(swiglu_forward_cuda(g, u, out));
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_cpu", [&] {
    swiglu_forward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                    out.mutable_data_ptr<scalar_t>(), g.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_op(const at::Tensor& grad, const at::Tensor& gate,
                                                      const at::Tensor& up) {
  check_dtype("optimus::swiglu_backward", gate);
  check_input("optimus::swiglu_backward", gate, up, "up");
  check_input("optimus::swiglu_backward", gate, grad, "grad");
  const c10::OptionalDeviceGuard device_guard(gate.device());
  const at::Tensor dy = grad.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor d_gate = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor d_up = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (g.numel() == 0) return {d_gate, d_up};
#ifdef OPTIMUS_WITH_CUDA
  if (g.is_cuda()) {
    C10_CUDA_CHECK(swiglu_backward_cuda(dy, g, u, d_gate, d_up));
    return {d_gate, d_up};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_backward_cpu", [&] {
    swiglu_backward_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                     u.const_data_ptr<scalar_t>(), d_gate.mutable_data_ptr<scalar_t>(),
                                     d_up.mutable_data_ptr<scalar_t>(), g.numel());
  });
  return {d_gate, d_up};
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("swiglu", &optimus::swiglu_op);
  m.impl("swiglu_backward", &optimus::swiglu_backward_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("swiglu", &optimus::swiglu_op);
  m.impl("swiglu_backward", &optimus::swiglu_backward_op);
}
#endif
