"""The CUDA C++ kernels of csrc/, loaded with ctypes (``backend="cuda"``).

Build the library once with ``make -C csrc`` (needs nvcc; writes
csrc/build/libmild_kernels_cuda.so) or point ``MILD_KERNELS_CUDA_LIB`` at a built copy.
The structures below mirror csrc/mild_kernels.h field for field; tests/test_csrc.py
checks the layouts against the C header.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from ._checks import require

CSRC = Path(__file__).resolve().parents[1] / "csrc"
LIBRARY_NAME = "libmild_kernels_cuda.so"
BUILD_COMMAND = "make -C csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def library_path() -> Path:
    return Path(os.environ.get("MILD_KERNELS_CUDA_LIB", CSRC / "build" / LIBRARY_NAME))


class StepIO(ctypes.Structure):
    _fields_ = [
        ("noise_uncond", ctypes.c_void_p), ("noise_cond", ctypes.c_void_p), ("latents", ctypes.c_void_p),
        ("guidance", ctypes.c_void_p), ("guidance_scale", ctypes.c_float), ("out", ctypes.c_void_p),
        ("known", ctypes.c_void_p), ("known_noise", ctypes.c_void_p), ("known_mask", ctypes.c_void_p),
        ("known_scale", ctypes.c_float), ("noise_scale", ctypes.c_float),
        ("rows", ctypes.c_int64), ("row_numel", ctypes.c_int64), ("mask_row_numel", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
    ]


class DDIMStep(ctypes.Structure):
    _fields_ = [
        ("prediction", ctypes.c_int32), ("clip", ctypes.c_int32), ("sqrt_alpha", ctypes.c_float),
        ("sqrt_beta", ctypes.c_float), ("sqrt_alpha_prev", ctypes.c_float), ("direction", ctypes.c_float),
        ("noise_std", ctypes.c_float), ("clip_range", ctypes.c_float), ("noise", ctypes.c_void_p),
    ]


class EulerStep(ctypes.Structure):
    _fields_ = [
        ("prediction", ctypes.c_int32), ("sigma_hat", ctypes.c_float), ("dt", ctypes.c_float),
        ("v_out_scale", ctypes.c_float), ("v_skip_divisor", ctypes.c_float),
    ]


class DPMSolverStep(ctypes.Structure):
    _fields_ = [
        ("prediction", ctypes.c_int32), ("second_order", ctypes.c_int32), ("x0_alpha", ctypes.c_float),
        ("x0_sigma", ctypes.c_float), ("sample_scale", ctypes.c_float), ("d0_scale", ctypes.c_float),
        ("d1_scale", ctypes.c_float), ("inv_r0", ctypes.c_float), ("previous_x0", ctypes.c_void_p),
        ("x0_out", ctypes.c_void_p),
    ]


class FlowMatchStep(ctypes.Structure):
    _fields_ = [("dt", ctypes.c_float)]


class CompositeIO(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_void_p), ("alphas", ctypes.c_void_p), ("original", ctypes.c_void_p),
        ("region", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("num_layers", ctypes.c_int64), ("batch", ctypes.c_int64), ("channels", ctypes.c_int64),
        ("pixels", ctypes.c_int64), ("dtype", ctypes.c_int32), ("mask_dtype", ctypes.c_int32),
    ]


STEP_ENTRY_POINTS = {
    "mild_ddim_step": DDIMStep, "mild_euler_step": EulerStep,
    "mild_dpm_solver_step": DPMSolverStep, "mild_flow_match_step": FlowMatchStep,
}


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of every entry point of a loaded library."""
    for name, step_type in STEP_ENTRY_POINTS.items():
        entry = getattr(library, name)
        entry.argtypes = [ctypes.POINTER(StepIO), ctypes.POINTER(step_type), ctypes.c_void_p]
        entry.restype = ctypes.c_int
    library.mild_composite_layers.argtypes = [ctypes.POINTER(CompositeIO), ctypes.c_void_p]
    library.mild_composite_layers.restype = ctypes.c_int
    library.mild_error_string.argtypes = [ctypes.c_int]
    library.mild_error_string.restype = ctypes.c_char_p
    return library


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    return declare(ctypes.CDLL(path))


def unavailable_reason(device: torch.device) -> str | None:
    """Why backend="cuda" cannot run on ``device`` here, or None when it can."""
    if device.type != "cuda":
        return f"it runs on CUDA tensors, got {device} tensors"
    if not torch.cuda.is_available():
        return "this machine has no usable CUDA device"
    path = library_path()
    if not path.exists():
        return f"{path} is not built; build it with `{BUILD_COMMAND}` (needs nvcc)"
    return None


def library(device: torch.device) -> ctypes.CDLL:
    """The loaded library, or a ValueError saying why backend="cuda" is unavailable."""
    reason = unavailable_reason(device)
    require(reason is None, f"backend: 'cuda' is unavailable: {reason}")
    return _load(str(library_path()))


def pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def call(entry, device: torch.device, *structures) -> None:
    """Run one entry point on the current stream of ``device``; raise on a CUDA error."""
    with torch.cuda.device(device):
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        code = entry(*(ctypes.byref(s) for s in structures), stream)
    if code != 0:
        message = _load(str(library_path())).mild_error_string(code).decode()
        raise RuntimeError(f"{entry.__name__}: CUDA error {code}: {message}")
