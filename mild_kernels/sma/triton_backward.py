"""Triton backward kernels of spatially-modulated attention.

With scores S (natural units), P = exp(S - lse) recomputed from the forward pass, and
delta = rowsum(dO * O) + rowsum(dMass * Mass) - dlse:

    dP = dO V^T + dMass Mk^T,   dS = P * (dP - delta)
    dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K,   dW[b, h] = Mq^T dS Mk

In the FlashAttention-2 arrangement, with no atomics (so bitwise repeatable):

- ``_sma_bwd_preprocess``: delta per row; with a region-mass gradient also the table
  ``delta[q] - dMass[q, c]`` (stored (R, Nq) like the shift table), the per-region delta
  that pure tiles read.
- ``_sma_bwd_dkdv_kernel``: one program per key block, walking the query tiles its
  layout list names, dK and dV in registers. A uniform key tile of region c (the pure
  case) recomputes P with the forward's shift table, ``P = exp2(q k^T qk_scale -
  shift[q, c])``: one column gather per query block, no bias, no mask. A mixed key tile
  runs the exact path (bias dot, element mask, key tail). Mixed key tiles come first in
  the grid, so their slower programs do not form the tail.
- ``_sma_bwd_dq_kernel``: one program per query block, walking mixed then pure key tiles
  like the forward. It also makes the bias gradient: on a pure tile all keys are in
  region c, so the tile adds ``rowsum(dS)`` to column c of a per-row table; mixed tiles
  add ``dS Mk`` with one small dot. The block's (R, R) partial ``Mq^T table`` is summed
  over blocks by torch, in a fixed order.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._runtime import empty, interpreting, launch, next_power_of_2
from .layout import REGION_BITS, TILE_M, TILE_N
from .triton_forward import (LOG2E, _as_operand, _bias_key_operand, _load_block, _load_cols,
                             _query_bias_columns, _split_operand, batch_stride, bias_dot_shape, config_variant,
                             head_dim_class, head_dim_split, kernel_precision, pad_head_dim)


@triton.jit
def _sma_bwd_preprocess(Out, DO, Mass, DMass, DLse, Delta, DTable,
                        stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                        H, Nq, R,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, RP: tl.constexpr,
                        MASS_GRAD: tl.constexpr, LSE_GRAD: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < Nq
    cols = tl.arange(0, BLOCK_D)
    mask = in_m[:, None] & (cols[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + cols[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh * Nq + offs_m
    if MASS_GRAD:
        offs_r = tl.arange(0, RP)
        mask_r = in_m[:, None] & (offs_r[None, :] < R)
        mass = tl.load(Mass + rows[:, None] * R + offs_r[None, :], mask=mask_r, other=0.0)
        dmass = tl.load(DMass + rows[:, None] * R + offs_r[None, :], mask=mask_r, other=0.0)
        delta += tl.sum(mass * dmass, 1)
    if LSE_GRAD:
        delta -= tl.load(DLse + rows, mask=in_m, other=0.0)
    tl.store(Delta + rows, delta, mask=in_m)
    if MASS_GRAD:
        # (R, Nq) per (batch row, head), like the shift table: region c's row is contiguous over queries
        tl.store(DTable + (pid_bh * R + offs_r[None, :]) * Nq + offs_m[:, None], delta[:, None] - dmass, mask=mask_r)


@triton.jit
def _sma_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DTable, DMass, Shift, DK, DV,
                         QLabels, QMem, KLabels, KOperand, Bias, AllowBits,
                         KVRunCount, KVRuns, KeyOrder, KeyRegion,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                         stride_qlab_b, stride_qmem_b, stride_klab_b, stride_kop_b, stride_kop_n,
                         stride_bias_b, stride_bias_h, stride_bias_r,
                         stride_allow_b, stride_count_b, stride_index_b, stride_key_b,
                         H, Nq, Nk, R, num_query_tiles, qk_scale, scale,
                         HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, KR: tl.constexpr,
                         TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr,
                         SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MIXED: tl.constexpr,
                         ANY_BLOCKED: tl.constexpr, MASS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                         REGION_BITS: tl.constexpr):
    """One program per key block (SUB_N per layout key tile), walking runs of query blocks."""
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile = tl.load(KeyOrder + b * stride_key_b + pid // SUB_N)
    region = tl.load(KeyRegion + b * stride_key_b + tile)
    offs_n = (tile * SUB_N + pid % SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < Nk
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k0 = _as_operand(_load_block(k_base, offs_n, stride_kn, Nk, 0, D0, HEAD_DIM, True), UPCAST)
    v0 = _as_operand(_load_block(v_base, offs_n, stride_vn, Nk, 0, D0, HEAD_DIM, True), UPCAST)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    k1 = k0
    v1 = v0
    dk1 = dk0
    dv1 = dv0
    if D1 > 0:
        k1 = _as_operand(_load_block(k_base, offs_n, stride_kn, Nk, D0, D1, HEAD_DIM, True), UPCAST)
        v1 = _as_operand(_load_block(v_base, offs_n, stride_vn, Nk, D0, D1, HEAD_DIM, True), UPCAST)
        dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stats_base = pid_bh * Nq
    offs_block = tl.arange(0, BLOCK_M)
    q_offs0 = offs_block[:, None] * stride_qn + tl.arange(0, D0)[None, :]
    do_offs0 = offs_block[:, None] * stride_don + tl.arange(0, D0)[None, :]
    q_offs1 = offs_block[:, None] * stride_qn + (D0 + tl.arange(0, D1 if D1 > 0 else 16))[None, :]
    do_offs1 = offs_block[:, None] * stride_don + (D0 + tl.arange(0, D1 if D1 > 0 else 16))[None, :]
    run_base = KVRuns + b * stride_index_b + tile * num_query_tiles * 2
    run_count = tl.load(KVRunCount + b * stride_count_b + tile)
    if region >= 0:
        # Uniform key tile: P from the forward's shift table, no bias and no mask.
        shift_base = Shift + (pid_bh * R + region) * Nq  # contiguous over queries
        if MASS_GRAD:
            delta_base = DTable + (pid_bh * R + region) * Nq
        else:
            delta_base = Delta + stats_base
        for r in range(run_count):
            start_m = tl.load(run_base + 2 * r) * (SUB_M * BLOCK_M)
            offs_m = start_m + offs_block
            q_ptrs0 = q_base + start_m * stride_qn + q_offs0
            do_ptrs0 = do_base + start_m * stride_don + do_offs0
            q_ptrs1 = q_base + start_m * stride_qn + q_offs1
            do_ptrs1 = do_base + start_m * stride_don + do_offs1
            for j in range(tl.load(run_base + 2 * r + 1) * SUB_M):
                in_m = offs_m < Nq
                q0 = _as_operand(_load_rows(q_ptrs0, in_m, 0, D0, HEAD_DIM), UPCAST)
                qk_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
                if D1 > 0:
                    q1 = _as_operand(_load_rows(q_ptrs1, in_m, D0, D1, HEAD_DIM), UPCAST)
                    qk_t = tl.dot(k1, tl.trans(q1), qk_t, input_precision=DOT_PRECISION)
                shift = tl.load(shift_base + offs_m, mask=in_m, other=float("inf"))
                p_t = tl.math.exp2(qk_t * qk_scale - shift[None, :])
                p_op = _as_operand(p_t.to(DO.dtype.element_ty), UPCAST)
                do0 = _as_operand(_load_rows(do_ptrs0, in_m, 0, D0, HEAD_DIM), UPCAST)
                dv0 = tl.dot(p_op, do0, dv0, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
                if D1 > 0:
                    do1 = _as_operand(_load_rows(do_ptrs1, in_m, D0, D1, HEAD_DIM), UPCAST)
                    dv1 = tl.dot(p_op, do1, dv1, input_precision=DOT_PRECISION)
                    dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
                delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
                ds_op = _as_operand((p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty), UPCAST)
                dk0 = tl.dot(ds_op, q0, dk0, input_precision=DOT_PRECISION)
                if D1 > 0:
                    dk1 = tl.dot(ds_op, q1, dk1, input_precision=DOT_PRECISION)
                q_ptrs0 += BLOCK_M * stride_qn
                do_ptrs0 += BLOCK_M * stride_don
                q_ptrs1 += BLOCK_M * stride_qn
                do_ptrs1 += BLOCK_M * stride_don
                offs_m += BLOCK_M
    else:
        # Mixed key tile: the exact bias dot, the element mask and the key tail.
        if HAS_MIXED:
            lk = tl.load(KLabels + b * stride_klab_b + offs_n, mask=in_n, other=0)
            bias_base = Bias + b * stride_bias_b + h * stride_bias_h
            qmem_base = QMem + b * stride_qmem_b
            k_op = _bias_key_operand(lk, offs_n, in_n, KOperand + b * stride_kop_b, stride_kop_n, R, KR, TERMS_Q,
                                     TERMS_K, SOFT, UPCAST)
            mass_cols = tl.arange(0, KR) // (TERMS_Q * TERMS_K)
            # Query blocks half the pure loop's: this branch's extra operands then fit in the
            # registers the pure branch sets for the whole kernel.
            MIXED_M: tl.constexpr = BLOCK_M // 2 if BLOCK_M >= 32 else BLOCK_M
            MIXED_SUB: tl.constexpr = SUB_M * BLOCK_M // MIXED_M
            for r in range(run_count):
                first_block = tl.load(run_base + 2 * r) * MIXED_SUB
                for j in range(tl.load(run_base + 2 * r + 1) * MIXED_SUB):
                    offs_m = (first_block + j) * MIXED_M + tl.arange(0, MIXED_M)
                    in_m = offs_m < Nq
                    lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
                    q0 = _as_operand(_load_block(q_base, offs_m, stride_qn, Nq, 0, D0, HEAD_DIM, True), UPCAST)
                    s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
                    if D1 > 0:
                        q1 = _as_operand(_load_block(q_base, offs_m, stride_qn, Nq, D0, D1, HEAD_DIM, True), UPCAST)
                        s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PRECISION)
                    s_t = s_t * qk_scale
                    if HAS_BIAS:
                        q_op = _split_operand(_query_bias_columns(lq, offs_m, in_m, qmem_base, bias_base, stride_bias_r,
                                                                  R, KR, TERMS_Q * TERMS_K, RP, SOFT), TERMS_Q, UPCAST)
                        s_t = tl.dot(k_op, tl.trans(q_op), s_t, input_precision=PRECISION if TERMS_Q == 1 else "tf32")
                    allowed = in_n[:, None] & in_m[None, :]
                    if ANY_BLOCKED:
                        q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
                        allowed = allowed & (((q_bits[None, :] >> lk[:, None].to(q_bits.dtype)) & 1) != 0)
                    lse = tl.load(Lse + stats_base + offs_m, mask=in_m, other=float("inf"))
                    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # P = 0 there
                    p_t = tl.math.exp2(tl.where(allowed, s_t, float("-inf")) - lse_log2[None, :])
                    p_op = _as_operand(p_t.to(DO.dtype.element_ty), UPCAST)
                    do0 = _as_operand(_load_block(do_base, offs_m, stride_don, Nq, 0, D0, HEAD_DIM, True), UPCAST)
                    dv0 = tl.dot(p_op, do0, dv0, input_precision=DOT_PRECISION)
                    dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
                    if D1 > 0:
                        do1 = _as_operand(_load_block(do_base, offs_m, stride_don, Nq, D0, D1, HEAD_DIM, True), UPCAST)
                        dv1 = tl.dot(p_op, do1, dv1, input_precision=DOT_PRECISION)
                        dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
                    if MASS_GRAD:  # dP += dMass Mk^T, one dot of split operands like the bias
                        dmass = tl.load(DMass + (stats_base + offs_m[:, None]) * R + mass_cols[None, :],
                                        mask=in_m[:, None] & (mass_cols[None, :] < R), other=0.0)
                        dp_t = tl.dot(k_op, tl.trans(_split_operand(dmass, TERMS_Q, UPCAST)), dp_t,
                                      input_precision=PRECISION if TERMS_Q == 1 else "tf32")
                    delta = tl.load(Delta + stats_base + offs_m, mask=in_m, other=0.0)
                    ds_op = _as_operand((p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty), UPCAST)
                    dk0 = tl.dot(ds_op, q0, dk0, input_precision=DOT_PRECISION)
                    if D1 > 0:
                        dk1 = tl.dot(ds_op, q1, dk1, input_precision=DOT_PRECISION)

    kv_rows = pid_bh * Nk + offs_n
    cols0 = tl.arange(0, D0)
    tl.store(DK + kv_rows[:, None] * HEAD_DIM + cols0[None, :], (dk0 * scale).to(DK.dtype.element_ty),
             mask=in_n[:, None] & (cols0[None, :] < HEAD_DIM))
    tl.store(DV + kv_rows[:, None] * HEAD_DIM + cols0[None, :], dv0.to(DV.dtype.element_ty),
             mask=in_n[:, None] & (cols0[None, :] < HEAD_DIM))
    if D1 > 0:
        cols1 = D0 + tl.arange(0, D1)
        tl.store(DK + kv_rows[:, None] * HEAD_DIM + cols1[None, :], (dk1 * scale).to(DK.dtype.element_ty),
                 mask=in_n[:, None] & (cols1[None, :] < HEAD_DIM))
        tl.store(DV + kv_rows[:, None] * HEAD_DIM + cols1[None, :], dv1.to(DV.dtype.element_ty),
                 mask=in_n[:, None] & (cols1[None, :] < HEAD_DIM))


@triton.jit
def _load_rows(ptrs, in_rows, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A block of rows, masked by row (and by column past the head dim, if any)."""
    if COL0 + WIDTH > HEAD_DIM:
        block = tl.load(ptrs, mask=in_rows[:, None] & (COL0 + tl.arange(0, WIDTH) < HEAD_DIM)[None, :], other=0.0)
    else:
        block = tl.load(ptrs, mask=in_rows[:, None], other=0.0)
    return block


@triton.jit
def _sma_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DTable, DMass, Shift, DQ, DW, StateDQ, StateSums,
                       QLabels, QMem, KLabels, KMem, KOperand, Bias, AllowBits,
                       RunCount, Runs, MixedCount, MixedIndex,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                       stride_qlab_b, stride_qmem_b, stride_klab_b, stride_kmem_b, stride_kop_b, stride_kop_n,
                       stride_bias_b, stride_bias_h, stride_bias_r,
                       stride_allow_b, stride_count_b, stride_index_b, stride_runs_b,
                       H, Nq, Nk, R, num_key_tiles, qk_scale, scale,
                       HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, KR: tl.constexpr,
                       TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr,
                       SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, MIXED: tl.constexpr, HAS_MIXED: tl.constexpr,
                       ANY_BLOCKED: tl.constexpr, MASS_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                       REGION_BITS: tl.constexpr):
    """As the forward: MIXED=True walks the mixed key tiles and leaves dq and the region sums in
    the State buffers; MIXED=False resumes from them, walks the pure runs and writes dq and
    this block's bias-gradient partial."""
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    list_row = pid_m // SUB_M
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < Nq
    rows = pid_bh * Nq + offs_m
    mixed_count = 0
    if HAS_MIXED:
        mixed_count = tl.load(MixedCount + b * stride_count_b + list_row)
    if not MIXED or mixed_count > 0:
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        q0 = _as_operand(_load_block(q_base, offs_m, stride_qn, Nq, 0, D0, HEAD_DIM, True), UPCAST)
        do0 = _as_operand(_load_block(do_base, offs_m, stride_don, Nq, 0, D0, HEAD_DIM, True), UPCAST)
        q1 = q0
        do1 = do0
        if D1 > 0:
            q1 = _as_operand(_load_block(q_base, offs_m, stride_qn, Nq, D0, D1, HEAD_DIM, True), UPCAST)
            do1 = _as_operand(_load_block(do_base, offs_m, stride_don, Nq, D0, D1, HEAD_DIM, True), UPCAST)
        cols0 = tl.arange(0, D0)
        cols1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
        offs_r = tl.arange(0, RP)
        in_r = offs_r < R
        delta = tl.load(Delta + rows, mask=in_m, other=0.0)
        lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
        qmem_base = QMem + b * stride_qmem_b
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        if MIXED:
            dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
            dq1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
            region_sums = tl.zeros((BLOCK_M, RP), dtype=tl.float32)  # (dS Mk)[q, r]
            bias_base = Bias + b * stride_bias_b + h * stride_bias_h
            q_op = q0
            if HAS_BIAS:
                q_op = _split_operand(_query_bias_columns(lq, offs_m, in_m, qmem_base, bias_base, stride_bias_r, R,
                                                          KR, TERMS_Q * TERMS_K, RP, SOFT), TERMS_Q, UPCAST)
            dmass_op = q_op
            if MASS_GRAD:
                mass_cols = tl.arange(0, KR) // (TERMS_Q * TERMS_K)
                dmass_op = _split_operand(tl.load(DMass + rows[:, None] * R + mass_cols[None, :],
                                                  mask=in_m[:, None] & (mass_cols[None, :] < R), other=0.0),
                                          TERMS_Q, UPCAST)
            q_bits = lq
            if ANY_BLOCKED:
                q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
            lse = tl.load(Lse + rows, mask=in_m, other=float("inf"))
            lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # blocked rows: P = 0
            mixed_index = MixedIndex + b * stride_index_b + list_row * num_key_tiles
            for j in range(mixed_count * SUB_N):
                offs_n = (tl.load(mixed_index + j // SUB_N) * SUB_N + j % SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
                in_n = offs_n < Nk
                lk = tl.load(KLabels + b * stride_klab_b + offs_n, mask=in_n, other=0)
                k0 = _as_operand(_load_block(k_base, offs_n, stride_kn, Nk, 0, D0, HEAD_DIM, True), UPCAST)
                s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
                if D1 > 0:
                    k1 = _as_operand(_load_block(k_base, offs_n, stride_kn, Nk, D0, D1, HEAD_DIM, True), UPCAST)
                    s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
                s = s * qk_scale
                k_op = _bias_key_operand(lk, offs_n, in_n, KOperand + b * stride_kop_b, stride_kop_n, R, KR,
                                         TERMS_Q, TERMS_K, SOFT, UPCAST)
                if HAS_BIAS:
                    s = tl.dot(q_op, tl.trans(k_op), s, input_precision=PRECISION if TERMS_Q == 1 else "tf32")
                allowed = in_n[None, :]
                if ANY_BLOCKED:
                    allowed = allowed & (((q_bits[:, None] >> lk[None, :].to(q_bits.dtype)) & 1) != 0)
                p = tl.math.exp2(tl.where(allowed, s, float("-inf")) - lse_log2[:, None])
                v0 = _as_operand(_load_block(v_base, offs_n, stride_vn, Nk, 0, D0, HEAD_DIM, True), UPCAST)
                dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
                if D1 > 0:
                    v1 = _as_operand(_load_block(v_base, offs_n, stride_vn, Nk, D0, D1, HEAD_DIM, True), UPCAST)
                    dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
                if MASS_GRAD:
                    dp = tl.dot(dmass_op, tl.trans(k_op), dp, input_precision=PRECISION if TERMS_Q == 1 else "tf32")
                ds = p * (dp - delta[:, None])
                ds_op = _as_operand(ds.to(K.dtype.element_ty), UPCAST)
                dq0 = tl.dot(ds_op, k0, dq0, input_precision=DOT_PRECISION)
                if D1 > 0:
                    dq1 = tl.dot(ds_op, k1, dq1, input_precision=DOT_PRECISION)
                if BIAS_GRAD:  # region_sums += dS Mk, exact to ~16 bits: dS split into bf16 halves
                    if SOFT:
                        mk = tl.load(KMem + b * stride_kmem_b + offs_n[:, None] * R + offs_r[None, :],
                                     mask=in_n[:, None] & (offs_r[None, :] < R), other=0.0)
                    else:
                        mk = tl.where(lk[:, None] == offs_r[None, :], 1.0, 0.0)
                    if TERMS_Q == 2:
                        ds_hi = ds.to(tl.bfloat16)
                        ds_lo = _as_operand((ds - ds_hi.to(tl.float32)).to(tl.bfloat16), UPCAST)
                        ds_hi = _as_operand(ds_hi, UPCAST)
                        mk_hi = mk.to(tl.bfloat16)
                        mk_lo = _as_operand((mk - mk_hi.to(tl.float32)).to(tl.bfloat16), UPCAST)
                        mk_hi = _as_operand(mk_hi, UPCAST)
                        region_sums = tl.dot(ds_hi, mk_hi, region_sums)
                        region_sums = tl.dot(ds_lo, mk_hi, region_sums)
                        if SOFT:
                            region_sums = tl.dot(ds_hi, mk_lo, region_sums)
                    else:
                        region_sums = tl.dot(ds, mk, region_sums, input_precision=PRECISION)
            tl.store(StateDQ + rows[:, None] * HEAD_DIM + cols0[None, :], dq0,
                     mask=in_m[:, None] & (cols0[None, :] < HEAD_DIM))
            if D1 > 0:
                tl.store(StateDQ + rows[:, None] * HEAD_DIM + cols1[None, :], dq1,
                         mask=in_m[:, None] & (cols1[None, :] < HEAD_DIM))
            if BIAS_GRAD:
                tl.store(StateSums + rows[:, None] * R + offs_r[None, :], region_sums, mask=in_m[:, None] & in_r[None, :])
        else:
            if HAS_MIXED:
                resume = in_m & (tl.zeros_like(lq) + mixed_count > 0)  # a block: the interpreter rejects 0-d masks
            else:
                resume = offs_m < 0
            dq0 = tl.load(StateDQ + rows[:, None] * HEAD_DIM + cols0[None, :],
                          mask=resume[:, None] & (cols0[None, :] < HEAD_DIM), other=0.0)
            dq1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
            if D1 > 0:
                dq1 = tl.load(StateDQ + rows[:, None] * HEAD_DIM + cols1[None, :],
                              mask=resume[:, None] & (cols1[None, :] < HEAD_DIM), other=0.0)
            region_sums = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
            if BIAS_GRAD:
                region_sums = tl.load(StateSums + rows[:, None] * R + offs_r[None, :],
                                      mask=resume[:, None] & in_r[None, :], other=0.0)
            # Pure runs: P from the shift table; the bias gradient is a row sum per run.
            offs_block = tl.arange(0, BLOCK_N)
            k_offs0 = offs_block[:, None] * stride_kn + cols0[None, :]
            v_offs0 = offs_block[:, None] * stride_vn + cols0[None, :]
            k_offs1 = offs_block[:, None] * stride_kn + cols1[None, :]
            v_offs1 = offs_block[:, None] * stride_vn + cols1[None, :]
            run_base = Runs + b * stride_runs_b + list_row * num_key_tiles * 2
            for r in range(tl.load(RunCount + b * stride_count_b + list_row)):
                head = tl.load(run_base + 2 * r)
                region = head & ((1 << REGION_BITS) - 1)
                start_n = (head >> REGION_BITS) * (SUB_N * BLOCK_N)
                shift = tl.load(Shift + (pid_bh * R + region) * Nq + offs_m, mask=in_m, other=float("inf"))
                if MASS_GRAD:
                    row_delta = tl.load(DTable + (pid_bh * R + region) * Nq + offs_m, mask=in_m, other=0.0)
                else:
                    row_delta = delta
                run_sum = tl.zeros_like(delta)
                k_ptrs0 = k_base + start_n * stride_kn + k_offs0
                v_ptrs0 = v_base + start_n * stride_vn + v_offs0
                k_ptrs1 = k_base + start_n * stride_kn + k_offs1
                v_ptrs1 = v_base + start_n * stride_vn + v_offs1
                for j in range(tl.load(run_base + 2 * r + 1) * SUB_N):
                    k0 = _as_operand(_load_cols(k_ptrs0, 0, D0, HEAD_DIM), UPCAST)
                    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
                    if D1 > 0:
                        k1 = _as_operand(_load_cols(k_ptrs1, D0, D1, HEAD_DIM), UPCAST)
                        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
                    p = tl.math.exp2(qk * qk_scale - shift[:, None])
                    v0 = _as_operand(_load_cols(v_ptrs0, 0, D0, HEAD_DIM), UPCAST)
                    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
                    if D1 > 0:
                        v1 = _as_operand(_load_cols(v_ptrs1, D0, D1, HEAD_DIM), UPCAST)
                        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
                    ds = p * (dp - row_delta[:, None])
                    ds_op = _as_operand(ds.to(K.dtype.element_ty), UPCAST)
                    dq0 = tl.dot(ds_op, k0, dq0, input_precision=DOT_PRECISION)
                    if D1 > 0:
                        dq1 = tl.dot(ds_op, k1, dq1, input_precision=DOT_PRECISION)
                        k_ptrs1 += BLOCK_N * stride_kn
                        v_ptrs1 += BLOCK_N * stride_vn
                    if BIAS_GRAD:
                        run_sum += tl.sum(ds, 1)
                    k_ptrs0 += BLOCK_N * stride_kn
                    v_ptrs0 += BLOCK_N * stride_vn
                if BIAS_GRAD:  # every key of the run is in region c
                    region_sums += tl.where(offs_r[None, :] == region, run_sum[:, None], 0.0)

            tl.store(DQ + rows[:, None] * HEAD_DIM + cols0[None, :], (dq0 * scale).to(DQ.dtype.element_ty),
                     mask=in_m[:, None] & (cols0[None, :] < HEAD_DIM))
            if D1 > 0:
                tl.store(DQ + rows[:, None] * HEAD_DIM + cols1[None, :], (dq1 * scale).to(DQ.dtype.element_ty),
                         mask=in_m[:, None] & (cols1[None, :] < HEAD_DIM))
            if BIAS_GRAD:  # this block's (R, R) partial: Mq^T region_sums, exact in fp32
                if SOFT:
                    mq = tl.load(qmem_base + offs_m[:, None] * R + offs_r[None, :], mask=in_m[:, None] & in_r[None, :],
                                 other=0.0)
                else:
                    mq = tl.where(in_m[:, None] & (lq[:, None] == offs_r[None, :]), 1.0, 0.0)
                partial = tl.dot(tl.trans(mq), region_sums, input_precision="ieee")
                dw_base = DW + (pid_bh * tl.num_programs(0) + pid_m) * R * R
                tl.store(dw_base + offs_r[:, None] * R + offs_r[None, :], partial, mask=in_r[:, None] & in_r[None, :])


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query block: per dK/dV iteration, or per dQ program
    block_n: int  # key block: per dK/dV program, or per dQ iteration
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    dkdv: KernelConfig
    dq: KernelConfig
    fp32_precision: str = "ieee"  # as ForwardConfig's


def _config(dkdv, dq, precision="ieee"):
    return BackwardConfig(KernelConfig(*dkdv), KernelConfig(*dq), precision)


# Per (head-dim class, fp32 inputs, variant), as FORWARD_CONFIGS; see tests/tune_configs.py.
# A dK/dV program owns 64 keys at most (the layout's key tile), so it runs one warpgroup:
# with two, both would compute the same 64-row products.
BACKWARD_CONFIGS = {
    (64, False, "plain"): _config((64, 64, 4, 2), (128, 64, 8, 2)),
    (64, False, "mass"): _config((64, 64, 4, 2), (128, 64, 8, 2)),
    (64, False, "wide"): _config((64, 64, 4, 2), (64, 64, 4, 2)),
    (64, True, "plain"): _config((32, 32, 4, 2), (32, 32, 4, 2)),
    (64, True, "mass"): _config((32, 32, 4, 2), (32, 32, 4, 2)),
    (64, True, "wide"): _config((32, 32, 4, 2), (32, 32, 4, 2)),
    (128, False, "plain"): _config((64, 64, 4, 2), (64, 64, 4, 2)),
    (128, False, "mass"): _config((64, 64, 4, 2), (64, 64, 4, 2)),
    (128, False, "wide"): _config((64, 64, 4, 2), (64, 64, 4, 2)),
    (128, True, "plain"): _config((16, 32, 4, 2), (16, 32, 4, 2)),
    (128, True, "mass"): _config((16, 32, 4, 2), (16, 32, 4, 2)),
    (128, True, "wide"): _config((16, 32, 4, 2), (16, 32, 4, 2)),
    (256, False, "plain"): _config((64, 32, 4, 2), (64, 32, 4, 2)),
    (256, False, "mass"): _config((64, 32, 4, 2), (64, 32, 4, 2)),
    (256, False, "wide"): _config((64, 32, 4, 2), (64, 32, 4, 2)),
    (256, True, "plain"): _config((16, 16, 4, 2), (16, 16, 4, 2)),
    (256, True, "mass"): _config((16, 16, 4, 2), (16, 16, 4, 2)),
    (256, True, "wide"): _config((16, 16, 4, 2), (16, 16, 4, 2)),
}


def backward_config(head_dim: int, dtype: torch.dtype, soft: bool, mass: bool, num_regions: int) -> BackwardConfig:
    return BACKWARD_CONFIGS[(head_dim_class(head_dim), dtype == torch.float32,
                             config_variant(soft, mass, num_regions))]


def sma_backward_triton(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, shift, layout, bias, scale,
                        config: BackwardConfig):
    """dq, dk, dv in the inputs' dtype and dbias as (B, H, R, R) float32 (zeros without a bias)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = layout.num_regions
    qr, kr, tiles, info = layout.q_regions, layout.k_regions, layout.tiles, layout.info
    soft = qr.is_soft
    device = q.device
    mass_grad = grad_mass is not None
    q, k, v, grad_out = (pad_head_dim(t) for t in (q, k, v, grad_out))
    Dp = q.shape[-1]
    rp = max(16, next_power_of_2(R))
    delta = empty((B, H, Nq), dtype=torch.float32, device=device)
    dtable = empty((B, H, R, Nq), dtype=torch.float32, device=device) if mass_grad else delta
    pre_block = 64
    launch(_sma_bwd_preprocess, (triton.cdiv(Nq, pre_block), B * H), num_warps=4, num_stages=1,
           Out=out, DO=grad_out, Mass=mass if mass_grad else delta, DMass=grad_mass if mass_grad else delta,
           DLse=grad_lse if grad_lse is not None else delta, Delta=delta, DTable=dtable,
           stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
           stride_dob=grad_out.stride(0), stride_doh=grad_out.stride(1), stride_don=grad_out.stride(2),
           H=H, Nq=Nq, R=R, HEAD_DIM=D, BLOCK_D=next_power_of_2(D), BLOCK_M=pre_block, RP=rp,
           MASS_GRAD=mass_grad, LSE_GRAD=grad_lse is not None)

    precision = kernel_precision(q.dtype, config)
    kr_width, terms_q, terms_k = bias_dot_shape(R, soft, precision)
    q_mem = qr.memberships if soft else qr.labels
    k_mem = kr.memberships if soft else kr.labels
    k_op = layout.k_split if soft and terms_k == 2 else k_mem
    table = bias if bias is not None else delta  # unread without a bias
    d0, d1 = head_dim_split(Dp)
    dq = empty((B, H, Nq, Dp), dtype=q.dtype, device=device)
    dk = empty((B, H, Nk, Dp), dtype=k.dtype, device=device)
    dv = empty((B, H, Nk, Dp), dtype=v.dtype, device=device)
    bias_grad = bias is not None
    q_blocks = triton.cdiv(Nq, config.dq.block_m)
    dw = empty((B, H, q_blocks, R, R), dtype=torch.float32, device=device) if bias_grad else delta
    if info.has_mixed:
        state = (empty((B, H, Nq, Dp), dtype=torch.float32, device=device),
                 empty((B, H, Nq, R), dtype=torch.float32, device=device) if bias_grad else delta)
    else:
        state = (delta, delta)  # never read
    common = dict(
        Q=q, K=k, V=v, DO=grad_out, Lse=lse, Delta=delta, DTable=dtable, DMass=grad_mass if mass_grad else delta,
        Shift=shift, QLabels=qr.labels, QMem=q_mem, KLabels=kr.labels, KOperand=k_op, Bias=table,
        AllowBits=layout.allow_bits,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_dob=grad_out.stride(0), stride_doh=grad_out.stride(1), stride_don=grad_out.stride(2),
        stride_qlab_b=batch_stride(qr.labels), stride_qmem_b=batch_stride(q_mem),
        stride_klab_b=batch_stride(kr.labels), stride_kop_b=batch_stride(k_op),
        stride_kop_n=k_op.stride(1) if soft else 0,
        stride_bias_b=0 if bias is None else batch_stride(bias),
        stride_bias_h=0 if bias is None or bias.shape[1] == 1 else bias.stride(1),
        stride_bias_r=R if bias is None else bias.stride(2),
        stride_allow_b=batch_stride(layout.allow_bits),
        H=H, Nq=Nq, Nk=Nk, R=R, qk_scale=scale * LOG2E, scale=scale,
        HEAD_DIM=Dp, D0=d0, D1=d1, RP=rp, KR=kr_width,
        TERMS_Q=terms_q, TERMS_K=terms_k, SOFT=soft, HAS_BIAS=bias is not None, HAS_MIXED=info.has_mixed,
        ANY_BLOCKED=info.any_blocked, MASS_GRAD=mass_grad, UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION=precision, REGION_BITS=REGION_BITS,
    )
    dkdv = config.dkdv
    key_programs = tiles.key_order.shape[-1] * (TILE_N // dkdv.block_n)
    launch(_sma_bwd_dkdv_kernel, (key_programs, B * H), num_warps=dkdv.num_warps, num_stages=dkdv.num_stages,
           BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, SUB_M=TILE_M // dkdv.block_m, SUB_N=TILE_N // dkdv.block_n,
           DK=dk, DV=dv, KVRunCount=tiles.kv_run_count, KVRuns=tiles.kv_runs, KeyOrder=tiles.key_order,
           KeyRegion=tiles.key_region, stride_count_b=batch_stride(tiles.kv_run_count),
           stride_index_b=batch_stride(tiles.kv_runs), stride_key_b=batch_stride(tiles.key_order),
           num_query_tiles=tiles.kv_runs.shape[-2], **common)
    dq_config = config.dq
    dq_args = dict(
        BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n, SUB_M=TILE_M // dq_config.block_m,
        SUB_N=TILE_N // dq_config.block_n, DQ=dq, DW=dw, StateDQ=state[0], StateSums=state[1], KMem=k_mem,
        RunCount=tiles.pure_run_count, Runs=tiles.pure_runs, MixedCount=tiles.mixed_count,
        MixedIndex=tiles.mixed_index, stride_kmem_b=batch_stride(k_mem),
        stride_count_b=batch_stride(tiles.mixed_count), stride_index_b=batch_stride(tiles.mixed_index),
        stride_runs_b=batch_stride(tiles.pure_runs),
        num_key_tiles=tiles.mixed_index.shape[-1], BIAS_GRAD=bias_grad, **common)
    grid = (q_blocks, B * H)
    if info.has_mixed:
        launch(_sma_bwd_dq_kernel, grid, num_warps=dq_config.num_warps, num_stages=dq_config.num_stages, MIXED=True,
               **dq_args)
    launch(_sma_bwd_dq_kernel, grid, num_warps=dq_config.num_warps, num_stages=dq_config.num_stages, MIXED=False,
           **dq_args)
    dbias = dw.sum(2) if bias_grad else torch.zeros(B, H, R, R, device=device)
    return dq[..., :D], dk[..., :D], dv[..., :D], dbias
