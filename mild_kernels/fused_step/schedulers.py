"""The host side of the fused step: per-step scalar coefficients and scheduler state.

For each supported diffusers scheduler this module computes the scalars of one
``step()`` with the same float32 tensor operations diffusers runs, so the kernel
only does the elementwise part, in the same order of operations. It also advances
the scheduler's own state (step index, DPM-Solver model-output history) exactly as
``step()`` would, so a pipeline can switch between ``FusedStep`` and
``scheduler.step`` at any step.

Anything this module does not reproduce exactly is refused with a ValueError that
names what is supported.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from .._checks import require

SUPPORTED = (
    "FusedStep supports: "
    "DDIMScheduler (prediction_type epsilon, sample or v_prediction; clip_sample on or off; thresholding off; "
    "eta >= 0, with the variance noise given when eta > 0); "
    "EulerDiscreteScheduler (prediction_type epsilon, sample, original_sample or v_prediction; no churn); "
    "DPMSolverMultistepScheduler (algorithm_type dpmsolver++, solver_order 1 or 2, solver_type midpoint or heun, "
    "prediction_type epsilon, sample, v_prediction or flow_prediction; thresholding off; variance_type None); "
    "FlowMatchEulerDiscreteScheduler (stochastic_sampling off)"
)

# Prediction types, as the kernels number them.
EPSILON, SAMPLE, V_PREDICTION, FLOW_PREDICTION = 0, 1, 2, 3
_PREDICTIONS = {"epsilon": EPSILON, "sample": SAMPLE, "original_sample": SAMPLE, "v_prediction": V_PREDICTION,
                "flow_prediction": FLOW_PREDICTION}


@dataclasses.dataclass(frozen=True)
class DDIMCoefficients:
    """x0 from the prediction, optional clamp, then sqrt_alpha_prev * x0 + direction * eps + noise_std * noise."""

    prediction: int
    sqrt_alpha: float  # alpha_prod_t ** 0.5
    sqrt_beta: float  # (1 - alpha_prod_t) ** 0.5
    sqrt_alpha_prev: float
    direction: float  # (1 - alpha_prod_t_prev - std**2) ** 0.5
    noise_std: float  # eta * variance ** 0.5; 0 means no noise term
    clip_range: float | None  # clamp x0 to [-clip_range, clip_range]; None: no clamp


@dataclasses.dataclass(frozen=True)
class EulerCoefficients:
    """x0 from the prediction, then x + ((x - x0) / sigma_hat) * dt."""

    prediction: int
    sigma_hat: float
    dt: float  # sigma_next - sigma_hat
    v_out_scale: float  # v_prediction: x0 = e * v_out_scale + x / v_skip_divisor
    v_skip_divisor: float


@dataclasses.dataclass(frozen=True)
class DPMSolverCoefficients:
    """DPM-Solver++: x0 from the prediction (kept as history), then the first- or second-order update.

    first order:  sample_scale * x - d0_scale * x0
    second order: sample_scale * x - d0_scale * x0 + d1_scale * (inv_r0 * (x0 - previous_x0))
    """

    prediction: int
    x0_alpha: float  # alpha_t, sigma_t of the current sigma (for flow_prediction, sigma_t is the raw sigma)
    x0_sigma: float
    sample_scale: float  # sigma_t / sigma_s0
    d0_scale: float  # alpha_t * (exp(-h) - 1)
    second_order: bool
    d1_scale: float  # midpoint: -(0.5 * d0_scale); heun: alpha_t * ((exp(-h) - 1) / h + 1)
    inv_r0: float  # 1 / r0


@dataclasses.dataclass(frozen=True)
class FlowMatchCoefficients:
    """x + dt * e."""

    dt: float  # sigma_next - sigma


Coefficients = Union[DDIMCoefficients, EulerCoefficients, DPMSolverCoefficients, FlowMatchCoefficients]


@dataclasses.dataclass(frozen=True)
class BlendScales:
    """noised(x0_known, t_next) = known_scale * x0_known + noise_scale * noise, as the scheduler's add_noise."""

    known_scale: float
    noise_scale: float


CLEAN = BlendScales(1.0, 0.0)  # after the last step the known region is the clean latent


@dataclasses.dataclass(frozen=True)
class StepPlan:
    coefficients: Coefficients
    blend: BlendScales | None  # used only when the caller asks for the known-region blend; None: no next timestep
    commit: "StepCommit"


@dataclasses.dataclass(frozen=True)
class StepCommit:
    """How the scheduler's state moves once the step has run."""

    step_index: int | None  # the index before the step; None for schedulers without one (DDIM)
    advances_history: bool  # DPM-Solver: push this step's x0 and count one more lower-order step


def _f(value: torch.Tensor | float) -> float:
    return float(value)


class _HostCopies:
    """CPU copies of the scheduler's schedule tensors, refreshed when set_timesteps replaces them."""

    def __init__(self):
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, scheduler, name: str) -> torch.Tensor:
        source = getattr(scheduler, name)
        cached = self._copies.get(name)
        if cached is None or cached[0] is not source:
            cached = (source, source.detach().cpu())
            self._copies[name] = cached
        return cached[1]


def _scheduler_classes():
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    return {DDIMScheduler: DDIMPlanner, EulerDiscreteScheduler: EulerPlanner,
            DPMSolverMultistepScheduler: DPMSolverPlanner, FlowMatchEulerDiscreteScheduler: FlowMatchPlanner}


def planner_for(scheduler) -> "Planner":
    """The planner of a supported scheduler; a ValueError naming what is supported otherwise."""
    try:
        classes = _scheduler_classes()
    except ImportError as error:
        raise ValueError(f"scheduler: FusedStep needs the diffusers package ({error})") from error
    planner = classes.get(type(scheduler))
    # Exact classes only: a subclass may override step() with other math.
    require(planner is not None, f"scheduler: {type(scheduler).__name__} is not supported. {SUPPORTED}")
    planner.check_config(scheduler)
    return planner(scheduler)


def _prediction(scheduler, allowed) -> int:
    name = scheduler.config.prediction_type
    require(name in allowed and name in _PREDICTIONS,
            f"scheduler: {type(scheduler).__name__} with prediction_type={name!r} is not supported. {SUPPORTED}")
    return _PREDICTIONS[name]


class Planner:
    """Plans one scheduler's steps. A step's coefficients depend only on the schedule and the
    step's position in it, so each is computed once per ``set_timesteps`` and then reused."""

    # The scheduler attributes set_timesteps replaces; a new object drops the cached plans.
    schedule_attributes = ("timesteps", "sigmas")

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.host = _HostCopies()
        self._schedule: tuple = ()
        self._plans: dict = {}

    @staticmethod
    def check_config(scheduler) -> None:
        raise NotImplementedError

    def key(self, timestep, eta: float) -> tuple:
        """What this step's plan depends on besides the schedule (checks the scheduler's state)."""
        raise NotImplementedError

    def compute(self, *key) -> StepPlan:
        raise NotImplementedError

    def plan(self, timestep, eta: float) -> StepPlan:
        key = self.key(timestep, eta)
        schedule = tuple(getattr(self.scheduler, name) for name in self.schedule_attributes)
        if len(schedule) != len(self._schedule) or any(a is not b for a, b in zip(schedule, self._schedule)):
            self._schedule, self._plans = schedule, {}
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.compute(*key)
        return plan

    def commit(self, plan: StepPlan, x0: torch.Tensor | None) -> None:
        """Advance the scheduler's state as its step() does."""
        if plan.commit.step_index is None:
            return
        scheduler = self.scheduler
        if plan.commit.advances_history:
            order = scheduler.config.solver_order
            for i in range(order - 1):
                scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
            scheduler.model_outputs[-1] = x0
            if scheduler.lower_order_nums < order:
                scheduler.lower_order_nums += 1
        scheduler._step_index = plan.commit.step_index + 1

    # Schedulers with a step index (Euler, DPM-Solver, flow matching).
    def _current_index(self, timestep) -> int:
        scheduler = self.scheduler
        require(scheduler.timesteps is not None and getattr(scheduler, "num_inference_steps", None) is not None,
                "scheduler: call set_timesteps() before stepping")
        if scheduler.step_index is None:
            try:
                scheduler._init_step_index(timestep)
            except IndexError as error:
                raise ValueError(f"timestep: {timestep} is not one of the scheduler's timesteps") from error
        index = scheduler.step_index
        steps = len(scheduler.timesteps)
        require(index < steps, f"timestep: the scheduler has run all {steps} of its steps; call set_timesteps() "
                               "to start again")
        return index


class DDIMPlanner(Planner):
    schedule_attributes = ("timesteps",)

    @staticmethod
    def check_config(scheduler) -> None:
        _prediction(scheduler, ("epsilon", "sample", "v_prediction"))
        require(not scheduler.config.thresholding,
                f"scheduler: DDIMScheduler with thresholding=True (a per-sample quantile) is not supported. "
                f"{SUPPORTED}")

    def key(self, timestep, eta: float) -> tuple:
        require(self.scheduler.num_inference_steps is not None, "scheduler: call set_timesteps() before stepping")
        require(eta >= 0, f"eta: must be >= 0, got {eta}")
        return int(timestep), float(eta)

    def compute(self, t: int, eta: float) -> StepPlan:
        scheduler = self.scheduler
        config = scheduler.config
        alphas_cumprod = self.host.get(scheduler, "alphas_cumprod")
        require(0 <= t < len(alphas_cumprod), f"timestep: {t} is outside [0, {len(alphas_cumprod)})")
        final = scheduler.final_alpha_cumprod.cpu()
        prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

        # The same float32 tensor arithmetic as DDIMScheduler.step and _get_variance.
        alpha_prod_t = alphas_cumprod[t]
        require(alpha_prod_t > 0 or config.prediction_type != "epsilon",
                f"timestep: {t} holds no signal (alphas_cumprod 0, rescale_betas_zero_snr), where an epsilon "
                f"prediction gives no x0; use prediction_type 'v_prediction' or 'sample'")
        alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** (0.5)
        coefficients = DDIMCoefficients(
            prediction=_PREDICTIONS[config.prediction_type],
            sqrt_alpha=_f(alpha_prod_t ** (0.5)),
            sqrt_beta=_f(beta_prod_t ** (0.5)),
            sqrt_alpha_prev=_f(alpha_prod_t_prev ** (0.5)),
            direction=_f((1 - alpha_prod_t_prev - std_dev_t ** 2) ** (0.5)),
            noise_std=_f(std_dev_t) if eta > 0 else 0.0,
            clip_range=float(config.clip_sample_range) if config.clip_sample else None,
        )
        return StepPlan(coefficients, self._blend(t, alphas_cumprod), StepCommit(None, False))

    def _blend(self, t: int, alphas_cumprod: torch.Tensor) -> BlendScales | None:
        # A pipeline noises the known latents to the next entry of scheduler.timesteps (add_noise).
        timesteps = self.host.get(self.scheduler, "timesteps")
        where = (timesteps == t).nonzero()
        if len(where) == 0:  # off the grid: fine for step() itself; only a blend would need the next one
            return None
        index = int(where[0])
        if index + 1 >= len(timesteps):
            return CLEAN
        alpha_prod = alphas_cumprod[int(timesteps[index + 1])]
        return BlendScales(_f(alpha_prod ** 0.5), _f((1 - alpha_prod) ** 0.5))


class EulerPlanner(Planner):
    @staticmethod
    def check_config(scheduler) -> None:
        _prediction(scheduler, ("epsilon", "sample", "original_sample", "v_prediction"))

    def key(self, timestep, eta: float) -> tuple:
        return (self._current_index(timestep),)

    def compute(self, index: int) -> StepPlan:
        scheduler = self.scheduler
        sigmas = self.host.get(scheduler, "sigmas")
        # EulerDiscreteScheduler.step with s_churn = 0: gamma = 0.
        sigma = sigmas[index]
        sigma_hat = sigma * (0.0 + 1)
        coefficients = EulerCoefficients(
            prediction=_PREDICTIONS[scheduler.config.prediction_type],
            sigma_hat=_f(sigma_hat),
            dt=_f(sigmas[index + 1] - sigma_hat),
            v_out_scale=_f(-sigma / (sigma ** 2 + 1) ** 0.5),
            v_skip_divisor=_f(sigma ** 2 + 1),
        )
        blend = CLEAN if index + 1 >= len(scheduler.timesteps) else BlendScales(1.0, _f(sigmas[index + 1]))
        return StepPlan(coefficients, blend, StepCommit(index, False))


class DPMSolverPlanner(Planner):
    @staticmethod
    def check_config(scheduler) -> None:
        config = scheduler.config
        name = type(scheduler).__name__

        def refuse(what):
            raise ValueError(f"scheduler: {name} with {what} is not supported. {SUPPORTED}")

        if config.algorithm_type != "dpmsolver++":
            refuse(f"algorithm_type={config.algorithm_type!r}")
        if config.solver_order not in (1, 2):
            refuse(f"solver_order={config.solver_order}")
        if config.solver_type not in ("midpoint", "heun"):
            refuse(f"solver_type={config.solver_type!r}")
        if config.thresholding:
            refuse("thresholding=True")
        if config.variance_type is not None:
            refuse(f"variance_type={config.variance_type!r}")
        _prediction(scheduler, ("epsilon", "sample", "v_prediction", "flow_prediction"))

    def key(self, timestep, eta: float) -> tuple:
        return self._current_index(timestep), self.scheduler.lower_order_nums < 1

    def compute(self, index: int, no_history: bool) -> StepPlan:
        scheduler = self.scheduler
        config = scheduler.config
        steps = len(scheduler.timesteps)
        sigmas = self.host.get(scheduler, "sigmas")
        to_alpha_sigma = scheduler._sigma_to_alpha_sigma_t

        # DPMSolverMultistepScheduler.step's choice of order.
        lower_order_final = (index == steps - 1) and (
            config.euler_at_final or (config.lower_order_final and steps < 15) or config.final_sigmas_type == "zero")
        second_order = not (config.solver_order == 1 or no_history or lower_order_final)

        # convert_model_output
        prediction = _PREDICTIONS[config.prediction_type]
        if prediction == FLOW_PREDICTION:
            x0_alpha, x0_sigma = torch.tensor(1.0), sigmas[index]
        else:
            x0_alpha, x0_sigma = to_alpha_sigma(sigmas[index])

        # dpm_solver_first_order_update / multistep_dpm_solver_second_order_update
        alpha_t, sigma_t = to_alpha_sigma(sigmas[index + 1])
        alpha_s0, sigma_s0 = to_alpha_sigma(sigmas[index])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        d0_scale = alpha_t * (torch.exp(-h) - 1.0)
        d1_scale, inv_r0 = 0.0, 0.0
        if second_order:
            alpha_s1, sigma_s1 = to_alpha_sigma(sigmas[index - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            inv_r0 = _f(1.0 / r0)
            if config.solver_type == "midpoint":
                d1_scale = -_f(0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
            else:
                d1_scale = _f(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
        coefficients = DPMSolverCoefficients(
            prediction=prediction, x0_alpha=_f(x0_alpha), x0_sigma=_f(x0_sigma),
            sample_scale=_f(sigma_t / sigma_s0), d0_scale=_f(d0_scale),
            second_order=second_order, d1_scale=d1_scale, inv_r0=inv_r0)

        blend = CLEAN
        if index + 1 < steps:  # DPMSolverMultistepScheduler.add_noise at the next sigma
            alpha_next, sigma_next = to_alpha_sigma(sigmas[index + 1])
            blend = BlendScales(_f(alpha_next), _f(sigma_next))
        return StepPlan(coefficients, blend, StepCommit(index, True))

    def previous_x0(self, plan: StepPlan) -> torch.Tensor | None:
        return self.scheduler.model_outputs[-1] if plan.coefficients.second_order else None


class FlowMatchPlanner(Planner):
    @staticmethod
    def check_config(scheduler) -> None:
        require(not scheduler.config.stochastic_sampling,
                f"scheduler: FlowMatchEulerDiscreteScheduler with stochastic_sampling=True is not supported. "
                f"{SUPPORTED}")

    def key(self, timestep, eta: float) -> tuple:
        return (self._current_index(timestep),)

    def compute(self, index: int) -> StepPlan:
        scheduler = self.scheduler
        sigmas = self.host.get(scheduler, "sigmas")
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        blend = CLEAN
        if index + 1 < len(scheduler.timesteps):  # scale_noise: sigma * noise + (1 - sigma) * sample
            blend = BlendScales(_f(1.0 - sigma_next), _f(sigma_next))
        return StepPlan(FlowMatchCoefficients(dt=_f(sigma_next - sigma)), blend, StepCommit(index, False))
