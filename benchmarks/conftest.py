"""pytest-benchmark runs of the microbenchmarks (benchmarks/test_microbenchmarks.py).

    pytest benchmarks --benchmark-only                       # tiny shapes on the CPU, SD shapes on a GPU
    pytest benchmarks --benchmark-only --bench-shapes full   # the CLI benchmarks' full grids
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep this run in .benchmarks/ ...
    pytest benchmarks --benchmark-only --benchmark-compare   # ... and compare the next one with it
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", choices=("quick", "full"), default=None,
                     help="microbenchmark grids: quick (tiny shapes; the CPU default, CI) or full (the GPU default)")
