// Layer composition: "over" back to front, pasted into the original through the region, in one launch.
#include <cuda_runtime.h>

#include "elementwise.cuh"

namespace mild {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBatch = 65535;  // images ride on gridDim.y

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) composite_kernel(const MildCompositeIO io) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < io.pixels) composite_pixel<T, A>(io, blockIdx.y, p);
}

}  // namespace
}  // namespace mild

extern "C" int mild_composite_layers(const MildCompositeIO* io, void* stream) {
  if (io == nullptr || io->num_layers < 0 || io->batch <= 0 || io->batch > mild::kMaxBatch || io->channels <= 0 ||
      io->pixels <= 0) {
    return cudaErrorInvalidValue;
  }
  const int code = mild::visit_dtype(io->dtype, [&](auto image_tag) {
    return mild::visit_dtype(io->mask_dtype, [&](auto mask_tag) {
      using T = decltype(image_tag);
      using A = decltype(mask_tag);
      const dim3 grid(static_cast<unsigned>((io->pixels + mild::kThreads - 1) / mild::kThreads),
                      static_cast<unsigned>(io->batch));
      mild::composite_kernel<T, A><<<grid, mild::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(*io);
      return static_cast<int>(cudaGetLastError());
    });
  });
  return code < 0 ? cudaErrorInvalidValue : code;
}
