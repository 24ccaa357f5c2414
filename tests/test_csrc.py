"""csrc/ builds with nvcc for sm_80 and sm_90a, and its C API matches what cuda_lib.py sends."""

import ctypes
import re
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from csrc_build import ROOT, build_library, emulate_cuda_backend, find_nvcc
from mild_kernels import FusedStep, cuda_lib

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")


def cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


@needs_nvcc
def test_csrc_compiles_for_sm80_and_sm90a(tmp_path):
    result = build_library(tmp_path)
    assert result.returncode == 0, f"make -C csrc failed:\n{result.stdout}\n{result.stderr}"
    library = tmp_path / cuda_lib.LIBRARY_NAME
    listing = subprocess.run([cuobjdump(), "--list-elf", str(library)], capture_output=True, text=True).stdout
    assert "sm_80" in listing and "sm_90a" in listing, listing
    usage = subprocess.run([cuobjdump(), "--dump-resource-usage", str(library)], capture_output=True, text=True).stdout
    spills = [int(n) for n in re.findall(r"\b(?:LOCAL|STACK):(\d+)", usage)]
    assert spills and not any(spills), f"a CUDA kernel spills:\n{usage}"
    # Loading needs no GPU: the CUDA runtime is linked statically and starts on the first call.
    cuda_lib.declare(ctypes.CDLL(str(library)))


LAYOUT_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include "mild_kernels.h"
#define FIELD(type, field) printf(#type " " #field " %zu %zu\n", offsetof(type, field), sizeof(((type*)0)->field));
#define SIZE(type) printf(#type " sizeof %zu 0\n", sizeof(type));
int main(void) {
BODY
  return 0;
}
"""

STRUCTURES = {
    "MildStepIO": cuda_lib.StepIO, "MildDDIMStep": cuda_lib.DDIMStep, "MildEulerStep": cuda_lib.EulerStep,
    "MildDPMSolverStep": cuda_lib.DPMSolverStep, "MildFlowMatchStep": cuda_lib.FlowMatchStep,
    "MildCompositeIO": cuda_lib.CompositeIO,
}


@needs_nvcc
def test_ctypes_structures_match_the_c_header(tmp_path):
    lines = []
    for c_name, structure in STRUCTURES.items():
        lines += [f"  FIELD({c_name}, {name})" for name, _ in structure._fields_] + [f"  SIZE({c_name})"]
    source = tmp_path / "layout.cu"
    source.write_text(LAYOUT_PROGRAM.replace("BODY", "\n".join(lines)))
    program = tmp_path / "layout"
    build = subprocess.run([find_nvcc(), "-I", str(ROOT / "csrc"), "-o", str(program), str(source)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    printed = subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout.splitlines()
    c_layout = {(t, f): (int(o), int(s)) for t, f, o, s in (line.split() for line in printed)}
    for c_name, structure in STRUCTURES.items():
        assert c_layout[(c_name, "sizeof")][0] == ctypes.sizeof(structure), c_name
        for name, _ in structure._fields_:
            field = getattr(structure, name)
            assert c_layout[(c_name, name)] == (field.offset, field.size), f"{c_name}.{name}"


@pytest.mark.parametrize("dtype,shape,width", [
    (torch.float32, (2, 4, 6, 6), 4), (torch.float16, (2, 4, 6, 6), 8), (torch.bfloat16, (2, 4, 6, 6), 8),
    (torch.float32, (2, 3, 5, 7), 1), (torch.float16, (2, 4, 5, 5), 1),
])
def test_cuda_kernels_take_16_byte_accesses_when_rows_allow(dtype, shape, width, monkeypatch):
    library = emulate_cuda_backend(monkeypatch)
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(4)
    fused = FusedStep(scheduler, backend="cuda")
    x = torch.randn(shape).to(dtype)
    fused.step(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), scheduler.timesteps[0], x, 3.0)
    assert library.mild_host_last_vector_width() == width
