"""The fused step written plainly: CFG, one scheduler update, the optional known-region blend.

Given the per-step coefficients that ``schedulers.py`` computes from a diffusers
scheduler, every row r of the batch (images x layers) gets

    e  = e_u + g[r] (e_c - e_u)                                  classifier-free guidance
    x' = the scheduler's update of (x, e)                        in diffusers' order of operations
    x' = m x' + (1 - m) (known_scale x0_known + noise_scale n)   known-region blend, when asked

It computes in float32, or in the inputs' dtype when that is wider (tests run it on
float64 copies as the ground truth), and returns the new latents in the latents'
dtype together with the DPM-Solver x0 that becomes the scheduler's history (None for
the other schedulers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .schedulers import (EPSILON, SAMPLE, V_PREDICTION, BlendScales, Coefficients, DDIMCoefficients,
                         DPMSolverCoefficients, EulerCoefficients, FlowMatchCoefficients)


class KnownRegion(NamedTuple):
    """The known-region blend of a 4-channel (non-inpainting) UNet.

    latents: the clean latents of the known image, shaped like the latents being denoised;
    mask: 1 where the row is generated, 0 where it is known, (N, 1, ...) or the latents' shape;
    noise: the fixed noise that noises ``latents`` to the next timestep, shaped like the latents.
    """

    latents: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor


def _guidance_column(guidance_scale, rows: int, dtype, device, ndim: int) -> torch.Tensor | float:
    if not isinstance(guidance_scale, torch.Tensor):
        return float(guidance_scale)
    return guidance_scale.to(device=device, dtype=dtype).reshape(-1).expand(rows).reshape((rows,) + (1,) * (ndim - 1))


def fused_step_reference(coefficients: Coefficients, noise_uncond, noise_cond, latents, guidance_scale,
                         noise=None, previous_x0=None, known_region: KnownRegion | None = None,
                         blend: BlendScales | None = None):
    """(new latents, x0 history entry or None); see the module docstring."""
    compute = torch.promote_types(latents.dtype, torch.float32)
    e_u, e_c, x = (t.to(compute) for t in (noise_uncond, noise_cond, latents))
    g = _guidance_column(guidance_scale, x.shape[0], compute, x.device, x.dim())
    e = e_u + g * (e_c - e_u)
    x0_history = None

    c = coefficients
    if isinstance(c, DDIMCoefficients):
        if c.prediction == EPSILON:
            x0, eps = (x - c.sqrt_beta * e) / c.sqrt_alpha, e
        elif c.prediction == SAMPLE:
            x0 = e
            eps = (x - c.sqrt_alpha * x0) / c.sqrt_beta
        else:
            x0, eps = c.sqrt_alpha * x - c.sqrt_beta * e, c.sqrt_alpha * e + c.sqrt_beta * x
        if c.clip_range is not None:
            x0 = x0.clamp(-c.clip_range, c.clip_range)
        out = c.sqrt_alpha_prev * x0 + c.direction * eps
        if c.noise_std > 0:
            out = out + c.noise_std * noise.to(compute)
    elif isinstance(c, EulerCoefficients):
        if c.prediction == EPSILON:
            x0 = x - c.sigma_hat * e
        elif c.prediction == SAMPLE:
            x0 = e
        else:
            x0 = e * c.v_out_scale + x / c.v_skip_divisor
        out = x + ((x - x0) / c.sigma_hat) * c.dt
    elif isinstance(c, DPMSolverCoefficients):
        if c.prediction == SAMPLE:
            x0 = e
        elif c.prediction == V_PREDICTION:
            x0 = c.x0_alpha * x - c.x0_sigma * e
        else:  # epsilon and flow_prediction
            x0 = (x - c.x0_sigma * e) / c.x0_alpha
        # The history holds x0 in the latents' dtype, and the update uses what the history holds.
        x0_history = x0.to(latents.dtype)
        x0 = x0_history.to(compute)
        out = c.sample_scale * x - c.d0_scale * x0
        if c.second_order:
            out = out + c.d1_scale * (c.inv_r0 * (x0 - previous_x0.to(compute)))
    elif isinstance(c, FlowMatchCoefficients):
        out = x + c.dt * e
    else:
        raise TypeError(f"unknown coefficients {type(c).__name__}")

    if known_region is not None:
        known, mask, known_noise = (t.to(compute) for t in known_region)
        noised = blend.known_scale * known + blend.noise_scale * known_noise
        out = (1 - mask) * noised + mask * out
    return out.to(latents.dtype), x0_history
