/*
 * Phase clocks, for measuring where a persistent kernel's time goes (tools/phase_clocks.py): with
 * OPTIMUS_PHASE_CLOCKS defined at build time (load_extension passes it when the environment
 * variable OPTIMUS_PHASE_CLOCKS=1), thread 0 of a block reads clock64() at each PHASE_CLOCK()
 * and PHASE_CLOCKS_PRINT() prints the cycles between consecutive points, one line per chosen
 * block and launch. Without the define every macro is empty: the kernels compile to the same code.
 */
#pragma once

#ifdef OPTIMUS_PHASE_CLOCKS
#include <cstdio>

namespace optimus {
constexpr int kPhaseClocks = 16;  // points a launch records at most
}  // namespace optimus

#define PHASE_CLOCKS_BEGIN()                     \
  long long phase_clock_[optimus::kPhaseClocks]; \
  int phase_clocks_ = 0;                         \
  PHASE_CLOCK()
#define PHASE_CLOCK()                                                          \
  do {                                                                         \
    if (threadIdx.x == 0 && phase_clocks_ < optimus::kPhaseClocks) phase_clock_[phase_clocks_++] = clock64(); \
  } while (0)
// Prints "<name> <id> <points>: d1 ... d15" (cycles between consecutive points, 0 past the last)
// in one printf from thread 0 where `when` holds, so blocks' lines do not interleave.
#define PHASE_CLOCKS_PRINT(name, id, when)                                                              \
  do {                                                                                                  \
    if (threadIdx.x == 0 && (when)) {                                                                   \
      long long d_[optimus::kPhaseClocks - 1] = {};                                                     \
      for (int i_ = 1; i_ < phase_clocks_; ++i_) d_[i_ - 1] = phase_clock_[i_] - phase_clock_[i_ - 1];  \
      printf("%s %d %d: %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld\n",    \
             name, static_cast<int>(id), phase_clocks_, d_[0], d_[1], d_[2], d_[3], d_[4], d_[5], d_[6],  \
             d_[7], d_[8], d_[9], d_[10], d_[11], d_[12], d_[13], d_[14]);                              \
    }                                                                                                   \
  } while (0)
#else
#define PHASE_CLOCKS_BEGIN()
#define PHASE_CLOCK()
#define PHASE_CLOCKS_PRINT(name, id, when)
#endif
