// The `optimus` operator library: the schemas of the fused ops, and nothing else.
//
// Each op's kernels register per device in their own files (swiglu.cpp / swiglu.cu,
// rope_kv_append.cpp / rope_kv_append.cu, ...); the fake (meta)
// implementations and the autograd formula are registered from Python
// (optimus._register_python_parts), next to the pure-PyTorch references that specify every op.
#include <torch/library.h>

TORCH_LIBRARY(optimus, m) {
  // out = silu(gate) * up, float32 math, one rounding to the input dtype.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  // (d_gate, d_up) of swiglu; recomputes sigmoid(gate) instead of saving it.
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // swiglu of gate_up = [gate | up] (..., 2H), one packed projection's output; its backward
  // writes one packed (..., 2H) gradient.
  m.def("swiglu_packed(Tensor gate_up) -> Tensor");
  m.def("swiglu_packed_backward(Tensor grad, Tensor gate_up) -> Tensor");
  // Rotary on q and k at positions `pos`, k and v written into the caches there; returns q as
  // (B, H, T, hd). The caches and `status` are written in place, hence their alias annotations.
  m.def(
      "rope_kv_append(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) status) -> Tensor");
  // Per-row cross-entropy of (rows, cols) logits over their first vocab_size columns; the logits
  // are overwritten with the gradient (softmax - onehot) * scale, hence the alias annotation.
  m.def("cross_entropy_fwd_bwd(Tensor(a!) logits, Tensor targets, Tensor scale, int vocab_size) -> Tensor");
  // Attention of q (B, H, T, hd) at positions pos (B, T) against the caches (B, KV, S, hd), each
  // query over the slots <= its position; `status` set to 1 on CUDA for a position outside [0, S).
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, Tensor(a!) status, "
      "float scale) -> Tensor");
  // One new token per row straight from the packed QKV projection (B, (H + 2 KV) hd): rope_kv_append,
  // then decode_attention, in one CUDA launch; returns (B, H hd). counts: the kernel's merge
  // counters (B x KV,) int32, zero before and after each call.
  m.def(
      "rope_append_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor pos, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor(c!) status, Tensor(d!) counts, int num_heads, float scale) -> Tensor");
  // One token per row of logits (B, V), drawn from logits_to_probs(logits, temperature, top_p,
  // top_k) by the exponential race with the given Exp(1) noise race (B, V) float32; (B,) int64.
  // Optionally also the decoding step's advance (sample.cpp): end-of-text masks, the tokens and
  // positions of the next step, its embedding rows.
  m.def(
      "sample(Tensor logits, Tensor race, float temperature, int top_k, float top_p, Tensor(a!)? tokens=None, "
      "Tensor(b!)? pos=None, Tensor(c!)? done=None, int eot_id=-1, Tensor? table=None, Tensor(d!)? x=None) -> Tensor");
  // (x + delta, RMSNorm(x + delta) * weight): a residual add and the next norm in one pass
  // (delta absent: x and its norm).
  m.def("add_rms_norm(Tensor x, Tensor? delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  // A decoding step's projection: [RMSNorm ->] x @ weight^T [-> SwiGLU of its halves] [+ residual].
  m.def(
      "decode_linear(Tensor x, Tensor weight, Tensor? norm_weight, Tensor? residual, float eps, "
      "bool swiglu) -> Tensor");
  // The rest of a decoding step's block after its attention (wo + residual, norm2 + gate-up +
  // SwiGLU, down + residual) and the next block's norm + QKV: (out, qkv), qkv (B, 0) without one.
  m.def(
      "decode_tail(Tensor y, Tensor x, Tensor wo, Tensor norm2, Tensor wgu, Tensor wdown, Tensor? next_norm, "
      "Tensor? next_wqkv, float eps, float next_eps) -> (Tensor, Tensor)");
  // The trainer's optimizer step: the global-norm clip of the gradients, then AdamW, on lists of
  // float32 tensors (the i-th of each list belongs to parameter i); weights, moments and step
  // counters in place. Returns the gradients' norm before the clip.
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, Tensor lr, float[] weight_decays, float beta1, float beta2, float eps, "
      "float max_norm) -> Tensor");
}
