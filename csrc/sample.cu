/*
 * sample: one token per row of logits from logits_to_probs' distribution, without a sort. CUDA
 * kernels, no host synchronisation. On sm_90, one launch: each row in one thread-block cluster
 * that holds it in shared memory through every phase (sample_cluster_kernel, below; rows of up
 * to about 165,000 tokens in clusters of 8, 330,000 in clusters of 16). Elsewhere, and for longer
 * rows: each row split over many blocks (about two blocks per SM over the whole batch), a short
 * chain of launches of one kernel, one phase each. H200, batch 1, the GPT-2 vocabulary in bf16,
 * top-p 0.9: the chain took 22.1 us in four launches and a memset, the cluster 16.6 us.
 *
 * Math: as in sample.cpp (temperature, top-k, top-p, then the exponential race over the kept
 * tokens' weights w_i = exp(x_i), x_i = (l_i - max l) / temperature), and why it is exact.
 * Both thresholds are found by radix select, most significant 8-bit digit first, over the order
 * key of the logit l_i itself (float bits mapped to an unsigned key that orders like the values:
 * negative, all bits flipped; positive, sign bit set; NaN 0, the lowest; -0 as +0). x and w are
 * non-decreasing functions of l, so the k-th largest x is x of the k-th largest l, and a prefix of
 * the tokens in descending l is a prefix in descending w: selecting over l's key needs no max
 * first, and a bf16 or fp16 logit has only 16 or 19 significant key bits, so 2 (bf16), 3 (fp16)
 * or 4 (fp32) digit passes find a threshold exactly.
 * - top-k: counts per digit among the tokens that share the digits found so far; the final key
 *   is that of the k-th largest l, and kept is x_i >= x of it (every tie kept, as the reference).
 * - top-p: the mass sum w per digit among the top-k kept tokens with w > 0; the first pass's total
 *   is Z, and the select finds the largest key K with mass{key >= K} >= top_p * Z: the logit of
 *   the nucleus's smallest weight, tau = w(K); kept is w_i >= tau (ties kept). Masses are float32
 *   sums in atomic order: a boundary within rounding of top_p * Z can fall one token either way.
 * - race: argmax over the kept tokens of w_i / race_i (the lowest index on a tie).
 * Phases (one launch each, in order; the host picks the list from top_k, top_p and the dtype):
 *   max (and top-k's first digit: counts need no max), top-k digits, top-p digits, race.
 * Each block keeps a private histogram in shared memory (a warp adds once per distinct digit of
 * its lanes: flat distributions put most tokens into one bin), adds its non-empty bins into the
 * row's histogram in global memory, and the last block of the row to finish (a ticket counter
 * after a fence: no block waits for another, so nothing relies on blocks running together)
 * chooses the digit for the next launch from the whole histogram, by a scan with one bin per
 * thread, and clears the histogram and the ticket. A row of one block decides from shared memory.
 *
 * Memory layout: logits (B, V) rows contiguous with row stride ld (any float dtype), race (B, V)
 * float32 contiguous, out (B,) int64; a workspace of one small state per row (and a histogram of
 * 2 x 256 words per row when rows have several blocks), zeroed by one memset per call. Shapes
 * alone fix the grid and the workspace, so the chain is CUDA-graph safe.
 *
 * Dtypes: logits float32, bfloat16, float16; math in float32.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "pdl.h"
#include "phase_clocks.h"
#include "sample.h"

namespace optimus {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;  // == kThreads: the decision scans one bin per thread
static_assert(kBins == kThreads, "one histogram bin per thread");
constexpr int kMinSlice = 512;          // the fewest tokens a block takes (fewer: launch-bound)
constexpr int kBlocksPerSm = 2;         // blocks per SM over the whole batch
constexpr unsigned kFull = 0xffffffffu;

enum Phase : int { kMaxPhase, kTopKPhase, kTopPPhase, kRacePhase };

// What one launch leaves for the next, per row (zeroed before the first).
struct RowState {
  uint32_t max_key;   // largest order key of the row (atomicMax)
  uint32_t prefix;    // digits chosen so far by the select in progress
  uint32_t kth_key;   // top-k's result: the key of the k-th largest logit
  uint32_t thr_key;   // top-p's result: the key of the nucleus's smallest weight
  int need_count;     // top-k: how many more keys the prefix must hold
  float need_mass;    // top-p: how much more mass
  uint32_t ticket;    // blocks of this row done with the current launch
  uint32_t pad;
  unsigned long long best;  // race: (score bits << 32) | ~index, atomicMax
};

struct SampleArgs {
  int V;
  int64_t ld;         // row stride of logits
  float temperature;
  int top_k;          // 0: keep all
  float top_p;        // 1: keep all
  int blocks;         // blocks per row
  int slice;          // tokens per block
  int key_passes;     // significant 8-bit digits of the keys: 2 bf16, 3 fp16, 4 fp32
  int phase, pass;
  // The decoding step's advance (sample.h, sample.cpp), each part absent when null: the sampled
  // token goes to tokens[row] (rows already done take eot, and a row drawing eot is done from then
  // on), pos[row] counts one more, and the token's row of `table` is copied to x[row].
  SampleStep step;
};

// The step's advance for a sampled token (SampleArgs): one thread. Returns the token as masked.
__device__ __forceinline__ int64_t advance(const SampleArgs& a, int row, int64_t token) {
  if (a.step.done != nullptr) {
    if (a.step.done[row]) token = a.step.eot;
    if (token == a.step.eot) a.step.done[row] = true;
  }
  if (a.step.tokens != nullptr) a.step.tokens[row] = token;
  if (a.step.pos != nullptr) a.step.pos[row] += 1;
  return token;
}

// x[row] = table[token], by the block's threads (row_bytes a multiple of 16, checked by sample.cpp).
__device__ __forceinline__ void copy_row(const SampleArgs& a, int row, int64_t token) {
  const uint4* from = reinterpret_cast<const uint4*>(a.step.table + token * a.step.row_bytes);
  uint4* to = reinterpret_cast<uint4*>(a.step.x + row * a.step.row_bytes);
  for (int64_t i = threadIdx.x; i < a.step.row_bytes / 16; i += blockDim.x) to[i] = from[i];
}

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return f != f ? 0u : f == 0.f ? 0x80000000u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The logit of a key chosen by `passes` digits: the key's lower bits are those of the dtype's
// unused float32 bits (0 for positive values, all ones for negative ones, flipped).
__device__ __forceinline__ float key_value(uint32_t key, int passes) {
  if (key == 0u) return NAN;
  const uint32_t low = passes >= 4 ? 0u : (1u << (32 - kDigitBits * passes)) - 1u;
  return (key & 0x80000000u) ? __uint_as_float(key & 0x7fffffffu) : __uint_as_float(~(key | low));
}

// The one formula for x everywhere (thresholds and tokens round alike).
__device__ __forceinline__ float scaled(float v, float mx, float temperature) { return (v - mx) / temperature; }

__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// The largest v of the block's NW warps, in thread 0 (per_warp: a slot per warp in shared memory).
template <int NW, typename U>
__device__ __forceinline__ U block_max(U v, U* per_warp) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const U other = __shfl_xor_sync(kFull, v, o);
    v = other > v ? other : v;
  }
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < NW; ++w) v = per_warp[w] > v ? per_warp[w] : v;
  return v;
}

// A token's digit in the select's histogram, or -1 if it takes no part: counting (top-k) every
// token whose key starts with prefix; else (top-p) those of them top-k keeps with w = exp(x) > 0,
// w returned in w (0 for the others).
__device__ __forceinline__ int token_digit(bool valid, float v, uint32_t key, bool counting, uint32_t prefix,
                                           uint32_t mask, int shift, float mx, float temperature, float x_kth,
                                           float& w) {
  w = 0.f;
  if (counting) return valid && (key & mask) == prefix ? static_cast<int>((key >> shift) & (kBins - 1)) : -1;
  const float x = scaled(v, mx, temperature);
  const float e = expf(x);
  if (!(valid && x >= x_kth && e > 0.f && (key & mask) == prefix)) return -1;
  w = e;
  return static_cast<int>((key >> shift) & (kBins - 1));
}

// One token per lane of a whole warp (its trip count uniform: __match_any_sync) into the block's
// histogram (counts, or masses w), shared by the block's warps: shared-memory atomics, a warp
// adding once per distinct digit of its lanes where all lanes share one (flat distributions put
// most tokens into one bin).
__device__ __forceinline__ void histogram_add(bool valid, float v, uint32_t key, bool counting, uint32_t prefix,
                                              uint32_t mask, int shift, float mx, float temperature, float x_kth,
                                              uint32_t* counts, float* masses) {
  const int lane = threadIdx.x % 32;
  float w;
  const int digit = token_digit(valid, v, key, counting, prefix, mask, shift, mx, temperature, x_kth, w);
  const unsigned peers = __match_any_sync(kFull, digit);
  if (counting) {
    if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&counts[digit], __popc(peers));
  } else if (peers == kFull) {  // one digit for the whole warp: one add of the warp's sum
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(kFull, w, o);
    if (lane == 0 && digit >= 0) atomicAdd(&masses[digit], w);
  } else if (digit >= 0) {
    atomicAdd(&masses[digit], w);
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // the cluster kernel's only
// The same into the warp's own histogram `bins` (counts, or masses as float bits), which no other
// warp touches: each lane its own shared-memory atomic add. H200, one bf16 GPT-2 row, top-p 0.9,
// the cluster kernel alone: 19.5 us (8 blocks), against 34.3 us for a round of shuffles per
// distinct digit of the warp summing its lanes (no atomics, but six shuffles a round and up to a
// dozen rounds a token on these rows) and 22.0 us with __match_any_sync as in histogram_add.
__device__ __forceinline__ void warp_histogram_add(bool valid, float v, uint32_t key, bool counting, uint32_t prefix,
                                                   uint32_t mask, int shift, float mx, float temperature, float x_kth,
                                                   uint32_t* bins) {
  float w;
  const int digit = token_digit(valid, v, key, counting, prefix, mask, shift, mx, temperature, x_kth, w);
  if (digit < 0) return;
  if (counting) atomicAdd(&bins[digit], 1u);
  else atomicAdd(reinterpret_cast<float*>(&bins[digit]), w);
}
#endif

// Token i's entry in the race: (score bits << 32) | ~i, score w / race_i (race_i read only for a
// kept token: x >= x_kth, w > 0, w >= tau); 0 otherwise. The largest entry is the winner (the
// lowest index on a tie).
__device__ __forceinline__ unsigned long long race_entry(float v, const float* race_i, int i, float mx,
                                                         float temperature, float x_kth, float tau) {
  const float x = scaled(v, mx, temperature), w = expf(x);
  if (!(x >= x_kth && w > 0.f && w >= tau)) return 0ull;
  return (static_cast<unsigned long long>(__float_as_uint(w / *race_i)) << 32) | (kFull - static_cast<uint32_t>(i));
}

// decide()'s shared memory.
struct Scratch {
  uint32_t warp_count[kBins / 32];
  float warp_mass[kBins / 32];
  int chosen;
  float total;
};

// One digit of a radix select, from the row's whole histogram: thread t < kBins brings the count
// c (counting: top-k) or the mass m (top-p) of digit d = kBins - 1 - t among the tokens that
// share the digits found so far (prefix); an inclusive scan over t gives, per digit, the count
// (or mass) of those tokens with that digit or a higher one. The digit chosen is the largest
// non-empty one whose sum reaches the need: need_count more tokens, or mass need (top_p_start:
// need is top_p, times the first pass's total mass Z). One thread writes the row's state: the
// need left, the prefix with the digit, and on the final pass the key found. Every thread of
// the block calls it (it has barriers); threads from kBins on only wait.
__device__ __forceinline__ void decide(uint32_t c, float m, Scratch& s, bool counting, bool top_p_start,
                                       bool final_pass, int need_count, float need, uint32_t prefix, int shift,
                                       RowState* st) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool active = tid < kBins;
  const int d = kBins - 1 - tid;
  uint32_t c_incl = c;
  float m_incl = m;
  if (active) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t cu = __shfl_up_sync(kFull, c_incl, o);
      const float mu = __shfl_up_sync(kFull, m_incl, o);
      if (lane >= o) c_incl += cu, m_incl += mu;
    }
    if (lane == 31) s.warp_count[warp] = c_incl, s.warp_mass[warp] = m_incl;
  }
  if (tid == 0) s.chosen = kBins;
  __syncthreads();
  if (active)
    for (int w = 0; w < warp; ++w) c_incl += s.warp_count[w], m_incl += s.warp_mass[w];
  if (tid == kBins - 1) s.total = m_incl;
  __syncthreads();
  const float need_mass = top_p_start ? need * s.total : (counting ? 0.f : need);
  const bool nonempty = active && (counting ? c > 0 : m > 0.f);
  const bool reaches = counting ? c_incl >= static_cast<uint32_t>(need_count) : m_incl >= need_mass;
  if (nonempty && reaches) atomicMin(&s.chosen, tid);
  __syncthreads();
  int pick = s.chosen;
  const bool fallback = pick == kBins;  // rounding left the bucket short of the need: keep all of it
  if (fallback) {                       // the lowest non-empty digit (none: digit 0, an empty row)
    __syncthreads();                    // every thread has read `chosen`
    if (tid == 0) s.chosen = -1;
    __syncthreads();
    if (nonempty) atomicMax(&s.chosen, tid);
    __syncthreads();
    pick = s.chosen;
  }
  if (tid == (pick < 0 ? kBins - 1 : pick)) {
    const uint32_t key = prefix | (static_cast<uint32_t>(d) << shift);
    if (counting) {
      st->need_count = need_count - static_cast<int>(c_incl - c);
      if (final_pass) st->kth_key = key;
    } else {
      st->need_mass = fallback ? INFINITY : need_mass - (m_incl - m);
      if (final_pass) st->thr_key = key;
    }
    st->prefix = final_pass ? 0u : key;  // the next select starts from no digits
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sample_kernel_pass(const T* __restrict__ logits, const float* __restrict__ race, RowState* __restrict__ states,
                   uint32_t* __restrict__ hists, int64_t* __restrict__ out, const SampleArgs a) {
  __shared__ uint32_t counts[kBins];
  __shared__ float masses[kBins];
  __shared__ unsigned long long red[kWarps];
  __shared__ uint32_t warp_max[kWarps];
  __shared__ Scratch scratch;
  __shared__ bool last;

  const int row = blockIdx.x / a.blocks, part = blockIdx.x % a.blocks;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int lo = part * a.slice, hi = min(a.V, lo + a.slice);
  const T* l = logits + row * a.ld;
  RowState* st = states + row;
  const bool counting = a.phase == kMaxPhase || a.phase == kTopKPhase;  // else masses (top-p)
  const bool select = a.phase == kTopKPhase || a.phase == kTopPPhase || (a.phase == kMaxPhase && a.top_k > 0);

  // What earlier launches found.
  const float mx = a.phase >= kTopPPhase ? key_value(__ldcg(&st->max_key), 4) : 0.f;
  const float x_kth = a.phase >= kTopPPhase && a.top_k > 0 && __ldcg(&st->kth_key) != 0u
                          ? scaled(key_value(__ldcg(&st->kth_key), a.key_passes), mx, a.temperature)
                          : -INFINITY;
  const float tau = a.phase == kRacePhase && a.top_p < 1.f
                        ? expf(scaled(key_value(__ldcg(&st->thr_key), a.key_passes), mx, a.temperature))
                        : 0.f;
  const int shift = 32 - kDigitBits * (a.pass + 1);
  const uint32_t prefix = a.pass > 0 ? __ldcg(&st->prefix) : 0u;
  const uint32_t mask = a.pass > 0 ? ~0u << (32 - kDigitBits * a.pass) : 0u;

  counts[tid] = 0;
  masses[tid] = 0.f;
  __syncthreads();

  uint32_t kmax = 0;
  unsigned long long best = 0;
  // Whole warps walk the slice (the trip count is uniform within a warp: __match_any_sync).
  for (int base = lo + warp * 32; base < hi; base += kThreads) {
    const int i = base + lane;
    const bool valid = i < hi;
    const float v = valid ? static_cast<float>(l[i]) : NAN;
    const uint32_t key = order_key(v);
    if (a.phase == kMaxPhase) kmax = max(kmax, key);
    if (a.phase == kRacePhase) {
      if (valid) best = max_u64(best, race_entry(v, race + static_cast<int64_t>(row) * a.V + i, i, mx, a.temperature,
                                                 x_kth, tau));
      continue;
    }
    if (select) histogram_add(valid, v, key, counting, prefix, mask, shift, mx, a.temperature, x_kth, counts, masses);
  }

  if (a.phase == kRacePhase) {
    __shared__ int64_t token;
    best = block_max<kWarps>(best, red);
    if (tid == 0) {
      if (a.blocks > 1) {
        atomicMax(&st->best, best);
        __threadfence();
        last = atomicAdd(&st->ticket, 1u) == static_cast<uint32_t>(a.blocks - 1);
        if (last) best = atomicMax(&st->best, 0ull);  // the row's best, read at the L2
      } else {
        last = true;
      }
      // No kept token (every logit NaN or -inf): token 0.
      if (last) {
        token = advance(a, row, best == 0 ? 0 : static_cast<int64_t>(kFull - static_cast<uint32_t>(best & kFull)));
        out[row] = token;
      }
    }
    if (a.step.x != nullptr) {
      __syncthreads();
      if (last) copy_row(a, row, token);
    }
    return;
  }
  if (a.phase == kMaxPhase) {
    kmax = block_max<kWarps>(kmax, warp_max);
    if (tid == 0) atomicMax(&st->max_key, kmax);
    if (!select) return;
  }
  __syncthreads();  // the block's histogram is complete

  if (a.blocks > 1) {  // into the row's histogram; the last block of the row decides
    uint32_t* g = hists + static_cast<int64_t>(row) * 2 * kBins;
    if (counting && counts[tid] != 0) atomicAdd(&g[tid], counts[tid]);
    if (!counting && masses[tid] > 0.f) atomicAdd(reinterpret_cast<float*>(&g[kBins + tid]), masses[tid]);
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&st->ticket, 1u) == static_cast<uint32_t>(a.blocks - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (counting) counts[tid] = __ldcg(&g[tid]);
    else masses[tid] = __ldcg(reinterpret_cast<const float*>(&g[kBins + tid]));
    g[tid] = 0;  // cleared for the next launch, which starts after this one ends
    g[kBins + tid] = 0;
    if (tid == 0) st->ticket = 0;
    __syncthreads();
  }

  const bool top_p_start = !counting && a.pass == 0;
  decide(counts[kBins - 1 - tid], masses[kBins - 1 - tid], scratch, counting, top_p_start, a.pass + 1 == a.key_passes,
         a.pass == 0 ? a.top_k : __ldcg(&st->need_count), top_p_start ? a.top_p : __ldcg(&st->need_mass), prefix,
         shift, st);
}

// ----------------------------------------------------------------------------- the cluster kernel

// One row per thread-block cluster (sm_90): C <= kClusterBlocks blocks of kClusterThreads threads,
// block `rank` holding tokens [rank slice, (rank + 1) slice) of the row. It reads its logits and
// race values once, into shared memory, and keeps them there for every phase of the chain above
// (the same phases, the same per-token math, the same decide()), which are separated by cluster
// barriers instead of launches: one launch in all, no workspace, no memset. A pass's histogram is
// built per warp (warp_histogram_add: no other warp adds into its bins) and summed in warp order.
// Each block pushes what a phase found (its max key, its histogram, its race winner) into the
// shared memory of every block of the cluster (distributed shared memory), so after the barrier
// every block sums the row's histogram from its own copy, in rank order: the same float sums in
// every block, so every block takes the same decision and needs nothing more from the others.
// The histograms alternate between two buffers, since a block may push the next pass's before
// another has read this one's (never two passes ahead: it waits at the next barrier for the
// other's arrival, which follows its reads). The race winners go to rank 0 only, which writes
// the token. Programmatic dependent launch (pdl.h): every read of the inputs follows pdl_wait().
// H200, bf16 GPT-2 rows, the kernel alone (tools/bench_sample.py): top-p 0.9 16.6 us at batch 1
// (clusters of 16) and 38.7 at batch 16 (of 8), against the chain's 22.1 and 56.8; temperature
// only 6.3 and 12.3 against 8.2 and 15.3.
constexpr int kClusterBlocks = 16;      // the most blocks of a cluster (above 8: a non-portable size)
constexpr int kPortableClusterBlocks = 8;
constexpr int kClusterThreads = 1024;
constexpr int kClusterWarps = kClusterThreads / 32;
constexpr int kClusterHistWords = (kClusterWarps + 2 * kClusterBlocks) * kBins;  // dynamic smem before the slice

template <typename T>
__global__ void __launch_bounds__(kClusterThreads)
sample_cluster_kernel(const T* logits, const float* race, int64_t* __restrict__ out, const SampleArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  // Dynamic: each warp's histogram of the pass in progress (kClusterWarps, kBins); the blocks'
  // histograms, pushed (2 buffers, kClusterBlocks, kBins): counts, or masses as float bits; then
  // the slice's logits as float32 and its race values (slice each).
  extern __shared__ uint32_t dynamic_smem[];
  uint32_t(*warp_hists)[kBins] = reinterpret_cast<uint32_t(*)[kBins]>(dynamic_smem);
  uint32_t(*hists)[kClusterBlocks][kBins] =
      reinterpret_cast<uint32_t(*)[kClusterBlocks][kBins]>(dynamic_smem + kClusterWarps * kBins);
  float* vals = reinterpret_cast<float*>(dynamic_smem + kClusterHistWords);
  float* noise = vals + a.slice;
  __shared__ uint32_t maxes[kClusterBlocks];                // pushed: each block's max key
  __shared__ unsigned long long bests[kClusterBlocks];      // pushed to rank 0: each block's race winner
  __shared__ uint32_t warp_max[kClusterWarps];
  __shared__ unsigned long long warp_best[kClusterWarps];
  __shared__ Scratch scratch;
  __shared__ RowState st;  // the same in every block of the cluster

  PHASE_CLOCKS_BEGIN();  // tools/phase_clocks.py names the points
  const int row = blockIdx.x / C, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int lo = rank * a.slice, n = max(0, min(a.V, lo + a.slice) - lo);
  const T* l = logits + row * a.ld + lo;
  const float* r = race + static_cast<int64_t>(row) * a.V + lo;
  if (tid == 0) st = RowState{};
  pdl_wait();
  PHASE_CLOCK();

  constexpr int kClusterLoads = 8;  // tokens a thread loads at once (a whole slice of the GPT-2 row)
  uint32_t kmax = 0;
  for (int base = 0; base < n; base += kClusterThreads * kClusterLoads) {
    float v[kClusterLoads], e[kClusterLoads];
#pragma unroll
    for (int u = 0; u < kClusterLoads; ++u) {
      const int i = base + u * kClusterThreads + tid;
      if (i < n) v[u] = static_cast<float>(l[i]), e[u] = r[i];
    }
#pragma unroll
    for (int u = 0; u < kClusterLoads; ++u) {
      const int i = base + u * kClusterThreads + tid;
      if (i < n) vals[i] = v[u], noise[i] = e[u], kmax = max(kmax, order_key(v[u]));
    }
  }
  kmax = block_max<kClusterWarps>(kmax, warp_max);
  PHASE_CLOCK();
  if (tid == 0)  // into every block of the cluster
    for (int to = 0; to < C; ++to) *cluster.map_shared_rank(&maxes[rank], to) = kmax;

  // One digit of a select: the block's histogram, pushed; the barrier; the row's, decided.
  int buffer = 0;
  const auto select_pass = [&](bool counting, int pass, float mx, float x_kth) {
    const int shift = 32 - kDigitBits * (pass + 1);
    const uint32_t prefix = pass > 0 ? st.prefix : 0u;
    const uint32_t mask = pass > 0 ? ~0u << (32 - kDigitBits * pass) : 0u;
    uint32_t* bins = warp_hists[warp];
    for (int d = lane; d < kBins; d += 32) bins[d] = 0;  // 0 is also 0.0f
    __syncwarp();
    for (int base = warp * 32; base < n; base += kClusterThreads) {
      const int i = base + lane;
      const bool valid = i < n;
      const float v = valid ? vals[i] : NAN;
      warp_histogram_add(valid, v, order_key(v), counting, prefix, mask, shift, mx, a.temperature, x_kth, bins);
    }
    __syncthreads();
    uint32_t(*hist)[kBins] = hists[buffer];
    buffer ^= 1;
    if (tid < kBins) {  // the block's bin, summed in warp order, pushed into every block
      uint32_t c = 0;
      float m = 0.f;
      for (int w = 0; w < kClusterWarps; ++w) {
        if (counting) c += warp_hists[w][tid];
        else m += __uint_as_float(warp_hists[w][tid]);
      }
      const uint32_t bits = counting ? c : __float_as_uint(m);
      for (int to = 0; to < C; ++to) *cluster.map_shared_rank(&hist[rank][tid], to) = bits;
    }
    cluster.sync();
    uint32_t c = 0;
    float m = 0.f;
    if (tid < kBins) {
      const int d = kBins - 1 - tid;
      for (int from = 0; from < C; ++from) {
        if (counting) c += hist[from][d];
        else m += __uint_as_float(hist[from][d]);
      }
    }
    const bool top_p_start = !counting && pass == 0;
    decide(c, m, scratch, counting, top_p_start, pass + 1 == a.key_passes, pass == 0 ? a.top_k : st.need_count,
           top_p_start ? a.top_p : st.need_mass, prefix, shift, &st);
    __syncthreads();  // st is written
    PHASE_CLOCK();
  };

  if (a.top_k > 0) select_pass(true, 0, 0.f, -INFINITY);  // counts need no max: its barrier is the max's
  else cluster.sync();
  PHASE_CLOCK();
  uint32_t max_key = 0;
  for (int from = 0; from < C; ++from) max_key = max(max_key, maxes[from]);
  const float mx = key_value(max_key, 4);
  for (int pass = 1; a.top_k > 0 && pass < a.key_passes; ++pass) select_pass(true, pass, mx, -INFINITY);
  const float x_kth = a.top_k > 0 && st.kth_key != 0u ? scaled(key_value(st.kth_key, a.key_passes), mx, a.temperature)
                                                      : -INFINITY;
  for (int pass = 0; a.top_p < 1.f && pass < a.key_passes; ++pass) select_pass(false, pass, mx, x_kth);
  const float tau = a.top_p < 1.f ? expf(scaled(key_value(st.thr_key, a.key_passes), mx, a.temperature)) : 0.f;

  unsigned long long best = 0;
  for (int i = tid; i < n; i += kClusterThreads)
    best = max_u64(best, race_entry(vals[i], noise + i, lo + i, mx, a.temperature, x_kth, tau));
  best = block_max<kClusterWarps>(best, warp_best);
  PHASE_CLOCK();
  if (tid == 0) *cluster.map_shared_rank(&bests[rank], 0) = best;
  cluster.sync();
  PHASE_CLOCK();
  PHASE_CLOCKS_PRINT("sample", rank, row == 0 && (rank == 0 || rank == C - 1));
  __shared__ int64_t token;
  if (rank == 0 && tid == 0) {
    for (int from = 0; from < C; ++from) best = max_u64(best, bests[from]);
    // None kept: 0.
    token = advance(a, row, best == 0 ? 0 : static_cast<int64_t>(kFull - static_cast<uint32_t>(best & kFull)));
    out[row] = token;
  }
  if (rank == 0 && a.step.x != nullptr) {
    __syncthreads();
    copy_row(a, row, token);
  }
#endif
}

// Launches the cluster kernel if this device and row length allow it; else returns false (and
// launches nothing): clusters need sm_90, and a block's slice must fit in its shared memory.
template <typename T>
bool launch_cluster(const at::Tensor& logits, const at::Tensor& race, SampleArgs a, int most, at::Tensor& out,
                    cudaError_t& err) {
  auto kernel = sample_cluster_kernel<T>;
  const int device = c10::cuda::current_device();
  // Per device, once: the dynamic shared memory a block may have (0: no clusters here), and the
  // largest cluster that can be resident (kClusterBlocks if the GPU has room for one, else 8).
  constexpr int kDevices = 64;  // devices remembered (a process seeing more takes the chain past them)
  static int room[kDevices] = {};
  static int largest[kDevices] = {};
  static int sms[kDevices] = {};
  static bool known[kDevices] = {};
  if (device < 0 || device >= kDevices) return false;
  if (!known[device]) {
    int clusters = 0, optin = 0;
    cudaFuncAttributes attributes{};
    if (cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device) == cudaSuccess && clusters != 0 &&
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
        cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             optin - static_cast<int>(attributes.sharedSizeBytes)) == cudaSuccess) {
      room[device] = optin - static_cast<int>(attributes.sharedSizeBytes);
      largest[device] = kPortableClusterBlocks;
      if (cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms[device] = 0;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(kClusterBlocks);
      config.blockDim = dim3(kClusterThreads);
      config.dynamicSmemBytes = sizeof(uint32_t) * kClusterHistWords;
      cudaLaunchAttribute attribute{};
      attribute.id = cudaLaunchAttributeClusterDimension;
      attribute.val.clusterDim.x = kClusterBlocks;
      attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
      config.attrs = &attribute;
      config.numAttrs = 1;
      int resident = 0;
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess &&
          cudaOccupancyMaxActiveClusters(&resident, kernel, &config) == cudaSuccess && resident > 0)
        largest[device] = kClusterBlocks;
    }
    (void)cudaGetLastError();  // a failed query: the chain of launches instead (or clusters of 8)
    known[device] = true;
  }
  // Clusters of 16 while they fit on the GPU in one wave (batch 1: 16.6 us against 19.5 with 8,
  // top-p 0.9), else of 8 (batch 16: 38.7 us against 48.3 with 16).
  const int B = static_cast<int>(logits.size(0));
  const int wave = B * kClusterBlocks <= sms[device] ? kClusterBlocks : kPortableClusterBlocks;
  const int C = std::clamp((a.V + kMinSlice - 1) / kMinSlice, 1, std::min({most, largest[device], wave}));
  a.slice = (a.V + C - 1) / C;
  const size_t smem = sizeof(uint32_t) * kClusterHistWords + size_t{2} * a.slice * sizeof(float);
  if (smem > static_cast<size_t>(room[device])) return false;
  err = launch_pdl_cluster(kernel, dim3(static_cast<unsigned>(B * C)), dim3(kClusterThreads), C, smem,
                           at::cuda::getCurrentCUDAStream(), static_cast<const T*>(logits.const_data_ptr()),
                           race.const_data_ptr<float>(), out.mutable_data_ptr<int64_t>(), a);
  return true;
}

template <typename T>
cudaError_t launch(const at::Tensor& logits, const at::Tensor& race, SampleArgs a, int key_passes, at::Tensor& out) {
  a.key_passes = key_passes;
  cudaError_t err = cudaSuccess;
  // OPTIMUS_SAMPLE_CLUSTER (read at each launch, for measuring): "0" takes the chain, 1-16 caps the
  // blocks of a cluster.
  const char* cluster = std::getenv("OPTIMUS_SAMPLE_CLUSTER");
  const int most = cluster == nullptr ? kClusterBlocks : std::clamp(std::atoi(cluster), 0, kClusterBlocks);
  if (most > 0 && launch_cluster<T>(logits, race, a, most, out, err)) return err;
  const int B = static_cast<int>(logits.size(0));
  int sms = 0;  // a query, not stream work: allowed under CUDA graph capture (decode_attention does it too)
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device());
  if (err != cudaSuccess) return err;
  const int by_size = (a.V + kMinSlice - 1) / kMinSlice;
  const int by_grid = (kBlocksPerSm * sms + B - 1) / B;
  a.blocks = std::max(1, std::min(by_size, by_grid));
  a.slice = (a.V + a.blocks - 1) / a.blocks;
  const int64_t state_words = static_cast<int64_t>(B) * (sizeof(RowState) / 4);
  const int64_t hist_words = a.blocks > 1 ? static_cast<int64_t>(B) * 2 * kBins : 0;
  at::Tensor work = at::empty({state_words + hist_words}, logits.options().dtype(at::kInt));
  RowState* states = reinterpret_cast<RowState*>(work.mutable_data_ptr<int>());
  uint32_t* hists = a.blocks > 1 ? reinterpret_cast<uint32_t*>(work.mutable_data_ptr<int>() + state_words) : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  err = cudaMemsetAsync(work.mutable_data_ptr<int>(), 0, sizeof(int) * (state_words + hist_words), stream);
  if (err != cudaSuccess) return err;
  const auto run = [&](int phase, int pass) {
    a.phase = phase;
    a.pass = pass;
    sample_kernel_pass<T><<<static_cast<unsigned int>(static_cast<int64_t>(B) * a.blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(logits.const_data_ptr()), race.const_data_ptr<float>(), states, hists,
        out.mutable_data_ptr<int64_t>(), a);
    return cudaGetLastError();
  };
  if ((err = run(kMaxPhase, 0)) != cudaSuccess) return err;
  for (int pass = 1; a.top_k > 0 && pass < key_passes; ++pass)
    if ((err = run(kTopKPhase, pass)) != cudaSuccess) return err;
  for (int pass = 0; a.top_p < 1.f && pass < key_passes; ++pass)
    if ((err = run(kTopPPhase, pass)) != cudaSuccess) return err;
  return run(kRacePhase, 0);
}

}  // namespace

// Arguments checked by sample.cpp: logits (B, V) float32/bf16/fp16 with unit column stride, race
// (B, V) float32 contiguous, on the current device; temperature > 0 (already clamped), V < 2^31.
cudaError_t sample_cuda(const at::Tensor& logits, const at::Tensor& race, float temperature, int64_t top_k,
                        float top_p, const SampleStep& step, at::Tensor& out) {
  SampleArgs a{};
  a.step = step;
  a.V = static_cast<int>(logits.size(1));
  a.ld = logits.stride(0);
  a.temperature = temperature;
  a.top_k = top_k >= a.V ? 0 : static_cast<int>(top_k);
  a.top_p = top_p;
  switch (logits.scalar_type()) {
    case at::kBFloat16: return launch<c10::BFloat16>(logits, race, a, 2, out);
    case at::kHalf: return launch<c10::Half>(logits, race, a, 3, out);
    default: return launch<float>(logits, race, a, 4, out);
  }
}

}  // namespace optimus
