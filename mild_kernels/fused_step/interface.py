"""The public ``FusedStep``: argument checks, the scheduler's state, and backend choice."""

from __future__ import annotations

import math

import torch

from .._backends import check_backend, choose_backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, require
from .reference import KnownRegion, fused_step_reference
from .schedulers import DDIMPlanner, DPMSolverPlanner, planner_for

MAX_ROWS = 65535  # rows ride on the second grid axis of the Triton and CUDA kernels


class FusedStep:
    """Classifier-free guidance and a diffusers scheduler's step for every row, in one kernel launch.

    Wraps a configured diffusers scheduler (``DDIMScheduler``, ``EulerDiscreteScheduler``,
    ``DPMSolverMultistepScheduler`` with dpmsolver++ and order 1 or 2, or
    ``FlowMatchEulerDiscreteScheduler``; anything else is a ValueError naming what is
    supported). ``step`` returns what

        scheduler.step(e_u + g * (e_c - e_u), timestep, latents).prev_sample

    returns, for all rows (images x layers) at once, and moves the scheduler's state
    (step index, DPM-Solver model-output history) exactly as that call would, so a
    pipeline can switch between the two at any step.

    Args:
        scheduler: the diffusers scheduler, after ``set_timesteps``.
        eta: DDIM's eta (DDIMScheduler only); eta > 0 needs ``noise`` at every step.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda" (the csrc/ kernels,
            built with ``make -C csrc``), "torch" (the reference, any device) or "auto"
            (Triton, else the CUDA kernels, on CUDA tensors; torch elsewhere).
    """

    def __init__(self, scheduler, *, eta: float = 0.0, backend: str = "auto"):
        self.backend = check_backend(backend)
        self.planner = planner_for(scheduler)
        self.scheduler = scheduler
        self.eta = self._check_eta(eta)

    def _check_eta(self, eta) -> float:
        eta = float(eta)
        require(eta >= 0 and eta == eta, f"eta: must be >= 0, got {eta}")
        require(eta == 0 or isinstance(self.planner, DDIMPlanner),
                f"eta: only DDIMScheduler takes eta; {type(self.scheduler).__name__} does not")
        return eta

    def step(self, noise_uncond, noise_cond, timestep, latents, guidance_scale, noise=None, *, eta=None,
             known_region: KnownRegion | None = None) -> torch.Tensor:
        """One denoising step for every row; returns the new latents.

        Args:
            noise_uncond, noise_cond: the model's unconditional and conditional outputs, shaped
                like ``latents`` (rows along dim 0: images x layers). fp16, bf16 or fp32
                (float64 on the torch backend), all three in one dtype.
            timestep: the current timestep, as for ``scheduler.step``.
            latents: (rows, ...) the current latents.
            guidance_scale: a float, or a tensor of one scale per row (rows,).
            noise: DDIM's variance noise when eta > 0, shaped like the latents.
            eta: overrides the constructor's DDIM eta for this step.
            known_region: ``KnownRegion(latents, mask, noise)`` applies the known-region blend
                of 4-channel (non-inpainting) UNets after the update:
                ``x = m x + (1 - m) noised(known, next timestep)``, with the scheduler's own
                add_noise (scale_noise for flow matching), and the clean known latents after
                the last step.
        """
        eta = self.eta if eta is None else self._check_eta(eta)
        inputs = self._check_inputs(noise_uncond, noise_cond, latents, guidance_scale, noise, eta, known_region)
        noise_uncond, noise_cond, latents, guidance_scale, noise, known_region = inputs
        backend = choose_backend(self.backend, latents.device)

        require(isinstance(timestep, (int, float)) and not isinstance(timestep, bool)
                or isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and not timestep.dtype.is_complex,
                f"timestep: expected a number or a one-element tensor, got "
                f"{tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__}")
        plan = self.planner.plan(timestep, eta)
        require(known_region is None or plan.blend is not None,
                f"timestep: {timestep} is not one of the scheduler's timesteps, so the known-region blend has no "
                "next timestep to noise to")
        previous_x0 = None
        if isinstance(self.planner, DPMSolverPlanner):
            previous_x0 = self._previous_x0(self.planner.previous_x0(plan), latents)
        run = {"torch": fused_step_reference, "triton": _triton_fused_step, "cuda": _cuda_fused_step}[backend]
        out, x0 = run(plan.coefficients, noise_uncond, noise_cond, latents, guidance_scale, noise, previous_x0,
                      known_region, plan.blend)
        self.planner.commit(plan, x0)
        return out

    __call__ = step

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, noise_uncond, noise_cond, latents, guidance_scale, noise, eta, known_region):
        dtypes = FLOAT_DTYPES + ((torch.float64,) if self.backend == "torch" else ())
        check_tensor("latents", latents, dtypes=dtypes)
        require(latents.dim() >= 2, f"latents: expected (rows, ...) with at least 2 dims, got shape "
                                    f"{tuple(latents.shape)}")
        require(latents.numel() > 0, f"latents: is empty, shape {tuple(latents.shape)}")
        rows = latents.shape[0]
        require(rows <= MAX_ROWS, f"latents: {rows} rows; at most {MAX_ROWS} are supported")
        for name, t in (("noise_uncond", noise_uncond), ("noise_cond", noise_cond)):
            self._check_like(name, t, latents)
        check_same_device(latents=latents, noise_uncond=noise_uncond, noise_cond=noise_cond)

        if isinstance(guidance_scale, torch.Tensor):
            require(guidance_scale.numel() in (1, rows),
                    f"guidance_scale: expected a float or one scale per row ({rows}), got shape "
                    f"{tuple(guidance_scale.shape)}")
            require(not guidance_scale.dtype.is_complex and guidance_scale.dtype != torch.bool,
                    f"guidance_scale: dtype {guidance_scale.dtype} is not a real number type")
            ready = (guidance_scale.dtype == torch.float32 and guidance_scale.device == latents.device
                     and guidance_scale.shape == (rows,) and guidance_scale.is_contiguous())
            if not ready:
                guidance_scale = guidance_scale.to(device=latents.device, dtype=torch.float32).reshape(-1)
                guidance_scale = guidance_scale.expand(rows).contiguous()
        else:
            require(isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool),
                    f"guidance_scale: expected a float or a tensor, got {type(guidance_scale).__name__}")
            guidance_scale = float(guidance_scale)
            # A tensor's values are not read (that would sync a GPU): NaN there gives NaN rows.
            require(math.isfinite(guidance_scale), f"guidance_scale: must be finite, got {guidance_scale}")

        takes_noise = isinstance(self.planner, DDIMPlanner)
        require(takes_noise or noise is None,
                f"noise: {type(self.scheduler).__name__}'s step takes no noise in the supported configuration")
        if takes_noise and eta > 0:
            require(noise is not None, "noise: DDIM with eta > 0 needs the variance noise (shaped like the "
                                       "latents); FusedStep draws none itself")
            self._check_like("noise", noise, latents)
            check_same_device(latents=latents, noise=noise)
            noise = noise.contiguous()
        else:
            noise = None  # DDIM with eta 0 ignores it, as DDIMScheduler.step does

        if known_region is not None:
            known_region = self._check_known_region(known_region, latents)
        return (noise_uncond.contiguous(), noise_cond.contiguous(), latents.contiguous(), guidance_scale, noise,
                known_region)

    @staticmethod
    def _check_like(name, tensor, latents):
        check_tensor(name, tensor)
        require(tuple(tensor.shape) == tuple(latents.shape),
                f"{name}: shape {tuple(tensor.shape)} must equal the latents' {tuple(latents.shape)}")
        require(tensor.dtype == latents.dtype, f"{name}: dtype {tensor.dtype} must equal the latents' {latents.dtype}")

    def _check_known_region(self, known_region, latents) -> KnownRegion:
        require(isinstance(known_region, tuple) and len(known_region) == 3,
                "known_region: expected KnownRegion(latents, mask, noise)")
        known, mask, known_noise = known_region
        self._check_like("known_region.latents", known, latents)
        self._check_like("known_region.noise", known_noise, latents)
        check_tensor("known_region.mask", mask)
        one_channel = (latents.shape[0], 1) + tuple(latents.shape[2:])
        require(tuple(mask.shape) in (one_channel, tuple(latents.shape)),
                f"known_region.mask: shape {tuple(mask.shape)} must be {one_channel} or the latents' "
                f"{tuple(latents.shape)}")
        require(mask.dtype == latents.dtype,
                f"known_region.mask: dtype {mask.dtype} must equal the latents' {latents.dtype}")
        check_same_device(latents=latents, known_region_latents=known, known_region_mask=mask,
                          known_region_noise=known_noise)
        return KnownRegion(known.contiguous(), mask.contiguous(), known_noise.contiguous())

    @staticmethod
    def _previous_x0(previous, latents):
        if previous is None:
            return None
        require(isinstance(previous, torch.Tensor) and tuple(previous.shape) == tuple(latents.shape),
                f"scheduler: its model-output history holds shape "
                f"{tuple(previous.shape) if isinstance(previous, torch.Tensor) else type(previous).__name__}, "
                f"but the latents are {tuple(latents.shape)}")
        return previous.to(device=latents.device, dtype=latents.dtype).contiguous()


def _triton_fused_step(*args):
    from .triton_step import triton_fused_step

    return triton_fused_step(*args)


def _cuda_fused_step(*args):
    from .cuda_step import cuda_fused_step

    return cuda_fused_step(*args)
