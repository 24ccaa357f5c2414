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


@pytest.mark.parametrize("arch, table", [(70, 80), (75, 80), (80, 80), (86, 80), (87, 80), (89, 80), (90, 90),
                                         (100, 90), (103, 90), (120, 80), (121, 80), (130, 80)])
def test_every_architecture_takes_a_stated_table(arch, table):
    """Ada (sm_89) and consumer Blackwell (sm_120) have mma.sync and no wgmma: Ampere's table, as
    configs.TABLE_OF_ARCH states; an unlisted architecture takes its nearest listed one below."""
    from mild_kernels.sma.configs import TABLE_OF_ARCH, table_arch

    assert table_arch(arch) == table
    assert set(TABLE_OF_ARCH.values()) == {80, 90}


def test_one_backend_policy_for_every_op(monkeypatch):
    """_backends.choose_backend decides for all four ops: "auto" takes Triton on CUDA tensors
    unless the interpreter runs or the kernel refuses the call, then the CUDA library where the op
    has one, then torch; an explicit backend the op lacks, or one refused, is a ValueError."""
    import torch

    from mild_kernels import _backends

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_backends, "interpreting", lambda: False)
    monkeypatch.setattr(_backends, "triton_available", lambda: True)
    monkeypatch.setattr(_backends, "triton_runs_on", lambda device: True)
    assert _backends.choose_backend("auto", cuda, offered=("triton", "torch")) == "triton"
    assert _backends.choose_backend("auto", cuda, offered=("triton", "torch"), triton_refusal="too big") == "torch"
    assert _backends.choose_backend("auto", cpu) == "torch"
    monkeypatch.setattr(_backends.cuda_lib, "unavailable_reason", lambda device: None)
    assert _backends.choose_backend("auto", cuda, triton_refusal="too big") == "cuda"
    assert _backends.choose_backend("auto", cuda, offered=("triton", "torch"), triton_refusal="too big") == "torch"
    monkeypatch.setattr(_backends, "interpreting", lambda: True)  # the interpreter runs only when asked by name
    assert _backends.choose_backend("auto", cuda) == "cuda"
    with pytest.raises(ValueError, match=r"^backend: must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        _backends.choose_backend("cuda", cuda, offered=("triton", "torch"))
    with pytest.raises(ValueError, match="^lora_a: rank 65"):
        _backends.choose_backend("triton", cuda, offered=("triton", "torch"), triton_refusal="lora_a: rank 65")


def test_every_op_refuses_a_backend_it_does_not_have():
    import torch
    from diffusers import DDIMScheduler

    from mild_kernels import FusedStep, composite_layers, multi_lora_linear, sma_attention

    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match=r"^backend: must be one of \('auto', 'triton', 'torch'\)"):
        sma_attention(q, q, q, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: must be one of \('auto', 'triton', 'torch'\)"):
        multi_lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(1, 2, 8), torch.randn(1, 4, 2),
                          [0, 0], backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: must be one of \('auto', 'triton', 'cuda', 'torch'\)"):
        FusedStep(DDIMScheduler(), backend="numpy")
    with pytest.raises(ValueError, match=r"^backend: must be one of \('auto', 'triton', 'cuda', 'torch'\)"):
        composite_layers(torch.rand(2, 1, 3, 4, 4), torch.rand(2, 1, 1, 4, 4), torch.rand(1, 3, 4, 4),
                         torch.rand(1, 1, 4, 4), backend="numpy")
