// The launch helpers of the CUDA kernels (kernels.cu, recurrent_kernels.cu): the block size, a
// grid-stride grid sized to what the device keeps resident, and the grid-stride loop.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace trpo_ext {
namespace cuda {

constexpr int kBlock = 256;

// At most as many blocks as the device keeps resident at once: grid-stride loops cover the rest,
// and the reductions make one atomic per block.
inline int64_t grid_for(int64_t n) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks =
      static_cast<int64_t>(props->multiProcessorCount) * (props->maxThreadsPerMultiProcessor / kBlock);
  return std::min((n + kBlock - 1) / kBlock, max_blocks);
}

// Runs `kernel` on the current stream with a grid-stride grid over n elements; n == 0 launches
// nothing.
template <typename... Params, typename... Args>
void launch(int64_t n, void (*kernel)(Params...), Args... args) {
  if (n == 0) return;
  kernel<<<grid_for(n), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
__device__ void grid_stride(int64_t n, const F& body) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) body(i);
}

}  // namespace cuda
}  // namespace trpo_ext
