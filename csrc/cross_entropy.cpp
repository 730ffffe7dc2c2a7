/*
 * cross_entropy_fwd_bwd: the softmax / cross-entropy half of the fused linear + cross-entropy of
 * the LM head (optimus.linear_cross_entropy). For one chunk of tokens it turns the head's logits
 * into the loss of each row and, in place, into the gradient of the loss with respect to them.
 * CPU kernel, and the op (checks) that runs it or the CUDA launcher of cross_entropy.cu.
 *
 * Math, for row r with target t = targets[r], real vocabulary V = vocab_size, x = logits[r, :V]
 * (float32, float64 for float64 logits) and s = scale[0]:
 *   lse       = log(sum_j exp(x_j - m)) + m,  m = max_j x_j
 *   loss[r]   = lse - x_t
 *   logits[r, j] <- (exp(x_j - lse) - [j == t]) * s    for j < V
 *   logits[r, j] <- 0                                   for V <= j < cols (padded vocabulary)
 * A row whose target is ignore_index (-100) has loss 0 and a zero gradient row. Any other target
 * outside [0, V) is an error: on CPU the op raises before writing anything; on CUDA (where raising
 * would need a host sync) that row's loss is NaN and its gradient row zero, so the training loss
 * turns non-finite and the trainer stops.
 *
 * Memory layout: logits (rows, cols) contiguous, overwritten in place (so it cannot be a copy);
 * targets (rows,) int64; scale: one element of the loss dtype. Returns loss (rows,): float32, or
 * float64 for float64 logits.
 *
 * Dtypes: logits float32, bfloat16, float16, and float64 on the CPU (for gradcheck). Every row is
 * computed in float32 (float64), its sum of exponentials in float64, and each gradient element
 * rounded once to the logits dtype.
 */
#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <c10/core/DeviceGuard.h>
#ifdef OPTIMUS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "text.h"

namespace optimus {
namespace {

constexpr int64_t kIgnoreIndex = -100;  // optimus.IGNORE_INDEX
// Elements per parallel task: below this, threading costs more than it saves (ATen's value).
constexpr int64_t kGrainSize = 32768;

// ----------------------------------------------------------------------------- kernel

// Rows [begin, end): each row is widened into `row` (the math's precision), then written back
// as its gradient. Three passes over the row in cache: max, exp and sum, gradient.
template <typename scalar_t, typename acc_t>
void cross_entropy_rows(scalar_t* logits, const int64_t* targets, acc_t scale, acc_t* loss, int64_t cols,
                        int64_t vocab, int64_t begin, int64_t end) {
  std::vector<acc_t> row(vocab);
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* x = logits + r * cols;
    const int64_t t = targets[r];
    if (t == kIgnoreIndex) {
      std::fill(x, x + cols, scalar_t(0));
      loss[r] = acc_t(0);
      continue;
    }
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < vocab; ++j) {
      row[j] = static_cast<acc_t>(x[j]);
      m = std::max(m, row[j]);
    }
    double sum = 0;  // a float32 running sum of 50k terms would drift by ~1e-5 relative
    for (int64_t j = 0; j < vocab; ++j) {
      row[j] = std::exp(row[j] - m);
      sum += row[j];
    }
    loss[r] = static_cast<acc_t>(std::log(sum) + m - static_cast<double>(x[t]));
    const acc_t p_scale = static_cast<acc_t>(scale / sum);  // exp(x_j - lse) * s = exp(x_j - m) * (s / sum)
    for (int64_t j = 0; j < vocab; ++j) x[j] = static_cast<scalar_t>(row[j] * p_scale - (j == t ? scale : acc_t(0)));
    std::fill(x + vocab, x + cols, scalar_t(0));
  }
}

// ----------------------------------------------------------------------------- checks

void check_args(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale, int64_t vocab_size) {
  constexpr const char* op = "optimus::cross_entropy_fwd_bwd";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, padded vocabulary), got shape ",
              shape(logits.sizes()));
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (they are overwritten in place with the "
              "gradient, so they cannot be copied)");
  const auto dtype = logits.scalar_type();
  const bool cpu = logits.device().is_cpu();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || (cpu && dtype == at::kDouble),
              op, ": logits dtype ", dtype, " is not supported on ", logits.device().type(),
              cpu ? " (float32, bfloat16, float16, float64)" : " (float32, bfloat16, float16)");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
              num(logits.size(0)), ",) to match the logits' rows, got ", shape(targets.sizes()));
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  const auto loss_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == loss_dtype, op, ": scale must be a one-element ",
              loss_dtype, " tensor, got ", scale.scalar_type(), " of shape ", shape(scale.sizes()));
  TORCH_CHECK(targets.device() == logits.device() && scale.device() == logits.device(), op,
              ": logits, targets and scale must be on one device (logits on ", logits.device(), ", targets on ",
              targets.device(), ", scale on ", scale.device(), ")");
  TORCH_CHECK(vocab_size > 0 && vocab_size <= logits.size(1), op, ": vocab_size ", num(vocab_size),
              " must lie in [1, ", num(logits.size(1)), "] (the logits' columns)");
}

// On CPU, before anything is written: each target is ignore_index or a real token id.
void check_targets(const at::Tensor& targets, int64_t vocab_size) {
  const int64_t* t = targets.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < targets.numel(); ++r) {
    TORCH_CHECK_INDEX(t[r] == kIgnoreIndex || (t[r] >= 0 && t[r] < vocab_size),
                      "optimus::cross_entropy_fwd_bwd: target ", num(t[r]), " at row ", num(r),
                      " is outside [0, ", num(vocab_size), ") and is not the ignore index ", num(kIgnoreIndex));
  }
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (cross_entropy.cu): it only launches, and returns the launch's error code.
cudaError_t cross_entropy_fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale,
                                       at::Tensor& loss, int64_t vocab_size);

namespace {
#endif

at::Tensor cross_entropy_fwd_bwd_op(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale,
                                    int64_t vocab_size) {
  check_args(logits, targets, scale, vocab_size);
  const c10::OptionalDeviceGuard device_guard(logits.device());
  const at::Tensor t = targets.contiguous();
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(loss_dtype));
  if (logits.size(0) == 0) return loss;
#ifdef OPTIMUS_WITH_CUDA
  if (logits.is_cuda()) {
    TORCH_CHECK(logits.size(0) <= std::numeric_limits<int>::max(), "optimus::cross_entropy_fwd_bwd: ",
                num(logits.size(0)), " rows exceed the CUDA grid (one block per row); pass fewer rows per call");
    C10_CUDA_CHECK(cross_entropy_fwd_bwd_cuda(logits, t, scale, loss, vocab_size));
    return loss;
  }
#endif
  check_targets(t, vocab_size);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  AT_DISPATCH_V2(logits.scalar_type(), "cross_entropy_fwd_bwd_cpu", AT_WRAP([&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    const int64_t* target = t.const_data_ptr<int64_t>();
    const acc_t s = scale.item<acc_t>();
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainSize / cols), [&](int64_t begin, int64_t end) {
      cross_entropy_rows<scalar_t, acc_t>(x, target, s, out, cols, vocab_size, begin, end);
    });
  }), at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  return loss;
}

}  // namespace
}  // namespace optimus

TORCH_LIBRARY_IMPL(optimus, CPU, m) {
  m.impl("cross_entropy_fwd_bwd", &optimus::cross_entropy_fwd_bwd_op);
}

#ifdef OPTIMUS_WITH_CUDA
TORCH_LIBRARY_IMPL(optimus, CUDA, m) {
  m.impl("cross_entropy_fwd_bwd", &optimus::cross_entropy_fwd_bwd_op);
}
#endif
