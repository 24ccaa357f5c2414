"""FusedStep against diffusers' own schedulers over full runs, per-row guidance, every backend."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from diffusers.utils import logging as diffusers_logging

from conftest import DEVICE
from csrc_build import emulate_cuda_backend
from helpers import TOLERANCE, assert_close, rel_err
from mild_kernels import FusedStep, KnownRegion
from mild_kernels._runtime import poison_outputs, record_launches

diffusers_logging.set_verbosity_error()  # Euler's "call scale_model_input" reminder, once per step

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# name: (scheduler class, config, inference steps, DDIM eta)
CONFIGS = {
    "ddim": (DDIMScheduler, dict(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 12, 0.0),
    "ddim-eta": (DDIMScheduler, dict(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 9, 0.7),
    "ddim-clip-sample": (DDIMScheduler, dict(prediction_type="sample", clip_sample_range=1.5), 8, 0.3),
    "ddim-v-zero-snr": (DDIMScheduler, dict(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                            timestep_spacing="trailing", clip_sample=True), 10, 0.0),
    "euler": (EulerDiscreteScheduler, dict(**SD, timestep_spacing="leading", steps_offset=1), 12, 0.0),
    "euler-v-karras": (EulerDiscreteScheduler, dict(**SD, prediction_type="v_prediction", use_karras_sigmas=True),
                       10, 0.0),
    "euler-sample": (EulerDiscreteScheduler, dict(prediction_type="sample", final_sigmas_type="sigma_min"), 7, 0.0),
    "dpm++2m": (DPMSolverMultistepScheduler, dict(**SD), 12, 0.0),
    "dpm++2m-heun-karras": (DPMSolverMultistepScheduler, dict(**SD, solver_type="heun", use_karras_sigmas=True),
                            16, 0.0),
    "dpm++2m-v-second-order-to-the-end": (
        DPMSolverMultistepScheduler, dict(prediction_type="v_prediction", final_sigmas_type="sigma_min",
                                          lower_order_final=False), 8, 0.0),
    "dpm++2m-sample": (DPMSolverMultistepScheduler, dict(prediction_type="sample"), 6, 0.0),
    "dpm++2m-flow": (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                       flow_shift=3.0), 9, 0.0),
    "dpm++1": (DPMSolverMultistepScheduler, dict(**SD, solver_order=1), 6, 0.0),
    "flow-match": (FlowMatchEulerDiscreteScheduler, dict(shift=3.0), 10, 0.0),
    "flow-match-default": (FlowMatchEulerDiscreteScheduler, dict(), 7, 0.0),
}

GPU = DEVICE == "cuda"
BACKENDS = ["triton", "torch", "cuda-host"] + (["cuda"] if GPU else [])


@pytest.fixture(params=BACKENDS)
def impl(request, monkeypatch):
    """(backend, device): "cuda-host" runs csrc/'s element code on the host (tests/csrc_build.py)."""
    if request.param == "cuda-host":
        emulate_cuda_backend(monkeypatch)
        return "cuda", "cpu"
    return request.param, DEVICE


def make_scheduler(name):
    cls, config, steps, eta = CONFIGS[name]
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    return scheduler, eta


def diffusers_step(scheduler, guided, t, x, eta, noise):
    kwargs = dict(eta=eta, variance_noise=noise) if isinstance(scheduler, DDIMScheduler) and eta > 0 else {}
    return scheduler.step(guided, t, x, **kwargs).prev_sample


def per_row_guidance(rows, device):
    return (1.0 + 9.0 * torch.rand(rows)).to(device)


def guided_of(e_u, e_c, g):
    return e_u + g.to(e_u.dtype).view(-1, *([1] * (e_u.dim() - 1))) * (e_c - e_u)


def assert_same_state(ours, theirs):
    assert ours.__dict__.get("_step_index") == theirs.__dict__.get("_step_index")
    if isinstance(ours, DPMSolverMultistepScheduler):
        assert ours.lower_order_nums == theirs.lower_order_nums
        for a, b in zip(ours.model_outputs, theirs.model_outputs):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and rel_err(a, b) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_run_matches_diffusers_fp32(name, impl):
    backend, device = impl
    theirs, eta = make_scheduler(name)
    ours = copy.deepcopy(theirs)
    fused = FusedStep(ours, eta=eta, backend=backend)
    shape = (3, 4, 13, 11)  # 3 rows (layers), 572 elements a row: a tail in the block
    x_theirs = (torch.randn(shape) * getattr(theirs, "init_noise_sigma", 1.0)).to(device)
    x_ours = x_theirs.clone()
    g = per_row_guidance(shape[0], device)
    for t in theirs.timesteps:
        e_u, e_c = torch.randn(shape, device=device), torch.randn(shape, device=device)
        noise = torch.randn(shape, device=device) if eta > 0 else None
        x_theirs = diffusers_step(theirs, guided_of(e_u, e_c, g), t, x_theirs, eta, noise)
        x_ours = fused.step(e_u, e_c, t, x_ours, g, noise=noise)
        assert_close(f"{name} t={int(t)}", x_ours, x_theirs, torch.float32)
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("name", ["ddim-eta", "euler-v-karras", "dpm++2m", "dpm++2m-flow", "flow-match"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_steps_against_float64(name, dtype, impl):
    """Each step within the dtype's tolerance of a float64 evaluation, and within 2x diffusers' own error."""
    backend, device = impl
    scheduler, eta = make_scheduler(name)
    fused = FusedStep(scheduler, eta=eta, backend=backend)
    shape = (2, 4, 9, 15)
    x = (torch.randn(shape) * getattr(scheduler, "init_noise_sigma", 1.0)).to(device, dtype)
    g = per_row_guidance(shape[0], device)
    for t in scheduler.timesteps:
        e_u, e_c = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
        noise = torch.randn(shape, device=device).to(dtype) if eta > 0 else None
        as64 = [None if v is None else v.double() for v in (e_u, e_c, x, noise)]
        truth = FusedStep(copy.deepcopy(scheduler), eta=eta, backend="torch").step(
            as64[0], as64[1], t, as64[2], g.double(), noise=as64[3])
        theirs = diffusers_step(copy.deepcopy(scheduler), guided_of(e_u, e_c, g), t, x, eta, noise)
        x = fused.step(e_u, e_c, t, x, g, noise=noise)
        assert x.dtype == dtype
        assert_close(f"{name} t={float(t):.1f}", x, truth, dtype)
        assert rel_err(x, truth) <= 2 * rel_err(theirs, truth) + 1e-6, \
            f"{name} t={float(t):.1f}: {rel_err(x, truth):.2e} vs diffusers' {rel_err(theirs, truth):.2e}"


@pytest.mark.parametrize("shape", [(1, 1), (5, 3, 1, 7), (2, 4, 33, 31), (3, 16, 4, 4, 2)])
def test_odd_shapes_and_rows_longer_than_a_block(shape, impl):
    backend, device = impl
    theirs, _ = make_scheduler("dpm++2m")
    fused = FusedStep(copy.deepcopy(theirs), backend=backend)
    x_theirs = torch.randn(shape, device=device)
    x_ours = x_theirs.clone()
    for t in theirs.timesteps[:3]:
        e_u, e_c = torch.randn(shape, device=device), torch.randn(shape, device=device)
        x_theirs = theirs.step(guided_of(e_u, e_c, torch.full((shape[0],), 7.5)), t, x_theirs).prev_sample
        x_ours = fused.step(e_u, e_c, t, x_ours, 7.5)
        assert_close(f"{shape} t={int(t)}", x_ours, x_theirs, torch.float32)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_random_shapes_against_float64(data):
    """Triton kernels on drawn shapes, schedulers, positions in the run, dtypes and blends."""
    draw = data.draw
    name = draw(st.sampled_from(list(CONFIGS)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    rows = draw(st.integers(1, 5))
    shape = (rows,) + tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    scheduler, eta = make_scheduler(name)
    steps_before = draw(st.integers(0, len(scheduler.timesteps) - 1))
    device = DEVICE
    x = torch.randn(shape, device=device).to(dtype)
    warmup = FusedStep(scheduler, eta=eta, backend="torch")
    for t in scheduler.timesteps[:steps_before]:
        noise = torch.randn(shape, device=device).to(dtype) if eta > 0 else None
        x = warmup.step(torch.randn_like(x), torch.randn_like(x), t, x, 4.0, noise=noise)
    t = scheduler.timesteps[steps_before]
    e_u, e_c, noise = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    g = per_row_guidance(rows, device) if draw(st.booleans()) else 6.5
    known = None
    if draw(st.booleans()):
        mask = torch.rand((rows, 1) + shape[2:], device=device).to(dtype)
        known = KnownRegion(torch.randn_like(x), mask, torch.randn_like(x))
    noise = noise if eta > 0 else None

    def as64(v):
        return v.double() if isinstance(v, torch.Tensor) else v

    truth = FusedStep(copy.deepcopy(scheduler), eta=eta, backend="torch").step(
        *(as64(v) for v in (e_u, e_c, t, x, g)), noise=as64(noise),
        known_region=None if known is None else KnownRegion(*(v.double() for v in known)))
    out = FusedStep(scheduler, eta=eta, backend="triton").step(
        e_u, e_c, t, x, g, noise=noise, known_region=known)
    assert_close(f"{name} {shape} step {steps_before}", out, truth, dtype)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "flow-match"])
@pytest.mark.parametrize("mask_channels", [1, 4])
def test_known_region_blend_matches_the_inpainting_pipeline(name, mask_channels, impl):
    """diffusers' SD inpainting loop for 4-channel UNets: step, then blend in the noised known latents."""
    backend, device = impl
    theirs, eta = make_scheduler(name)
    fused = FusedStep(copy.deepcopy(theirs), backend=backend)
    shape = (3, 4, 11, 9)
    known = torch.randn(shape, device=device)
    known_noise = torch.randn(shape, device=device)
    mask = (torch.rand(shape[0], mask_channels, *shape[2:], device=device) > 0.4).float()
    mask[mask == 0] = torch.rand(int((mask == 0).sum())).to(device) * 0.3  # feathered edges too
    x_theirs = torch.randn(shape, device=device) * getattr(theirs, "init_noise_sigma", 1.0)
    x_ours = x_theirs.clone()
    g = per_row_guidance(shape[0], device)
    timesteps = theirs.timesteps
    for i, t in enumerate(timesteps):
        e_u, e_c = torch.randn(shape, device=device), torch.randn(shape, device=device)
        x_theirs = theirs.step(guided_of(e_u, e_c, g), t, x_theirs).prev_sample
        proper = known
        if i < len(timesteps) - 1:
            t_next = torch.tensor([timesteps[i + 1]])
            if isinstance(theirs, FlowMatchEulerDiscreteScheduler):
                proper = theirs.scale_noise(known, t_next, known_noise)
            else:
                proper = theirs.add_noise(known, known_noise, t_next)
        x_theirs = (1 - mask) * proper + mask * x_theirs
        x_ours = fused.step(e_u, e_c, t, x_ours, g, known_region=KnownRegion(known, mask, known_noise))
        assert_close(f"{name} step {i}", x_ours, x_theirs, torch.float32)


@pytest.mark.parametrize("name", ["dpm++2m", "euler", "flow-match"])
def test_switching_between_fused_and_diffusers_mid_run(name, impl):
    backend, device = impl
    reference, _ = make_scheduler(name)
    mixed = copy.deepcopy(reference)
    fused = FusedStep(mixed, backend=backend)
    shape = (2, 4, 7, 5)
    x_ref = torch.randn(shape, device=device)
    x_mix = x_ref.clone()
    g = per_row_guidance(shape[0], device)
    for i, t in enumerate(reference.timesteps):
        e_u, e_c = torch.randn(shape, device=device), torch.randn(shape, device=device)
        x_ref = reference.step(guided_of(e_u, e_c, g), t, x_ref).prev_sample
        if i % 3 == 1:  # diffusers takes every third step, reading and extending the fused steps' history
            x_mix = mixed.step(guided_of(e_u, e_c, g), t, x_mix).prev_sample
        else:
            x_mix = fused.step(e_u, e_c, t, x_mix, g)
        assert_close(f"{name} step {i}", x_mix, x_ref, torch.float32)
    assert_same_state(mixed, reference)


@pytest.mark.parametrize("name", ["ddim-eta", "dpm++2m", "euler", "flow-match"])
def test_every_output_element_is_written(name, impl):
    backend, device = impl
    scheduler, eta = make_scheduler(name)
    fused = FusedStep(scheduler, eta=eta, backend=backend)
    shape = (3, 4, 10, 13)
    x = torch.randn(shape, device=device)
    with poison_outputs():
        for t in scheduler.timesteps[:3]:
            noise = torch.randn(shape, device=device) if eta > 0 else None
            x = fused.step(torch.randn_like(x), torch.randn_like(x), t, x, per_row_guidance(3, device), noise=noise)
            assert not x.isnan().any()
    for history in getattr(scheduler, "model_outputs", []):
        assert history is None or not history.isnan().any()


def test_dpm_solver_history_is_stored_in_the_latents_dtype(impl):
    backend, device = impl
    scheduler, _ = make_scheduler("dpm++2m")
    fused = FusedStep(scheduler, backend=backend)
    x = torch.randn(2, 4, 6, 6, device=device, dtype=torch.float16)
    for t in scheduler.timesteps[:2]:
        x = fused.step(torch.randn_like(x), torch.randn_like(x), t, x, 5.0)
    assert [h.dtype for h in scheduler.model_outputs] == [torch.float16, torch.float16]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_launch_per_step(name):
    scheduler, eta = make_scheduler(name)
    fused = FusedStep(scheduler, eta=eta, backend="triton")
    shape = (4, 4, 8, 8)
    x = torch.randn(shape)
    for t in scheduler.timesteps:
        noise = torch.randn(shape) if eta > 0 else None
        with record_launches() as launches:
            fused.step(torch.randn(shape), torch.randn(shape), t, x, per_row_guidance(4, "cpu"), noise=noise)
        assert len(launches) == 1


# ---------------------------------------------------------------- errors
UNSUPPORTED = {
    "pndm": lambda: PNDMScheduler(),
    "unipc": lambda: UniPCMultistepScheduler(),
    "euler-ancestral": lambda: EulerAncestralDiscreteScheduler(),
    "sde-dpmsolver++": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    "dpmsolver": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    "dpm-order-3": lambda: DPMSolverMultistepScheduler(solver_order=3),
    "dpm-thresholding": lambda: DPMSolverMultistepScheduler(thresholding=True),
    "dpm-learned-variance": lambda: DPMSolverMultistepScheduler(variance_type="learned_range"),
    "ddim-thresholding": lambda: DDIMScheduler(thresholding=True),
    "flow-stochastic": lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    "ddim-subclass": lambda: type("MyDDIM", (DDIMScheduler,), {})(),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_schedulers_name_what_is_supported(name):
    with pytest.raises(ValueError, match="^scheduler: .*FusedStep supports: DDIMScheduler"):
        FusedStep(UNSUPPORTED[name]())


def test_bad_arguments_raise_value_errors_naming_the_argument():
    scheduler, _ = make_scheduler("ddim")
    fused = FusedStep(scheduler, backend="torch")
    t = scheduler.timesteps[0]
    x = torch.randn(2, 4, 5, 5)
    e = torch.randn_like(x)
    cases = [
        (lambda: fused.step(e[:1], e, t, x, 7.5), "^noise_uncond: shape"),
        (lambda: fused.step(e, e.half(), t, x, 7.5), "^noise_cond: dtype"),
        (lambda: fused.step(e.int(), e, t, x.int(), 7.5), "^latents: dtype"),
        (lambda: fused.step(e[0, 0, 0], e[0, 0, 0], t, x[0, 0, 0], 7.5), "^latents: expected"),
        (lambda: fused.step(e, e, t, x, torch.ones(3)), "^guidance_scale: expected"),
        (lambda: fused.step(e, e, t, x, "7.5"), "^guidance_scale: expected"),
        (lambda: fused.step(e, e, t, x, 7.5, known_region=KnownRegion(x, x[:, :2], x)), "^known_region.mask: shape"),
        (lambda: fused.step(e, e, t, x, 7.5, known_region=KnownRegion(x.half(), x[:, :1], x)),
         "^known_region.latents: dtype"),
        (lambda: fused.step(e, e, 5000, x, 7.5), "^timestep: "),
        (lambda: FusedStep(scheduler, backend="jax"), "^backend: must be one of"),
        (lambda: FusedStep(make_scheduler("euler")[0], eta=0.5), "^eta: only DDIMScheduler"),
        (lambda: FusedStep(scheduler, eta=-1.0), "^eta: must be >= 0"),
        (lambda: FusedStep(scheduler, eta=0.5, backend="torch").step(e, e, t, x, 7.5), "^noise: DDIM with eta > 0"),
        (lambda: FusedStep(make_scheduler("euler")[0]).step(e, e, 1.0, x, 7.5, noise=e),
         "^noise: EulerDiscreteScheduler's step takes no noise"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_stepping_before_set_timesteps_or_past_the_end():
    with pytest.raises(ValueError, match="^scheduler: call set_timesteps"):
        FusedStep(EulerDiscreteScheduler()).step(*(torch.randn(1, 4) for _ in range(2)), 999.0, torch.randn(1, 4), 1.0)
    with pytest.raises(ValueError, match="^scheduler: call set_timesteps"):
        FusedStep(DDIMScheduler()).step(*(torch.randn(1, 4) for _ in range(2)), 999, torch.randn(1, 4), 1.0)
    scheduler, _ = make_scheduler("flow-match")
    fused = FusedStep(scheduler, backend="torch")
    x = torch.randn(1, 4)
    for t in scheduler.timesteps:
        x = fused.step(torch.randn_like(x), torch.randn_like(x), t, x, 1.0)
    with pytest.raises(ValueError, match="^timestep: the scheduler has run all"):
        fused.step(torch.randn_like(x), torch.randn_like(x), scheduler.timesteps[-1], x, 1.0)


@pytest.mark.skipif(GPU, reason="checks the message on machines without a CUDA device")
def test_cuda_backend_says_it_is_unavailable_without_a_gpu():
    scheduler, _ = make_scheduler("euler")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="^backend: 'cuda' is unavailable: "):
        FusedStep(scheduler, backend="cuda").step(x, x, scheduler.timesteps[0], x, 7.5)


@pytest.mark.parametrize("name", ["ddim-clip-sample", "ddim-v-zero-snr"])
def test_clipping_keeps_a_nan_as_diffusers_does(name, impl):
    """torch.clamp keeps NaN; min/max would turn a diverged latent into a finite, healthy-looking one."""
    backend, device = impl
    theirs, eta = make_scheduler(name)
    fused = FusedStep(copy.deepcopy(theirs), eta=eta, backend=backend)
    x = torch.randn(2, 4, 5, 7, device=device)
    x[0, 1, 2, 3] = float("nan")
    e_u, e_c = torch.randn_like(x), torch.randn_like(x)
    noise = torch.randn_like(x) if eta > 0 else None
    t = theirs.timesteps[0]
    expected = diffusers_step(theirs, guided_of(e_u, e_c, torch.full((2,), 3.0)), t, x, eta, noise)
    got = fused.step(e_u, e_c, t, x, 3.0, noise=noise)
    assert expected[0, 1, 2, 3].isnan() and got[0, 1, 2, 3].isnan()
    finite = ~expected.isnan()
    assert (got.isnan() == ~finite).all()
    assert_close(name, got[finite], expected[finite], torch.float32)


def test_ddim_steps_off_the_grid_like_diffusers(impl):
    """DDIM's step() takes any timestep; only the known-region blend needs the schedule's next one."""
    backend, device = impl
    theirs, _ = make_scheduler("ddim")
    fused = FusedStep(copy.deepcopy(theirs), backend=backend)
    t = int(theirs.timesteps[3]) + 7
    assert t not in theirs.timesteps.tolist()
    x = torch.randn(3, 4, 6, 5, device=device)
    e_u, e_c = torch.randn_like(x), torch.randn_like(x)
    expected = diffusers_step(theirs, guided_of(e_u, e_c, torch.full((3,), 5.0)), t, x, 0.0, None)
    assert_close("off-grid", fused.step(e_u, e_c, t, x, 5.0), expected, torch.float32)
    known = KnownRegion(torch.randn_like(x), (torch.rand(3, 1, 6, 5, device=device) > 0.5).float(), torch.randn_like(x))
    with pytest.raises(ValueError, match="^timestep: .* known-region blend"):
        fused.step(e_u, e_c, t, x, 5.0, known_region=known)
