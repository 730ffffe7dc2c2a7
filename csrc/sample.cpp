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
 *
 * The decoding step's advance (optional, each part on its own; sample_advance_ref in optimus.py):
 * with done (B,) bool and eot_id, rows already done take eot_id and a row drawing eot_id is done
 * from then on; the returned tokens are those masked ones, also written to tokens (B,) or (B, 1)
 * int64; pos (B,) or (B, 1) int64 counts one more; with table (N, D) and x (B, D) of one dtype,
 * x[b] = table[token b] (the next step's embedding row). The Decoder's sampling step is then
 * this one launch after the LM head, where it was five more (the masks, the copy of the tokens,
 * the position's increment and the next step's embedding gather).
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

#include "sample.h"
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

// One int64 (or bool) value per row: (B,) or (B, 1), contiguous, on logits' device.
void check_rows(const at::Tensor& logits, const at::Tensor& t, const char* name, at::ScalarType dtype) {
  const int64_t B = logits.size(0);
  const bool rows = (t.dim() == 1 && t.size(0) == B) || (t.dim() == 2 && t.size(0) == B && t.size(1) == 1);
  TORCH_CHECK(rows && t.scalar_type() == dtype && t.is_contiguous() && t.device() == logits.device(), kOp, ": ", name,
              " must be a contiguous ", dtype, " tensor of shape (", num(B), ") or (", num(B), ", 1) on ",
              logits.device(), ", got ", t.scalar_type(), " of shape ", shape(t.sizes()), " on ", t.device());
}

SampleStep step_args(const at::Tensor& logits, const std::optional<at::Tensor>& tokens,
                     const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& done, int64_t eot_id,
                     const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& x) {
  SampleStep step;
  if (tokens) {
    check_rows(logits, *tokens, "tokens", at::kLong);
    step.tokens = tokens->mutable_data_ptr<int64_t>();
  }
  if (pos) {
    check_rows(logits, *pos, "pos", at::kLong);
    step.pos = pos->mutable_data_ptr<int64_t>();
  }
  if (done) {
    check_rows(logits, *done, "done", at::kBool);
    TORCH_CHECK(eot_id >= 0, kOp, ": done needs the end-of-text token eot_id (>= 0), got ", num(eot_id));
    step.done = done->mutable_data_ptr<bool>();
    step.eot = eot_id;
  }
  TORCH_CHECK(table.has_value() == x.has_value(), kOp, ": pass table and x together (the embedding table and the "
              "next step's rows) or neither");
  if (table) {
    const int64_t B = logits.size(0), D = table->dim() == 2 ? table->size(1) : -1;
    TORCH_CHECK(table->dim() == 2 && table->size(0) >= logits.size(1) && table->is_contiguous(), kOp,
                ": table must be a contiguous (N, D) tensor with N >= the logits' ", num(logits.size(1)),
                " tokens, got shape ", shape(table->sizes()));
    TORCH_CHECK(x->dim() == 2 && x->size(0) == B && x->size(1) == D && x->is_contiguous() &&
                x->scalar_type() == table->scalar_type(), kOp, ": x must be a contiguous (", num(B), ", ", num(D),
                ") tensor of table's dtype ", table->scalar_type(), ", got ", x->scalar_type(), " of shape ",
                shape(x->sizes()));
    TORCH_CHECK(table->device() == logits.device() && x->device() == logits.device(), kOp,
                ": table and x must be on logits' device ", logits.device());
    step.table = static_cast<const char*>(table->const_data_ptr());
    step.x = static_cast<char*>(x->mutable_data_ptr());
    step.row_bytes = D * table->element_size();
  }
  return step;
}

// The advance on the CPU, after the draw (on CUDA the kernel does it; sample_op gathers the rows
// whose copy the kernel does not take).
void advance_cpu(const SampleStep& step, at::Tensor& out, const std::optional<at::Tensor>& table,
                 const std::optional<at::Tensor>& x) {
  int64_t* token = out.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < out.size(0); ++b) {
    if (step.done != nullptr) {
      if (step.done[b]) token[b] = step.eot;
      if (token[b] == step.eot) step.done[b] = true;
    }
    if (step.tokens != nullptr) step.tokens[b] = token[b];
    if (step.pos != nullptr) step.pos[b] += 1;
  }
  if (table) x->copy_(table->index_select(0, out));
}

#ifdef OPTIMUS_WITH_CUDA
}  // namespace

// The CUDA launcher (sample.cu): it only launches, and returns the launch's error code.
cudaError_t sample_cuda(const at::Tensor& logits, const at::Tensor& race, float temperature, int64_t top_k,
                        float top_p, const SampleStep& step, at::Tensor& out);

namespace {
#endif

at::Tensor sample_op(const at::Tensor& logits, const at::Tensor& race, double temperature, int64_t top_k,
                     double top_p, const std::optional<at::Tensor>& tokens, const std::optional<at::Tensor>& pos,
                     const std::optional<at::Tensor>& done, int64_t eot_id, const std::optional<at::Tensor>& table,
                     const std::optional<at::Tensor>& x) {
  check_args(logits, race, temperature, top_k, top_p);
  const SampleStep step = step_args(logits, tokens, pos, done, eot_id, table, x);
  const c10::OptionalDeviceGuard device_guard(logits.device());
  const at::Tensor l = logits.stride(1) == 1 && logits.stride(0) >= logits.size(1) ? logits : logits.contiguous();
  // logits_to_probs' divisor: max(temperature, smallest normal float32), rounded to float32.
  const float t = std::max(static_cast<float>(temperature), std::numeric_limits<float>::min());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return out;
#ifdef OPTIMUS_WITH_CUDA
  if (logits.is_cuda()) {
    // The kernel copies x's rows in 16-byte units: other rows take a gather after it.
    SampleStep fused = step;
    const bool whole = step.x == nullptr || (step.row_bytes % 16 == 0 &&
                                             reinterpret_cast<uintptr_t>(step.table) % 16 == 0 &&
                                             reinterpret_cast<uintptr_t>(step.x) % 16 == 0);
    if (!whole) fused.table = nullptr, fused.x = nullptr;
    C10_CUDA_CHECK(sample_cuda(l, race, t, top_k, static_cast<float>(top_p), fused, out));
    if (!whole) x->copy_(table->index_select(0, out));
    return out;
  }
#endif
  AT_DISPATCH_V2(logits.scalar_type(), "sample_cpu", AT_WRAP([&] {
    sample_kernel<scalar_t>(l, race, t, top_k, top_p, out);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  advance_cpu(step, out, table, x);
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
