/* mild-kernels CUDA C++ kernels: the C API that mild_kernels/cuda_lib.py loads with ctypes.
 *
 * Every entry point launches one kernel on `stream` (a cudaStream_t; NULL is the legacy
 * default stream) and returns a cudaError_t code: 0 on success, mild_error_string(code)
 * says what went wrong. Tensors are contiguous device pointers; rows lie along dim 0.
 * The math is docs/semantics.md's and mild_kernels/fused_step/reference.py's.
 */
#ifndef MILD_KERNELS_H
#define MILD_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MILD_FLOAT32 = 0, MILD_FLOAT16 = 1, MILD_BFLOAT16 = 2 };

/* Prediction types; flow_prediction is sent as MILD_EPSILON with x0_alpha = 1. */
enum { MILD_EPSILON = 0, MILD_SAMPLE = 1, MILD_V_PREDICTION = 2 };

/* What every fused step reads and writes. `dtype` is the dtype of every tensor below but
 * `guidance` (float32). */
typedef struct {
  const void* noise_uncond;
  const void* noise_cond;
  const void* latents;
  const float* guidance; /* (rows,) guidance scales; NULL: guidance_scale for every row */
  float guidance_scale;
  void* out;
  /* Known-region blend out = (1 - m) (known_scale known + noise_scale known_noise) + m out;
   * known == NULL: no blend. The mask row has mask_row_numel elements (one channel, or all). */
  const void* known;
  const void* known_noise;
  const void* known_mask;
  float known_scale;
  float noise_scale;
  int64_t rows;
  int64_t row_numel;
  int64_t mask_row_numel;
  int32_t dtype;
} MildStepIO;

typedef struct {
  int32_t prediction;
  int32_t clip; /* clamp x0 to [-clip_range, clip_range] */
  float sqrt_alpha;
  float sqrt_beta;
  float sqrt_alpha_prev;
  float direction;
  float noise_std; /* > 0: add noise_std * noise */
  float clip_range;
  const void* noise;
} MildDDIMStep;

typedef struct {
  int32_t prediction;
  float sigma_hat;
  float dt;
  float v_out_scale;
  float v_skip_divisor;
} MildEulerStep;

typedef struct {
  int32_t prediction;
  int32_t second_order;
  float x0_alpha;
  float x0_sigma;
  float sample_scale;
  float d0_scale;
  float d1_scale;
  float inv_r0;
  const void* previous_x0; /* read when second_order */
  void* x0_out;            /* this step's x0, the scheduler's next history entry */
} MildDPMSolverStep;

typedef struct {
  float dt;
} MildFlowMatchStep;

int mild_ddim_step(const MildStepIO* io, const MildDDIMStep* step, void* stream);
int mild_euler_step(const MildStepIO* io, const MildEulerStep* step, void* stream);
int mild_dpm_solver_step(const MildStepIO* io, const MildDPMSolverStep* step, void* stream);
int mild_flow_match_step(const MildStepIO* io, const MildFlowMatchStep* step, void* stream);

/* layers (L, B, C, P) and original (B, C, P) in `dtype`; alphas (L, B, 1, P) and region (B, 1, P)
 * in `mask_dtype`; out (B, C, P) in `dtype`. P is the number of pixels. */
typedef struct {
  const void* layers;
  const void* alphas;
  const void* original;
  const void* region;
  void* out;
  int64_t num_layers;
  int64_t batch;
  int64_t channels;
  int64_t pixels;
  int32_t dtype;
  int32_t mask_dtype;
} MildCompositeIO;

int mild_composite_layers(const MildCompositeIO* io, void* stream);

const char* mild_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif
