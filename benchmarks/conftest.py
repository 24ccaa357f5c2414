"""pytest-benchmark runs of the microbenchmarks (benchmarks/test_microbenchmarks.py).

    pytest benchmarks --benchmark-only                       # tiny shapes on the CPU, SD shapes on a GPU
    pytest benchmarks --benchmark-only --bench-shapes full   # the CLI benchmarks' full grids
    pytest benchmarks --benchmark-only --bench-shapes flux   # attention at FLUX.1's joint shape (sd3: SD3's)
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep this run in .benchmarks/ ...
    pytest benchmarks --benchmark-only --benchmark-compare   # ... and compare the next one with it
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", choices=("quick", "full", "flux", "sd3"), default=None,
                     help="microbenchmark grids: quick (tiny shapes; the CPU default, CI), full (the GPU default), "
                          "or flux / sd3 (full grids, attention at those transformers' joint shapes)")
