"""Test setup. TRITON_INTERPRET must be set before anything imports triton."""

import os
import zlib
from pathlib import Path


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


if not _has_nvidia_gpu():
    # CPU-only machine: run every Triton kernel through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mild_kernels._runtime import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh but reproducible seed per test: inputs differ across tests, failures replay.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
