"""Building csrc/ with nvcc for the tests, and running its C API on the host.

``emulate_cuda_backend`` points backend="cuda" at tests/csrc_host_harness.cu, which runs
the CUDA kernels' per-element code on CPU pointers: the whole Python-to-C path and the
kernels' arithmetic are tested on machines without a GPU.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mild_kernels import cuda_lib

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("csrc_host_harness.cu")


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def build_library(build_dir: Path) -> subprocess.CompletedProcess:
    """``make -C csrc`` into build_dir, the documented build."""
    return subprocess.run(["make", "-C", str(ROOT / "csrc"), f"BUILD_DIR={build_dir}", f"NVCC={find_nvcc()}"],
                          capture_output=True, text=True)


@functools.lru_cache(maxsize=None)
def host_harness() -> ctypes.CDLL:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the host harness of csrc/ needs it to build")
    build_dir = tempfile.mkdtemp(prefix="mild_csrc_host_")
    atexit.register(shutil.rmtree, build_dir, ignore_errors=True)
    out = Path(build_dir) / "libmild_host_harness.so"
    command = [nvcc, "-O2", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC,-Wall,-Wno-unknown-pragmas",
               "-Werror", "all-warnings", "-I", str(ROOT / "csrc"), "-shared", "-o", str(out), str(HARNESS)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"host harness failed to build:\n{result.stdout}\n{result.stderr}"
    library = cuda_lib.declare(ctypes.CDLL(str(out)))
    library.mild_host_last_vector_width.restype = ctypes.c_int
    return library


def emulate_cuda_backend(monkeypatch) -> ctypes.CDLL:
    """Make backend="cuda" run csrc/'s element code on the host for CPU tensors."""
    library = host_harness()

    def call(entry, device, *structures):
        code = entry(*(ctypes.byref(s) for s in structures), None)
        assert code == 0, f"{entry.__name__} returned {code}"

    monkeypatch.setattr(cuda_lib, "library", lambda device: library)
    monkeypatch.setattr(cuda_lib, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(cuda_lib, "call", call)
    return library
