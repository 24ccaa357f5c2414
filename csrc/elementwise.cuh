// The per-element math of the fused step and the layer composite, shared by the CUDA
// kernels and by the host harness the tests build (tests/csrc_host_harness.cu), so the
// arithmetic is checked against the reference on machines without a GPU.
//
// Everything is computed in float32 in diffusers' order of operations; build with
// --fmad=false so no multiply-add is contracted and results track torch's kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mild_kernels.h"

#define MILD_HD __host__ __device__ __forceinline__

namespace mild {

MILD_HD float to_float(float v) { return v; }
MILD_HD float to_float(__half v) { return __half2float(v); }
MILD_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
MILD_HD T from_float(float v);
template <>
MILD_HD float from_float<float>(float v) { return v; }
template <>
MILD_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MILD_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved as one aligned access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
MILD_HD void load(const void* base, int64_t i, float (&dst)[VEC]) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(base) + i);
#pragma unroll
  for (int k = 0; k < VEC; ++k) dst[k] = to_float(p.v[k]);
}

template <typename T, int VEC>
MILD_HD void store(void* base, int64_t i, const float (&src)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(src[k]);
  *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(base) + i) = p;
}

MILD_HD bool aligned(const void* p, uintptr_t alignment) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

// ------------------------------------------------------------------ scheduler updates
// Each step maps (x, e) to the new latents; it may read and write tensors of its own.

struct DDIMStep {
  MildDDIMStep c;

  template <typename T, int VEC>
  MILD_HD void apply(int64_t offs, const float (&x)[VEC], const float (&e)[VEC], float (&out)[VEC]) const {
    const bool add_noise = c.noise_std > 0.f;
    float noise[VEC];
    if (add_noise) load<T, VEC>(c.noise, offs, noise);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float x0, eps;
      if (c.prediction == MILD_EPSILON) {
        x0 = (x[k] - c.sqrt_beta * e[k]) / c.sqrt_alpha;
        eps = e[k];
      } else if (c.prediction == MILD_SAMPLE) {
        x0 = e[k];
        eps = (x[k] - c.sqrt_alpha * x0) / c.sqrt_beta;
      } else {
        x0 = c.sqrt_alpha * x[k] - c.sqrt_beta * e[k];
        eps = c.sqrt_alpha * e[k] + c.sqrt_beta * x[k];
      }
      /* as torch.clamp: a NaN stays NaN (fminf/fmaxf would return the bound) */
      if (c.clip && x0 == x0) x0 = fminf(fmaxf(x0, -c.clip_range), c.clip_range);
      float value = c.sqrt_alpha_prev * x0 + c.direction * eps;
      if (add_noise) value = value + c.noise_std * noise[k];
      out[k] = value;
    }
  }

  MILD_HD bool aligned_to(uintptr_t alignment) const { return c.noise_std <= 0.f || aligned(c.noise, alignment); }
};

struct EulerStep {
  MildEulerStep c;

  template <typename T, int VEC>
  MILD_HD void apply(int64_t, const float (&x)[VEC], const float (&e)[VEC], float (&out)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float x0;
      if (c.prediction == MILD_EPSILON) {
        x0 = x[k] - c.sigma_hat * e[k];
      } else if (c.prediction == MILD_SAMPLE) {
        x0 = e[k];
      } else {
        x0 = e[k] * c.v_out_scale + x[k] / c.v_skip_divisor;
      }
      out[k] = x[k] + ((x[k] - x0) / c.sigma_hat) * c.dt;
    }
  }

  MILD_HD bool aligned_to(uintptr_t) const { return true; }
};

struct DPMSolverStep {
  MildDPMSolverStep c;

  template <typename T, int VEC>
  MILD_HD void apply(int64_t offs, const float (&x)[VEC], const float (&e)[VEC], float (&out)[VEC]) const {
    float x0[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float value;
      if (c.prediction == MILD_SAMPLE) {
        value = e[k];
      } else if (c.prediction == MILD_V_PREDICTION) {
        value = c.x0_alpha * x[k] - c.x0_sigma * e[k];
      } else {
        value = (x[k] - c.x0_sigma * e[k]) / c.x0_alpha;
      }
      // The history holds x0 in the latents' dtype; the update uses exactly what it holds.
      x0[k] = to_float(from_float<T>(value));
    }
    store<T, VEC>(c.x0_out, offs, x0);
    float previous[VEC];
    if (c.second_order) load<T, VEC>(c.previous_x0, offs, previous);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float value = c.sample_scale * x[k] - c.d0_scale * x0[k];
      if (c.second_order) value = value + c.d1_scale * (c.inv_r0 * (x0[k] - previous[k]));
      out[k] = value;
    }
  }

  MILD_HD bool aligned_to(uintptr_t alignment) const {
    return aligned(c.x0_out, alignment) && (!c.second_order || aligned(c.previous_x0, alignment));
  }
};

struct FlowMatchStep {
  MildFlowMatchStep c;

  template <typename T, int VEC>
  MILD_HD void apply(int64_t, const float (&x)[VEC], const float (&e)[VEC], float (&out)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = x[k] + c.dt * e[k];
  }

  MILD_HD bool aligned_to(uintptr_t) const { return true; }
};

// Elements [col, col + VEC) of one row: CFG, the step, the optional blend, the store.
template <typename T, int VEC, typename Step>
MILD_HD void fused_step_elements(const MildStepIO& io, const Step& step, int64_t row, int64_t col) {
  const int64_t offs = row * io.row_numel + col;
  float e_u[VEC], e_c[VEC], x[VEC], e[VEC], out[VEC];
  load<T, VEC>(io.noise_uncond, offs, e_u);
  load<T, VEC>(io.noise_cond, offs, e_c);
  load<T, VEC>(io.latents, offs, x);
  const float g = io.guidance != nullptr ? io.guidance[row] : io.guidance_scale;
#pragma unroll
  for (int k = 0; k < VEC; ++k) e[k] = e_u[k] + g * (e_c[k] - e_u[k]);
  step.template apply<T, VEC>(offs, x, e, out);
  if (io.known != nullptr) {
    float known[VEC], known_noise[VEC], m[VEC];
    load<T, VEC>(io.known, offs, known);
    load<T, VEC>(io.known_noise, offs, known_noise);
    // mask_row_numel is a multiple of VEC, so the VEC mask elements are consecutive.
    load<T, VEC>(io.known_mask, row * io.mask_row_numel + col % io.mask_row_numel, m);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float noised = io.known_scale * known[k] + io.noise_scale * known_noise[k];
      out[k] = (1.f - m[k]) * noised + m[k] * out[k];
    }
  }
  store<T, VEC>(io.out, offs, out);
}

// 16-byte accesses when every tensor and row allows them, else one element at a time.
template <typename T, typename Step>
MILD_HD int step_vector_width(const MildStepIO& io, const Step& step) {
  constexpr int wide = 16 / sizeof(T);
  const bool rows_fit = io.row_numel % wide == 0 && (io.known == nullptr || io.mask_row_numel % wide == 0);
  const bool pointers_fit = aligned(io.noise_uncond, 16) && aligned(io.noise_cond, 16) &&
                            aligned(io.latents, 16) && aligned(io.out, 16) && aligned(io.known, 16) &&
                            aligned(io.known_noise, 16) && aligned(io.known_mask, 16) && step.aligned_to(16);
  return rows_fit && pointers_fit ? wide : 1;
}

// ------------------------------------------------------------------ layer composite

// Pixel p of image b, every channel: layers "over" the original back to front, then the
// result pasted into the original through the region. Where the region is 0 the original's
// bits are copied unchanged and no layer is read.
template <typename T, typename A>
MILD_HD void composite_pixel(const MildCompositeIO& io, int64_t b, int64_t p) {
  const T* layers = static_cast<const T*>(io.layers);
  const A* alphas = static_cast<const A*>(io.alphas);
  const T* original = static_cast<const T*>(io.original);
  const A* region = static_cast<const A*>(io.region);
  T* out = static_cast<T*>(io.out);
  const int64_t B = io.batch, C = io.channels, P = io.pixels;
  const float r = to_float(region[b * P + p]);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = (b * C + c) * P + p;
    if (r == 0.f) {
      out[o] = original[o];
      continue;
    }
    const float base = to_float(original[o]);
    float acc = base;
    for (int64_t l = 0; l < io.num_layers; ++l) {
      const float a = to_float(alphas[(l * B + b) * P + p]);
      const float v = to_float(layers[((l * B + b) * C + c) * P + p]);
      acc = a * v + (1.f - a) * acc;
    }
    out[o] = from_float<T>(r * acc + (1.f - r) * base);
  }
}

// Calls f with a value of the C++ type of a MILD_* dtype code; -1 for an unknown code.
template <typename F>
int visit_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case MILD_FLOAT32:
      return f(float{});
    case MILD_FLOAT16:
      return f(__half{});
    case MILD_BFLOAT16:
      return f(__nv_bfloat16{});
  }
  return -1;
}

}  // namespace mild
