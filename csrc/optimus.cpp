// The `optimus` operator library: the schemas of the fused ops, and nothing else.
//
// Each op's kernels register per device in their own files (swiglu.cpp / swiglu.cu,
// rope_kv_append.cpp / rope_kv_append.cu); the fake (meta) implementations and the autograd
// formula are registered from Python (optimus._register_python_parts), next to the pure-PyTorch
// references that specify every op.
#include <torch/library.h>

TORCH_LIBRARY(optimus, m) {
  // out = silu(gate) * up, float32 math, one rounding to the input dtype.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  // (d_gate, d_up) of swiglu; recomputes sigmoid(gate) instead of saving it.
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // Rotary on q and k at positions `pos`, k and v written into the caches there; returns q as
  // (B, H, T, hd). The caches and `status` are written in place, hence their alias annotations.
  m.def(
      "rope_kv_append(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) status) -> Tensor");
  // A decoding step's projection: [RMSNorm ->] x @ weight^T [-> SwiGLU of its halves] [+ residual].
  m.def(
      "decode_linear(Tensor x, Tensor weight, Tensor? norm_weight, Tensor? residual, float eps, "
      "bool swiglu) -> Tensor");
}
