/*
 * Programmatic dependent launch (PDL, compute capability 9.0+) for the decoding step's kernels.
 *
 * A kernel launched with launch_pdl may start while the kernel before it in the stream is still
 * running: its blocks are scheduled once every block of that kernel has called
 * pdl_launch_dependents() or exited. pdl_wait() then blocks until the previous grid has completed
 * and its writes are visible. So a kernel may do before pdl_wait() only what reads no output of
 * any earlier kernel of the step: loading weights (decode_linear) or nothing at all (waiting
 * first, which still hides the launch latency behind the previous kernel's tail). Because the
 * kernel before may itself have started early, "earlier kernel" means any of them, not only the
 * one just before. Inside a CUDA graph the dependency becomes a programmatic edge.
 *
 * Such a kernel is running while its inputs are written, so it must read them with coherent loads
 * (plain or ld.global.cg): a read-only load (ld.global.nc, which the compiler emits for a const
 * __restrict__ pointer or __ldg) is only defined for data that no kernel writes during the
 * reader's lifetime. rope_append_attention read its QKV row through one and, inside the graph,
 * sometimes got stale values: its logits differed from the eager step's by up to 0.7 in 11 of 12
 * replays (H200, 2026-12-02), where with coherent loads they are bit-identical. So these kernels
 * read an earlier kernel's output through pointers that are not const __restrict__, or with
 * __ldcg (rope_append_attention's load_cg); weights, tables and positions written before the
 * step may still take the read-only path.
 *
 * launch_pdl asks for the overlap only while the stream is being captured into a CUDA graph (the
 * Decoder's step): there the weights are constant, written before the capture began. Launched
 * eagerly, a weight may be the output of the kernel just before (a test's torch.randn), which a
 * prefetch before pdl_wait() would race; so eager launches are ordinary ones. On older GPUs, or
 * with the environment variable OPTIMUS_PDL=0 (read once; for measuring both ways), every launch
 * is an ordinary one, and pdl_wait() returns at once.
 */
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace optimus {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool pdl_enabled(cudaStream_t stream) {
  static const bool wanted = [] {
    const char* v = std::getenv("OPTIMUS_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  int device = 0, major = 0;
  if (!wanted || cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusActive ||
      cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query: an ordinary launch
    return false;
  }
  return major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...) in clusters of `cluster` blocks along x (sm_90;
// 0: no cluster attribute), allowed to overlap the previous kernel (above).
template <typename... Params, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned cluster, size_t smem,
                               cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[2]{};
  unsigned count = 0;
  if (pdl_enabled(stream)) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 0) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = cluster;
    attributes[count].val.clusterDim.y = 1;
    attributes[count++].val.clusterDim.z = 1;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the previous kernel (above).
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  return launch_pdl_cluster(kernel, grid, block, 0, smem, stream, std::forward<Args>(args)...);
}

}  // namespace optimus
