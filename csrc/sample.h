/*
 * The decoding step's advance that optimus::sample can do after drawing its tokens (sample.cpp
 * says what each part means), passed from the op to the CUDA launcher (sample.cu). A null pointer
 * leaves its part out.
 */
#pragma once

#include <cstdint>

namespace optimus {

struct SampleStep {
  int64_t* tokens = nullptr;  // (B,): the sampled (masked) tokens, the next step's input
  int64_t* pos = nullptr;     // (B,): one more each
  bool* done = nullptr;       // (B,): rows past end-of-text take eot; a row drawing eot is done
  int64_t eot = -1;
  const char* table = nullptr;  // (N, D) rows: the embedding table
  char* x = nullptr;            // (B, D): x[b] = table[token b]
  int64_t row_bytes = 0;
};

}  // namespace optimus
