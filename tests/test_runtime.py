"""The launch path on a GPU: what it does when a config does not fit the device."""

import pytest


def test_a_config_too_big_for_the_gpu_retries_with_fewer_stages(monkeypatch):
    """sm_86/sm_89 blocks get 99 KB of shared memory, the sm_80 table was sized for 163 KB: a
    launch Triton refuses for shared memory runs with fewer pipeline stages, remembered after."""
    from triton.runtime.errors import OutOfResources

    from mild_kernels import _runtime

    attempts = []

    class Kernel:  # a jit function's launch protocol: kernel[grid](**kwargs, **options)
        def __getitem__(self, grid):
            def run(**kwargs):
                attempts.append(kwargs["num_stages"])
                needed = 40 * 1024 * kwargs["num_stages"] + 20 * 1024
                if needed > 99 * 1024:
                    raise OutOfResources(needed, 99 * 1024, "shared memory")
            return run

    monkeypatch.setattr(_runtime, "_fitting_stages", {})
    recorded = _runtime.RecordedLaunch(Kernel(), (4,), {"BLOCK_M": 128, "Nq": 77}, num_warps=8, num_stages=3)
    _runtime.launch_fitting(recorded, 86, 0)
    assert attempts == [3, 2, 1]
    _runtime.launch_fitting(recorded, 86, 0)  # remembered: the fitting count at once
    assert attempts == [3, 2, 1, 1]
    other = _runtime.RecordedLaunch(Kernel(), (4,), {"BLOCK_M": 64, "Nq": 77}, num_warps=8, num_stages=2)
    _runtime.launch_fitting(other, 86, 0)  # another config starts from its own count
    assert attempts[4:] == [2, 1]

    class Huge(Kernel):
        def __getitem__(self, grid):
            def run(**kwargs):
                attempts.append(kwargs["num_stages"])
                raise OutOfResources(200 * 1024, 99 * 1024, "shared memory")
            return run

    with pytest.raises(OutOfResources):
        _runtime.launch_fitting(_runtime.RecordedLaunch(Huge(), (1,), {}, num_warps=4, num_stages=2), 86, 0)
