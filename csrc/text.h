/*
 * Numbers in the extension's error messages, formatted without std::ostream.
 *
 * Streaming an integer (a shape, a position) into an error message from this extension crashed
 * inside libstdc++ on the H200 machine (pip torch 2.11 built with gcc-toolset-13, extension built
 * with Ubuntu's g++ 13.3; 2026-11-29), while messages of strings and dtypes raised fine.
 * std::to_string does not go through a stream's locale, so messages are assembled from strings.
 */
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace optimus {

inline std::string num(int64_t x) {
  return std::to_string(x);
}

// "(4, 8, 16)": a shape as PyTorch prints it, without the brackets.
inline std::string shape(c10::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

}  // namespace optimus
