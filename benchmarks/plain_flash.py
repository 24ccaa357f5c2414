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

Head dims are multiples of 8 up to 256, in the two blocks SMA uses (a power of two and a
smaller one: 80 = 64 + 16, 160 = 128 + 32), so SD 1.5's 40, 80 and 160 have a baseline of
the same shape.

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

from mild_kernels._runtime import empty, empty_like, interpreting, launch, next_power_of_2
from mild_kernels.sma.triton_common import _keys_first, _pair_dot, _per_query, head_dim_split

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


# Head dims other than 64 in the strongest tiles that pass the compile gate's rule (no spill): the
# cheapest per (q, k) pair by the static report's count, of forward 128x128x8, 128x64x8 (3 and 2
# stages), 64x64x4; dK/dV 64x128x8, 64x64x4, 32x128x8, 32x64x4 (2 stages), 16x64x4 (1 and 2), and
# 128x64x8 queries-first (2 and 1); dQ 128x64x8, 64x64x4, 128x32x8, 64x32x4. One stage cannot
# prefetch, which the count does not see: it is taken only where it costs at least 10% less than
# every spill-free candidate of two stages or more (D=128's dK/dV: 403.3 against 492.2), or where
# none compiles (D=160). Searched on sm_90 on 2026-12-03 (benchmarks/NOTES.md).
# D=64 keeps FlashAttention-2's tiles above: the static report's headline rows are issue 19's
# reference figures.
TILES = {  # head dim: (forward, dK/dV, dQ) as TileConfig fields
    40: ((128, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2)),  # the 128 x 128 forward spills 8 B
    80: ((128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
    128: ((128, 128, 8, 2), (128, 64, 8, 1), (128, 64, 8, 2)),  # two stages: 128 x 64 dK/dV spills 64 B
    160: ((128, 64, 8, 3), (16, 64, 4, 1), (128, 64, 8, 2)),  # every two-stage dK/dV candidate spills
}


def default_configs(head_dim: int) -> tuple[TileConfig, BackwardConfig]:
    """The forward's and the backward's tiles at ``head_dim``: TILES, else the D=64 ones."""
    if head_dim not in TILES:
        return ForwardConfig(), BackwardConfig()
    forward, dkdv, dq = (TileConfig(*t) for t in TILES[head_dim])
    return forward, BackwardConfig(dkdv=dkdv, dq=dq)


# ---------------------------------------------------------------- kernels
# A head dim runs as a power-of-two block [0, D0) plus a second block [D0, D0 + D1) (D1 = 0:
# none), the split the SMA kernels use (mild_kernels.sma.triton_common.head_dim_split): 80 is
# 64 + 16, 160 is 128 + 32, 40 is 32 + 16 with its last 8 columns masked. With D1 = 0 the
# second block's tensors are unused placeholders, and the code is the single-block kernel's.
@triton.jit
def _load_rows(ptrs, offs, n, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """Load a (rows, D0) tile; rows at or past ``n`` read as 0 when MASKED. UPCAST: in fp32 (the
    interpreter computes 16-bit dots wrongly; on a GPU it is never set)."""
    if MASKED:
        x = tl.load(ptrs, mask=offs[:, None] < n, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_rows1(ptrs, offs, n, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                UPCAST: tl.constexpr):
    """The second head-dim block of a row tile: columns past HEAD_DIM read as 0."""
    if D0 + D1 > HEAD_DIM:
        in_cols = (D0 + tl.arange(0, D1))[None, :] < HEAD_DIM
        if MASKED:
            x = tl.load(ptrs, mask=(offs[:, None] < n) & in_cols, other=0.0)
        else:
            x = tl.load(ptrs, mask=in_cols, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x
    return _load_rows(ptrs, offs, n, MASKED, UPCAST)


@triton.jit
def _load_held(row_ptrs, offs_d, offs_d1, offs, n, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               UPCAST: tl.constexpr):
    """A tile a program holds through its loop, rows past ``n`` as zeros, in its two head-dim blocks
    (the second is the first again when D1 = 0)."""
    x0 = _load_rows(row_ptrs + offs_d[None, :], offs, n, True, UPCAST)
    x1 = x0
    if D1 > 0:
        x1 = _load_rows1(row_ptrs + offs_d1[None, :], offs, n, D0, D1, HEAD_DIM, True, UPCAST)
    return x0, x1


@triton.jit
def _store_rows(ptrs, x, row_mask, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store a tile's rows where ``row_mask`` holds, columns past HEAD_DIM left alone."""
    if COL0 + WIDTH > HEAD_DIM:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty),
                 mask=row_mask & ((COL0 + tl.arange(0, WIDTH))[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=row_mask)


@triton.jit
def _fwd_step(acc0, acc1, m_i, l_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, offs_n, N_k, qk_scale,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax; MASKED only for the peeled last tile."""
    k0 = _load_rows(k_ptrs0, offs_n, N_k, MASKED, UPCAST)
    v0 = _load_rows(v_ptrs0, offs_n, N_k, MASKED, UPCAST)
    qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if D1 > 0:
        k1 = _load_rows1(k_ptrs1, offs_n, N_k, D0, D1, HEAD_DIM, MASKED, UPCAST)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
    if MASKED:
        # The peeled tile holds at least one real key, so the row max below stays finite.
        qk = tl.where(offs_n[None, :] < N_k, qk, float("-inf"))
    # Running max in scaled (log2) units: max(qk) * scale = max(qk * scale) for scale > 0.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # the scale rides in the FFMA
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_mm = p.to(v_ptrs0.dtype.element_ty)
    if UPCAST:
        p_mm = p_mm.to(tl.float32)  # rounded to the input dtype first, as on the GPU
    acc0 = tl.dot(p_mm, v0, acc0 * alpha[:, None], input_precision=PRECISION)
    if D1 > 0:
        v1 = _load_rows1(v_ptrs1, offs_n, N_k, D0, D1, HEAD_DIM, MASKED, UPCAST)
        acc1 = tl.dot(p_mm, v1, acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _plain_fwd_kernel(Q, K, V, Out, Lse,
                      stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_on,
                      H, N_q, N_k, qk_scale,
                      HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit head offsets: B * H * N * D overflows int32 long before memory runs out.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)  # unused when D1 = 0
    offs_tile = tl.arange(0, BLOCK_N)

    # Query rows past N_q read as zeros: finite scores, and their results are never stored.
    q0, q1 = _load_held(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn, offs_d, offs_d1, offs_m,
                        N_q, HEAD_DIM, D0, D1, UPCAST)
    k_rows = K + b * stride_kb + h * stride_kh + offs_tile[:, None] * stride_kn
    v_rows = V + b * stride_vb + h * stride_vh + offs_tile[:, None] * stride_vn
    k_ptrs0, k_ptrs1 = k_rows + offs_d[None, :], k_rows + offs_d1[None, :]
    v_ptrs0, v_ptrs1 = v_rows + offs_d[None, :], v_rows + offs_d1[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
    n_full = (N_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _fwd_step(acc0, acc1, m_i, l_i, q0, q1, k_ptrs0 + start_n * stride_kn,
                                         k_ptrs1 + start_n * stride_kn, v_ptrs0 + start_n * stride_vn,
                                         v_ptrs1 + start_n * stride_vn, start_n + offs_tile, N_k, qk_scale,
                                         HEAD_DIM, D0, D1, False, UPCAST, PRECISION)
    if n_full < N_k:
        acc0, acc1, m_i, l_i = _fwd_step(acc0, acc1, m_i, l_i, q0, q1, k_ptrs0 + n_full * stride_kn,
                                         k_ptrs1 + n_full * stride_kn, v_ptrs0 + n_full * stride_vn,
                                         v_ptrs1 + n_full * stride_vn, n_full + offs_tile, N_k, qk_scale,
                                         HEAD_DIM, D0, D1, True, UPCAST, PRECISION)

    in_m = offs_m < N_q
    out_rows = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
    tl.store(out_rows + offs_d[None, :], (acc0 / l_i[:, None]).to(Out.dtype.element_ty), mask=in_m[:, None])
    if D1 > 0:
        _store_rows(out_rows + offs_d1[None, :], acc1 / l_i[:, None], in_m[:, None], D0, D1, HEAD_DIM)
    # lse in natural-log units, the convention of torch's flash kernels.
    tl.store(Lse + pid_bh.to(tl.int64) * N_q + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=in_m)


@triton.jit
def _plain_bwd_preprocess_kernel(Out, DO, Lse, Delta, Lse2,
                                 stride_ob, stride_oh, stride_on,
                                 stride_dob, stride_doh, stride_don,
                                 H, N_q,
                                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), and lse in log2 units (the gradient loops then need no multiply for it)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < N_q
    mask = in_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * N_q + offs_m
    tl.store(Delta + rows, delta, mask=in_m)
    tl.store(Lse2 + rows, tl.load(Lse + rows, mask=in_m) * _LOG2E, mask=in_m)


@triton.jit
def _dkdv_step(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_ptrs0, q_ptrs1, do_ptrs0, do_ptrs1, lse2_ptrs, delta_ptrs,
               offs_m, N_q, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, QUERY_MAJOR: tl.constexpr):
    """One query tile into the held key tile's dK and dV."""
    q0 = _load_rows(q_ptrs0, offs_m, N_q, MASKED, UPCAST)
    do0 = _load_rows(do_ptrs0, offs_m, N_q, MASKED, UPCAST)
    if MASKED:
        in_m = offs_m < N_q
        lse2 = tl.load(lse2_ptrs, mask=in_m, other=0.0)
        delta = tl.load(delta_ptrs, mask=in_m, other=0.0)
    else:
        lse2 = tl.load(lse2_ptrs)
        delta = tl.load(delta_ptrs)
    # P = exp(scale * q k^T - lse), in log2 units: one FFMA per score again. In the frame whose
    # rows are the larger block (mild_kernels.sma.triton_common._pair_dot): keys-first keeps P^T
    # and dS^T in registers, queries-first stages them through shared memory.
    qk = _pair_dot(k0, q0, None, QUERY_MAJOR, PRECISION)
    if D1 > 0:
        q1 = _load_rows1(q_ptrs1, offs_m, N_q, D0, D1, HEAD_DIM, MASKED, UPCAST)
        do1 = _load_rows1(do_ptrs1, offs_m, N_q, D0, D1, HEAD_DIM, MASKED, UPCAST)
        qk = _pair_dot(k1, q1, qk, QUERY_MAJOR, PRECISION)
    p = tl.math.exp2(qk * qk_scale - _per_query(lse2, QUERY_MAJOR))
    if MASKED:
        p = tl.where(_per_query(offs_m < N_q, QUERY_MAJOR), p, 0.0)
    p_mm = p.to(do_ptrs0.dtype.element_ty)
    if UPCAST:
        p_mm = p_mm.to(tl.float32)
    p_mm = _keys_first(p_mm, QUERY_MAJOR)
    dv0 = tl.dot(p_mm, do0, dv0, input_precision=PRECISION)
    dp = _pair_dot(v0, do0, None, QUERY_MAJOR, PRECISION)
    if D1 > 0:
        dv1 = tl.dot(p_mm, do1, dv1, input_precision=PRECISION)
        dp = _pair_dot(v1, do1, dp, QUERY_MAJOR, PRECISION)
    ds = p * (dp - _per_query(delta, QUERY_MAJOR))
    ds_mm = ds.to(q_ptrs0.dtype.element_ty)
    if UPCAST:
        ds_mm = ds_mm.to(tl.float32)
    ds_mm = _keys_first(ds_mm, QUERY_MAJOR)
    dk0 = tl.dot(ds_mm, q0, dk0, input_precision=PRECISION)
    if D1 > 0:
        dk1 = tl.dot(ds_mm, q1, dk1, input_precision=PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit
def _plain_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse2, Delta,
                           stride_qb, stride_qh, stride_qn,
                           stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn,
                           stride_dob, stride_doh, stride_don,
                           stride_dkb, stride_dkh, stride_dkn,
                           stride_dvb, stride_dvh, stride_dvn,
                           H, N_q, N_k, scale, qk_scale,
                           HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr, QUERY_MAJOR: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)  # unused when D1 = 0
    offs_tile = tl.arange(0, BLOCK_M)

    # Key rows past N_k read as zeros; their dK, dV rows are computed but never stored.
    k0, k1 = _load_held(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn, offs_d, offs_d1, offs_n,
                        N_k, HEAD_DIM, D0, D1, UPCAST)
    v0, v1 = _load_held(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn, offs_d, offs_d1, offs_n,
                        N_k, HEAD_DIM, D0, D1, UPCAST)
    q_rows = Q + b * stride_qb + h * stride_qh + offs_tile[:, None] * stride_qn
    do_rows = DO + b * stride_dob + h * stride_doh + offs_tile[:, None] * stride_don
    q_ptrs0, q_ptrs1 = q_rows + offs_d[None, :], q_rows + offs_d1[None, :]
    do_ptrs0, do_ptrs1 = do_rows + offs_d[None, :], do_rows + offs_d1[None, :]
    lse2_ptrs = Lse2 + pid_bh.to(tl.int64) * N_q + offs_tile
    delta_ptrs = Delta + pid_bh.to(tl.int64) * N_q + offs_tile

    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dk1 = tl.zeros((BLOCK_N, D1 if D1 > 0 else 16), dtype=tl.float32)
    dv1 = tl.zeros((BLOCK_N, D1 if D1 > 0 else 16), dtype=tl.float32)
    m_full = (N_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_step(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_ptrs0 + start_m * stride_qn,
                                        q_ptrs1 + start_m * stride_qn, do_ptrs0 + start_m * stride_don,
                                        do_ptrs1 + start_m * stride_don, lse2_ptrs + start_m, delta_ptrs + start_m,
                                        start_m + offs_tile, N_q, qk_scale, HEAD_DIM, D0, D1, False, UPCAST,
                                        PRECISION, QUERY_MAJOR)
    if m_full < N_q:
        dk0, dk1, dv0, dv1 = _dkdv_step(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_ptrs0 + m_full * stride_qn,
                                        q_ptrs1 + m_full * stride_qn, do_ptrs0 + m_full * stride_don,
                                        do_ptrs1 + m_full * stride_don, lse2_ptrs + m_full, delta_ptrs + m_full,
                                        m_full + offs_tile, N_q, qk_scale, HEAD_DIM, D0, D1, True, UPCAST,
                                        PRECISION, QUERY_MAJOR)

    in_n = offs_n[:, None] < N_k
    # dS was taken with respect to the scaled scores: the scale comes back once, here.
    dk_rows = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
    dv_rows = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
    tl.store(dk_rows + offs_d[None, :], (dk0 * scale).to(DK.dtype.element_ty), mask=in_n)
    tl.store(dv_rows + offs_d[None, :], dv0.to(DV.dtype.element_ty), mask=in_n)
    if D1 > 0:
        _store_rows(dk_rows + offs_d1[None, :], dk1 * scale, in_n, D0, D1, HEAD_DIM)
        _store_rows(dv_rows + offs_d1[None, :], dv1, in_n, D0, D1, HEAD_DIM)


@triton.jit
def _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, offs_n, N_k, qk_scale,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile into the held query tile's dQ."""
    k0 = _load_rows(k_ptrs0, offs_n, N_k, MASKED, UPCAST)
    v0 = _load_rows(v_ptrs0, offs_n, N_k, MASKED, UPCAST)
    qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if D1 > 0:
        k1 = _load_rows1(k_ptrs1, offs_n, N_k, D0, D1, HEAD_DIM, MASKED, UPCAST)
        v1 = _load_rows1(v_ptrs1, offs_n, N_k, D0, D1, HEAD_DIM, MASKED, UPCAST)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(offs_n[None, :] < N_k, p, 0.0)
    dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
    if D1 > 0:
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    ds_mm = ds.to(k_ptrs0.dtype.element_ty)
    if UPCAST:
        ds_mm = ds_mm.to(tl.float32)
    dq0 = tl.dot(ds_mm, k0, dq0, input_precision=PRECISION)
    if D1 > 0:
        dq1 = tl.dot(ds_mm, k1, dq1, input_precision=PRECISION)
    return dq0, dq1


@triton.jit
def _plain_bwd_dq_kernel(Q, K, V, DO, DQ, Lse2, Delta,
                         stride_qb, stride_qh, stride_qn,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_dob, stride_doh, stride_don,
                         stride_dqb, stride_dqh, stride_dqn,
                         H, N_q, N_k, scale, qk_scale,
                         HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)  # unused when D1 = 0
    offs_tile = tl.arange(0, BLOCK_N)
    in_m = offs_m < N_q

    # Query rows past N_q read as zeros (lse and delta too): finite, and never stored.
    q0, q1 = _load_held(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn, offs_d, offs_d1, offs_m,
                        N_q, HEAD_DIM, D0, D1, UPCAST)
    do0, do1 = _load_held(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don, offs_d, offs_d1,
                          offs_m, N_q, HEAD_DIM, D0, D1, UPCAST)
    lse2 = tl.load(Lse2 + pid_bh.to(tl.int64) * N_q + offs_m, mask=in_m, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_q + offs_m, mask=in_m, other=0.0)
    k_rows = K + b * stride_kb + h * stride_kh + offs_tile[:, None] * stride_kn
    v_rows = V + b * stride_vb + h * stride_vh + offs_tile[:, None] * stride_vn
    k_ptrs0, k_ptrs1 = k_rows + offs_d[None, :], k_rows + offs_d1[None, :]
    v_ptrs0, v_ptrs1 = v_rows + offs_d[None, :], v_rows + offs_d1[None, :]

    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    dq1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
    n_full = (N_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_ptrs0 + start_n * stride_kn,
                            k_ptrs1 + start_n * stride_kn, v_ptrs0 + start_n * stride_vn,
                            v_ptrs1 + start_n * stride_vn, start_n + offs_tile, N_k, qk_scale, HEAD_DIM, D0, D1,
                            False, UPCAST, PRECISION)
    if n_full < N_k:
        dq0, dq1 = _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_ptrs0 + n_full * stride_kn,
                            k_ptrs1 + n_full * stride_kn, v_ptrs0 + n_full * stride_vn,
                            v_ptrs1 + n_full * stride_vn, n_full + offs_tile, N_k, qk_scale, HEAD_DIM, D0, D1,
                            True, UPCAST, PRECISION)

    dq_rows = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn
    tl.store(dq_rows + offs_d[None, :], (dq0 * scale).to(DQ.dtype.element_ty), mask=in_m[:, None])
    if D1 > 0:
        _store_rows(dq_rows + offs_d1[None, :], dq1 * scale, in_m[:, None], D0, D1, HEAD_DIM)


# ---------------------------------------------------------------- wrappers
def _check(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    head_dim = tensors[0].shape[-1]
    for t in tensors:
        assert t.dim() == 4, "expected (B, H, N, D) tensors"
        assert t.dtype == tensors[0].dtype and t.device == tensors[0].device and t.shape[-1] == head_dim
    assert 16 <= head_dim <= 256 and head_dim % 8 == 0, f"head dim {head_dim}: a multiple of 8 in 16..256"
    # The kernels address the head dim with unit stride.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _constants(dtype: torch.dtype) -> dict:
    # fp32 inputs get exact fp32 dots (tf32 would miss the fp32 tolerance); moot for 16-bit.
    return dict(UPCAST=interpreting() and dtype != torch.float32,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _head_dim_blocks(head_dim: int) -> dict:
    """HEAD_DIM and its two blocks D0 + D1 (D1 = 0 for a power of two), as SMA splits it."""
    d0, d1 = head_dim_split(head_dim)
    return dict(HEAD_DIM=head_dim, D0=d0, D1=d1)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def plain_flash_forward(q, k, v, scale=None, config: TileConfig | None = None):
    """(out, lse): out = softmax(q k^T * scale) v, lse (B, H, N_q) fp32 in natural log."""
    q, k, v = _check(q, k, v)
    config = config or default_configs(q.shape[-1])[0]
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
           **_head_dim_blocks(D), BLOCK_M=config.block_m, BLOCK_N=config.block_n, **_constants(q.dtype))
    return out, lse


def plain_flash_backward(do, q, k, v, out, lse, scale=None, config: BackwardConfig | None = None):
    """(dq, dk, dv) of plain_flash_forward, given its out and lse."""
    do, q, k, v, out = _check(do, q, k, v, out)
    config = config or default_configs(q.shape[-1])[1]
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
           H=H, N_q=N_q, HEAD_DIM=D, BLOCK_D=next_power_of_2(D), BLOCK_M=config.preprocess_block_m)
    tiles = config.dkdv
    launch(_plain_bwd_dkdv_kernel, (triton.cdiv(N_k, tiles.block_n), B * H),
           num_warps=tiles.num_warps, num_stages=tiles.num_stages,
           Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, Lse2=lse2, Delta=delta,
           **stride_args("q", "k", "v", "do", "dk", "dv"),
           H=H, N_q=N_q, N_k=N_k, scale=scale, qk_scale=scale * LOG2E,
           **_head_dim_blocks(D), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
           QUERY_MAJOR=tiles.block_m > tiles.block_n, **constants)
    tiles = config.dq
    launch(_plain_bwd_dq_kernel, (triton.cdiv(N_q, tiles.block_m), B * H),
           num_warps=tiles.num_warps, num_stages=tiles.num_stages,
           Q=q, K=k, V=v, DO=do, DQ=dq, Lse2=lse2, Delta=delta,
           **stride_args("q", "k", "v", "do", "dq"),
           H=H, N_q=N_q, N_k=N_k, scale=scale, qk_scale=scale * LOG2E,
           **_head_dim_blocks(D), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **constants)
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
