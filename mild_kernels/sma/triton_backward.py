"""Triton backward kernels of spatially-modulated attention.

With scores S (natural units), P = exp(S - lse) recomputed from the forward pass, and
delta = rowsum(dO * O) + rowsum(dMass * Mass) - dlse:

    dP = dO V^T + dMass Mk^T,   dS = P * (dP - delta)
    dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K,   dW[b, h] = Mq^T dS Mk

In the FlashAttention-2 arrangement, with no atomics (so bitwise repeatable):

- ``_sma_bwd_preprocess``: delta per row; the shift table ``lse_log2[q] - qw[q, c]`` (+inf
  where (label(q), c) is blocked or the row sees nothing), (R, Nq) per (batch row, head),
  from lse and the forward's bias table QW; with a region-mass gradient also the table
  ``delta[q] - dMass[q, c]`` (stored like the shift table), the per-region delta that pure
  tiles read.
- ``_sma_bwd_dkdv_kernel``: one program per key block, walking the query tiles its
  layout list names, dK and dV in registers. A uniform key tile of region c (the pure
  case) recomputes P with the shift table, ``P = exp2(q k^T qk_scale -
  shift[q, c])``: one column gather per query block, no bias, no mask. A mixed key tile
  runs the exact path (bias dot, element mask, key tail). Mixed key tiles come first in
  the grid, so their slower programs do not form the tail. Scores are computed keys-first
  (S^T = K Q^T, P^T and dS^T straight into the dV and dK dots from registers), or, where the
  query block is wider than the key block, queries-first (S = Q K^T, P and dS transposed
  through shared memory): Triton gives a dot that feeds another dot all its warps along its
  rows, and a 64-key block fills one warpgroup only, so the 8-warp D=128 tiles put the 128
  queries there (the FlashAttention-3 arrangement).
- ``_sma_bwd_dq_mixed_kernel`` then ``_sma_bwd_dq_pure_kernel``: one program per query block,
  walking mixed then pure key tiles like the forward's two kernels, the first handing over
  per-row state. It also
  makes the bias gradient's region sums ``(dS Mk)[q, r]``: on a pure run all keys are in
  region c, so the run adds ``rowsum(dS)`` to column c; mixed tiles add ``dS Mk`` with
  one small dot.
- ``_sma_bwd_dbias_kernel``: ``dW[b, h] = Mq^T sums``, summed over queries in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import empty, interpreting, launch, next_power_of_2, unit_last_stride
from .configs import BackwardConfig
from .layout import REGION_BITS, TILE_N
from .triton_common import (LOG2E, _as_operand, _bias_key_operand, _keys_first, _load_block, _load_cols,
                            _load_head_blocks, _load_rows, _pair_dot, _per_key, _per_query, _query_block, _qw_columns,
                            _region_product, _resume_blocks, _split_operand,
                            batch_stride, bias_dot_shape, fp32_memberships, head_dim_split, kernel_args,
                            kernel_precision, pad_head_dim, stride_unit, unit_strides)


@triton.jit
def _sma_bwd_preprocess(Out, DO, Mass, DMass, DLse, Delta, DTable, Lse, QW, Shift, QLabels, AllowBits,
                        stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                        stride_qlab_b, stride_allow_b, H, Nq, R,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, RP: tl.constexpr,
                        MASS_GRAD: tl.constexpr, LSE_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                        ANY_BLOCKED: tl.constexpr):
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
    # The shift table: P = exp2(qk qk_scale - shift[c, q]) on a key tile of region c, +inf where
    # (label(q), c) is blocked or the row sees nothing (lse = -inf). (R, Nq) per (batch row, head).
    lse_log2 = tl.load(Lse + rows, mask=in_m, other=float("-inf")) * LOG2E
    for c0 in tl.static_range(0, RP, 16):
        cols = c0 + tl.arange(0, 16)
        table_mask = in_m[:, None] & (cols[None, :] < R)
        usable = (lse_log2 != float("-inf"))[:, None] & (cols[None, :] < R)
        if ANY_BLOCKED:
            lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
            q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
            usable = usable & (((q_bits[:, None] >> cols[None, :].to(q_bits.dtype)) & 1) != 0)
        shift = lse_log2[:, None] + tl.zeros((BLOCK_M, 16), dtype=tl.float32)
        if HAS_BIAS:
            shift -= tl.load(QW + (pid_bh * R + cols[None, :]) * Nq + offs_m[:, None], mask=table_mask, other=0.0)
        tl.store(Shift + (pid_bh * R + cols[None, :]) * Nq + offs_m[:, None], tl.where(usable, shift, float("inf")),
                 mask=table_mask)


@triton.jit
def _sma_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DTable, DMass, QW, Shift, DK, DV,
                         QLabels, KLabels, KOperand, AllowBits,
                         KVRunCount, KVRuns, KeyOrder, KeyRegion,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                         stride_qlab_b, stride_klab_b, stride_kop_b, stride_kop_n, stride_allow_b,
                         stride_kvcount_b, stride_kvruns_b, stride_key_b,
                         H, Nq, Nk, R, num_query_tiles, qk_scale, scale,
                         HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, KR: tl.constexpr,
                         TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr,
                         SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MIXED: tl.constexpr,
                         ANY_BLOCKED: tl.constexpr, MASS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                         REGION_BITS: tl.constexpr, STRIDE_UNIT: tl.constexpr, QUERY_MAJOR: tl.constexpr):
    """One program per key block (SUB_N per layout key tile), walking runs of query blocks."""
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    # Strides in units of STRIDE_UNIT elements (see triton_forward.stride_unit).
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
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
    # Pointer blocks moved by scalar offsets (see _fwd_pure_runs).
    q_block0 = q_base + offs_block[:, None] * stride_qn + tl.arange(0, D0)[None, :]
    do_block0 = do_base + offs_block[:, None] * stride_don + tl.arange(0, D0)[None, :]
    q_block1 = q_base + offs_block[:, None] * stride_qn + (D0 + tl.arange(0, D1 if D1 > 0 else 16))[None, :]
    do_block1 = do_base + offs_block[:, None] * stride_don + (D0 + tl.arange(0, D1 if D1 > 0 else 16))[None, :]
    run_base = KVRuns + b * stride_kvruns_b + tile * num_query_tiles * 2
    run_count = tl.load(KVRunCount + b * stride_kvcount_b + tile)
    if region >= 0:
        # Uniform key tile: P from the forward's shift table, no bias and no mask.
        shift_base = Shift + (pid_bh * R + region) * Nq  # contiguous over queries
        if MASS_GRAD:
            delta_base = DTable + (pid_bh * R + region) * Nq
        else:
            delta_base = Delta + stats_base
        for r in range(run_count):
            first_m = tl.load(run_base + 2 * r) * (SUB_M * BLOCK_M)
            for j in range(tl.load(run_base + 2 * r + 1) * SUB_M):
                start_m = first_m + j * BLOCK_M
                offs_m = start_m + offs_block
                in_m = offs_m < Nq
                q0 = _as_operand(_load_rows(q_block0 + start_m * stride_qn, in_m, 0, D0, HEAD_DIM), UPCAST)
                qk = _pair_dot(k0, q0, None, QUERY_MAJOR, DOT_PRECISION)
                if D1 > 0:
                    q1 = _as_operand(_load_rows(q_block1 + start_m * stride_qn, in_m, D0, D1, HEAD_DIM), UPCAST)
                    qk = _pair_dot(k1, q1, qk, QUERY_MAJOR, DOT_PRECISION)
                shift = tl.load(shift_base + offs_m, mask=in_m, other=float("inf"))
                p = tl.math.exp2(qk * qk_scale - _per_query(shift, QUERY_MAJOR))
                p_op = _keys_first(_as_operand(p.to(DO.dtype.element_ty), UPCAST), QUERY_MAJOR)
                do0 = _as_operand(_load_rows(do_block0 + start_m * stride_don, in_m, 0, D0, HEAD_DIM), UPCAST)
                dv0 = tl.dot(p_op, do0, dv0, input_precision=DOT_PRECISION)
                dp = _pair_dot(v0, do0, None, QUERY_MAJOR, DOT_PRECISION)
                if D1 > 0:
                    do1 = _as_operand(_load_rows(do_block1 + start_m * stride_don, in_m, D0, D1, HEAD_DIM), UPCAST)
                    dv1 = tl.dot(p_op, do1, dv1, input_precision=DOT_PRECISION)
                    dp = _pair_dot(v1, do1, dp, QUERY_MAJOR, DOT_PRECISION)
                delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
                ds = p * (dp - _per_query(delta, QUERY_MAJOR))
                ds_op = _keys_first(_as_operand(ds.to(Q.dtype.element_ty), UPCAST), QUERY_MAJOR)
                dk0 = tl.dot(ds_op, q0, dk0, input_precision=DOT_PRECISION)
                if D1 > 0:
                    dk1 = tl.dot(ds_op, q1, dk1, input_precision=DOT_PRECISION)
    else:
        # Mixed key tile: the exact bias dot, the element mask and the key tail.
        if HAS_MIXED:
            lk = tl.load(KLabels + b * stride_klab_b + offs_n, mask=in_n, other=0)
            qw_base = QW + pid_bh * R * Nq
            RELOAD_K_OP: tl.constexpr = KR > 64  # R > 16: read the key operand per block, not held in registers
            if not RELOAD_K_OP:
                k_op = _bias_key_operand(lk, offs_n, in_n, KOperand + b * stride_kop_b, stride_kop_n, R, KR, TERMS_Q,
                                         TERMS_K, SOFT, UPCAST)
            mass_cols = tl.arange(0, KR) // (TERMS_Q * TERMS_K)
            for r in range(run_count):
                first_block = tl.load(run_base + 2 * r) * SUB_M
                for j in range(tl.load(run_base + 2 * r + 1) * SUB_M):
                    offs_m = (first_block + j) * BLOCK_M + offs_block
                    in_m = offs_m < Nq
                    lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
                    q0 = _as_operand(_load_block(q_base, offs_m, stride_qn, Nq, 0, D0, HEAD_DIM, True), UPCAST)
                    s = _pair_dot(k0, q0, None, QUERY_MAJOR, DOT_PRECISION)
                    if D1 > 0:
                        q1 = _as_operand(_load_block(q_base, offs_m, stride_qn, Nq, D0, D1, HEAD_DIM, True), UPCAST)
                        s = _pair_dot(k1, q1, s, QUERY_MAJOR, DOT_PRECISION)
                    s = s * qk_scale
                    if HAS_BIAS:
                        if RELOAD_K_OP:
                            s = _region_product(s, qw_base, Nq, 1, offs_m, in_m, lk, offs_n, in_n,
                                                KOperand + b * stride_kop_b, stride_kop_n, R, KR, TERMS_Q, TERMS_K,
                                                SOFT, UPCAST, PRECISION, not QUERY_MAJOR)
                        else:
                            q_op = _split_operand(_qw_columns(qw_base, offs_m, in_m, R, Nq, KR, TERMS_Q * TERMS_K),
                                                  TERMS_Q, UPCAST)
                            s = _pair_dot(k_op, q_op, s, QUERY_MAJOR, PRECISION if TERMS_Q == 1 else "tf32")
                    allowed = _per_key(in_n, QUERY_MAJOR) & _per_query(in_m, QUERY_MAJOR)
                    if ANY_BLOCKED:
                        q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
                        allowed = allowed & (((_per_query(q_bits, QUERY_MAJOR)
                                               >> _per_key(lk, QUERY_MAJOR).to(q_bits.dtype)) & 1) != 0)
                    lse = tl.load(Lse + stats_base + offs_m, mask=in_m, other=float("inf"))
                    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # P = 0 there
                    p = tl.math.exp2(tl.where(allowed, s, float("-inf")) - _per_query(lse_log2, QUERY_MAJOR))
                    p_op = _keys_first(_as_operand(p.to(DO.dtype.element_ty), UPCAST), QUERY_MAJOR)
                    do0 = _as_operand(_load_block(do_base, offs_m, stride_don, Nq, 0, D0, HEAD_DIM, True), UPCAST)
                    dv0 = tl.dot(p_op, do0, dv0, input_precision=DOT_PRECISION)
                    dp = _pair_dot(v0, do0, None, QUERY_MAJOR, DOT_PRECISION)
                    if D1 > 0:
                        do1 = _as_operand(_load_block(do_base, offs_m, stride_don, Nq, D0, D1, HEAD_DIM, True), UPCAST)
                        dv1 = tl.dot(p_op, do1, dv1, input_precision=DOT_PRECISION)
                        dp = _pair_dot(v1, do1, dp, QUERY_MAJOR, DOT_PRECISION)
                    if MASS_GRAD:  # dP += dMass Mk^T, one dot of split operands like the bias
                        if RELOAD_K_OP:
                            dp = _region_product(dp, DMass + stats_base * R, 1, R, offs_m, in_m, lk, offs_n, in_n,
                                                 KOperand + b * stride_kop_b, stride_kop_n, R, KR, TERMS_Q, TERMS_K,
                                                 SOFT, UPCAST, PRECISION, not QUERY_MAJOR)
                        else:
                            dmass = tl.load(DMass + (stats_base + offs_m[:, None]) * R + mass_cols[None, :],
                                            mask=in_m[:, None] & (mass_cols[None, :] < R), other=0.0)
                            dp = _pair_dot(k_op, _split_operand(dmass, TERMS_Q, UPCAST), dp, QUERY_MAJOR,
                                           PRECISION if TERMS_Q == 1 else "tf32")
                    delta = tl.load(Delta + stats_base + offs_m, mask=in_m, other=0.0)
                    ds = p * (dp - _per_query(delta, QUERY_MAJOR))
                    ds_op = _keys_first(_as_operand(ds.to(Q.dtype.element_ty), UPCAST), QUERY_MAJOR)
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
def _sma_bwd_dq_mixed_kernel(Q, K, V, DO, Lse, Delta, DMass, QW, StateDQ, StateSums,
                             QLabels, KLabels, KMem, KOperand, AllowBits, MixedCount, MixedIndex,
                             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                             stride_qlab_b, stride_klab_b, stride_kmem_b, stride_kop_b, stride_kop_n, stride_allow_b,
                             stride_count_b, stride_index_b,
                             H, Nq, Nk, R, num_key_tiles, qk_scale,
                             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, KR: tl.constexpr,
                             TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr,
                             SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, ANY_BLOCKED: tl.constexpr,
                             MASS_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                             PRECISION: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                             STRIDE_UNIT: tl.constexpr):
    """As the forward's mixed kernel: walks a query block's mixed key tiles and leaves dq and the
    region sums (dS Mk)[q, r] in the State buffers, from which _sma_bwd_dq_pure_kernel resumes."""
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    # Strides in units of STRIDE_UNIT elements (see triton_common.stride_unit).
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    pid_bh, b, h, list_row, offs_m, in_m = _query_block(H, Nq, BLOCK_M, SUB_M)
    mixed_count = tl.load(MixedCount + b * stride_count_b + list_row)
    if mixed_count > 0:
        rows = pid_bh * Nq + offs_m
        q0, q1 = _load_head_blocks(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, HEAD_DIM, D0, D1,
                                   UPCAST)
        do0, do1 = _load_head_blocks(DO + b * stride_dob + h * stride_doh, offs_m, stride_don, Nq, HEAD_DIM, D0,
                                     D1, UPCAST)
        cols0 = tl.arange(0, D0)
        offs_r = tl.arange(0, RP)
        delta = tl.load(Delta + rows, mask=in_m, other=0.0)
        lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
        dq1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
        region_sums = tl.zeros((BLOCK_M, RP), dtype=tl.float32)  # (dS Mk)[q, r]
        RELOAD_OPS: tl.constexpr = KR > 64  # R > 16: read the query operands per tile, not held in registers
        mass_cols = tl.arange(0, KR) // (TERMS_Q * TERMS_K)
        if HAS_BIAS and not RELOAD_OPS:
            q_op = _split_operand(_qw_columns(QW + pid_bh * R * Nq, offs_m, in_m, R, Nq, KR, TERMS_Q * TERMS_K),
                                  TERMS_Q, UPCAST)
        if MASS_GRAD and not RELOAD_OPS:
            dmass_op = _split_operand(tl.load(DMass + rows[:, None] * R + mass_cols[None, :],
                                              mask=in_m[:, None] & (mass_cols[None, :] < R), other=0.0),
                                      TERMS_Q, UPCAST)
        q_bits = lq
        if ANY_BLOCKED:
            q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
        lse = tl.load(Lse + rows, mask=in_m, other=float("inf"))
        lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # blocked rows: P = 0
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
            if not RELOAD_OPS:
                k_op = _bias_key_operand(lk, offs_n, in_n, KOperand + b * stride_kop_b, stride_kop_n, R, KR,
                                         TERMS_Q, TERMS_K, SOFT, UPCAST)
            if HAS_BIAS:
                if RELOAD_OPS:
                    s = _region_product(s, QW + pid_bh * R * Nq, Nq, 1, offs_m, in_m, lk, offs_n, in_n,
                                        KOperand + b * stride_kop_b, stride_kop_n, R, KR, TERMS_Q, TERMS_K, SOFT,
                                        UPCAST, PRECISION, False)
                else:
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
                if RELOAD_OPS:
                    dp = _region_product(dp, DMass + pid_bh * Nq * R, 1, R, offs_m, in_m, lk, offs_n, in_n,
                                         KOperand + b * stride_kop_b, stride_kop_n, R, KR, TERMS_Q, TERMS_K, SOFT,
                                         UPCAST, PRECISION, False)
                else:
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
                    region_sums = tl.dot(ds, mk, region_sums, input_precision="tf32x3")
        tl.store(StateDQ + rows[:, None] * HEAD_DIM + cols0[None, :], dq0,
                 mask=in_m[:, None] & (cols0[None, :] < HEAD_DIM))
        if D1 > 0:
            cols1 = D0 + tl.arange(0, D1)
            tl.store(StateDQ + rows[:, None] * HEAD_DIM + cols1[None, :], dq1,
                     mask=in_m[:, None] & (cols1[None, :] < HEAD_DIM))
        if BIAS_GRAD:
            tl.store(StateSums + rows[:, None] * R + offs_r[None, :], region_sums, mask=in_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _sma_bwd_dq_pure_kernel(Q, K, V, DO, Delta, DTable, Shift, DQ, StateDQ, StateSums, RunCount, Runs, MixedCount,
                            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                            stride_count_b, stride_runs_b,
                            H, Nq, R, num_key_tiles, qk_scale, scale,
                            HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr,
                            HAS_MIXED: tl.constexpr, MASS_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr,
                            REGION_BITS: tl.constexpr, STRIDE_UNIT: tl.constexpr):
    """Every query block's pure runs, from the state the mixed launch left where it ran (HAS_MIXED),
    then dq and the region sums, which _sma_bwd_dbias_kernel turns into dW. The sums stay in the
    StateSums rows, one column per run, rather than as a (BLOCK_M, 16) register tensor that the
    accumulator's layout would pad to its width."""
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    pid_bh, b, h, list_row, offs_m, in_m = _query_block(H, Nq, BLOCK_M, SUB_M)
    rows = pid_bh * Nq + offs_m
    q0, q1 = _load_head_blocks(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, HEAD_DIM, D0, D1, UPCAST)
    do0, do1 = _load_head_blocks(DO + b * stride_dob + h * stride_doh, offs_m, stride_don, Nq, HEAD_DIM, D0, D1,
                                 UPCAST)
    cols0 = tl.arange(0, D0)
    cols1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    offs_r = tl.arange(0, RP)
    delta = tl.load(Delta + rows, mask=in_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if HAS_MIXED:
        mixed_count = tl.load(MixedCount + b * stride_count_b + list_row)
        resume = in_m & (tl.zeros_like(offs_m) + mixed_count > 0)  # a block: the interpreter rejects 0-d masks
    else:
        resume = offs_m < 0
    dq0, dq1 = _resume_blocks(StateDQ, rows, resume, cols0, cols1, HEAD_DIM, D1, BLOCK_M)
    if BIAS_GRAD:  # the region sums live in the StateSums rows: zero those the mixed launch left none in
        tl.store(StateSums + rows[:, None] * R + offs_r[None, :], tl.zeros((BLOCK_M, RP), dtype=tl.float32),
                 mask=(in_m & ~resume)[:, None] & (offs_r[None, :] < R))
        tl.debug_barrier()
    # Pure runs: P from the shift table; the bias gradient is a row sum per run.
    offs_block = tl.arange(0, BLOCK_N)  # pointer blocks moved by scalar offsets (see _fwd_pure_runs)
    k_block0 = k_base + offs_block[:, None] * stride_kn + cols0[None, :]
    v_block0 = v_base + offs_block[:, None] * stride_vn + cols0[None, :]
    k_block1 = k_base + offs_block[:, None] * stride_kn + cols1[None, :]
    v_block1 = v_base + offs_block[:, None] * stride_vn + cols1[None, :]
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
        for j in range(tl.load(run_base + 2 * r + 1) * SUB_N):
            k_offset = (start_n + j * BLOCK_N) * stride_kn
            v_offset = (start_n + j * BLOCK_N) * stride_vn
            k0 = _as_operand(_load_cols(k_block0 + k_offset, 0, D0, HEAD_DIM), UPCAST)
            qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
            if D1 > 0:
                k1 = _as_operand(_load_cols(k_block1 + k_offset, D0, D1, HEAD_DIM), UPCAST)
                qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - shift[:, None])
            v0 = _as_operand(_load_cols(v_block0 + v_offset, 0, D0, HEAD_DIM), UPCAST)
            dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
            if D1 > 0:
                v1 = _as_operand(_load_cols(v_block1 + v_offset, D0, D1, HEAD_DIM), UPCAST)
                dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
            ds = p * (dp - row_delta[:, None])
            ds_op = _as_operand(ds.to(K.dtype.element_ty), UPCAST)
            dq0 = tl.dot(ds_op, k0, dq0, input_precision=DOT_PRECISION)
            if D1 > 0:
                dq1 = tl.dot(ds_op, k1, dq1, input_precision=DOT_PRECISION)
            if BIAS_GRAD:
                run_sum += tl.sum(ds, 1)
        if BIAS_GRAD:  # every key of the run is in region c: one column of the sums
            sums_ptrs = StateSums + rows * R + region
            tl.store(sums_ptrs, tl.load(sums_ptrs, mask=in_m, other=0.0) + run_sum, mask=in_m)

    tl.store(DQ + rows[:, None] * HEAD_DIM + cols0[None, :], (dq0 * scale).to(DQ.dtype.element_ty),
             mask=in_m[:, None] & (cols0[None, :] < HEAD_DIM))
    if D1 > 0:
        tl.store(DQ + rows[:, None] * HEAD_DIM + cols1[None, :], (dq1 * scale).to(DQ.dtype.element_ty),
                 mask=in_m[:, None] & (cols1[None, :] < HEAD_DIM))


@triton.jit
def _sma_bwd_dbias_kernel(Sums, QLabels, QMem, DW, stride_qlab_b, stride_qmem_b, H, Nq, R,
                          BLOCK_M: tl.constexpr, RP: tl.constexpr, RM: tl.constexpr, SOFT: tl.constexpr):
    """dW[b, h] = Mq^T (dS Mk): one program per (batch row, head) sums the region sums of every
    query in a fixed order, on tensor cores in tf32x3 (~fp32-exact). The rows of dW are padded
    to RM >= 64, the least a warpgroup MMA takes."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    offs_r = tl.arange(0, RP)
    rows_r = tl.arange(0, RM)
    acc = tl.zeros((RM, RP), dtype=tl.float32)
    for start in range(0, Nq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        in_m = offs_m < Nq
        sums = tl.load(Sums + (pid_bh * Nq + offs_m[:, None]) * R + offs_r[None, :],
                       mask=in_m[:, None] & (offs_r[None, :] < R), other=0.0)
        if SOFT:
            mq_t = tl.load(QMem + b * stride_qmem_b + offs_m[None, :] * R + rows_r[:, None],
                           mask=in_m[None, :] & (rows_r[:, None] < R), other=0.0)
        else:
            lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
            mq_t = tl.where(in_m[None, :] & (lq[None, :] == rows_r[:, None]), 1.0, 0.0)
        acc = tl.dot(mq_t, sums, acc, input_precision="tf32x3")
    tl.store(DW + pid_bh * R * R + rows_r[:, None] * R + offs_r[None, :], acc,
             mask=(rows_r[:, None] < R) & (offs_r[None, :] < R))


def sma_backward_triton(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, qw, layout, bias, scale,
                        config: BackwardConfig):
    """dq, dk, dv in the inputs' dtype and dbias as (B, H, R, R) float32 (zeros without a bias)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = layout.num_regions
    qr, kr, tiles, info = layout.q_regions, layout.k_regions, layout.tiles, layout.info
    soft = qr.is_soft
    device = q.device
    mass_grad = grad_mass is not None
    out = unit_last_stride(out)
    q, k, v, grad_out = (pad_head_dim(unit_last_stride(t)) for t in (q, k, v, grad_out))
    Dp = q.shape[-1]
    rp = max(16, next_power_of_2(R))
    delta = empty((B, H, Nq), dtype=torch.float32, device=device)
    dtable = empty((B, H, R, Nq), dtype=torch.float32, device=device) if mass_grad else delta
    pre_block = 32 if q.dtype == torch.float32 else 64  # 64 fp32 rows at D=64: ptxas spills a pointer
    shift = empty((B, H, R, Nq), dtype=torch.float32, device=device)
    launch(_sma_bwd_preprocess, (triton.cdiv(Nq, pre_block), B * H), num_warps=4, num_stages=1,
           Out=out, DO=grad_out, Mass=mass if mass_grad else delta, DMass=grad_mass if mass_grad else delta,
           DLse=grad_lse if grad_lse is not None else delta, Delta=delta, DTable=dtable, Lse=lse, QW=qw, Shift=shift,
           QLabels=qr.labels, AllowBits=layout.allow_bits,
           stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
           stride_dob=grad_out.stride(0), stride_doh=grad_out.stride(1), stride_don=grad_out.stride(2),
           stride_qlab_b=batch_stride(qr.labels), stride_allow_b=batch_stride(layout.allow_bits),
           H=H, Nq=Nq, R=R, HEAD_DIM=D, BLOCK_D=next_power_of_2(D), BLOCK_M=pre_block, RP=rp,
           MASS_GRAD=mass_grad, LSE_GRAD=grad_lse is not None, HAS_BIAS=bias is not None,
           ANY_BLOCKED=info.any_blocked)

    kr_width, terms_q, terms_k = bias_dot_shape(R, soft, "split" if q.dtype != torch.float32 else "ieee")
    q_mem = fp32_memberships(qr) if soft else qr.labels
    k_mem = fp32_memberships(kr) if soft else kr.labels
    k_op = layout.k_split if soft and terms_k == 2 else k_mem
    d0, d1 = head_dim_split(Dp)
    dq = empty((B, H, Nq, Dp), dtype=q.dtype, device=device)
    dk = empty((B, H, Nk, Dp), dtype=k.dtype, device=device)
    dv = empty((B, H, Nk, Dp), dtype=v.dtype, device=device)
    bias_grad = bias is not None
    q_blocks = triton.cdiv(Nq, config.dq.block_m)
    state_dq = empty((B, H, Nq, Dp), dtype=torch.float32, device=device) if info.has_mixed else delta
    region_sums = empty((B, H, Nq, R), dtype=torch.float32, device=device) if bias_grad else delta
    state = (state_dq, region_sums)
    unit = stride_unit(q, k, v, grad_out)
    pool = dict(  # what the three kernels read; each launch takes its parameters (kernel_args)
        Q=q, K=k, V=v, DO=grad_out, Lse=lse, Delta=delta, DTable=dtable, DMass=grad_mass if mass_grad else delta,
        QW=qw, Shift=shift, DQ=dq, DK=dk, DV=dv, StateDQ=state[0], StateSums=state[1],
        QLabels=qr.labels, KLabels=kr.labels, KMem=k_mem, KOperand=k_op, AllowBits=layout.allow_bits,
        RunCount=tiles.pure_run_count, Runs=tiles.pure_runs, MixedCount=tiles.mixed_count,
        MixedIndex=tiles.mixed_index, KVRunCount=tiles.kv_run_count, KVRuns=tiles.kv_runs,
        KeyOrder=tiles.key_order, KeyRegion=tiles.key_region,
        **dict(zip(("stride_qb", "stride_qh", "stride_qn"), unit_strides(q, unit))),
        **dict(zip(("stride_kb", "stride_kh", "stride_kn"), unit_strides(k, unit))),
        **dict(zip(("stride_vb", "stride_vh", "stride_vn"), unit_strides(v, unit))),
        **dict(zip(("stride_dob", "stride_doh", "stride_don"), unit_strides(grad_out, unit))),
        stride_qlab_b=batch_stride(qr.labels), stride_klab_b=batch_stride(kr.labels),
        stride_kmem_b=batch_stride(k_mem), stride_kop_b=batch_stride(k_op),
        stride_kop_n=k_op.stride(1) if soft else 0, stride_allow_b=batch_stride(layout.allow_bits),
        stride_count_b=batch_stride(tiles.mixed_count), stride_index_b=batch_stride(tiles.mixed_index),
        stride_runs_b=batch_stride(tiles.pure_runs), stride_kvcount_b=batch_stride(tiles.kv_run_count),
        stride_kvruns_b=batch_stride(tiles.kv_runs), stride_key_b=batch_stride(tiles.key_order),
        H=H, Nq=Nq, Nk=Nk, R=R, num_key_tiles=tiles.mixed_index.shape[-1], num_query_tiles=tiles.kv_runs.shape[-2],
        qk_scale=scale * LOG2E.value, scale=scale,
        HEAD_DIM=Dp, D0=d0, D1=d1, RP=rp, KR=kr_width,
        TERMS_Q=terms_q, TERMS_K=terms_k, SOFT=soft, HAS_BIAS=bias is not None, HAS_MIXED=info.has_mixed,
        ANY_BLOCKED=info.any_blocked, MASS_GRAD=mass_grad, BIAS_GRAD=bias_grad,
        UPCAST=interpreting() and q.dtype != torch.float32, REGION_BITS=REGION_BITS, STRIDE_UNIT=unit,
    )
    dkdv = config.dkdv
    key_programs = tiles.key_order.shape[-1] * (TILE_N // dkdv.block_n)
    # Wide regions at D=40/48: two head-dim blocks spill even at 16x16 tiles beside the
    # region-wide operands; one 64-column block (its tail masked) does not.
    one_block = dict(D0=64, D1=0) if R > 16 and d1 > 0 and Dp <= 64 else {}
    # Triton gives a dot whose result feeds another dot all its warps along M (the score tile's
    # rows), so the larger block goes there: a query block wider than the key block computes the
    # scores queries-first and stages P^T and dS^T through shared memory for the dV and dK dots.
    query_major = dkdv.block_m > dkdv.block_n
    launch(_sma_bwd_dkdv_kernel, (key_programs, B * H), **dkdv.launch_options(),
           **kernel_args(_sma_bwd_dkdv_kernel, pool, dkdv.tile_args(), one_block,
                         PRECISION=kernel_precision(q.dtype, dkdv), QUERY_MAJOR=query_major))
    if info.has_mixed:
        mixed = config.dq_mixed
        launch(_sma_bwd_dq_mixed_kernel, (triton.cdiv(Nq, mixed.block_m), B * H), **mixed.launch_options(),
               **kernel_args(_sma_bwd_dq_mixed_kernel, pool, mixed.tile_args(),
                             PRECISION=kernel_precision(q.dtype, mixed)))
    pure = config.dq
    launch(_sma_bwd_dq_pure_kernel, (q_blocks, B * H), **pure.launch_options(),
           **kernel_args(_sma_bwd_dq_pure_kernel, pool, pure.tile_args(), PRECISION=kernel_precision(q.dtype, pure)))
    if bias_grad:
        dbias = empty((B, H, R, R), dtype=torch.float32, device=device)
        # Query blocks of 32 past 32 regions: at 64, sm_80's tf32x3 operands spilled 32 B.
        launch(_sma_bwd_dbias_kernel, (B * H,), num_warps=4, num_stages=2, Sums=region_sums, QLabels=qr.labels,
               QMem=q_mem, DW=dbias, stride_qlab_b=batch_stride(qr.labels), stride_qmem_b=batch_stride(q_mem), H=H,
               Nq=Nq, R=R, BLOCK_M=64 if rp <= 32 else 32, RP=rp, RM=max(64, rp), SOFT=soft)
    else:
        dbias = torch.zeros(B, H, R, R, device=device)
    return dq[..., :D], dk[..., :D], dv[..., :D], dbias
