"""A plain flash attention in Triton: the ceiling that the region-aware kernels are measured against.

No bias, no regions, no masks but the sequence tails: softmax(q k^T * scale) v over
(B, H, N, D) tensors, forward and backward, in the FlashAttention-2 layout of work:

- forward: one program per query tile of one (batch, head) walks every key tile with
  an online softmax in log2 units. The score scale is folded into the exponent's
  argument (``qk * qk_scale - m``: one FFMA per score, as FlashAttention-2 does) and
  the running max is kept in scaled units. The last, partial key tile is peeled out
  of the loop, so the steady-state loop carries no mask at all;
- backward: delta = rowsum(dO * O) and lse in log2 units first, then a dK/dV kernel
  (one program per key tile, walking the query tiles) and a dQ kernel (one program
  per query tile, walking the key tiles). Each gradient is owned by one program: no
  atomics.

Every launch goes through ``mild_kernels._runtime.launch`` with keyword arguments
only, so ``record_launches()`` sees them and benchmarks/static_speed.py can compile
them ahead of time. On the CPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1), where 16-bit dots are upcast to fp32 first (UPCAST).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from mild_kernels._runtime import empty, empty_like, interpreting, launch

LOG2E = 1.4426950408889634
# The kernels' copies: a jitted function may read a module global only as a constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One kernel's tiling: BLOCK_M queries by BLOCK_N keys per loop iteration."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class ForwardConfig(TileConfig):
    # H100, D = 64, bf16: a 128-query tile is two warpgroups of 64 rows for wgmma.
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    # dK/dV: 128 keys held, 64 queries a step; dQ: 128 queries held, 64 keys a step.
    dkdv: TileConfig = TileConfig(block_m=64, block_n=128, num_warps=8, num_stages=2)
    dq: TileConfig = TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    preprocess_block_m: int = 128


# ---------------------------------------------------------------- kernels
@triton.jit
def _load_rows(ptrs, offs, n, MASKED: tl.constexpr):
    """Load a (rows, HEAD_DIM) tile; rows at or past ``n`` read as 0 when MASKED."""
    if MASKED:
        return tl.load(ptrs, mask=offs[:, None] < n, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n, N_k, qk_scale,
              MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax; MASKED only for the peeled last tile."""
    k = _load_rows(k_ptrs, offs_n, N_k, MASKED)
    v = _load_rows(v_ptrs, offs_n, N_k, MASKED)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        # The peeled tile holds at least one real key, so the row max below stays finite.
        qk = tl.where(offs_n[None, :] < N_k, qk, float("-inf"))
    # Running max in scaled (log2) units: max(qk) * scale = max(qk * scale) for scale > 0.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # the scale rides in the FFMA
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_mm = p.to(v.dtype)
    if UPCAST:
        p_mm = p_mm.to(tl.float32)  # rounded to the input dtype first, as on the GPU
        v = v.to(tl.float32)
    acc = tl.dot(p_mm, v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _plain_fwd_kernel(Q, K, V, Out, Lse,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_on,
                      H, N_q, N_k, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit head offsets: B * H * N * D overflows int32 long before memory runs out.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_tile = tl.arange(0, BLOCK_N)

    # Query rows past N_q read as zeros: finite scores, and their results are never stored.
    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, N_q, True)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_tile[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_tile[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    n_full = (N_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn,
                                  start_n + offs_tile, N_k, qk_scale, False, UPCAST, PRECISION)
    if n_full < N_k:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptrs + n_full * stride_kn, v_ptrs + n_full * stride_vn,
                                  n_full + offs_tile, N_k, qk_scale, True, UPCAST, PRECISION)

    in_m = offs_m < N_q
    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=in_m[:, None])
    # lse in natural-log units, the convention of torch's flash kernels.
    tl.store(Lse + pid_bh.to(tl.int64) * N_q + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=in_m)


@triton.jit
def _plain_bwd_preprocess_kernel(Out, DO, Lse, Delta, Lse2,
                                 stride_ob, stride_oh, stride_on,
                                 stride_dob, stride_doh, stride_don,
                                 H, N_q,
                                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), and lse in log2 units (the gradient loops then need no multiply for it)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_m = offs_m < N_q
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=in_m[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=in_m[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * N_q + offs_m
    tl.store(Delta + rows, delta, mask=in_m)
    tl.store(Lse2 + rows, tl.load(Lse + rows, mask=in_m) * _LOG2E, mask=in_m)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, lse2_ptrs, delta_ptrs, offs_m, N_q, qk_scale,
               MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile into the held key tile's dK and dV, all in the transposed (key-major) frame."""
    q = _load_rows(q_ptrs, offs_m, N_q, MASKED)
    do = _load_rows(do_ptrs, offs_m, N_q, MASKED)
    if MASKED:
        in_m = offs_m < N_q
        lse2 = tl.load(lse2_ptrs, mask=in_m, other=0.0)
        delta = tl.load(delta_ptrs, mask=in_m, other=0.0)
    else:
        lse2 = tl.load(lse2_ptrs)
        delta = tl.load(delta_ptrs)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # p^T = exp(scale * k q^T - lse), in log2 units: one FFMA per score again.
    qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(offs_m[None, :] < N_q, p_t, 0.0)
    p_mm = p_t.to(do_ptrs.dtype.element_ty)
    if UPCAST:
        p_mm = p_mm.to(tl.float32)
    dv = tl.dot(p_mm, do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    ds_mm = ds_t.to(q_ptrs.dtype.element_ty)
    if UPCAST:
        ds_mm = ds_mm.to(tl.float32)
    dk = tl.dot(ds_mm, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _plain_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse2, Delta,
                           stride_qb, stride_qh, stride_qn,
                           stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn,
                           stride_dob, stride_doh, stride_don,
                           stride_dkb, stride_dkh, stride_dkn,
                           stride_dvb, stride_dvh, stride_dvn,
                           H, N_q, N_k, scale, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_tile = tl.arange(0, BLOCK_M)

    # Key rows past N_k read as zeros; their dK, dV rows are computed but never stored.
    k = _load_rows(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   offs_n, N_k, True)
    v = _load_rows(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   offs_n, N_k, True)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_tile[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_tile[:, None] * stride_don + offs_d[None, :]
    lse2_ptrs = Lse2 + pid_bh.to(tl.int64) * N_q + offs_tile
    delta_ptrs = Delta + pid_bh.to(tl.int64) * N_q + offs_tile

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    m_full = (N_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs + start_m * stride_qn, do_ptrs + start_m * stride_don,
                            lse2_ptrs + start_m, delta_ptrs + start_m, start_m + offs_tile, N_q, qk_scale,
                            False, UPCAST, PRECISION)
    if m_full < N_q:
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs + m_full * stride_qn, do_ptrs + m_full * stride_don,
                            lse2_ptrs + m_full, delta_ptrs + m_full, m_full + offs_tile, N_q, qk_scale,
                            True, UPCAST, PRECISION)

    in_n = offs_n[:, None] < N_k
    # dS was taken with respect to the scaled scores: the scale comes back once, here.
    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=in_n)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=in_n)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, offs_n, N_k, qk_scale,
             MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile into the held query tile's dQ."""
    k = _load_rows(k_ptrs, offs_n, N_k, MASKED)
    v = _load_rows(v_ptrs, offs_n, N_k, MASKED)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(offs_n[None, :] < N_k, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    ds_mm = ds.to(k_ptrs.dtype.element_ty)
    if UPCAST:
        ds_mm = ds_mm.to(tl.float32)
    return tl.dot(ds_mm, k, dq, input_precision=PRECISION)


@triton.jit
def _plain_bwd_dq_kernel(Q, K, V, DO, DQ, Lse2, Delta,
                         stride_qb, stride_qh, stride_qn,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_dob, stride_doh, stride_don,
                         stride_dqb, stride_dqh, stride_dqn,
                         H, N_q, N_k, scale, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_tile = tl.arange(0, BLOCK_N)
    in_m = offs_m < N_q

    # Query rows past N_q read as zeros (lse and delta too): finite, and never stored.
    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, N_q, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                    offs_m, N_q, True)
    lse2 = tl.load(Lse2 + pid_bh.to(tl.int64) * N_q + offs_m, mask=in_m, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_q + offs_m, mask=in_m, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_tile[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_tile[:, None] * stride_vn + offs_d[None, :]

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    n_full = (N_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn,
                      start_n + offs_tile, N_k, qk_scale, False, UPCAST, PRECISION)
    if n_full < N_k:
        dq = _dq_step(dq, q, do, lse2, delta, k_ptrs + n_full * stride_kn, v_ptrs + n_full * stride_vn,
                      n_full + offs_tile, N_k, qk_scale, True, UPCAST, PRECISION)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_m[:, None])


# ---------------------------------------------------------------- wrappers
def _check(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    head_dim = tensors[0].shape[-1]
    for t in tensors:
        assert t.dim() == 4, "expected (B, H, N, D) tensors"
        assert t.dtype == tensors[0].dtype and t.device == tensors[0].device and t.shape[-1] == head_dim
    assert head_dim in (16, 32, 64, 128, 256), f"head dim {head_dim}: a power of two in 16..256"
    # The kernels address the head dim with unit stride.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _constants(dtype: torch.dtype) -> dict:
    # fp32 inputs get exact fp32 dots (tf32 would miss the fp32 tolerance); moot for 16-bit.
    return dict(UPCAST=interpreting() and dtype != torch.float32,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def plain_flash_forward(q, k, v, scale=None, config: TileConfig | None = None):
    """(out, lse): out = softmax(q k^T * scale) v, lse (B, H, N_q) fp32 in natural log."""
    q, k, v = _check(q, k, v)
    config = config or ForwardConfig()
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    assert N_k > 0 and k.shape[:2] == v.shape[:2] == (B, H) and v.shape[2] == N_k
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    assert scale > 0, "the running max is taken before scaling"
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((B, H, N_q), dtype=torch.float32, device=q.device)
    (sqb, sqh, sqn), (skb, skh, skn), (svb, svh, svn), (sob, soh, son) = map(_strides, (q, k, v, out))
    launch(_plain_fwd_kernel, (triton.cdiv(N_q, config.block_m), B * H),
           num_warps=config.num_warps, num_stages=config.num_stages,
           Q=q, K=k, V=v, Out=out, Lse=lse,
           stride_qb=sqb, stride_qh=sqh, stride_qn=sqn,
           stride_kb=skb, stride_kh=skh, stride_kn=skn,
           stride_vb=svb, stride_vh=svh, stride_vn=svn,
           stride_ob=sob, stride_oh=soh, stride_on=son,
           H=H, N_q=N_q, N_k=N_k, qk_scale=scale * LOG2E,
           HEAD_DIM=D, BLOCK_M=config.block_m, BLOCK_N=config.block_n, **_constants(q.dtype))
    return out, lse


def plain_flash_backward(do, q, k, v, out, lse, scale=None, config: BackwardConfig | None = None):
    """(dq, dk, dv) of plain_flash_forward, given its out and lse."""
    do, q, k, v, out = _check(do, q, k, v, out)
    config = config or BackwardConfig()
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    assert scale > 0
    lse = lse.contiguous()  # (B, H, N_q), addressed as rows of N_q
    delta = empty((B, H, N_q), dtype=torch.float32, device=q.device)
    lse2 = empty((B, H, N_q), dtype=torch.float32, device=q.device)
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    strides = dict(zip(("q", "k", "v", "do", "o", "dq", "dk", "dv"), map(_strides, (q, k, v, do, out, dq, dk, dv))))
    constants = _constants(q.dtype)

    def stride_args(*names):
        return {f"stride_{name}{axis}": value for name in names for axis, value in zip("bhn", strides[name])}

    launch(_plain_bwd_preprocess_kernel, (triton.cdiv(N_q, config.preprocess_block_m), B * H),
           num_warps=4, num_stages=1, Out=out, DO=do, Lse=lse, Delta=delta, Lse2=lse2, **stride_args("o", "do"),
           H=H, N_q=N_q, HEAD_DIM=D, BLOCK_M=config.preprocess_block_m)
    tiles = config.dkdv
    launch(_plain_bwd_dkdv_kernel, (triton.cdiv(N_k, tiles.block_n), B * H),
           num_warps=tiles.num_warps, num_stages=tiles.num_stages,
           Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, Lse2=lse2, Delta=delta,
           **stride_args("q", "k", "v", "do", "dk", "dv"),
           H=H, N_q=N_q, N_k=N_k, scale=scale, qk_scale=scale * LOG2E,
           HEAD_DIM=D, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **constants)
    tiles = config.dq
    launch(_plain_bwd_dq_kernel, (triton.cdiv(N_q, tiles.block_m), B * H),
           num_warps=tiles.num_warps, num_stages=tiles.num_stages,
           Q=q, K=k, V=v, DO=do, DQ=dq, Lse2=lse2, Delta=delta,
           **stride_args("q", "k", "v", "do", "dq"),
           H=H, N_q=N_q, N_k=N_k, scale=scale, qk_scale=scale * LOG2E,
           HEAD_DIM=D, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **constants)
    return dq, dk, dv


class _PlainFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = plain_flash_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = plain_flash_backward(do, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


def plain_flash_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over (B, H, N, D) tensors, differentiable in q, k and v."""
    return _PlainFlashAttention.apply(q, k, v, scale)
