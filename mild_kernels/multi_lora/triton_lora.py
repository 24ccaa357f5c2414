"""Triton kernels of the multi-adapter LoRA linear layer.

``_multi_lora_kernel`` computes ``x W^T + bias + s[id] (x A[id]^T) B[id]^T`` in one pass:

- A program owns a tile of ``BLOCK_M`` flattened token rows and a group of
  ``group_n`` consecutive output tiles of ``BLOCK_N`` columns.
- In the first output tile of its group, the K loop of ``x W^T`` also computes the
  shrink ``x A[id]^T`` from the same x loads: the shrink reads nothing extra. It is
  scaled, cast to the operand dtype once, and kept in registers; every output tile of
  the group adds its expand ``(s x A^T) B^T`` to the accumulator before its single
  store. The output is written once, never read back. Grouping output tiles amortises
  the shrink to ``rank / (group_n * BLOCK_N)`` of the base GEMM's work instead of
  ``rank / BLOCK_N``; ``output_group_size`` picks the group from a wave model.
- A row tile whose rows all have one adapter applies it here. Row tiles whose rows all
  have id -1, and tiles whose rows have several ids, run the plain GEMM.
- ``_multi_lora_fixup_kernel`` adds the LoRA terms of the tiles with several ids, one
  adapter at a time, storing only that adapter's rows (so a non-finite entry of one
  adapter's weights never reaches another's rows). It is launched only when a tile can
  straddle a change of adapter (3-D inputs whose token count is not a multiple of
  BLOCK_M, or 2-D inputs), and its programs for single-adapter tiles exit after loading
  the ids. Keeping it apart keeps the main kernel's
  registers to one adapter's state (it spilled with the multi-adapter loop inside).

The same kernel computes the input gradient ``dx = dy W + s (dy B[id]) A[id]`` with
W^T, B^T and A^T as its operands, storing the shrink ``dy B`` of each row; the forward
stores ``x A^T`` when a backward pass will need it.

``_lora_grad_kernel`` computes the adapter gradients as per-adapter reductions over
rows, ``out[a] = s_a sum over rows m with id a of U[m]^T V[m]``: ``dA = s g^T x``
with ``g = dy B`` and ``dB^T = s xa^T dy`` with ``xa = x A^T``. Programs split the
rows into chunks and write one fp32 partial per chunk, which torch sums in a fixed
order: no atomics, so gradients are bitwise repeatable.
"""

from __future__ import annotations

import dataclasses
import torch
import triton
import triton.language as tl

from .._runtime import empty, interpreting, launch, next_power_of_2

NO_ADAPTER = tl.constexpr(1 << 30)  # larger than any adapter id; marks "no adapter" in reductions

NOMINAL_SM_COUNT = 132  # an H100; used to size grids when no GPU is present (CPU interpreter, compile gate)


@triton.jit
def _gemm_loop(acc, x_rows, w_cols, in_m, in_n, K, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """acc += x W^T over the whole K extent."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None], mask=in_k[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fused_loop(acc, x_rows, w_cols, a_cols, in_m, in_n, K, R, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += x W^T, and the shrink x A^T from the same x loads: (acc, shrink (BLOCK_M, BLOCK_R) fp32)."""
    offs_r = tl.arange(0, BLOCK_R)
    shrink = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None], mask=in_k[:, None] & in_n[None, :], other=0.0)
        a = tl.load(a_cols + offs_k[:, None], mask=in_k[:, None] & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        shrink = tl.dot(x, a, shrink, input_precision=PRECISION)
    return acc, shrink


@triton.jit
def _shrink_loop(x_rows, a_cols, in_m, K, R, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The shrink x A^T alone: (BLOCK_M, BLOCK_R) fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    shrink = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        a = tl.load(a_cols + offs_k[:, None], mask=in_k[:, None] & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        shrink = tl.dot(x, a, shrink, input_precision=PRECISION)
    return shrink


@triton.jit
def _lora_operand(shrink, mine, adapter, Scales, scale, DTYPE: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr,
                  UPCAST: tl.constexpr):
    """s[adapter] * shrink on the adapter's rows, 0 elsewhere, in the operands' dtype: the expand's left side.

    Formed once per row tile and reused by every output tile, so the fp32 shrink dies here.
    """
    s = scale
    if PER_ADAPTER_SCALE:
        s = s * tl.load(Scales + adapter)
    lora = tl.where(mine[:, None], shrink * s, 0.0).to(DTYPE)
    if UPCAST:
        lora = lora.to(tl.float32)
    return lora


@triton.jit
def _expand(acc, lora, adapter, B, offs_n, in_n, R, stride_ba, stride_bn, BLOCK_R: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += lora B[adapter]^T."""
    offs_r = tl.arange(0, BLOCK_R)
    b = tl.load(B + adapter * stride_ba + offs_r[:, None] + offs_n[None, :] * stride_bn,
                mask=(offs_r[:, None] < R) & in_n[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    return tl.dot(lora, b, acc, input_precision=PRECISION)


@triton.jit
def _store_tile(acc, Y, Bias, offs_m, in_m, offs_n, in_n, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _next_adapter(row_ids, after):
    """The lowest id above ``after`` among the rows, NO_ADAPTER if none."""
    return tl.min(tl.where(row_ids > after, row_ids, NO_ADAPTER), axis=0)


@triton.jit
def _first_adapter(row_ids):
    """The lowest id >= 0 among the rows, NO_ADAPTER if none."""
    return tl.min(tl.where(row_ids >= 0, row_ids, NO_ADAPTER), axis=0)


@triton.jit
def _single_adapter(row_ids, in_m, first):
    """Whether every row of the tile has the id ``first`` (out-of-range rows aside)."""
    return tl.min(tl.where(in_m & (row_ids != first), 0, 1), axis=0) == 1


@triton.jit
def _multi_lora_kernel(X, W, Bias, A, B, Ids, Scales, Y, Shrink,
                       M, N, K, R, tokens, num_n_tiles, num_n_groups, group_n, scale,
                       stride_xm, stride_wn, stride_aa, stride_ar, stride_ba, stride_bn,
                       HAS_BIAS: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, STORE_SHRINK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Y (M, N) = X W^T + bias + s[id] (X A[id]^T) B[id]^T for the rows of each row tile's first adapter.

    Every operand's last dim is contiguous. Rows of a tile's further adapters are left to
    ``_multi_lora_fixup_kernel``.
    """
    PRECISION: tl.constexpr = "ieee" if IEEE else "tf32"  # "tf32" is moot for 16-bit operands
    # The output-tile groups of one row tile are neighbours in launch order, so they share x in L2.
    pid = tl.program_id(0)
    pid_m = pid // num_n_groups
    pid_g = pid % num_n_groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    offs_tile = tl.arange(0, BLOCK_N)
    row_ids = tl.load(Ids + offs_m // tokens, mask=in_m, other=-1).to(tl.int32)
    adapter = _first_adapter(row_ids)
    # A tile whose rows have several ids (an adapter and -1 included) is left whole to the fixup
    # kernel, which stores each adapter's rows alone: in one expand over all rows, another
    # adapter's rows would multiply 0 by this B, and a non-finite entry there would give NaN.
    adapter = tl.where(_single_adapter(row_ids, in_m, adapter), adapter, NO_ADAPTER)
    x_rows = X + offs_m[:, None] * stride_xm
    n_start = pid_g * group_n
    offs_n = n_start * BLOCK_N + offs_tile
    in_n = offs_n < N
    w_cols = W + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if adapter < NO_ADAPTER:
        # The shrink rides along the first output tile's K loop and serves the whole group.
        a_cols = A + adapter * stride_aa + offs_r[None, :] * stride_ar
        acc, shrink = _fused_loop(acc, x_rows, w_cols, a_cols, in_m, in_n, K, R,
                                  BLOCK_M, BLOCK_K, BLOCK_R, UPCAST, PRECISION)
        mine = row_ids == adapter
        if STORE_SHRINK:
            if pid_g == 0:
                tl.store(Shrink + offs_m[:, None] * R + offs_r[None, :], shrink, mask=mine[:, None] & (offs_r[None, :] < R))
        lora = _lora_operand(shrink, mine, adapter, Scales, scale, B.dtype.element_ty, PER_ADAPTER_SCALE, UPCAST)
        acc = _expand(acc, lora, adapter, B, offs_n, in_n, R, stride_ba, stride_bn, BLOCK_R, UPCAST, PRECISION)
    else:
        acc = _gemm_loop(acc, x_rows, w_cols, in_m, in_n, K, BLOCK_K, UPCAST, PRECISION)
        lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=B.dtype.element_ty)
        if UPCAST:
            lora = lora.to(tl.float32)
    _store_tile(acc, Y, Bias, offs_m, in_m, offs_n, in_n, N, HAS_BIAS)
    for n_tile in range(n_start + 1, tl.minimum(n_start + group_n, num_n_tiles)):
        offs_n = n_tile * BLOCK_N + offs_tile
        in_n = offs_n < N
        acc = _gemm_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_rows, W + offs_n[None, :] * stride_wn,
                         in_m, in_n, K, BLOCK_K, UPCAST, PRECISION)
        if adapter < NO_ADAPTER:
            acc = _expand(acc, lora, adapter, B, offs_n, in_n, R, stride_ba, stride_bn, BLOCK_R, UPCAST, PRECISION)
        _store_tile(acc, Y, Bias, offs_m, in_m, offs_n, in_n, N, HAS_BIAS)


@triton.jit
def _multi_lora_fixup_kernel(X, A, B, Ids, Scales, Y, Shrink, M, N, K, R, tokens, num_n_tiles, scale,
                             stride_xm, stride_aa, stride_ar, stride_ba, stride_bn,
                             PER_ADAPTER_SCALE: tl.constexpr, STORE_SHRINK: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Y += s[id] (X A[id]^T) B[id]^T for the rows of every adapter but the first of each row tile.

    The same row tiles as ``_multi_lora_kernel``, which did the first adapter. Only tiles that
    straddle a change of adapter have work; the others exit after loading their ids.
    """
    PRECISION: tl.constexpr = "ieee" if IEEE else "tf32"
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    offs_tile = tl.arange(0, BLOCK_N)
    row_ids = tl.load(Ids + offs_m // tokens, mask=in_m, other=-1).to(tl.int32)
    highest = tl.max(row_ids, axis=0)
    x_rows = X + offs_m[:, None] * stride_xm
    first = _first_adapter(row_ids)
    # Single-adapter tiles were done whole by the main kernel; here every adapter of the others.
    adapter = tl.where(_single_adapter(row_ids, in_m, first), NO_ADAPTER, first)
    while adapter <= highest:
        shrink = _shrink_loop(x_rows, A + adapter * stride_aa + offs_r[None, :] * stride_ar, in_m, K, R,
                              BLOCK_M, BLOCK_K, BLOCK_R, UPCAST, PRECISION)
        mine = row_ids == adapter
        if STORE_SHRINK:
            tl.store(Shrink + offs_m[:, None] * R + offs_r[None, :], shrink, mask=mine[:, None] & (offs_r[None, :] < R))
        lora = _lora_operand(shrink, mine, adapter, Scales, scale, B.dtype.element_ty, PER_ADAPTER_SCALE, UPCAST)
        for n_tile in range(num_n_tiles):
            offs_n = n_tile * BLOCK_N + offs_tile
            in_n = offs_n < N
            delta = _expand(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), lora, adapter, B, offs_n, in_n, R,
                            stride_ba, stride_bn, BLOCK_R, UPCAST, PRECISION)
            y_ptrs = Y + offs_m[:, None] * N + offs_n[None, :]
            rows = mine[:, None] & in_n[None, :]
            y = tl.load(y_ptrs, mask=rows, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + delta).to(Y.dtype.element_ty), mask=rows)
        adapter = _next_adapter(row_ids, adapter)


@triton.jit
def _lora_grad_kernel(U, V, Ids, Scales, Out,
                      M, R, Q, tokens, rows_per_chunk, num_q_tiles, scale, stride_vm,
                      PER_ADAPTER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                      BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Out[chunk, a] (R, Q) = s_a * sum over the chunk's rows m with id a of U[m]^T V[m].

    U is (M, R) fp32 and contiguous, V (M, Q) with contiguous rows, Out (chunks, adapters, R, Q)
    contiguous.
    """
    PRECISION: tl.constexpr = "ieee" if IEEE else "tf32"
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    num_adapters = tl.num_programs(0) // num_q_tiles
    adapter = pid // num_q_tiles
    offs_q = (pid % num_q_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_q = offs_q < Q
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    m_start = chunk * rows_per_chunk
    m_stop = tl.minimum(m_start + rows_per_chunk, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ids = tl.load(Ids + offs_m // tokens, mask=offs_m < m_stop, other=-1)
        mine = row_ids == adapter
        if tl.max(mine.to(tl.int32), axis=0) > 0:  # row tiles of other adapters cost one id load
            u = tl.load(U + offs_m[:, None] * R + offs_r[None, :], mask=mine[:, None] & in_r[None, :], other=0.0)
            v = tl.load(V + offs_m[:, None] * stride_vm + offs_q[None, :], mask=mine[:, None] & in_q[None, :],
                        other=0.0)
            u = u.to(V.dtype.element_ty)
            if UPCAST:
                u = u.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(tl.trans(u), v, acc, input_precision=PRECISION)
    s = scale
    if PER_ADAPTER_SCALE:
        s = s * tl.load(Scales + adapter)
    out = Out + (chunk * num_adapters + adapter) * R * Q
    tl.store(out + offs_r[:, None] * Q + offs_q[None, :], acc * s, mask=in_r[:, None] & in_q[None, :])


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class GradConfig:
    block_m: int
    block_q: int
    num_warps: int
    num_stages: int


# The shipped configs. Fused GEMM (main and fix-up kernels): per (fp32 inputs, padded rank,
# output tile class), the class being 128 when the output width is a multiple of 128 and 64
# otherwise (SD's 320 fits 64-wide tiles exactly; 128-wide ones would waste a sixth of their
# work). Gradient kernel: per (fp32 inputs, padded rank). Each entry is the first of a list of
# candidates, largest tiles first, that compiled for sm_80 and sm_90 with no spill in any
# kernel it serves (16-bit: 128x128x64/8 warps, 128x128x32, 128x64x64, 128x64x32, 64x128x64,
# ... ; fp32: 32x64x16/4 warps/2 stages, 32x32x16, 32x32x16/1 stage, ...); tests/compile_gate.py
# holds every entry to that. fp32 runs its dots in "ieee" (FMA, operands in registers), hence
# its small tiles: it is the exact path, 16-bit the fast one.
GEMM_CONFIGS = {
    (False, 16, 64): GemmConfig(128, 64, 64, 8, 3),
    (False, 32, 64): GemmConfig(128, 64, 64, 8, 3),
    (False, 64, 64): GemmConfig(128, 64, 64, 8, 3),
    (False, 16, 128): GemmConfig(128, 128, 32, 8, 3),
    (False, 32, 128): GemmConfig(128, 128, 32, 8, 3),
    (False, 64, 128): GemmConfig(128, 64, 64, 8, 3),
    (True, 16, 64): GemmConfig(32, 64, 16, 4, 2),
    (True, 32, 64): GemmConfig(32, 64, 16, 4, 2),
    (True, 64, 64): GemmConfig(32, 32, 16, 4, 1),
    (True, 16, 128): GemmConfig(32, 64, 16, 4, 2),
    (True, 32, 128): GemmConfig(32, 64, 16, 4, 2),
    (True, 64, 128): GemmConfig(32, 32, 16, 4, 1),
}
GRAD_CONFIGS = {
    (False, 16): GradConfig(64, 128, 4, 3),
    (False, 32): GradConfig(64, 128, 4, 3),
    (False, 64): GradConfig(64, 64, 4, 3),
    (True, 16): GradConfig(32, 64, 4, 2),
    (True, 32): GradConfig(32, 64, 4, 2),
    (True, 64): GradConfig(32, 64, 4, 2),
}


def padded_rank(rank: int) -> int:
    return max(16, next_power_of_2(rank))


def output_tile_class(out_features: int) -> int:
    return 128 if out_features % 128 == 0 else 64


def gemm_config(dtype: torch.dtype, rank: int, out_features: int) -> GemmConfig:
    return GEMM_CONFIGS[(dtype == torch.float32, padded_rank(rank), output_tile_class(out_features))]


def grad_config(dtype: torch.dtype, rank: int) -> GradConfig:
    return GRAD_CONFIGS[(dtype == torch.float32, padded_rank(rank))]


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SM_COUNT


def output_group_size(m_tiles: int, n_tiles: int, block_n: int, block_r: int, sms: int) -> int:
    """How many output tiles one program computes, sharing one shrink.

    A cost model, in units of one BLOCK_M x BLOCK_K x 1 multiply-add row: a program with a
    group of g tiles does g * block_n of base work plus block_r of shrink, and the grid runs
    in ceil(programs / sms) waves. The smallest modelled time wins; ties go to the smaller
    group (more programs hide latency better).
    """
    def modelled_time(group):
        programs = m_tiles * triton.cdiv(n_tiles, group)
        return triton.cdiv(programs, sms) * (group * block_n + block_r)

    return min(range(1, n_tiles + 1), key=lambda group: (modelled_time(group), group))


def fused_lora_gemm(x2: torch.Tensor, weight: torch.Tensor, bias, lora_a: torch.Tensor, lora_b: torch.Tensor, ids,
                    tokens: int, scale: float, scales, store_shrink: bool):
    """Launch the fused kernel: y = x2 W^T + bias + s[id] (x2 A[id]^T) B[id]^T.

    x2 (M, K), weight (N, K), lora_a (n, r, K), lora_b (n, N, r), each with a contiguous last
    dim; ids hold one id per ``tokens`` rows. Returns y (M, N) in x2's dtype and the per-row
    shrink (M, r) fp32 (None unless ``store_shrink``).
    """
    M, K = x2.shape
    N, rank = weight.shape[0], lora_a.shape[1]
    y = empty((M, N), dtype=x2.dtype, device=x2.device)
    shrink = empty((M, rank), dtype=torch.float32, device=x2.device) if store_shrink else None
    if M == 0:
        return y, shrink
    config = gemm_config(x2.dtype, rank, N)
    block_r = padded_rank(rank)
    m_tiles, n_tiles = triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n)
    group_n = output_group_size(m_tiles, n_tiles, config.block_n, block_r, sm_count(x2.device))
    num_n_groups = triton.cdiv(n_tiles, group_n)
    launch(
        _multi_lora_kernel, (m_tiles * num_n_groups,), num_warps=config.num_warps, num_stages=config.num_stages,
        X=x2, W=weight, Bias=bias if bias is not None else y, A=lora_a, B=lora_b, Ids=ids,
        Scales=scales if scales is not None else y, Y=y, Shrink=shrink if shrink is not None else y,
        M=M, N=N, K=K, R=rank, tokens=tokens, num_n_tiles=n_tiles, num_n_groups=num_n_groups, group_n=group_n,
        scale=float(scale), stride_xm=x2.stride(0), stride_wn=weight.stride(0),
        stride_aa=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ba=lora_b.stride(0), stride_bn=lora_b.stride(1),
        HAS_BIAS=bias is not None, PER_ADAPTER_SCALE=scales is not None, STORE_SHRINK=store_shrink,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_R=block_r,
        UPCAST=interpreting() and x2.dtype != torch.float32, IEEE=x2.dtype == torch.float32 or interpreting(),
    )
    if M // tokens > 1 and tokens % config.block_m != 0:  # some row tile may hold several adapters
        launch(
            # two stages: the fixup also holds a tile's per-row adapter operands, and three spill on sm_80
            _multi_lora_fixup_kernel, (m_tiles,), num_warps=config.num_warps, num_stages=min(config.num_stages, 2),
            X=x2, A=lora_a, B=lora_b, Ids=ids, Scales=scales if scales is not None else y, Y=y,
            Shrink=shrink if shrink is not None else y, M=M, N=N, K=K, R=rank, tokens=tokens, num_n_tiles=n_tiles,
            scale=float(scale), stride_xm=x2.stride(0), stride_aa=lora_a.stride(0), stride_ar=lora_a.stride(1),
            stride_ba=lora_b.stride(0), stride_bn=lora_b.stride(1),
            PER_ADAPTER_SCALE=scales is not None, STORE_SHRINK=store_shrink,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_R=block_r,
            UPCAST=interpreting() and x2.dtype != torch.float32, IEEE=x2.dtype == torch.float32 or interpreting(),
        )
    return y, shrink


def lora_grad(u: torch.Tensor, v: torch.Tensor, ids, tokens: int, num_adapters: int, scale: float,
              scales) -> torch.Tensor:
    """Per-adapter sums s_a * U_a^T V_a over the rows of adapter a: (n, r, Q) fp32.

    u: (M, r) fp32 shrink, contiguous; v: (M, Q) activations with contiguous rows. Row chunks
    write separate partials, summed here in a fixed order.
    """
    M, rank = u.shape
    Q = v.shape[1]
    config = grad_config(v.dtype, rank)
    m_tiles, q_tiles = triton.cdiv(M, config.block_m), triton.cdiv(Q, config.block_q)
    chunks = max(1, min(m_tiles, triton.cdiv(2 * sm_count(v.device), num_adapters * q_tiles)))
    rows_per_chunk = triton.cdiv(m_tiles, chunks) * config.block_m
    chunks = triton.cdiv(M, rows_per_chunk)
    partials = empty((chunks, num_adapters, rank, Q), dtype=torch.float32, device=v.device)
    launch(
        _lora_grad_kernel, (num_adapters * q_tiles, chunks), num_warps=config.num_warps,
        num_stages=config.num_stages,
        U=u, V=v, Ids=ids, Scales=scales if scales is not None else u, Out=partials,
        M=M, R=rank, Q=Q, tokens=tokens, rows_per_chunk=rows_per_chunk, num_q_tiles=q_tiles, scale=float(scale),
        stride_vm=v.stride(0), PER_ADAPTER_SCALE=scales is not None, BLOCK_M=config.block_m,
        BLOCK_Q=config.block_q, BLOCK_R=padded_rank(rank), UPCAST=interpreting() and v.dtype != torch.float32,
        IEEE=v.dtype == torch.float32 or interpreting(),
    )
    return partials.sum(0)


def inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index every operand's last dim with stride 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def multi_lora_forward_triton(x2, weight, bias, lora_a, lora_b, ids, tokens, scale, scales, store_shrink):
    """y = x2 W^T + bias + s[id] (x2 A[id]^T) B[id]^T; x2 is (M, K) with ids per ``tokens`` rows."""
    x2, weight, lora_a, lora_b = (inner_contiguous(t) for t in (x2, weight, lora_a, lora_b))
    return fused_lora_gemm(x2, weight, bias, lora_a, lora_b, ids, tokens, scale, scales, store_shrink)


def multi_lora_backward_triton(grad_y2, x2, weight, lora_a, lora_b, ids, tokens, scale, scales, shrink):
    """(dx, dA, dB) from dy (M, N), x (M, K) and the forward's shrink x A^T (M, r) fp32."""
    grad_y2, x2 = inner_contiguous(grad_y2), inner_contiguous(x2)
    # dx = dy W + s (dy B[id]) A[id]: the fused kernel on the transposed operands. The copies
    # are of the weights, O(N K), against the O(M N K) product.
    weight_t, lora_b_t, lora_a_t = (t.transpose(-1, -2).contiguous() for t in (weight, lora_b, lora_a))
    dx, g = fused_lora_gemm(grad_y2, weight_t, None, lora_b_t, lora_a_t, ids, tokens, scale, scales,
                            store_shrink=True)
    if grad_y2.shape[0] == 0:
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    num_adapters = lora_a.shape[0]
    d_a = lora_grad(g, x2, ids, tokens, num_adapters, scale, scales)  # s g^T x
    d_b = lora_grad(shrink, grad_y2, ids, tokens, num_adapters, scale, scales)  # (s dy^T xa)^T
    return dx, d_a.to(lora_a.dtype), d_b.transpose(1, 2).to(lora_b.dtype, memory_format=torch.contiguous_format)
