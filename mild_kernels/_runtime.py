"""Where Triton kernels can run, and the one place that launches them.

Every Triton launch in the package goes through :func:`launch`. That gives the
ahead-of-time compile gate (``tests/test_compile_gate.py``) a way to see exactly
the kernels, arguments and configs the wrappers would launch, without a GPU:
inside :func:`record_launches` a launch is recorded instead of run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autocast_inputs(*tensors):
    """The floating tensors in the autocast dtype when ``torch.autocast`` is on for their device,
    as F.linear and SDPA take them there (autocast never casts for custom ops); else unchanged."""
    device_type = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return tensors  # (bad arguments are left to the callers' checks)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def autocast_off(tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``tensor``'s device: inside an op the kernels choose their own precision
    from the input dtypes (their fp32 accumulators and tables must not be cast down)."""
    if not isinstance(tensor, torch.Tensor):
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and (interpreting() or _recorder is not None)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_poison = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every kernel output buffer with NaN (or -1 for integers) before the launch.

    Tests use it to catch elements a kernel never writes.
    """
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. Wrappers allocate every output through this."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return empty(x.shape, dtype=x.dtype, device=x.device)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether a torch path may read tensor values on the host to skip work: on the CPU a read
    costs nothing; on a GPU each one waits for the device (and breaks a CUDA graph), so there
    the torch paths do the skipped work instead."""
    return device.type == "cpu"


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy when its last dim is strided: the kernels' row loads assume
    adjacent elements (any batch, head and token strides are passed to them, even 0)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


@dataclasses.dataclass
class RecordedLaunch:
    kernel: Any
    grid: tuple
    kwargs: dict
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # applies on Hopper (sm_90) and later only, as in launch()

    def options_for(self, arch: int) -> dict:
        """The compile options the launch gives on sm_<arch>, as ``triton.compile`` takes them."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None and arch >= 90:
            options["maxnreg"] = self.maxnreg
        return options


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


_target_arch = 90


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Pick configs for sm_<arch> where no GPU says which (recording, the interpreter): the
    compile gate and the tuner record each architecture's launches under it."""
    global _target_arch
    previous, _target_arch = _target_arch, arch
    try:
        yield
    finally:
        _target_arch = previous


def device_arch(device: torch.device) -> int:
    """The compute capability (90 for sm_90) whose configs a launch on ``device`` takes."""
    if device.type == "cuda" and not interpreting() and _recorder is None:
        return _capability(device.index if device.index is not None else torch.cuda.current_device())
    return _target_arch


_recorder: list | None = None


@contextlib.contextmanager
def record_launches() -> Iterator[list]:
    """Record Triton launches instead of running them (for the compile gate)."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def launch(kernel: Callable, grid: tuple, *, num_warps: int, num_stages: int, maxnreg: int | None = None,
           **kwargs) -> None:
    """Launch (or record) a kernel.

    ``maxnreg`` caps registers a thread on Hopper: 128 lets two 8-warp programs share an SM,
    where ptxas left alone may take a few more and halve occupancy. On sm_80 the same code
    (mma.sync, not wgmma) needs more registers, so the cap applies from sm_90 on.
    """
    recorded = RecordedLaunch(kernel, tuple(grid), kwargs, num_warps, num_stages, maxnreg)
    if _recorder is not None:
        _recorder.append(recorded)
        return
    if interpreting():
        # The interpreter ignores these; some Triton versions reject them.
        kernel[grid](**kwargs)
    else:
        device = next(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
        launch_fitting(recorded, device_arch(device), device.index)


# (kernel, device index, options, constexprs) -> the pipeline stages that fit that device
_fitting_stages: dict = {}


def launch_fitting(recorded: RecordedLaunch, arch: int, device_index) -> None:
    """Launch on the GPU, with fewer software-pipeline stages if the config's shared memory
    does not fit it (Triton's OutOfResources).

    The sm_80 table serves sm_86 and sm_89 (RTX 30xx/40xx), whose blocks get 99 KB of shared
    memory against the A100's 163 KB: 18 of its 250 kernels need more (the compile gate's rows:
    fp16 D=128/160 forwards, the mixed dQ launches), and 15 of those fit with one or two stages
    fewer (static, 2026-12-02). The fitting count is remembered per kernel and config, so only
    the first launch retries; a config that fits with one stage raises as Triton does.
    """
    from triton.runtime.errors import OutOfResources

    options = recorded.options_for(arch)
    constexprs = tuple(sorted((k, v) for k, v in recorded.kwargs.items()  # the kernels' constexprs are upper case
                              if k.isupper() and isinstance(v, (bool, int, float, str))))
    key = (recorded.kernel, device_index, tuple(sorted(options.items())), constexprs)
    stages = _fitting_stages.get(key, options["num_stages"])
    while True:
        try:
            recorded.kernel[recorded.grid](**recorded.kwargs, **{**options, "num_stages": stages})
            _fitting_stages[key] = stages
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1


HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Count every read of a tensor's value on the host, custom ops' insides included
    (tests and the step profiler use it: each read is a GPU sync).

    A dispatch mode does not see inside a custom op; patching the Tensor methods that
    hand a value to Python does (on a GPU each of them is a device sync).
    """
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
