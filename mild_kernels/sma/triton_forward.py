"""Triton forward kernels of spatially-modulated attention.

One program owns one query block of one (batch row, head) and walks the key tiles that
its layout's lists name (layout.py): ``_sma_fwd_mixed_kernel`` the mixed tiles (launched only
where the layout has some), then ``_sma_fwd_pure_kernel`` the pure runs, from the state the
first left, and the results. Scores
are kept in log2 units (``qk_scale = scale * log2(e)``, bias times log2(e)), so the
softmax uses exp2.

- Prologue: the query block's bias rows ``qw = Mq W`` (hard labels: rows of the table;
  soft: one small fp32 dot), written to a table ``QW`` (B, H, R, Nq).
- Pure tiles (uniform key tile of region c): the bias of query row q is ``qw[q, c]``, one
  gather per row and tile, folded into the exp2 shift with the running max, so the loop
  is FlashAttention-2's with a per-row constant. ``allow`` applies per row.
- Mixed tiles: the bias is the dot ``qw Mk^T``, accumulated onto the scaled scores. For
  16-bit inputs both operands are split into bf16 halves (hi + lo, 16 mantissa bits) and
  laid side by side along K, so the four products are one dot of width 4 next_pow2(R)
  (16 at R <= 4); the key operand is split once, in the layout. Then the element-wise
  allow mask and the key tail.
- Epilogue: out, lse (natural log) and region mass. The ``QW`` table stays for the backward
  pass, whose preprocess makes the shift table from it and lse: the forward's kernels are the
  same for inference and training, and keep no shift state through their loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import empty, empty_like, interpreting, launch, next_power_of_2, unit_last_stride
from .configs import ForwardConfig
from .layout import REGION_BITS, TILE_N
from .triton_common import (LN2, LOG2E, _as_operand, _bias_key_operand, _load_block, _load_cols, _load_head_blocks,
                            _load_rows, _query_bias_columns, _query_block, _qw_columns, _region_product,
                            _resume_blocks, _split_operand, batch_stride, bias_dot_shape, fp32_memberships,
                            head_dim_split, kernel_args, kernel_precision, pad_head_dim, stride_unit, unit_strides)


TILE_KEYS = tl.constexpr(TILE_N)  # keys per layout tile: a pure launch's key block may span two


@triton.jit
def _fwd_mixed_tiles(acc0, acc1, m_i, l_i, mass, q0, q1, q_bits, qw_base, offs_m, in_m, Nq, k_base, v_base,
                     klab_base, kmem_base, kop_base, tile_index, tile_count, stride_kn, stride_vn, stride_kop_n, Nk, R,
                     qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr,
                     SUB_N: tl.constexpr, KR: tl.constexpr, TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr,
                     MASS_R: tl.constexpr, SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, ANY_BLOCKED: tl.constexpr,
                     RETURN_MASS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, OUT_TY: tl.constexpr):
    """Online softmax over mixed key tiles: the bias as a dot, the element-wise mask, the key tail.

    The bias dot's query operand comes from the QW table; past 64 columns (R > 16 regions) it is
    read again for every tile rather than held across the loop.
    """
    RELOAD_Q_OP: tl.constexpr = KR > 64
    offs_mass = tl.arange(0, MASS_R)
    if HAS_BIAS and not RELOAD_Q_OP:
        q_op = _split_operand(_qw_columns(qw_base, offs_m, in_m, R, Nq, KR, TERMS_Q * TERMS_K), TERMS_Q, UPCAST)
    for j in range(tile_count * SUB_N):
        offs_n = (tl.load(tile_index + j // SUB_N) * SUB_N + j % SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < Nk
        lk = tl.load(klab_base + offs_n, mask=in_n, other=0)
        k0 = _as_operand(_load_block(k_base, offs_n, stride_kn, Nk, 0, D0, HEAD_DIM, True), UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        if D1 > 0:
            k1 = _as_operand(_load_block(k_base, offs_n, stride_kn, Nk, D0, D1, HEAD_DIM, True), UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if HAS_BIAS:
            if RELOAD_Q_OP:
                s = _region_product(s, qw_base, Nq, 1, offs_m, in_m, lk, offs_n, in_n, kop_base, stride_kop_n, R, KR,
                                    TERMS_Q, TERMS_K, SOFT, UPCAST, PRECISION, False)
            else:
                k_op = _bias_key_operand(lk, offs_n, in_n, kop_base, stride_kop_n, R, KR, TERMS_Q, TERMS_K, SOFT,
                                         UPCAST)
                s = tl.dot(q_op, tl.trans(k_op), s, input_precision=PRECISION if TERMS_Q == 1 else "tf32")
        allowed = in_n[None, :]
        if ANY_BLOCKED:
            allowed = allowed & (((q_bits[:, None] >> lk[None, :].to(q_bits.dtype)) & 1) != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_op = _as_operand(p.to(OUT_TY), UPCAST)
        v0 = _as_operand(_load_block(v_base, offs_n, stride_vn, Nk, 0, D0, HEAD_DIM, True), UPCAST)
        acc0 = tl.dot(p_op, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            v1 = _as_operand(_load_block(v_base, offs_n, stride_vn, Nk, D0, D1, HEAD_DIM, True), UPCAST)
            acc1 = tl.dot(p_op, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        if RETURN_MASS:
            if SOFT:
                k_mass = tl.load(kmem_base + offs_n[:, None] * R + offs_mass[None, :],
                                 mask=in_n[:, None] & (offs_mass[None, :] < R), other=0.0)
            else:
                k_mass = tl.where(lk[:, None] == offs_mass[None, :], 1.0, 0.0)
            k_mass = _as_operand(k_mass.to(OUT_TY), UPCAST)
            mass = tl.dot(p_op, k_mass, mass * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc0, acc1, m_i, l_i, mass


@triton.jit
def _fwd_pure_block(acc0, acc1, m_i, l_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, b_row, allowed_row, in_block,
                    qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ANY_BLOCKED: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, OUT_TY: tl.constexpr, MASKED: tl.constexpr):
    """One key block of a pure run: FlashAttention-2's step with the row's bias in the exp2 shift.
    MASKED: only the keys where ``in_block`` holds are the run's (a run's last layout tile alone)."""
    if MASKED:
        k0 = _as_operand(_load_rows(k_ptrs0, in_block, 0, D0, HEAD_DIM), UPCAST)
    else:
        k0 = _as_operand(_load_cols(k_ptrs0, 0, D0, HEAD_DIM), UPCAST)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if D1 > 0:
        if MASKED:
            k1 = _as_operand(_load_rows(k_ptrs1, in_block, D0, D1, HEAD_DIM), UPCAST)
        else:
            k1 = _as_operand(_load_cols(k_ptrs1, D0, D1, HEAD_DIM), UPCAST)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where(in_block[None, :], qk, float("-inf"))
    row_max = tl.max(qk, 1) * qk_scale + b_row
    if ANY_BLOCKED:
        m_new = tl.maximum(m_i, tl.where(allowed_row, row_max, float("-inf")))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(allowed_row, m_safe - b_row, float("inf"))  # blocked rows: p = 0
    else:
        m_new = tl.maximum(m_i, row_max)
        m_safe = m_new
        shift = m_new - b_row
    p = tl.math.exp2(qk * qk_scale - shift[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_op = _as_operand(p.to(OUT_TY), UPCAST)
    if MASKED:
        v0 = _as_operand(_load_rows(v_ptrs0, in_block, 0, D0, HEAD_DIM), UPCAST)
    else:
        v0 = _as_operand(_load_cols(v_ptrs0, 0, D0, HEAD_DIM), UPCAST)
    acc0 = tl.dot(p_op, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if D1 > 0:
        if MASKED:
            v1 = _as_operand(_load_rows(v_ptrs1, in_block, D0, D1, HEAD_DIM), UPCAST)
        else:
            v1 = _as_operand(_load_cols(v_ptrs1, D0, D1, HEAD_DIM), UPCAST)
        acc1 = tl.dot(p_op, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _fwd_pure_runs(acc0, acc1, m_i, l_i, mass_rows, R, q0, q1, q_bits, qw_base, offs_m, in_m, k_base, v_base,
                   run_base, run_count, stride_kn, stride_vn, Nq, qk_scale,
                   HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr, MASS_R: tl.constexpr, HAS_BIAS: tl.constexpr, ANY_BLOCKED: tl.constexpr,
                   RETURN_MASS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   OUT_TY: tl.constexpr, REGION_BITS: tl.constexpr):
    """Online softmax over runs of uniform key tiles. Within a run every key is in region c, so
    a row's bias qw[q, c] is one number, folded into the exp2 shift: the inner loop is
    FlashAttention-2's, with pointer increments.

    Region mass is settled once per run, in the rows of the Mass output (``mass_rows``, the
    unnormalised running mass): kept in registers across the loop, a (BLOCK_M, 16) tensor in
    the accumulator's layout costs as many registers as a (BLOCK_M, 64) one.
    """
    # One pointer block per operand, moved by a scalar offset: pointer blocks carried through the
    # loops would each hold a register per element.
    offs_block = tl.arange(0, BLOCK_N)
    k_block0 = k_base + offs_block[:, None] * stride_kn + tl.arange(0, D0)[None, :]
    v_block0 = v_base + offs_block[:, None] * stride_vn + tl.arange(0, D0)[None, :]
    if D1 > 0:
        k_block1 = k_base + offs_block[:, None] * stride_kn + (D0 + tl.arange(0, D1))[None, :]
        v_block1 = v_base + offs_block[:, None] * stride_vn + (D0 + tl.arange(0, D1))[None, :]
    else:  # unused: one head-dim block
        k_block1 = k_block0
        v_block1 = v_block0
    for r in range(run_count):
        head = tl.load(run_base + 2 * r)
        length = tl.load(run_base + 2 * r + 1)
        region = head & ((1 << REGION_BITS) - 1)
        start_n = (head >> REGION_BITS) * TILE_KEYS
        if HAS_BIAS:
            b_row = tl.load(qw_base + region * Nq + offs_m, mask=in_m, other=0.0)
        else:
            b_row = tl.zeros_like(m_i)
        if ANY_BLOCKED:
            allowed_row = ((q_bits >> region.to(q_bits.dtype)) & 1) != 0
        else:  # unused
            allowed_row = in_m
        if RETURN_MASS:
            m_start = m_i
            l_start = l_i
        keys = length * TILE_KEYS
        for j in range(keys // BLOCK_N):
            acc0, acc1, m_i, l_i = _fwd_pure_block(
                acc0, acc1, m_i, l_i, q0, q1, k_block0 + (start_n + j * BLOCK_N) * stride_kn,
                k_block1 + (start_n + j * BLOCK_N) * stride_kn, v_block0 + (start_n + j * BLOCK_N) * stride_vn,
                v_block1 + (start_n + j * BLOCK_N) * stride_vn, b_row, allowed_row, offs_block, qk_scale, HEAD_DIM,
                D0, D1, ANY_BLOCKED, UPCAST, DOT_PRECISION, OUT_TY, False)
        if BLOCK_N > TILE_KEYS:  # a block spans two layout tiles: a run of odd length ends in one alone
            if keys % BLOCK_N != 0:
                last = start_n + (keys // BLOCK_N) * BLOCK_N
                acc0, acc1, m_i, l_i = _fwd_pure_block(
                    acc0, acc1, m_i, l_i, q0, q1, k_block0 + last * stride_kn, k_block1 + last * stride_kn,
                    v_block0 + last * stride_vn, v_block1 + last * stride_vn, b_row, allowed_row,
                    offs_block < TILE_KEYS, qk_scale, HEAD_DIM, D0, D1, ANY_BLOCKED, UPCAST, DOT_PRECISION, OUT_TY,
                    True)
        if RETURN_MASS:  # the run's share of l is its mass in region c; rescale the rest once
            factor = tl.where(m_i == float("-inf"), 1.0, tl.math.exp2(m_start - m_i))
            tl.debug_barrier()
            for c0 in tl.static_range(0, MASS_R, 16):  # 16 regions at a time: registers stay flat in R
                cols = c0 + tl.arange(0, 16)
                mass_ptrs = mass_rows[:, None] + cols[None, :]
                mass_mask = in_m[:, None] & (cols[None, :] < R)
                mass = tl.load(mass_ptrs, mask=mass_mask, other=0.0) * factor[:, None]
                mass += tl.where(cols[None, :] == region, (l_i - l_start * factor)[:, None], 0.0)
                tl.store(mass_ptrs, mass, mask=mass_mask)
    return acc0, acc1, m_i, l_i


@triton.jit
def _store_query_bias(qw_base, lq, offs_m, in_m, qmem_base, bias_base, stride_bias_r, R, Nq, RP: tl.constexpr,
                      SOFT: tl.constexpr):
    """This query block's columns of the QW table: qw = Mq W in log2 units, read back by other threads."""
    offs_r = tl.arange(0, RP)
    qw = _query_bias_columns(lq, offs_m, in_m, qmem_base, bias_base, stride_bias_r, R, RP, 1, RP, SOFT)
    tl.store(qw_base + offs_r[None, :] * Nq + offs_m[:, None], qw, mask=in_m[:, None] & (offs_r[None, :] < R))
    tl.debug_barrier()


@triton.jit
def _sma_fwd_mixed_kernel(Q, K, V, QW, StateAcc, StateM, StateL, StateMass,
                          QLabels, QMem, KLabels, KMem, KOperand, Bias, AllowBits, MixedCount, MixedIndex,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                          stride_qlab_b, stride_qmem_b, stride_klab_b, stride_kmem_b, stride_kop_b, stride_kop_n,
                          stride_bias_b, stride_bias_h, stride_bias_r, stride_allow_b, stride_count_b, stride_index_b,
                          H, Nq, Nk, R, num_key_tiles, qk_scale,
                          HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, KR: tl.constexpr,
                          TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr, MASS_R: tl.constexpr,
                          SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, ANY_BLOCKED: tl.constexpr,
                          RETURN_MASS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          SUB_M: tl.constexpr, SUB_N: tl.constexpr, STRIDE_UNIT: tl.constexpr):
    """The first launch where the layout has mixed tiles: walks a query block's mixed key tiles
    and leaves each row's online-softmax state (acc, m, l, mass) in the State buffers, from which
    _sma_fwd_pure_kernel resumes. A kernel of its own keeps the mixed path's registers out of the
    pure loop's allocation. SUB_M, SUB_N: query and key blocks per layout tile.
    """
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    OUT_TY: tl.constexpr = V.dtype.element_ty
    # The strides come in units of STRIDE_UNIT elements (see stride_unit): rows provably on 16 bytes.
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    pid_bh, b, h, list_row, offs_m, in_m = _query_block(H, Nq, BLOCK_M, SUB_M)
    mixed_count = tl.load(MixedCount + b * stride_count_b + list_row)
    if mixed_count > 0:
        q0, q1 = _load_head_blocks(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, HEAD_DIM, D0, D1,
                                   UPCAST)
        lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
        q_bits = lq
        if ANY_BLOCKED:
            q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
        qw_base = QW + pid_bh * R * Nq  # (R, Nq) per (batch row, head): region c's bias of every query
        acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        mass = tl.zeros((BLOCK_M, MASS_R), dtype=tl.float32)
        if HAS_BIAS:  # this launch writes the QW table too (the pure launch writes the same values)
            _store_query_bias(qw_base, lq, offs_m, in_m, QMem + b * stride_qmem_b,
                              Bias + b * stride_bias_b + h * stride_bias_h, stride_bias_r, R, Nq, RP, SOFT)
        acc0, acc1, m_i, l_i, mass = _fwd_mixed_tiles(
            acc0, acc1, m_i, l_i, mass, q0, q1, q_bits, qw_base, offs_m, in_m, Nq, K + b * stride_kb + h * stride_kh,
            V + b * stride_vb + h * stride_vh, KLabels + b * stride_klab_b, KMem + b * stride_kmem_b,
            KOperand + b * stride_kop_b, MixedIndex + b * stride_index_b + list_row * num_key_tiles,
            mixed_count, stride_kn, stride_vn, stride_kop_n, Nk, R, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, SUB_N,
            KR, TERMS_Q, TERMS_K, MASS_R, SOFT, HAS_BIAS, ANY_BLOCKED, RETURN_MASS, UPCAST, PRECISION,
            DOT_PRECISION, OUT_TY)
        rows = pid_bh * Nq + offs_m
        cols0 = tl.arange(0, D0)
        tl.store(StateAcc + rows[:, None] * HEAD_DIM + cols0[None, :], acc0,
                 mask=in_m[:, None] & (cols0[None, :] < HEAD_DIM))
        if D1 > 0:
            cols1 = D0 + tl.arange(0, D1)
            tl.store(StateAcc + rows[:, None] * HEAD_DIM + cols1[None, :], acc1,
                     mask=in_m[:, None] & (cols1[None, :] < HEAD_DIM))
        tl.store(StateM + rows, m_i, mask=in_m)
        tl.store(StateL + rows, l_i, mask=in_m)
        if RETURN_MASS:
            offs_mass = tl.arange(0, MASS_R)
            tl.store(StateMass + rows[:, None] * R + offs_mass[None, :], mass,
                     mask=in_m[:, None] & (offs_mass[None, :] < R))


@triton.jit
def _sma_fwd_pure_kernel(Q, K, V, Out, Lse, Mass, QW, StateAcc, StateM, StateL, StateMass,
                         QLabels, QMem, Bias, AllowBits, RunCount, Runs, MixedCount,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                         stride_qlab_b, stride_qmem_b, stride_bias_b, stride_bias_h, stride_bias_r,
                         stride_allow_b, stride_count_b, stride_runs_b,
                         H, Nq, R, num_key_tiles, qk_scale,
                         HEAD_DIM: tl.constexpr, OUT_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr, MASS_R: tl.constexpr,
                         SOFT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MIXED: tl.constexpr,
                         ANY_BLOCKED: tl.constexpr, RETURN_MASS: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, SUB_M: tl.constexpr,
                         REGION_BITS: tl.constexpr, STRIDE_UNIT: tl.constexpr):
    """Every query block's pure runs, then the results: starts from the state the mixed launch
    left where it ran (HAS_MIXED), else from nothing. Its key block may span two layout tiles
    (BLOCK_N = 128). REGION_BITS: the run entries' format.
    """
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    OUT_TY: tl.constexpr = V.dtype.element_ty
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    pid_bh, b, h, list_row, offs_m, in_m = _query_block(H, Nq, BLOCK_M, SUB_M)
    rows = pid_bh * Nq + offs_m
    q0, q1 = _load_head_blocks(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, HEAD_DIM, D0, D1, UPCAST)
    lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
    q_bits = lq
    if ANY_BLOCKED:
        q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
    qw_base = QW + pid_bh * R * Nq
    cols0 = tl.arange(0, D0)
    cols1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    # Start from the mixed launch's state where it left one, else from nothing.
    if HAS_MIXED:
        mixed_count = tl.load(MixedCount + b * stride_count_b + list_row)
        resume = in_m & (tl.zeros_like(lq) + mixed_count > 0)  # a block: the interpreter rejects 0-d masks
    else:
        resume = offs_m < 0
    acc0, acc1 = _resume_blocks(StateAcc, rows, resume, cols0, cols1, HEAD_DIM, D1, BLOCK_M)
    m_i = tl.load(StateM + rows, mask=resume, other=float("-inf"))
    l_i = tl.load(StateL + rows, mask=resume, other=0.0)
    if RETURN_MASS:  # the running mass lives in the Mass rows (see _fwd_pure_runs)
        for c0 in tl.static_range(0, MASS_R, 16):
            cols = c0 + tl.arange(0, 16)
            mass = tl.load(StateMass + rows[:, None] * R + cols[None, :],
                           mask=resume[:, None] & (cols[None, :] < R), other=0.0)
            tl.store(Mass + rows[:, None] * R + cols[None, :], mass, mask=in_m[:, None] & (cols[None, :] < R))
    if HAS_BIAS:  # the bias rows qw = Mq W (log2 units), gathered once per run below
        _store_query_bias(qw_base, lq, offs_m, in_m, QMem + b * stride_qmem_b,
                          Bias + b * stride_bias_b + h * stride_bias_h, stride_bias_r, R, Nq, RP, SOFT)
    acc0, acc1, m_i, l_i = _fwd_pure_runs(
        acc0, acc1, m_i, l_i, Mass + rows * R, R, q0, q1, q_bits, qw_base, offs_m, in_m,
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        Runs + b * stride_runs_b + list_row * num_key_tiles * 2, tl.load(RunCount + b * stride_count_b + list_row),
        stride_kn, stride_vn, Nq, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, MASS_R, HAS_BIAS, ANY_BLOCKED, RETURN_MASS,
        UPCAST, DOT_PRECISION, OUT_TY, REGION_BITS)

    # Epilogue. Rows with every key blocked have l = 0: O = 0 and lse = -inf.
    blocked = l_i == 0.0
    inv_l = 1.0 / tl.where(blocked, 1.0, l_i)
    out_base = Out + b * stride_ob + h * stride_oh
    tl.store(out_base + offs_m[:, None] * stride_on + cols0[None, :],
             (acc0 * inv_l[:, None]).to(Out.dtype.element_ty), mask=in_m[:, None] & (cols0[None, :] < OUT_DIM))
    if D1 > 0:
        tl.store(out_base + offs_m[:, None] * stride_on + cols1[None, :],
                 (acc1 * inv_l[:, None]).to(Out.dtype.element_ty), mask=in_m[:, None] & (cols1[None, :] < OUT_DIM))
    lse_log2 = tl.where(blocked, float("-inf"), m_i + tl.math.log2(tl.where(blocked, 1.0, l_i)))
    tl.store(Lse + rows, lse_log2 * LN2, mask=in_m)
    if RETURN_MASS:
        tl.debug_barrier()
        for c0 in tl.static_range(0, MASS_R, 16):
            cols = c0 + tl.arange(0, 16)
            mass_ptrs = Mass + rows[:, None] * R + cols[None, :]
            mass_mask = in_m[:, None] & (cols[None, :] < R)
            tl.store(mass_ptrs, tl.load(mass_ptrs, mask=mass_mask, other=0.0) * inv_l[:, None], mask=mass_mask)


def sma_forward_triton(q, k, v, layout, bias, scale, return_mass, config: ForwardConfig):
    """Launch the forward: _sma_fwd_mixed_kernel where the layout has mixed tiles, then
    _sma_fwd_pure_kernel. Inputs are checked.

    Args:
        layout: the SMALayout (its tile lists built).
        bias: (B|1, H|1, R, R) float bias table in natural units (last dim contiguous), or None.
    Returns:
        out (B, H, Nq, D) in q.dtype, lse (B, H, Nq) float32, mass (B, H, Nq, R) float32 or
        None, and the bias table QW (B, H, R, Nq) float32 in log2 units (written when there is a bias), which
        the backward reads.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = layout.num_regions
    qr, kr, tiles, info = layout.q_regions, layout.k_regions, layout.tiles, layout.info
    soft = qr.is_soft
    device = q.device
    out = empty_like(q)
    q, k, v = (pad_head_dim(unit_last_stride(t)) for t in (q, k, v))
    lse = empty((B, H, Nq), dtype=torch.float32, device=device)
    mass = empty((B, H, Nq, R), dtype=torch.float32, device=device) if return_mass else lse
    qw = empty((B, H, R, Nq), dtype=torch.float32, device=device)
    if info.has_mixed:
        state = (empty((B, H, Nq, q.shape[-1]), dtype=torch.float32, device=device),
                 empty((B, H, Nq), dtype=torch.float32, device=device),
                 empty((B, H, Nq), dtype=torch.float32, device=device),
                 empty((B, H, Nq, R), dtype=torch.float32, device=device) if return_mass else lse)
    else:
        state = (lse, lse, lse, lse)  # never read
    # The bias dot's operand layout: "split" for 16-bit inputs, else 1 term.
    kr_width, terms_q, terms_k = bias_dot_shape(R, soft, "split" if q.dtype != torch.float32 else "ieee")
    q_mem = fp32_memberships(qr) if soft else qr.labels
    k_mem = fp32_memberships(kr) if soft else kr.labels
    k_op = layout.k_split if soft and terms_k == 2 else k_mem
    d0, d1 = head_dim_split(q.shape[-1])
    unit = stride_unit(q, k, v, out)
    pool = dict(  # what either kernel reads; each launch takes its parameters (kernel_args)
        Q=q, K=k, V=v, Out=out, Lse=lse, Mass=mass, QW=qw, StateAcc=state[0], StateM=state[1], StateL=state[2],
        StateMass=state[3], QLabels=qr.labels, QMem=q_mem, KLabels=kr.labels, KMem=k_mem, KOperand=k_op,
        Bias=bias if bias is not None else lse, AllowBits=layout.allow_bits,
        RunCount=tiles.pure_run_count, Runs=tiles.pure_runs, MixedCount=tiles.mixed_count,
        MixedIndex=tiles.mixed_index,
        **dict(zip(("stride_qb", "stride_qh", "stride_qn"), unit_strides(q, unit))),
        **dict(zip(("stride_kb", "stride_kh", "stride_kn"), unit_strides(k, unit))),
        **dict(zip(("stride_vb", "stride_vh", "stride_vn"), unit_strides(v, unit))),
        **dict(zip(("stride_ob", "stride_oh", "stride_on"), unit_strides(out, unit))),
        stride_qlab_b=batch_stride(qr.labels), stride_qmem_b=batch_stride(q_mem),
        stride_klab_b=batch_stride(kr.labels), stride_kmem_b=batch_stride(k_mem),
        stride_kop_b=batch_stride(k_op), stride_kop_n=k_op.stride(1) if soft else 0,
        stride_bias_b=0 if bias is None else batch_stride(bias),
        stride_bias_h=0 if bias is None or bias.shape[1] == 1 else bias.stride(1),
        stride_bias_r=R if bias is None else bias.stride(2),
        stride_allow_b=batch_stride(layout.allow_bits),
        stride_count_b=batch_stride(tiles.mixed_count), stride_index_b=batch_stride(tiles.mixed_index),
        stride_runs_b=batch_stride(tiles.pure_runs),
        H=H, Nq=Nq, Nk=Nk, R=R, num_key_tiles=tiles.mixed_index.shape[-1], qk_scale=scale * LOG2E.value,
        HEAD_DIM=q.shape[-1], OUT_DIM=D, D0=d0, D1=d1,
        RP=max(16, next_power_of_2(R)), KR=kr_width, TERMS_Q=terms_q, TERMS_K=terms_k,
        MASS_R=max(16, next_power_of_2(R)), SOFT=soft, HAS_BIAS=bias is not None, HAS_MIXED=info.has_mixed,
        ANY_BLOCKED=info.any_blocked, RETURN_MASS=return_mass,
        UPCAST=interpreting() and q.dtype != torch.float32, REGION_BITS=REGION_BITS, STRIDE_UNIT=unit,
    )
    if info.has_mixed:
        mixed = config.mixed
        launch(_sma_fwd_mixed_kernel, (triton.cdiv(Nq, mixed.block_m), B * H), **mixed.launch_options(),
               **kernel_args(_sma_fwd_mixed_kernel, pool, mixed.tile_args(),
                             PRECISION=kernel_precision(q.dtype, mixed)))
    pure = config.pure
    launch(_sma_fwd_pure_kernel, (triton.cdiv(Nq, pure.block_m), B * H), **pure.launch_options(),
           **kernel_args(_sma_fwd_pure_kernel, pool, pure.tile_args(), PRECISION=kernel_precision(q.dtype, pure)))
    return out, lse, (mass if return_mass else None), qw
