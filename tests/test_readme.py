"""The README's API snippet runs as written on this machine (the CPU takes the torch backend)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_snippet_runs_on_this_machine():
    snippet = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert "sma_attention" in snippet and "prepare_regions" in snippet
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    out, res = scope["out"], scope["res"]
    assert out.shape == (2, 8, 4096, 40) and torch.isfinite(out).all()
    assert torch.allclose(res.region_mass.sum(-1), torch.ones(2, 8, 4096), atol=1e-5)
    reference = scope["sma_attention"](scope["q"], scope["k"], scope["v"], scope["regions"], scope["regions"],
                                       scope["bias"], scope["allow"])
    torch.testing.assert_close(out, reference)  # the prepared, sorted call gives the raw call's result
