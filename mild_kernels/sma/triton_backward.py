"""Triton backward kernels of spatially-modulated attention.

With scores S = scale q k^T + bias (natural units), P = exp(S - lse) recomputed from
the forward pass's lse, and delta = rowsum(dO * O) + rowsum(dMass * Mass) - dlse:

    dP = dO V^T + dMass Mk^T,   dS = P * (dP - delta)
    dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K,   dW[b, h] = Mq^T dS Mk

Two kernels, in the FlashAttention-2 arrangement:

- ``_sma_bwd_dkdv_kernel``: one program per key tile walks the query tiles that the
  transposed tile-sparsity lists name (the same pairs the forward visited), keeping
  dK and dV in registers. It writes one (R, R) partial of dW per key tile, which
  torch then sums in a fixed order, so dW never needs atomics. With
  ``deterministic=False`` it also adds dQ into an fp32 buffer with atomics.
- ``_sma_bwd_dq_kernel`` (``deterministic=True``): one program per query tile walks
  its key tiles and accumulates dQ in registers: no atomics anywhere, so gradients
  are bitwise repeatable.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._runtime import empty, interpreting, launch
from .sparsity import tile_sparsity
from .triton_forward import (LOG2E, _dot_fp32, _dot_onehot, _load_tile, config_variant, head_dim_class,
                             kernel_precision, pad_head_dim, padded_head_dim, padded_regions)


@triton.jit
def _tile_scores(q, k, lq, lk, q_bits, bias_base, mq, kw, qk_scale, R,
                 MASKED: tl.constexpr, SOFT: tl.constexpr, PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of one (query tile, key tile) pair in log2 units, -inf at blocked pairs."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SOFT:
        s += _dot_fp32(mq, tl.trans(kw), PRECISION)
    else:
        s += tl.load(bias_base + (lq * R)[:, None] + lk[None, :])
    if MASKED:
        allowed = ((q_bits[:, None] >> lk[None, :].to(q_bits.dtype)) & 1) != 0
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def _one_hot(labels, offs_r, PRECISION: tl.constexpr):
    """(len, BLOCK_R) one-hot rows; bf16 (exact) for _dot_onehot's split dots, which halves their registers."""
    if PRECISION == "split":
        out = (labels[:, None] == offs_r[None, :]).to(tl.bfloat16)
    else:
        out = (labels[:, None] == offs_r[None, :]).to(tl.float32)
    return out


@triton.jit
def _load_key_tile(base, offs_n, offs_d, stride_n, Nk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr):
    tile = _load_tile(base + offs_n[:, None] * stride_n + offs_d[None, :], offs_n, offs_d, Nk, True,
                      BLOCK_D != HEAD_DIM, HEAD_DIM)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _sma_bwd_dkdv_tiles(dk, dv, dw, k, v, lk, mk, kw, k_mass, k_base, v_base, stride_kn, stride_vn,
                        Q, DO, Lse, Delta, DMass, QLabels, QMem, AllowBits, DQ,
                        bias_base, q_row_base, qlab_base, qmem_base, stats_base, dq_base, allow_base,
                        stride_qn, stride_don, stride_dqn,
                        tile_index, tile_count, offs_n, Nq, Nk, R, qk_scale, scale,
                        MASKED: tl.constexpr, SOFT: tl.constexpr, MASS_GRAD: tl.constexpr,
                        ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        RELOAD_KV: tl.constexpr):
    """Accumulates one key tile's dK, dV and dW partials over the query tiles of one list.

    RELOAD_KV reads the key and value tiles again for every query tile (from L1/L2)
    instead of holding them in registers across the loop: the price of wide head dims.
    """
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_tile = tl.arange(0, BLOCK_M)
    in_n = offs_n < Nk
    for j in range(tile_count):
        offs_m = tl.load(tile_index + j) * BLOCK_M + offs_tile
        if RELOAD_KV:
            kt = _load_key_tile(k_base, offs_n, offs_d, stride_kn, Nk, HEAD_DIM, BLOCK_D, UPCAST)
            vt = _load_key_tile(v_base, offs_n, offs_d, stride_vn, Nk, HEAD_DIM, BLOCK_D, UPCAST)
        else:
            kt = k
            vt = v
        in_m = offs_m < Nq
        q = _load_tile(Q + q_row_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, offs_d, Nq,
                       MASKED, BLOCK_D != HEAD_DIM, HEAD_DIM)
        do = _load_tile(DO + q_row_base + offs_m[:, None] * stride_don + offs_d[None, :], offs_m, offs_d, Nq,
                        MASKED, BLOCK_D != HEAD_DIM, HEAD_DIM)
        if MASKED:
            lq = tl.load(qlab_base + offs_m, mask=in_m, other=0)
            lse = tl.load(Lse + stats_base + offs_m, mask=in_m, other=float("inf"))
            delta = tl.load(Delta + stats_base + offs_m, mask=in_m, other=0.0)
        else:
            lq = tl.load(qlab_base + offs_m)
            lse = tl.load(Lse + stats_base + offs_m)
            delta = tl.load(Delta + stats_base + offs_m)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        q_bits = tl.load(allow_base + lq)
        if SOFT:
            mq = tl.load(qmem_base + offs_m[:, None] * R + offs_r[None, :],
                         mask=in_m[:, None] & (offs_r[None, :] < R), other=0.0)
        else:
            mq = _one_hot(lq, offs_r, PRECISION)
        s = _tile_scores(q, kt, lq, lk, q_bits, bias_base, mq, kw, qk_scale, R, MASKED, SOFT, PRECISION, DOT_PRECISION)
        if MASKED:
            s = tl.where(in_m[:, None] & in_n[None, :], s, float("-inf"))
        # Rows with every key blocked have lse = -inf: shift by +inf so that P = 0.
        lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        p = tl.math.exp2(s - lse_log2[:, None])
        p_mm = p.to(kt.dtype)
        dv = tl.dot(tl.trans(p_mm), do.to(kt.dtype), dv, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PRECISION)
        if MASS_GRAD:
            dmass = tl.load(DMass + (stats_base + offs_m[:, None]) * R + offs_r[None, :],
                            mask=in_m[:, None] & (offs_r[None, :] < R), other=0.0)
            if SOFT:
                dp += _dot_fp32(dmass, tl.trans(k_mass), PRECISION)
            else:
                dp += _dot_onehot(dmass, tl.trans(k_mass), False, PRECISION)
        ds = p * (dp - delta[:, None])
        ds_mm = ds.to(kt.dtype)
        dk = tl.dot(tl.trans(ds_mm), q.to(kt.dtype), dk, input_precision=DOT_PRECISION)
        if SOFT:
            dw += _dot_fp32(tl.trans(mq), _dot_fp32(ds, k_mass, PRECISION), PRECISION)
        else:
            dw += _dot_onehot(tl.trans(mq), _dot_onehot(ds, k_mass, False, PRECISION), True, PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(ds_mm, kt, input_precision=DOT_PRECISION) * scale
            dq_ptrs = DQ + dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=in_m[:, None] & (offs_d[None, :] < HEAD_DIM))
    return dk, dv, dw


@triton.jit
def _sma_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DMass, DQ, DK, DV, DW,
                         QLabels, KLabels, QMem, KMem, Bias, AllowBits,
                         PartialCount, PartialIndex, FullCount, FullIndex,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                         stride_dqb, stride_dqh, stride_dqn,
                         stride_qlab_b, stride_klab_b, stride_qmem_b, stride_kmem_b,
                         stride_bias_b, stride_bias_h, stride_allow_b, stride_count_b, stride_index_b,
                         H, Nq, Nk, R, num_q_tiles, qk_scale, scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SOFT: tl.constexpr,
                         MASS_GRAD: tl.constexpr, ATOMIC_DQ: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, RELOAD_KV: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    in_n = offs_n < Nk
    in_r = offs_r < R

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # Unused (and not loaded: dead code) when RELOAD_KV.
    k = _load_key_tile(k_base, offs_n, offs_d, stride_kn, Nk, HEAD_DIM, BLOCK_D, UPCAST)
    v = _load_key_tile(v_base, offs_n, offs_d, stride_vn, Nk, HEAD_DIM, BLOCK_D, UPCAST)
    lk = tl.load(KLabels + b * stride_klab_b + offs_n, mask=in_n, other=0)
    bias_base = Bias + b * stride_bias_b + h * stride_bias_h
    if SOFT:
        mk = tl.load(KMem + b * stride_kmem_b + offs_n[:, None] * R + offs_r[None, :],
                     mask=in_n[:, None] & in_r[None, :], other=0.0)
        # kw = Mk W^T, so that the bias of a query tile is Mq kw^T.
        w_t = tl.load(bias_base + offs_r[None, :] * R + offs_r[:, None], mask=in_r[:, None] & in_r[None, :],
                      other=0.0)
        kw = _dot_fp32(mk, w_t, PRECISION)
        k_mass = mk
    else:
        mk = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        kw = mk
        k_mass = _one_hot(lk, offs_r, PRECISION)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dw = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    q_row_base = b * stride_qb + h * stride_qh
    qlab_base = QLabels + b * stride_qlab_b
    qmem_base = QMem + b * stride_qmem_b
    stats_base = pid_bh * Nq
    dq_base = b * stride_dqb + h * stride_dqh
    allow_base = AllowBits + b * stride_allow_b
    row = pid_n * num_q_tiles
    # DO shares Q's strides (the wrapper makes both contiguous).
    dk, dv, dw = _sma_bwd_dkdv_tiles(
        dk, dv, dw, k, v, lk, mk, kw, k_mass, k_base, v_base, stride_kn, stride_vn,
        Q, DO, Lse, Delta, DMass, QLabels, QMem, AllowBits, DQ,
        bias_base, q_row_base, qlab_base, qmem_base, stats_base, dq_base, allow_base,
        stride_qn, stride_don, stride_dqn,
        PartialIndex + b * stride_index_b + row, tl.load(PartialCount + b * stride_count_b + pid_n),
        offs_n, Nq, Nk, R, qk_scale, scale,
        True, SOFT, MASS_GRAD, ATOMIC_DQ, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_R, UPCAST, PRECISION, RELOAD_KV)
    dk, dv, dw = _sma_bwd_dkdv_tiles(
        dk, dv, dw, k, v, lk, mk, kw, k_mass, k_base, v_base, stride_kn, stride_vn,
        Q, DO, Lse, Delta, DMass, QLabels, QMem, AllowBits, DQ,
        bias_base, q_row_base, qlab_base, qmem_base, stats_base, dq_base, allow_base,
        stride_qn, stride_don, stride_dqn,
        FullIndex + b * stride_index_b + row, tl.load(FullCount + b * stride_count_b + pid_n),
        offs_n, Nq, Nk, R, qk_scale, scale,
        False, SOFT, MASS_GRAD, ATOMIC_DQ, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_R, UPCAST, PRECISION, RELOAD_KV)

    store_mask = in_n[:, None] & (offs_d[None, :] < HEAD_DIM)
    kv_offsets = pid_bh * Nk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=store_mask)
    dw_ptrs = DW + ((pid_bh * tl.num_programs(0) + pid_n) * R + offs_r[:, None]) * R + offs_r[None, :]
    tl.store(dw_ptrs, dw, mask=in_r[:, None] & in_r[None, :])


@triton.jit
def _sma_bwd_dq_tiles(dq, q, do, lq, q_bits, lse_log2, delta, mq, dmass, bias_base,
                      k_base, v_base, klab_base, kmem_base, stride_kn, stride_vn,
                      tile_index, tile_count, Nk, R, qk_scale,
                      MASKED: tl.constexpr, SOFT: tl.constexpr, MASS_GRAD: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_tile = tl.arange(0, BLOCK_N)
    for j in range(tile_count):
        offs_n = tl.load(tile_index + j) * BLOCK_N + offs_tile
        in_n = offs_n < Nk
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, offs_d, Nk,
                       MASKED, BLOCK_D != HEAD_DIM, HEAD_DIM)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, offs_d, Nk,
                       MASKED, BLOCK_D != HEAD_DIM, HEAD_DIM)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if MASKED:
            lk = tl.load(klab_base + offs_n, mask=in_n, other=0)
        else:
            lk = tl.load(klab_base + offs_n)
        if SOFT:
            mk = tl.load(kmem_base + offs_n[:, None] * R + offs_r[None, :],
                         mask=in_n[:, None] & (offs_r[None, :] < R), other=0.0)
        else:
            mk = (lk[:, None] == offs_r[None, :]).to(tl.float32)
        s = _tile_scores(q, k, lq, lk, q_bits, bias_base, mq, mk, qk_scale, R, MASKED, SOFT, PRECISION, DOT_PRECISION)
        if MASKED:
            s = tl.where(in_n[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse_log2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if MASS_GRAD:
            dp += _dot_fp32(dmass, tl.trans(mk), PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _sma_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DMass, DQ,
                       QLabels, KLabels, QMem, KMem, Bias, AllowBits,
                       PartialCount, PartialIndex, FullCount, FullIndex,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                       stride_qlab_b, stride_klab_b, stride_qmem_b, stride_kmem_b,
                       stride_bias_b, stride_bias_h, stride_allow_b, stride_count_b, stride_index_b,
                       H, Nq, Nk, R, num_k_tiles, qk_scale, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SOFT: tl.constexpr,
                       MASS_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < Nq
    in_r = offs_r < R
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, offs_d, Nq, True, BLOCK_D != HEAD_DIM, HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                    offs_m, offs_d, Nq, True, BLOCK_D != HEAD_DIM, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
    q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
    lse = tl.load(Lse + pid_bh * Nq + offs_m, mask=in_m, other=float("inf"))
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=in_m, other=0.0)
    bias_base = Bias + b * stride_bias_b + h * stride_bias_h
    if SOFT:
        mq = tl.load(QMem + b * stride_qmem_b + offs_m[:, None] * R + offs_r[None, :],
                     mask=in_m[:, None] & in_r[None, :], other=0.0)
        w = tl.load(bias_base + offs_r[:, None] * R + offs_r[None, :], mask=in_r[:, None] & in_r[None, :], other=0.0)
        qw = _dot_fp32(mq, w, PRECISION)
    else:
        qw = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if MASS_GRAD:
        dmass = tl.load(DMass + (pid_bh * Nq + offs_m[:, None]) * R + offs_r[None, :],
                        mask=in_m[:, None] & in_r[None, :], other=0.0)
    else:
        dmass = qw
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    klab_base = KLabels + b * stride_klab_b
    kmem_base = KMem + b * stride_kmem_b
    row = pid_m * num_k_tiles
    # _tile_scores takes (mq, kw) for the soft bias Mq kw^T; here (qw, mk) plays that part.
    dq = _sma_bwd_dq_tiles(dq, q, do, lq, q_bits, lse_log2, delta, qw, dmass, bias_base,
                           k_base, v_base, klab_base, kmem_base, stride_kn, stride_vn,
                           PartialIndex + b * stride_index_b + row, tl.load(PartialCount + b * stride_count_b + pid_m),
                           Nk, R, qk_scale, True, SOFT, MASS_GRAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_R, UPCAST, PRECISION)
    dq = _sma_bwd_dq_tiles(dq, q, do, lq, q_bits, lse_log2, delta, qw, dmass, bias_base,
                           k_base, v_base, klab_base, kmem_base, stride_kn, stride_vn,
                           FullIndex + b * stride_index_b + row, tl.load(FullCount + b * stride_count_b + pid_m),
                           Nk, R, qk_scale, False, SOFT, MASS_GRAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_R, UPCAST,
                           PRECISION)
    dq_ptrs = DQ + pid_bh * Nq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=in_m[:, None] & (offs_d[None, :] < HEAD_DIM))


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    block_m: int  # query tile
    block_n: int  # key tile
    num_warps: int
    num_stages: int
    fp32_precision: str = "ieee"  # as ForwardConfig's
    reload_kv: bool = False  # dK/dV: read the key and value tiles per query tile instead of holding them


# Per (head-dim class, fp32 inputs, variant), as FORWARD_CONFIGS: for each key the first of
# tests/tune_configs.py's candidates that compiles for sm_80 and sm_90 without spills. Where
# none does (the dK/dV kernel's register footprint; see benchmarks/NOTES.md), the candidate
# with the least stack, whose spill tests/compile_gate.py caps in KNOWN_SPILLS.
BACKWARD_CONFIGS = {
    (64, False, "plain"): BackwardConfig(16, 32, 4, 1),
    (64, False, "narrow"): BackwardConfig(16, 16, 4, 1),
    (64, False, "wide"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (64, True, "plain"): BackwardConfig(16, 16, 8, 1),
    (64, True, "narrow"): BackwardConfig(16, 16, 8, 1),
    (64, True, "wide"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (128, False, "plain"): BackwardConfig(16, 16, 8, 1),
    (128, False, "narrow"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (128, False, "wide"): BackwardConfig(16, 16, 4, 1, "ieee", reload_kv=True),  # spills
    (128, True, "plain"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),
    (128, True, "narrow"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (128, True, "wide"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),
    (256, False, "plain"): BackwardConfig(16, 32, 4, 1),  # spills
    (256, False, "narrow"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (256, False, "wide"): BackwardConfig(16, 16, 4, 1, "ieee", reload_kv=True),  # spills
    (256, True, "plain"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (256, True, "narrow"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
    (256, True, "wide"): BackwardConfig(16, 16, 8, 1, "ieee", reload_kv=True),  # spills
}


def backward_config(head_dim: int, dtype: torch.dtype, soft: bool, mass: bool, num_regions: int) -> BackwardConfig:
    return BACKWARD_CONFIGS[(head_dim_class(head_dim), dtype == torch.float32, config_variant(soft, mass,
                                                                                              num_regions))]


def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def sma_backward_triton(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, q_regions, k_regions, bias_log2,
                        allow, allow_bits, scale, num_regions, deterministic, config: BackwardConfig):
    """dq, dk, dv in the inputs' dtype and dbias as (B, H, R, R) float32."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = num_regions
    soft = q_regions.is_soft
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_mass is not None:
        delta += (grad_mass.float() * mass.float()).sum(-1)
    if grad_lse is not None:
        delta -= grad_lse.float()
    delta = delta.contiguous()
    q, k, v, grad_out = (pad_head_dim(t.contiguous()) for t in (q, k, v, grad_out))
    Dp = q.shape[-1]
    allow_t = None if allow is None else allow.transpose(-1, -2)
    backward_lists = tile_sparsity(k_regions.labels, q_regions.labels, allow_t, R, config.block_n, config.block_m)
    num_k_tiles = triton.cdiv(Nk, config.block_n)

    dk = empty((B, H, Nk, Dp), dtype=k.dtype, device=q.device)
    dv = empty((B, H, Nk, Dp), dtype=v.dtype, device=q.device)
    dw_tiles = empty((B, H, num_k_tiles, R, R), dtype=torch.float32, device=q.device)
    dq_accum = None if deterministic else torch.zeros(B, H, Nq, Dp, dtype=torch.float32, device=q.device)
    q_mem = q_regions.memberships if soft else q_regions.labels
    k_mem = k_regions.memberships if soft else k_regions.labels
    dmass = grad_mass.float().contiguous() if grad_mass is not None else delta
    common = dict(
        Q=q, K=k, V=v, DO=grad_out, Lse=lse.contiguous(), Delta=delta, DMass=dmass,
        QLabels=q_regions.labels, KLabels=k_regions.labels, QMem=q_mem, KMem=k_mem, Bias=bias_log2,
        AllowBits=allow_bits,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_dob=grad_out.stride(0), stride_doh=grad_out.stride(1), stride_don=grad_out.stride(2),
        stride_qlab_b=_batch_stride(q_regions.labels), stride_klab_b=_batch_stride(k_regions.labels),
        stride_qmem_b=_batch_stride(q_mem), stride_kmem_b=_batch_stride(k_mem),
        stride_bias_b=_batch_stride(bias_log2), stride_bias_h=0 if bias_log2.shape[1] == 1 else bias_log2.stride(1),
        stride_allow_b=_batch_stride(allow_bits),
        H=H, Nq=Nq, Nk=Nk, R=R, scale=scale,
        HEAD_DIM=Dp, BLOCK_D=padded_head_dim(D), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_R=padded_regions(R, minimum=16), SOFT=soft, MASS_GRAD=grad_mass is not None,
        UPCAST=interpreting() and q.dtype != torch.float32, PRECISION=kernel_precision(q.dtype, config),
    )
    dq_buffer = dq_accum if dq_accum is not None else dk  # unused when deterministic
    launch(_sma_bwd_dkdv_kernel, (num_k_tiles, B * H), num_warps=config.num_warps, num_stages=config.num_stages,
           DQ=dq_buffer, DK=dk, DV=dv, DW=dw_tiles,
           PartialCount=backward_lists.partial_count, PartialIndex=backward_lists.partial_index,
           FullCount=backward_lists.full_count, FullIndex=backward_lists.full_index,
           stride_dqb=dq_buffer.stride(0), stride_dqh=dq_buffer.stride(1), stride_dqn=dq_buffer.stride(2),
           stride_count_b=_batch_stride(backward_lists.partial_count),
           stride_index_b=_batch_stride(backward_lists.partial_index),
           num_q_tiles=backward_lists.partial_index.shape[-1], qk_scale=scale * LOG2E,
           ATOMIC_DQ=not deterministic, RELOAD_KV=config.reload_kv, **common)
    if deterministic:
        forward_lists = tile_sparsity(q_regions.labels, k_regions.labels, allow, R, config.block_m, config.block_n)
        dq = empty((B, H, Nq, Dp), dtype=q.dtype, device=q.device)
        launch(_sma_bwd_dq_kernel, (triton.cdiv(Nq, config.block_m), B * H), num_warps=config.num_warps,
               num_stages=config.num_stages, DQ=dq,
               PartialCount=forward_lists.partial_count, PartialIndex=forward_lists.partial_index,
               FullCount=forward_lists.full_count, FullIndex=forward_lists.full_index,
               stride_count_b=_batch_stride(forward_lists.partial_count),
               stride_index_b=_batch_stride(forward_lists.partial_index),
               num_k_tiles=forward_lists.partial_index.shape[-1], qk_scale=scale * LOG2E, **common)
    else:
        dq = dq_accum.to(q.dtype)
    return dq[..., :D], dk[..., :D], dv[..., :D], dw_tiles.sum(2)


def sma_backward_triton_launch(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, q_regions, k_regions, bias,
                               allow, scale, num_regions, deterministic):
    """The custom op's entry: lay out the tables and pick the config."""
    from .op import allow_bitmask

    config = backward_config(q.shape[-1], q.dtype, q_regions.is_soft, grad_mass is not None, num_regions)
    bias_log2 = (bias.float() * LOG2E).contiguous()
    bits = allow_bitmask(allow, num_regions, q.device)
    return sma_backward_triton(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, q_regions, k_regions,
                               bias_log2, allow, bits, scale, num_regions, deterministic, config)
