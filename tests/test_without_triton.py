"""Where triton is not installed (setup.py installs it on Linux only) every op runs on the torch
backend, hard and soft regions, forward and backward, and nothing imports triton."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import importlib.abc
    import sys

    class HideTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, HideTriton())
    import torch
    from diffusers import DDIMScheduler
    from mild_kernels import (FusedStep, composite_layers, multi_lora_linear, prepare_regions, sma_attention,
                              sma_attention_reference, soft_regions)

    q = torch.randn(2, 2, 50, 16, requires_grad=True)
    for regions in (torch.randint(0, 3, (50,)), soft_regions(torch.rand(2, 10, 5), (10, 5))):
        bias = torch.randn(3, 3)
        out = sma_attention(q, q, q, regions, regions, bias)
        ref = sma_attention_reference(q.double(), q.double(), q.double(), regions, regions, bias.double())
        assert ((out - ref).norm() / ref.norm()) < 1e-5
        out.sum().backward()
        layout = prepare_regions(regions, sort=True)
        sorted_q = layout.sort(q.detach())
        mass = sma_attention(sorted_q, sorted_q, sorted_q, layout=layout, return_region_mass=True).region_mass
        assert mass.isfinite().all()
    x = torch.randn(2, 5, 8, requires_grad=True)
    multi_lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 3, 8), torch.randn(2, 4, 3), [0, 1]).sum().backward()
    composite_layers(torch.rand(2, 1, 3, 4, 4), torch.rand(2, 1, 1, 4, 4), torch.rand(1, 3, 4, 4),
                     torch.rand(1, 1, 4, 4))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(5)
    FusedStep(scheduler).step(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), scheduler.timesteps[0],
                              torch.randn(2, 4, 3, 3), 3.0)
    from mild_kernels.sma.configs import backward_config, forward_config  # choosing a config needs no triton
    assert forward_config(80, torch.float16, False, 3, torch.device("cpu")).pure.block_m >= 16
    assert backward_config(80, torch.float16, False, 3, torch.device("cpu")).dkdv.block_n >= 16
    assert "triton" not in sys.modules
    print("ran without triton")
''')


def test_every_op_runs_on_the_torch_backend_without_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ran without triton")
