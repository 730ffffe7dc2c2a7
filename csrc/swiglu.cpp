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
 * Memory layout: gate, up and grad have one shape (..., cols). Each is read in place when it is
 * contiguous or a view of rows: last dimension contiguous, leading dimensions collapsible into
 * one row index with a row stride (e.g. gate and up as the halves [..., :H] and [..., H:] of one
 * packed (..., 2H) projection). Any other layout is first copied (one extra pass). The outputs
 * are new contiguous tensors of the same shape. swiglu_packed / swiglu_packed_backward take the
 * packed (..., 2H) tensor itself and write the packed (..., 2H) gradient: d_gate into its first
 * half and d_up into its second, so the gate-up projection's backward gets one gradient.
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
#include <ATen/ops/empty.h>
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
#include <initializer_list>
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

// Operands as (rows, cols) with a row stride each (elements); contiguous ones are one flat row.
struct Rows {
  int64_t rows, cols;
  int64_t stride[5];  // forward: gate, up, out; backward: grad, gate, up, d_gate, d_up
};

// Calls fn(segment offsets, length) for the contiguous pieces of elements [begin, end) of the
// row-major (rows, cols) index space, in parallel: one piece per row touched, at most.
template <typename Fn>
void for_each_segment(const Rows& l, int nops, Fn fn) {
  at::parallel_for(0, l.rows * l.cols, kGrainSize, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t r = begin / l.cols, c = begin % l.cols;
      const int64_t len = std::min(l.cols - c, end - begin);
      int64_t off[5];
      for (int k = 0; k < nops; ++k) off[k] = r * l.stride[k] + c;
      fn(off, len);
      begin += len;
    }
  });
}

template <typename scalar_t>
void swiglu_forward_kernel(const scalar_t* gate, const scalar_t* up, scalar_t* out, const Rows& l) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_segment(l, 3, [=](const int64_t* off, int64_t n) {
    const scalar_t* __restrict__ g = gate + off[0];
    const scalar_t* __restrict__ u = up + off[1];
    scalar_t* __restrict__ o = out + off[2];
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = static_cast<acc_t>(g[i]);
      o[i] = static_cast<scalar_t>(x * sigmoid(x) * static_cast<acc_t>(u[i]));
    }
  });
}

template <typename scalar_t>
void swiglu_backward_kernel(const scalar_t* grad, const scalar_t* gate, const scalar_t* up,
                            scalar_t* d_gate, scalar_t* d_up, const Rows& l) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_segment(l, 5, [=](const int64_t* off, int64_t n) {
    const scalar_t* __restrict__ dy = grad + off[0];
    const scalar_t* __restrict__ g = gate + off[1];
    const scalar_t* __restrict__ u = up + off[2];
    scalar_t* __restrict__ dg = d_gate + off[3];
    scalar_t* __restrict__ du = d_up + off[4];
    for (int64_t i = 0; i < n; ++i) {
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

// A (rows, cols) view of t that the kernels can read in place: t itself when contiguous, else
// its rows when the last dimension is contiguous and the leading ones collapse into one row
// index; otherwise a contiguous copy.
// Non-empty tensors only; a 1-D tensor comes back contiguous and 1-D (one flat row).
at::Tensor rows_view(const at::Tensor& t) {
  if (t.dim() < 2) return t.contiguous();
  const int64_t cols = t.size(-1);
  bool rows = t.stride(-1) == 1 || cols == 1;
  for (int64_t d = 0; rows && d + 2 < t.dim(); ++d) {
    rows = t.size(d) == 1 || t.stride(d) == t.stride(d + 1) * t.size(d + 1);
  }
  if (t.is_contiguous() || !rows) return t.contiguous().view({-1, cols});
  return t.as_strided({t.numel() / cols, cols}, {t.stride(-2), 1});
}

// Flat when every operand is contiguous, else (rows, cols) with each operand's row stride; the
// operands are contiguous or rows_view()s of one shape.
Rows rows_of(std::initializer_list<const at::Tensor*> operands) {
  const at::Tensor& first = **operands.begin();
  bool strided = false;
  for (const at::Tensor* t : operands) strided = strided || !t->is_contiguous();
  Rows l{};
  l.cols = strided ? first.size(-1) : first.numel();
  l.rows = strided ? first.numel() / l.cols : 1;
  int k = 0;
  for (const at::Tensor* t : operands) l.stride[k++] = strided && t->dim() >= 2 ? t->stride(-2) : l.cols;
  return l;
}

// One function per op for both devices: checks and allocation, then the CPU loop or the CUDA launcher.
// `out` (and d_gate, d_up) may be views of rows too: the packed ops write halves of one tensor.
void swiglu_into(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  if (gate.numel() == 0) return;
#ifdef OPTIMUS_WITH_CUDA
  if (gate.is_cuda()) {
    C10_CUDA_CHECK(swiglu_forward_cuda(gate, up, out));
    return;
  }
#endif
  const Rows l = rows_of({&gate, &up, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_cpu", [&] {
    swiglu_forward_kernel<scalar_t>(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                                    out.mutable_data_ptr<scalar_t>(), l);
  });
}

void swiglu_backward_into(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, at::Tensor& d_gate,
                          at::Tensor& d_up) {
  if (gate.numel() == 0) return;
#ifdef OPTIMUS_WITH_CUDA
  if (gate.is_cuda()) {
    C10_CUDA_CHECK(swiglu_backward_cuda(grad, gate, up, d_gate, d_up));
    return;
  }
#endif
  const Rows l = rows_of({&grad, &gate, &up, &d_gate, &d_up});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_backward_cpu", [&] {
    swiglu_backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                                     up.const_data_ptr<scalar_t>(), d_gate.mutable_data_ptr<scalar_t>(),
                                     d_up.mutable_data_ptr<scalar_t>(), l);
  });
}

at::Tensor swiglu_op(const at::Tensor& gate, const at::Tensor& up) {
  check_dtype("optimus::swiglu", gate);
  check_input("optimus::swiglu", gate, up, "up");
  const c10::OptionalDeviceGuard device_guard(gate.device());
  at::Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
  if (gate.numel() == 0) return out;
  at::Tensor out_rows = out.dim() >= 2 ? out.view({-1, out.size(-1)}) : out;  // (rows, cols) or flat
  swiglu_into(rows_view(gate), rows_view(up), out_rows);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_op(const at::Tensor& grad, const at::Tensor& gate,
                                                      const at::Tensor& up) {
  check_dtype("optimus::swiglu_backward", gate);
  check_input("optimus::swiglu_backward", gate, up, "up");
  check_input("optimus::swiglu_backward", gate, grad, "grad");
  const c10::OptionalDeviceGuard device_guard(gate.device());
  at::Tensor d_gate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor d_up = at::empty_like(gate, at::MemoryFormat::Contiguous);
  if (gate.numel() == 0) return {d_gate, d_up};
  at::Tensor dg = d_gate.dim() >= 2 ? d_gate.view({-1, d_gate.size(-1)}) : d_gate;
  at::Tensor du = d_up.dim() >= 2 ? d_up.view({-1, d_up.size(-1)}) : d_up;
  swiglu_backward_into(rows_view(grad), rows_view(gate), rows_view(up), dg, du);
  return {d_gate, d_up};
}

// gate_up (..., 2H): gate = [..., :H], up = [..., H:]. Returns (..., H).
void check_packed(const char* op, const at::Tensor& gate_up) {
  check_dtype(op, gate_up);
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op, ": gate_up must be (..., 2H), gate then up, "
              "got shape ", shape(gate_up.sizes()));
}

at::Tensor swiglu_packed_op(const at::Tensor& gate_up) {
  check_packed("optimus::swiglu_packed", gate_up);
  const c10::OptionalDeviceGuard device_guard(gate_up.device());
  const int64_t H = gate_up.size(-1) / 2;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = H;
  at::Tensor out = at::empty(sizes, gate_up.options());
  if (out.numel() == 0) return out;
  const at::Tensor gu = rows_view(gate_up);
  const at::Tensor rows = gu.dim() == 2 ? gu : gu.view({1, -1});  // (rows, 2H)
  at::Tensor out_rows = out.view({rows.size(0), H});
  swiglu_into(rows.narrow(1, 0, H), rows.narrow(1, H, H), out_rows);
  return out;
}

at::Tensor swiglu_packed_backward_op(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_packed("optimus::swiglu_packed_backward", gate_up);
  const int64_t H = gate_up.size(-1) / 2;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = H;
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(sizes), "optimus::swiglu_packed_backward: grad has shape ",
              shape(grad.sizes()), " but the output has shape ", shape(sizes));
  TORCH_CHECK(grad.scalar_type() == gate_up.scalar_type() && grad.device() == gate_up.device(),
              "optimus::swiglu_packed_backward: grad and gate_up must share one dtype and device");
  const c10::OptionalDeviceGuard device_guard(gate_up.device());
  at::Tensor d_gate_up = at::empty_like(gate_up, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return d_gate_up;
  const at::Tensor gu = rows_view(gate_up);
  const at::Tensor rows = gu.dim() == 2 ? gu : gu.view({1, -1});  // (rows, 2H)
  const at::Tensor dy = grad.contiguous().view({rows.size(0), H});
  at::Tensor d_rows = d_gate_up.view({rows.size(0), 2 * H});
  at::Tensor dg = d_rows.narrow(1, 0, H), du = d_rows.narrow(1, H, H);
  swiglu_backward_into(dy, rows.narrow(1, 0, H), rows.narrow(1, H, H), dg, du);
  return d_gate_up;
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("swiglu", &optimus::swiglu_op);
  m.impl("swiglu_backward", &optimus::swiglu_backward_op);
  m.impl("swiglu_packed", &optimus::swiglu_packed_op);
  m.impl("swiglu_packed_backward", &optimus::swiglu_packed_backward_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("swiglu", &optimus::swiglu_op);
  m.impl("swiglu_backward", &optimus::swiglu_backward_op);
  m.impl("swiglu_packed", &optimus::swiglu_packed_op);
  m.impl("swiglu_packed_backward", &optimus::swiglu_packed_backward_op);
}
#endif
