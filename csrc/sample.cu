/*
 * sample: one token per row of logits from logits_to_probs' distribution, without a sort. CUDA
 * kernel: each row split over many blocks (about two blocks per SM over the whole batch), a
 * short chain of launches of one kernel, one phase each, with no host synchronisation.
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
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

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
};

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

template <typename T>
__global__ void __launch_bounds__(kThreads)
sample_kernel_pass(const T* __restrict__ logits, const float* __restrict__ race, RowState* __restrict__ states,
                   uint32_t* __restrict__ hists, int64_t* __restrict__ out, const SampleArgs a) {
  __shared__ uint32_t counts[kBins];
  __shared__ float masses[kBins];
  __shared__ unsigned long long red[kWarps];
  __shared__ uint32_t warp_count[kWarps];
  __shared__ float warp_mass[kWarps];
  __shared__ int chosen;
  __shared__ float total;
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
      const float x = scaled(v, mx, a.temperature), w = expf(x);
      if (valid && x >= x_kth && w > 0.f && w >= tau) {
        const float s = w / race[static_cast<int64_t>(row) * a.V + i];
        best = max_u64(best, (static_cast<unsigned long long>(__float_as_uint(s)) << 32) | (kFull - i));
      }
      continue;
    }
    if (!select) continue;
    int digit = -1;
    float w = 0.f;
    if (counting) {
      if (valid && (key & mask) == prefix) digit = static_cast<int>((key >> shift) & (kBins - 1));
    } else {
      const float x = scaled(v, mx, a.temperature);
      w = expf(x);
      if (valid && x >= x_kth && w > 0.f && (key & mask) == prefix) digit = static_cast<int>((key >> shift) & (kBins - 1));
      else w = 0.f;
    }
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

  if (a.phase == kRacePhase) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = max_u64(best, __shfl_xor_sync(kFull, best, o));
    if (lane == 0) red[warp] = best;
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kWarps; ++w) best = max_u64(best, red[w]);
      if (a.blocks > 1) {
        atomicMax(&st->best, best);
        __threadfence();
        last = atomicAdd(&st->ticket, 1u) == static_cast<uint32_t>(a.blocks - 1);
        if (last) best = atomicMax(&st->best, 0ull);  // the row's best, read at the L2
      } else {
        last = true;
      }
      // No kept token (every logit NaN or -inf): token 0.
      if (last) out[row] = best == 0 ? 0 : static_cast<int64_t>(kFull - static_cast<uint32_t>(best & kFull));
    }
    return;
  }
  if (a.phase == kMaxPhase) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) kmax = max(kmax, __shfl_xor_sync(kFull, kmax, o));
    if (lane == 0) warp_count[warp] = kmax;
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kWarps; ++w) kmax = max(kmax, warp_count[w]);
      atomicMax(&st->max_key, kmax);
    }
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

  // The decision: thread t holds digit d = 255 - t; an inclusive scan over t gives, per digit, the
  // count (or mass) of the prefix's tokens with that digit or a higher one. The digit chosen is
  // the largest non-empty one whose sum reaches the need.
  const int d = kBins - 1 - tid;
  const uint32_t c = counts[d];
  const float m = masses[d];
  uint32_t c_incl = c;
  float m_incl = m;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t cu = __shfl_up_sync(kFull, c_incl, o);
    const float mu = __shfl_up_sync(kFull, m_incl, o);
    if (lane >= o) c_incl += cu, m_incl += mu;
  }
  if (lane == 31) warp_count[warp] = c_incl, warp_mass[warp] = m_incl;
  if (tid == 0) chosen = kBins;
  __syncthreads();
  for (int w = 0; w < warp; ++w) c_incl += warp_count[w], m_incl += warp_mass[w];
  if (tid == kThreads - 1) total = m_incl;
  __syncthreads();
  const bool top_p_start = !counting && a.pass == 0;
  const float need_mass = top_p_start ? a.top_p * total : (counting ? 0.f : __ldcg(&st->need_mass));
  const int need_count = a.pass == 0 ? a.top_k : __ldcg(&st->need_count);
  const bool nonempty = counting ? c > 0 : m > 0.f;
  const bool reaches = counting ? c_incl >= static_cast<uint32_t>(need_count) : m_incl >= need_mass;
  if (nonempty && reaches) atomicMin(&chosen, tid);
  __syncthreads();
  int pick = chosen;
  const bool fallback = pick == kBins;  // rounding left the bucket short of the need: keep all of it
  if (fallback) {                       // the lowest non-empty digit (none: digit 0, an empty row)
    __syncthreads();                    // every thread has read `chosen`
    if (tid == 0) chosen = -1;
    __syncthreads();
    if (nonempty) atomicMax(&chosen, tid);
    __syncthreads();
    pick = chosen;
  }
  if (tid == (pick < 0 ? kThreads - 1 : pick)) {
    const uint32_t key = prefix | (static_cast<uint32_t>(d) << shift);
    const bool final_pass = a.pass + 1 == a.key_passes;
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
cudaError_t launch(const at::Tensor& logits, const at::Tensor& race, SampleArgs a, int key_passes, at::Tensor& out) {
  const int B = static_cast<int>(logits.size(0));
  int sms = 0;  // a query, not stream work: allowed under CUDA graph capture (decode_attention does it too)
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device());
  if (err != cudaSuccess) return err;
  const int by_size = (a.V + kMinSlice - 1) / kMinSlice;
  const int by_grid = (kBlocksPerSm * sms + B - 1) / B;
  a.blocks = std::max(1, std::min(by_size, by_grid));
  a.slice = (a.V + a.blocks - 1) / a.blocks;
  a.key_passes = key_passes;
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
                        float top_p, at::Tensor& out) {
  SampleArgs a{};
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
