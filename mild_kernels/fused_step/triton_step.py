"""Triton kernels of the fused step: CFG + one scheduler update (+ the known-region blend) in one launch.

One kernel per scheduler family, each a single pass over the rows (images x layers):
program (i, r) handles elements [i * BLOCK, (i + 1) * BLOCK) of row r, so the per-row
guidance scale is one scalar load. Every element is read once and written once, in
float32 registers; the arithmetic follows diffusers' order of operations (see
schedulers.py for the coefficients), with IEEE division as torch's.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._runtime import empty, empty_like, interpreting, launch
from .reference import KnownRegion
from .schedulers import (EPSILON, FLOW_PREDICTION, BlendScales, Coefficients, DDIMCoefficients, DPMSolverCoefficients,
                         EulerCoefficients, FlowMatchCoefficients)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    block: int
    num_warps: int


# One config for every kernel: 8 elements a thread (16-byte fp16 accesses) keeps enough
# bytes in flight per SM for a streaming kernel; memory-bound, so nothing to tune per scheduler.
STEP_CONFIG = StepConfig(block=1024, num_warps=4)


@triton.jit
def rounded_like(value, Ptr, BF16_BY_HAND: tl.constexpr):
    """float32 ``value`` rounded to nearest-even in Ptr's element type.

    Triton's CPU interpreter truncates float32 to bfloat16 (a GPU rounds), so under the
    interpreter bf16 is rounded here by hand, on the bits.
    """
    if BF16_BY_HAND:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(Ptr.dtype.element_ty)


@triton.jit
def _guided(EU, EC, X, Guidance, guidance_scale, row, offs, in_row, PER_ROW_GUIDANCE: tl.constexpr):
    """(x, e_u + g (e_c - e_u)) in float32."""
    e_u = tl.load(EU + offs, mask=in_row, other=0.0).to(tl.float32)
    e_c = tl.load(EC + offs, mask=in_row, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=in_row, other=0.0).to(tl.float32)
    if PER_ROW_GUIDANCE:
        g = tl.load(Guidance + row)
    else:
        g = guidance_scale
    return x, e_u + g * (e_c - e_u)


@triton.jit
def _blend_and_store(Out, value, Known, KnownNoise, Mask, known_scale, noise_scale, row, col, offs, in_row,
                     mask_row_numel, BLEND: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    if BLEND:
        known = tl.load(Known + offs, mask=in_row, other=0.0).to(tl.float32)
        known_noise = tl.load(KnownNoise + offs, mask=in_row, other=0.0).to(tl.float32)
        m = tl.load(Mask + row.to(tl.int64) * mask_row_numel + col % mask_row_numel, mask=in_row,
                    other=0.0).to(tl.float32)
        noised = known_scale * known + noise_scale * known_noise
        value = (1 - m) * noised + m * value
    tl.store(Out + offs, rounded_like(value, Out, BF16_BY_HAND), mask=in_row)


@triton.jit
def _row_block(row_numel, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_row = col < row_numel
    return row, col, row.to(tl.int64) * row_numel + col, in_row


@triton.jit
def _ddim_step_kernel(EU, EC, X, Guidance, Noise, Out, Known, KnownNoise, Mask,
                      row_numel, mask_row_numel, guidance_scale,
                      sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction, noise_std, clip_range,
                      known_scale, noise_scale,
                      PREDICTION: tl.constexpr, CLIP: tl.constexpr, ADD_NOISE: tl.constexpr,
                      PER_ROW_GUIDANCE: tl.constexpr, BLEND: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                      BLOCK: tl.constexpr):
    row, col, offs, in_row = _row_block(row_numel, BLOCK)
    x, e = _guided(EU, EC, X, Guidance, guidance_scale, row, offs, in_row, PER_ROW_GUIDANCE)
    if PREDICTION == 0:  # epsilon
        x0 = tl.math.div_rn(x - sqrt_beta * e, sqrt_alpha)
        eps = e
    elif PREDICTION == 1:  # sample
        x0 = e
        eps = tl.math.div_rn(x - sqrt_alpha * x0, sqrt_beta)
    else:  # v_prediction
        x0 = sqrt_alpha * x - sqrt_beta * e
        eps = sqrt_alpha * e + sqrt_beta * x
    if CLIP:
        # as torch.clamp: a NaN stays NaN (min/max would return the bound and hide a diverged run)
        x0 = tl.where(x0 != x0, x0, tl.minimum(tl.maximum(x0, -clip_range), clip_range))
    out = sqrt_alpha_prev * x0 + direction * eps
    if ADD_NOISE:
        out = out + noise_std * tl.load(Noise + offs, mask=in_row, other=0.0).to(tl.float32)
    _blend_and_store(Out, out, Known, KnownNoise, Mask, known_scale, noise_scale, row, col, offs, in_row,
                     mask_row_numel, BLEND, BF16_BY_HAND)


@triton.jit
def _euler_step_kernel(EU, EC, X, Guidance, Out, Known, KnownNoise, Mask,
                       row_numel, mask_row_numel, guidance_scale,
                       sigma_hat, dt, v_out_scale, v_skip_divisor, known_scale, noise_scale,
                       PREDICTION: tl.constexpr, PER_ROW_GUIDANCE: tl.constexpr, BLEND: tl.constexpr,
                       BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    row, col, offs, in_row = _row_block(row_numel, BLOCK)
    x, e = _guided(EU, EC, X, Guidance, guidance_scale, row, offs, in_row, PER_ROW_GUIDANCE)
    if PREDICTION == 0:  # epsilon
        x0 = x - sigma_hat * e
    elif PREDICTION == 1:  # sample
        x0 = e
    else:  # v_prediction
        x0 = e * v_out_scale + tl.math.div_rn(x, v_skip_divisor)
    out = x + tl.math.div_rn(x - x0, sigma_hat) * dt
    _blend_and_store(Out, out, Known, KnownNoise, Mask, known_scale, noise_scale, row, col, offs, in_row,
                     mask_row_numel, BLEND, BF16_BY_HAND)


@triton.jit
def _dpm_solver_step_kernel(EU, EC, X, Guidance, PreviousX0, Out, X0Out, Known, KnownNoise, Mask,
                            row_numel, mask_row_numel, guidance_scale,
                            x0_alpha, x0_sigma, sample_scale, d0_scale, d1_scale, inv_r0,
                            known_scale, noise_scale,
                            PREDICTION: tl.constexpr, SECOND_ORDER: tl.constexpr,
                            PER_ROW_GUIDANCE: tl.constexpr, BLEND: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                            BLOCK: tl.constexpr):
    row, col, offs, in_row = _row_block(row_numel, BLOCK)
    x, e = _guided(EU, EC, X, Guidance, guidance_scale, row, offs, in_row, PER_ROW_GUIDANCE)
    if PREDICTION == 1:  # sample
        x0 = e
    elif PREDICTION == 2:  # v_prediction
        x0 = x0_alpha * x - x0_sigma * e
    else:  # epsilon, flow_prediction (x0_alpha = 1)
        x0 = tl.math.div_rn(x - x0_sigma * e, x0_alpha)
    # The history holds x0 in the latents' dtype; the update uses exactly what it holds.
    x0_stored = rounded_like(x0, X0Out, BF16_BY_HAND)
    tl.store(X0Out + offs, x0_stored, mask=in_row)
    x0 = x0_stored.to(tl.float32)
    out = sample_scale * x - d0_scale * x0
    if SECOND_ORDER:
        previous = tl.load(PreviousX0 + offs, mask=in_row, other=0.0).to(tl.float32)
        out = out + d1_scale * (inv_r0 * (x0 - previous))
    _blend_and_store(Out, out, Known, KnownNoise, Mask, known_scale, noise_scale, row, col, offs, in_row,
                     mask_row_numel, BLEND, BF16_BY_HAND)


@triton.jit
def _flow_match_step_kernel(EU, EC, X, Guidance, Out, Known, KnownNoise, Mask,
                            row_numel, mask_row_numel, guidance_scale, dt, known_scale, noise_scale,
                            PER_ROW_GUIDANCE: tl.constexpr, BLEND: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                            BLOCK: tl.constexpr):
    row, col, offs, in_row = _row_block(row_numel, BLOCK)
    x, e = _guided(EU, EC, X, Guidance, guidance_scale, row, offs, in_row, PER_ROW_GUIDANCE)
    _blend_and_store(Out, x + dt * e, Known, KnownNoise, Mask, known_scale, noise_scale, row, col, offs, in_row,
                     mask_row_numel, BLEND, BF16_BY_HAND)


def triton_fused_step(coefficients: Coefficients, noise_uncond, noise_cond, latents, guidance_scale,
                      noise=None, previous_x0=None, known_region: KnownRegion | None = None,
                      blend: BlendScales | None = None):
    """Launch the kernel of ``coefficients``' scheduler; same contract as fused_step_reference.

    Tensors are contiguous with rows along dim 0; ``guidance_scale`` is a float or a
    contiguous float32 (rows,) tensor on the latents' device.
    """
    rows = latents.shape[0]
    row_numel = latents.numel() // latents.shape[0]
    out = empty_like(latents)
    per_row = isinstance(guidance_scale, torch.Tensor)
    blending = known_region is not None
    known, mask, known_noise = known_region if blending else (latents, latents, latents)
    blend = blend or BlendScales(1.0, 0.0)
    common = dict(
        EU=noise_uncond, EC=noise_cond, X=latents, Guidance=guidance_scale if per_row else latents, Out=out,
        Known=known, KnownNoise=known_noise, Mask=mask,
        row_numel=row_numel, mask_row_numel=mask.numel() // mask.shape[0],
        guidance_scale=1.0 if per_row else guidance_scale,
        known_scale=blend.known_scale, noise_scale=blend.noise_scale,
        PER_ROW_GUIDANCE=per_row, BLEND=blending, BF16_BY_HAND=interpreting() and latents.dtype == torch.bfloat16,
        BLOCK=STEP_CONFIG.block,
    )
    grid = (-(-row_numel // STEP_CONFIG.block), rows)
    x0 = None
    c = coefficients
    if isinstance(c, DDIMCoefficients):
        add_noise = c.noise_std > 0
        launch(_ddim_step_kernel, grid, num_warps=STEP_CONFIG.num_warps, num_stages=1, **common,
               Noise=noise if add_noise else latents,
               sqrt_alpha=c.sqrt_alpha, sqrt_beta=c.sqrt_beta, sqrt_alpha_prev=c.sqrt_alpha_prev,
               direction=c.direction, noise_std=c.noise_std,
               clip_range=c.clip_range if c.clip_range is not None else 0.0,
               PREDICTION=c.prediction, CLIP=c.clip_range is not None, ADD_NOISE=add_noise)
    elif isinstance(c, EulerCoefficients):
        launch(_euler_step_kernel, grid, num_warps=STEP_CONFIG.num_warps, num_stages=1, **common,
               sigma_hat=c.sigma_hat, dt=c.dt, v_out_scale=c.v_out_scale, v_skip_divisor=c.v_skip_divisor,
               PREDICTION=c.prediction)
    elif isinstance(c, DPMSolverCoefficients):
        x0 = empty(latents.shape, dtype=latents.dtype, device=latents.device)
        launch(_dpm_solver_step_kernel, grid, num_warps=STEP_CONFIG.num_warps, num_stages=1, **common,
               PreviousX0=previous_x0 if c.second_order else latents, X0Out=x0,
               x0_alpha=c.x0_alpha, x0_sigma=c.x0_sigma, sample_scale=c.sample_scale, d0_scale=c.d0_scale,
               d1_scale=c.d1_scale, inv_r0=c.inv_r0,
               PREDICTION=EPSILON if c.prediction == FLOW_PREDICTION else c.prediction,
               SECOND_ORDER=c.second_order)
    elif isinstance(c, FlowMatchCoefficients):
        launch(_flow_match_step_kernel, grid, num_warps=STEP_CONFIG.num_warps, num_stages=1, **common, dt=c.dt)
    else:
        raise TypeError(f"unknown coefficients {type(c).__name__}")
    return out, x0
