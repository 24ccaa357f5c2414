"""Error measures shared by the parity tests."""

import torch

# Relative-error bounds ||out - ref|| / ||ref|| against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the entries where ref is finite; inf if the patterns differ."""
    out, ref = out.double().cpu(), ref.double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    denom = ref[finite].norm().item()
    diff = (out[finite] - ref[finite]).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{name}: NaN in output"
    err = rel_err(out, ref)
    bound = TOLERANCE[dtype] * factor
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"
