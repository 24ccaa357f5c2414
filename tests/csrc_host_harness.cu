// The C API of csrc/mild_kernels.h run on the host: the CUDA kernels' per-element code
// (csrc/elementwise.cuh), called for every element on CPU pointers. tests/test_csrc.py
// builds it with nvcc and drives it through the ctypes path of backend="cuda", so the
// kernels' arithmetic and the Python-to-C structures are checked without a GPU; only the
// launch geometry is left to a GPU run.
#include "elementwise.cuh"

namespace {

int last_vector_width = 0;

template <typename Step>
int run_step(const MildStepIO* io, const Step& step) {
  return mild::visit_dtype(io->dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int wide = 16 / sizeof(T);
    const int width = mild::step_vector_width<T>(*io, step);
    last_vector_width = width;
    for (int64_t row = 0; row < io->rows; ++row) {
      for (int64_t col = 0; col < io->row_numel; col += width) {
        if (width == wide) {
          mild::fused_step_elements<T, wide>(*io, step, row, col);
        } else {
          mild::fused_step_elements<T, 1>(*io, step, row, col);
        }
      }
    }
    return 0;
  });
}

}  // namespace

extern "C" {

int mild_ddim_step(const MildStepIO* io, const MildDDIMStep* step, void*) { return run_step(io, mild::DDIMStep{*step}); }

int mild_euler_step(const MildStepIO* io, const MildEulerStep* step, void*) {
  return run_step(io, mild::EulerStep{*step});
}

int mild_dpm_solver_step(const MildStepIO* io, const MildDPMSolverStep* step, void*) {
  return run_step(io, mild::DPMSolverStep{*step});
}

int mild_flow_match_step(const MildStepIO* io, const MildFlowMatchStep* step, void*) {
  return run_step(io, mild::FlowMatchStep{*step});
}

int mild_composite_layers(const MildCompositeIO* io, void*) {
  return mild::visit_dtype(io->dtype, [&](auto image_tag) {
    return mild::visit_dtype(io->mask_dtype, [&](auto mask_tag) {
      using T = decltype(image_tag);
      using A = decltype(mask_tag);
      for (int64_t b = 0; b < io->batch; ++b) {
        for (int64_t p = 0; p < io->pixels; ++p) mild::composite_pixel<T, A>(*io, b, p);
      }
      return 0;
    });
  });
}

const char* mild_error_string(int code) { return code == 0 ? "no error" : "invalid argument"; }

int mild_host_last_vector_width() { return last_vector_width; }

}  // extern "C"
