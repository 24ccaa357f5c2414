"""The public ``sma_attention``: argument checks, layout, and backend choice."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, require
from .._runtime import triton_available, triton_runs_on
from .regions import MAX_REGIONS, Regions, normalize_regions, num_regions_of
from .op import sma_forward

BACKENDS = ("auto", "triton", "torch")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


class SMAOutput(NamedTuple):
    out: torch.Tensor
    lse: torch.Tensor | None
    region_mass: torch.Tensor | None


class SMAInputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_regions: Regions
    k_regions: Regions
    bias: torch.Tensor  # (B|1, H|1, R, R) float
    allow: torch.Tensor | None  # (B|1, R, R) bool
    scale: float
    num_regions: int


def _check_qkv(q, k, v, backend):
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndims=(4,), dtypes=dtypes)
    require(k.dtype == q.dtype and v.dtype == q.dtype, f"k, v: dtypes {k.dtype}, {v.dtype} must match q's {q.dtype}")
    B, H, _, D = q.shape
    require(k.shape[:2] == (B, H), f"k: shape {tuple(k.shape)} must share (B, H) = {(B, H)} with q")
    require(v.shape[:3] == k.shape[:3], f"v: shape {tuple(v.shape)} must match k's (B, H, Nk) = {tuple(k.shape[:3])}")
    require(k.shape[3] == D and v.shape[3] == D, f"k, v: head dims {k.shape[3]}, {v.shape[3]} must equal q's {D}")
    require(MIN_HEAD_DIM <= D <= MAX_HEAD_DIM, f"q: head dim {D} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    require(q.shape[2] > 0 and k.shape[2] > 0, "q, k: need at least one query and one key token")


def _check_bias(bias, batch, heads, num_regions):
    if bias is None:
        return None
    check_tensor("bias", bias, ndims=(2, 3, 4))
    require(bias.is_floating_point(), f"bias: must be a float tensor, got {bias.dtype}")
    R = num_regions
    shapes = {2: (R, R), 3: (heads, R, R), 4: (batch, heads, R, R)}
    require(tuple(bias.shape) == shapes[bias.dim()],
            f"bias: shape {tuple(bias.shape)} must be (R, R), (H, R, R) or (B, H, R, R) with R={R}, H={heads}, B={batch}")
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _check_allow(allow, batch, num_regions):
    if allow is None:
        return None
    check_tensor("allow", allow, ndims=(2, 3), dtypes=(torch.bool,))
    R = num_regions
    shape_ok = tuple(allow.shape[-2:]) == (R, R) and (allow.dim() == 2 or allow.shape[0] == batch)
    require(shape_ok, f"allow: shape {tuple(allow.shape)} must be (R, R) or (B, R, R) with R={R}, B={batch}")
    return allow.reshape((1,) * (3 - allow.dim()) + tuple(allow.shape))


def prepare_inputs(q, k, v, q_regions, k_regions, bias, allow, scale, backend) -> SMAInputs:
    """Check every argument and bring it to the layout both backends take."""
    require(backend in BACKENDS, f"backend: must be one of {BACKENDS}, got {backend!r}")
    _check_qkv(q, k, v, backend)
    check_tensor("q_regions", q_regions)
    check_tensor("k_regions", k_regions)
    check_same_device(q=q, k=k, v=v, q_regions=q_regions, k_regions=k_regions, bias=bias, allow=allow)
    B, H, Nq, D = q.shape
    R = num_regions_of(q_regions, k_regions, bias, allow)
    require(1 <= R <= MAX_REGIONS, f"regions: R={R} regions, but at most {MAX_REGIONS} are supported")
    bias4 = _check_bias(bias, B, H, R)
    allow3 = _check_allow(allow, B, R)
    qr = normalize_regions("q_regions", q_regions, B, Nq, R)
    kr = normalize_regions("k_regions", k_regions, B, k.shape[2], R)
    if qr.is_soft != kr.is_soft:  # one soft side makes both soft: one-hot rows are exact
        qr, kr = (_as_soft(r, R) for r in (qr, kr))
    if bias4 is None:
        bias4 = torch.zeros(1, 1, R, R, dtype=torch.float32, device=q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    require(scale == scale and abs(scale) != float("inf"), f"scale: must be finite, got {scale}")
    return SMAInputs(q, k, v, qr, kr, bias4, allow3, scale, R)


def _as_soft(regions: Regions, num_regions: int) -> Regions:
    if regions.is_soft:
        return regions
    onehot = torch.nn.functional.one_hot(regions.labels.long(), num_regions).float()
    return Regions(regions.labels, onehot)


def choose_backend(backend: str, inputs: SMAInputs) -> str:
    device = inputs.q.device
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        require(triton_available(), "backend: 'triton' needs the triton package")
        require(triton_runs_on(device),
                f"backend: 'triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; got {device}")
    return backend


def sma_attention(q, k, v, q_regions, k_regions, bias=None, allow=None, scale=None, *,
                  return_lse=False, return_region_mass=False, backend="auto", deterministic=False):
    """Spatially-modulated attention (docs/semantics.md).

    ``softmax(scale * q k^T + Mq W Mk^T, masked by allow) v`` per batch row and head.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D). fp16, bf16 or fp32 (float64 on the torch backend).
        q_regions, k_regions: hard labels (N,) / (B, N) of an integer dtype, or soft
            memberships (N, R) / (B, N, R) that sum to 1 per token.
        bias: finite region-pair bias W of shape (R, R), (H, R, R) or (B, H, R, R); None is 0.
        allow: bool (R, R) or (B, R, R); allow[label(q), label(k)] False blocks the pair.
        scale: score scale, default D ** -0.5.
        return_lse: also return the natural-log logsumexp of each score row, (B, H, Nq).
        return_region_mass: also return softmax(S) Mk, (B, H, Nq, R).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked, any
            device) or "auto".
        deterministic: make the backward pass bitwise repeatable (the Triton backward then
            computes dq in its own pass instead of with atomic adds).

    Differentiable in q, k, v and bias (the bias gradient is reduced to the shape given);
    region memberships get no gradient. Registered as the custom op
    ``torch.ops.mild_kernels.sma_forward``, so torch.compile traces it whole.

    Returns:
        The output (B, H, Nq, D), or ``SMAOutput(out, lse, region_mass)`` when a
        ``return_`` flag is set (None for what was not asked). Rows whose keys are all
        blocked give 0 and lse = -inf.
    """
    inputs = prepare_inputs(q, k, v, q_regions, k_regions, bias, allow, scale, backend)
    chosen = choose_backend(backend, inputs)
    qr, kr = inputs.q_regions, inputs.k_regions
    out, lse, mass = sma_forward(inputs.q, inputs.k, inputs.v, qr.labels, kr.labels, qr.memberships, kr.memberships,
                                 inputs.bias, inputs.allow, inputs.scale, inputs.num_regions, return_region_mass,
                                 chosen, deterministic)
    if not (return_lse or return_region_mass):
        return out
    return SMAOutput(out, lse if return_lse else None, mass if return_region_mass else None)
