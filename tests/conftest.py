"""Test setup. TRITON_INTERPRET must be set before anything imports triton."""

import os
import re
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


def pytest_addoption(parser):
    parser.addoption("--full-gate", action="store_true",
                     help="compile every shipped Triton config in the compile gate (default: the quick gate, "
                          "tests/compile_gate.py QUICK_HEAD_DIMS)")


def pytest_collection_modifyitems(session, config, items):
    gate_items = [item for item in items if item.nodeid.startswith("tests/test_compile_gate.py")]
    if gate_items:
        # Last, so that the interpreter tests run while the gate compiles on the other core.
        items[:] = [item for item in items if item not in gate_items] + gate_items
        import subprocess
        import sys
        import tempfile

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        folder = Path(tempfile.mkdtemp())
        gate = Path(__file__).with_name("compile_gate.py")
        _GATE["report"], _GATE["log"] = folder / "compile_gate.json", folder / "compile_gate.log"
        with open(_GATE["log"], "w") as log:  # a file, not a pipe: nothing blocks the gate before it is read
            scope = [] if config.getoption("--full-gate") else ["--quick"]
            alone = len(gate_items) == len(items)  # nothing else to run: every core compiles
            workers = str(os.cpu_count() or 1) if alone else "1"
            _GATE["proc"] = subprocess.Popen([sys.executable, str(gate), "--json", str(_GATE["report"]),
                                              "--workers", workers, *scope], stdout=log, stderr=subprocess.STDOUT,
                                             env=env)


@pytest.fixture(scope="session")
def compile_gate_run(request):
    """(return code, printed report, rows) of the compile-gate subprocess started at collection.

    While the tests wait on it, its progress goes to the terminal every ~20 s, so a cold run
    does not sit silent at [99%].
    """
    import json
    import time

    proc = _GATE["proc"]
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    started = time.monotonic()

    def report_progress():
        counts = re.findall(r"^\[(\d+)/(\d+)\]", _GATE["log"].read_text(), re.M)  # a line per compiled kernel
        done, total = counts[-1] if counts else ("0", "?")
        if terminal is not None:
            with capture.global_and_fixture_disabled():
                terminal.write_line(f"compile gate: {done}/{total} Triton kernels compiled for sm_80 and sm_90 "
                                    f"({time.monotonic() - started:.0f} s waited; a cold Triton cache takes minutes)")

    last = started
    while proc.poll() is None:
        time.sleep(1.0)
        if time.monotonic() - last >= 20:
            last = time.monotonic()
            report_progress()
    report_progress()
    output = _GATE["log"].read_text()
    rows = json.loads(_GATE["report"].read_text()) if _GATE["report"].exists() else []
    return proc.returncode, output, rows
