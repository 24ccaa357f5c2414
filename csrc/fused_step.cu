// The fused step: CFG + one scheduler update (+ the known-region blend) for every row in one launch.
#include <cuda_runtime.h>

#include "elementwise.cuh"

namespace mild {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxRows = 65535;  // rows ride on gridDim.y

template <typename T, int VEC, typename Step>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(const MildStepIO io, const Step step) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col < io.row_numel) fused_step_elements<T, VEC>(io, step, blockIdx.y, col);
}

template <typename T, int VEC, typename Step>
cudaError_t launch_with_width(const MildStepIO& io, const Step& step, cudaStream_t stream) {
  const int64_t threads_per_row = (io.row_numel + VEC - 1) / VEC;
  const dim3 grid(static_cast<unsigned>((threads_per_row + kThreads - 1) / kThreads), static_cast<unsigned>(io.rows));
  fused_step_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(io, step);
  return cudaGetLastError();
}

template <typename Step>
int launch_step(const MildStepIO* io, const Step& step, void* stream) {
  if (io == nullptr || io->rows <= 0 || io->rows > kMaxRows || io->row_numel <= 0 ||
      (io->known != nullptr && io->mask_row_numel <= 0)) {
    return cudaErrorInvalidValue;
  }
  const int code = visit_dtype(io->dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int wide = 16 / sizeof(T);
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    return static_cast<int>(step_vector_width<T>(*io, step) == wide ? launch_with_width<T, wide>(*io, step, s)
                                                                      : launch_with_width<T, 1>(*io, step, s));
  });
  return code < 0 ? cudaErrorInvalidValue : code;
}

}  // namespace
}  // namespace mild

extern "C" {

int mild_ddim_step(const MildStepIO* io, const MildDDIMStep* step, void* stream) {
  return step == nullptr ? cudaErrorInvalidValue : mild::launch_step(io, mild::DDIMStep{*step}, stream);
}

int mild_euler_step(const MildStepIO* io, const MildEulerStep* step, void* stream) {
  return step == nullptr ? cudaErrorInvalidValue : mild::launch_step(io, mild::EulerStep{*step}, stream);
}

int mild_dpm_solver_step(const MildStepIO* io, const MildDPMSolverStep* step, void* stream) {
  return step == nullptr ? cudaErrorInvalidValue : mild::launch_step(io, mild::DPMSolverStep{*step}, stream);
}

int mild_flow_match_step(const MildStepIO* io, const MildFlowMatchStep* step, void* stream) {
  return step == nullptr ? cudaErrorInvalidValue : mild::launch_step(io, mild::FlowMatchStep{*step}, stream);
}

const char* mild_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
