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


@pytest.fixture(params=["torch", "torch-portable", "triton"])
def backend(request, monkeypatch):
    """The SMA backend under test; torch-portable is the torch backend without aten's fused CPU kernel."""
    if request.param == "torch-portable":
        from mild_kernels.sma import torch_chunked

        monkeypatch.setattr(torch_chunked, "USE_FUSED_CPU", False)
        return "torch"
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh but reproducible seed per test: inputs differ across tests, failures replay.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- compile gate
# The ahead-of-time compile gate takes minutes of CPU: start it as soon as the session
# knows it will run, in a subprocess beside the interpreter tests (see test_compile_gate.py).
_GATE = {}


def pytest_collection_modifyitems(session, config, items):
    gate_items = [item for item in items if item.nodeid.startswith("tests/test_compile_gate.py")]
    if gate_items:
        # Last, so that the interpreter tests run while the gate compiles on the other core.
        items[:] = [item for item in items if item not in gate_items] + gate_items
        import subprocess
        import sys
        import tempfile

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        report = Path(tempfile.mkdtemp()) / "compile_gate.json"
        gate = Path(__file__).with_name("compile_gate.py")
        _GATE["report"] = report
        _GATE["proc"] = subprocess.Popen([sys.executable, str(gate), "--json", str(report), "--workers", "1"],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture(scope="session")
def compile_gate_run():
    """(return code, printed report, rows) of the compile-gate subprocess started at collection."""
    import json

    proc = _GATE["proc"]
    output, _ = proc.communicate(timeout=3600)
    rows = json.loads(_GATE["report"].read_text()) if _GATE["report"].exists() else []
    return proc.returncode, output, rows
