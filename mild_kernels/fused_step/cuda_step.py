"""The fused step on the CUDA C++ kernels of csrc/fused_step.cu (backend="cuda")."""

from __future__ import annotations

import torch

from .. import cuda_lib
from .._runtime import empty, empty_like
from .reference import KnownRegion
from .schedulers import (EPSILON, FLOW_PREDICTION, BlendScales, Coefficients, DDIMCoefficients, DPMSolverCoefficients,
                         EulerCoefficients, FlowMatchCoefficients)


def cuda_fused_step(coefficients: Coefficients, noise_uncond, noise_cond, latents, guidance_scale,
                    noise=None, previous_x0=None, known_region: KnownRegion | None = None,
                    blend: BlendScales | None = None):
    """Same contract as triton_fused_step."""
    library = cuda_lib.library(latents.device)
    entry, io, step, out, x0 = step_call(coefficients, noise_uncond, noise_cond, latents, guidance_scale, noise,
                                         previous_x0, known_region, blend)
    cuda_lib.call(getattr(library, entry), latents.device, io, step)
    return out, x0


def step_call(coefficients: Coefficients, noise_uncond, noise_cond, latents, guidance_scale, noise=None,
              previous_x0=None, known_region: KnownRegion | None = None, blend: BlendScales | None = None):
    """(entry point name, MildStepIO, step structure, out, x0) for one call of the C API.

    The structures point into the tensors, which must outlive the call.
    """
    out = empty_like(latents)
    per_row = isinstance(guidance_scale, torch.Tensor)
    blend = blend or BlendScales(1.0, 0.0)
    known, mask, known_noise = known_region if known_region is not None else (None, None, None)
    io = cuda_lib.StepIO(
        noise_uncond=noise_uncond.data_ptr(), noise_cond=noise_cond.data_ptr(), latents=latents.data_ptr(),
        guidance=guidance_scale.data_ptr() if per_row else None,
        guidance_scale=1.0 if per_row else guidance_scale, out=out.data_ptr(),
        known=cuda_lib.pointer(known), known_noise=cuda_lib.pointer(known_noise), known_mask=cuda_lib.pointer(mask),
        known_scale=blend.known_scale, noise_scale=blend.noise_scale,
        rows=latents.shape[0], row_numel=latents.numel() // latents.shape[0],
        mask_row_numel=mask.numel() // mask.shape[0] if mask is not None else 0,
        dtype=cuda_lib.DTYPE_CODES[latents.dtype],
    )
    x0 = None
    c = coefficients
    if isinstance(c, DDIMCoefficients):
        step = cuda_lib.DDIMStep(
            prediction=c.prediction, clip=c.clip_range is not None, sqrt_alpha=c.sqrt_alpha, sqrt_beta=c.sqrt_beta,
            sqrt_alpha_prev=c.sqrt_alpha_prev, direction=c.direction, noise_std=c.noise_std,
            clip_range=c.clip_range if c.clip_range is not None else 0.0,
            noise=cuda_lib.pointer(noise) if c.noise_std > 0 else None)
        entry = "mild_ddim_step"
    elif isinstance(c, EulerCoefficients):
        step = cuda_lib.EulerStep(prediction=c.prediction, sigma_hat=c.sigma_hat, dt=c.dt,
                                  v_out_scale=c.v_out_scale, v_skip_divisor=c.v_skip_divisor)
        entry = "mild_euler_step"
    elif isinstance(c, DPMSolverCoefficients):
        x0 = empty(latents.shape, dtype=latents.dtype, device=latents.device)
        step = cuda_lib.DPMSolverStep(
            prediction=EPSILON if c.prediction == FLOW_PREDICTION else c.prediction, second_order=c.second_order,
            x0_alpha=c.x0_alpha, x0_sigma=c.x0_sigma, sample_scale=c.sample_scale, d0_scale=c.d0_scale,
            d1_scale=c.d1_scale, inv_r0=c.inv_r0,
            previous_x0=cuda_lib.pointer(previous_x0) if c.second_order else None, x0_out=x0.data_ptr())
        entry = "mild_dpm_solver_step"
    elif isinstance(c, FlowMatchCoefficients):
        step = cuda_lib.FlowMatchStep(dt=c.dt)
        entry = "mild_flow_match_step"
    else:
        raise TypeError(f"unknown coefficients {type(c).__name__}")
    return entry, io, step, out, x0
