"""Triton forward kernel of spatially-modulated attention.

One program owns one query tile of one (batch row, head). It walks the key tiles
that the tile-sparsity lists name (see sparsity.py): partial tiles with the
element-wise allow mask, then full tiles with no mask at all. Skipped tiles are
never loaded. Scores are kept in log2 units: the bias table arrives pre-scaled
by log2(e) and ``qk_scale = scale * log2(e)``, so the softmax uses exp2.

The bias term Mq W Mk^T is computed two ways:

- hard labels: a gather ``W[label(q), label(k)]`` from the (R, R) table, which
  stays in L1; when tokens are region-sorted most tiles read one row of it;
- soft memberships: ``(Mq W) Mk^T`` with Mq W formed once per query tile and one
  small dot per key tile, in tf32x3 so the bias keeps fp32 accuracy.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._runtime import empty, empty_like, interpreting, launch, next_power_of_2

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, offs_n, offs_d, n_limit, CHECK_N: tl.constexpr, CHECK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only the edges that can be out of range."""
    if CHECK_N:
        if CHECK_D:
            tile = tl.load(ptrs, mask=(offs_n[:, None] < n_limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            tile = tl.load(ptrs, mask=offs_n[:, None] < n_limit, other=0.0)
    else:
        if CHECK_D:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot_fp32(a, b, PRECISION: tl.constexpr):
    """An fp32 x fp32 dot near fp32 accuracy.

    PRECISION "ieee" and "tf32x3" (fp32 inputs: the kernel's other dots use the same) go to
    tl.dot. "split" (16-bit inputs) splits each operand into bf16 high and low halves and
    sums three bf16 tensor-core dots: about 16 mantissa bits, far below the inputs' own
    rounding, at a fraction of the registers that tf32x3 takes.
    """
    if PRECISION != "split":
        out = tl.dot(a, b, input_precision="ieee")  # K = R is small: exact FMA beats tf32x3's registers
    else:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        out = tl.dot(a_hi, b_hi)
        out = tl.dot(a_hi, b_lo, out)
        out = tl.dot(a_lo, b_hi, out)
    return out


@triton.jit
def _dot_onehot(a, b, ONEHOT_A: tl.constexpr, PRECISION: tl.constexpr):
    """_dot_fp32 where one operand (a if ONEHOT_A, else b) holds only 0 and 1 (hard labels).

    That operand is exact in bf16, so "split" needs two bf16 dots instead of three, and
    only the other operand is split: fewer live tiles, which is what spilled.
    """
    if PRECISION != "split":
        out = tl.dot(a, b, input_precision="ieee")
    elif ONEHOT_A:
        exact = a.to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        out = tl.dot(exact, (b - b_hi.to(tl.float32)).to(tl.bfloat16), tl.dot(exact, b_hi))
    else:
        exact = b.to(tl.bfloat16)
        a_hi = a.to(tl.bfloat16)
        out = tl.dot((a - a_hi.to(tl.float32)).to(tl.bfloat16), exact, tl.dot(a_hi, exact))
    return out


@triton.jit
def _sma_fwd_tiles(acc, m_i, l_i, mass_acc,
                   q, qw, q_bits, bias_base, bias_rows,
                   k_base, v_base, klab_base, kmem_base,
                   tile_index, tile_count,
                   stride_kn, stride_vn, Nk, R, qk_scale, q_base, offs_m, stride_qn, Nq,
                   MASKED: tl.constexpr, SOFT: tl.constexpr, RETURN_MASS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   RELOAD_Q: tl.constexpr):
    """Online-softmax accumulation over a list of key tiles.

    RELOAD_Q reads the query tile again for every key tile (from L1/L2) instead of holding
    it in registers: fp32 at D = 256 otherwise spills.
    """
    DOT_PRECISION: tl.constexpr = "tf32" if PRECISION == "split" else PRECISION  # moot for 16-bit operands
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_tile = tl.arange(0, BLOCK_N)
    for j in range(tile_count):
        offs_n = tl.load(tile_index + j) * BLOCK_N + offs_tile
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, offs_d, Nk,
                       MASKED, BLOCK_D != HEAD_DIM, HEAD_DIM)
        if MASKED:
            in_n = offs_n < Nk
            lk = tl.load(klab_base + offs_n, mask=in_n, other=0)
        else:
            lk = tl.load(klab_base + offs_n)
        if UPCAST:
            k = k.to(tl.float32)
        if RELOAD_Q:
            q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, offs_d, Nq, True,
                           BLOCK_D != HEAD_DIM, HEAD_DIM)
            if UPCAST:
                q = q.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFT:
            mem_mask = offs_r[None, :] < R
            if MASKED:
                mem_mask = mem_mask & in_n[:, None]
            mk = tl.load(kmem_base + offs_n[:, None] * R + offs_r[None, :], mask=mem_mask, other=0.0)
            s += _dot_fp32(qw, tl.trans(mk), PRECISION)
        else:
            s += tl.load(bias_base + bias_rows[:, None] + lk[None, :])
        if MASKED:
            allowed = ((q_bits[:, None] >> lk[None, :].to(q_bits.dtype)) & 1) != 0
            s = tl.where(allowed & in_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing allowed so far keeps m = -inf; shift by 0 to avoid -inf - -inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, offs_d, Nk,
                       MASKED, BLOCK_D != HEAD_DIM, HEAD_DIM)
        p_mm = p.to(v.dtype)
        if UPCAST:
            p_mm = p_mm.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p_mm, v, acc, input_precision=DOT_PRECISION)
        if RETURN_MASS:
            alpha_mass = alpha[:, None]
            if SOFT:
                k_mass = mk.to(p_mm.dtype)
            else:
                k_mass = (lk[:, None] == offs_r[None, :]).to(p_mm.dtype)
            if PRECISION == "split":
                mass_acc = tl.dot(p_mm, k_mass, mass_acc * alpha_mass)
            else:
                mass_acc = mass_acc * alpha_mass + _dot_fp32(p_mm, k_mass, PRECISION)
        m_i = m_new
    return acc, m_i, l_i, mass_acc


@triton.jit
def _sma_fwd_kernel(Q, K, V, Out, Lse, Mass,
                    QLabels, KLabels, QMem, KMem, Bias, AllowBits,
                    PartialCount, PartialIndex, FullCount, FullIndex,
                    stride_qb, stride_qh, stride_qn,
                    stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    stride_ob, stride_oh, stride_on,
                    stride_qlab_b, stride_klab_b, stride_qmem_b, stride_kmem_b,
                    stride_bias_b, stride_bias_h, stride_allow_b,
                    stride_count_b, stride_index_b,
                    H, Nq, Nk, R, num_k_tiles, qk_scale,
                    HEAD_DIM: tl.constexpr, OUT_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SOFT: tl.constexpr,
                    RETURN_MASS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    RELOAD_Q: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < Nq

    q_base = Q + b * stride_qb + h * stride_qh
    if RELOAD_Q:
        q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # stands in: the tile loops load it
    else:
        q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, offs_d, Nq, True,
                       BLOCK_D != HEAD_DIM, HEAD_DIM)
        if UPCAST:
            q = q.to(tl.float32)
    lq = tl.load(QLabels + b * stride_qlab_b + offs_m, mask=in_m, other=0)
    q_bits = tl.load(AllowBits + b * stride_allow_b + lq)
    bias_base = Bias + b * stride_bias_b + h * stride_bias_h
    bias_rows = lq * R
    if SOFT:
        in_r = offs_r < R
        mq = tl.load(QMem + b * stride_qmem_b + offs_m[:, None] * R + offs_r[None, :],
                     mask=in_m[:, None] & in_r[None, :], other=0.0)
        w = tl.load(bias_base + offs_r[:, None] * R + offs_r[None, :], mask=in_r[:, None] & in_r[None, :], other=0.0)
        qw = _dot_fp32(mq, w, PRECISION)
    else:
        qw = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    mass_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    klab_base = KLabels + b * stride_klab_b
    kmem_base = KMem + b * stride_kmem_b
    row = pid_m * num_k_tiles
    acc, m_i, l_i, mass_acc = _sma_fwd_tiles(
        acc, m_i, l_i, mass_acc, q, qw, q_bits, bias_base, bias_rows, k_base, v_base, klab_base, kmem_base,
        PartialIndex + b * stride_index_b + row, tl.load(PartialCount + b * stride_count_b + pid_m),
        stride_kn, stride_vn, Nk, R, qk_scale, q_base, offs_m, stride_qn, Nq,
        True, SOFT, RETURN_MASS, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_R, UPCAST, PRECISION, RELOAD_Q)
    acc, m_i, l_i, mass_acc = _sma_fwd_tiles(
        acc, m_i, l_i, mass_acc, q, qw, q_bits, bias_base, bias_rows, k_base, v_base, klab_base, kmem_base,
        FullIndex + b * stride_index_b + row, tl.load(FullCount + b * stride_count_b + pid_m),
        stride_kn, stride_vn, Nk, R, qk_scale, q_base, offs_m, stride_qn, Nq,
        False, SOFT, RETURN_MASS, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_R, UPCAST, PRECISION, RELOAD_Q)

    # Rows with every key blocked have l = 0 and acc = 0: they give O = 0 and lse = -inf.
    blocked = l_i == 0.0
    inv_l = 1.0 / tl.where(blocked, 1.0, l_i)
    out = acc * inv_l[:, None]
    out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=in_m[:, None] & (offs_d[None, :] < OUT_DIM))
    lse = tl.where(blocked, float("-inf"), (m_i + tl.math.log2(tl.where(blocked, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Lse + pid_bh * Nq + offs_m, lse, mask=in_m)
    if RETURN_MASS:
        mass_ptrs = Mass + pid_bh * Nq * R + offs_m[:, None] * R + offs_r[None, :]
        tl.store(mass_ptrs, mass_acc * inv_l[:, None], mask=in_m[:, None] & (offs_r[None, :] < R))


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    fp32_precision: str = "ieee"  # fp32 inputs: "ieee" (FMA) or "tf32x3" (tensor cores, ~fp32 accurate)
    reload_q: bool = False  # read the query tile per key tile instead of holding it in registers


def kernel_precision(dtype: torch.dtype, config) -> str:
    """The kernels' PRECISION: the interpreter computes in fp32 and ignores precision."""
    if interpreting():
        return "ieee"
    return config.fp32_precision if dtype == torch.float32 else "split"


# The shipped configs, per (head-dim class, fp32 inputs, variant). tests/tune_configs.py
# picks for each key the first of its candidates that compiles for sm_80 and sm_90 with
# no spills; tests/test_compile_gate.py holds every entry to that.
FORWARD_CONFIGS = {
    (64, False, "plain"): ForwardConfig(128, 64, 8, 2),
    (64, False, "narrow"): ForwardConfig(128, 64, 8, 2),
    (64, False, "wide"): ForwardConfig(64, 32, 4, 2),
    (64, True, "plain"): ForwardConfig(32, 32, 4, 2),
    (64, True, "narrow"): ForwardConfig(16, 16, 4, 1, "tf32x3"),
    (64, True, "wide"): ForwardConfig(32, 32, 8, 2),
    (128, False, "plain"): ForwardConfig(64, 32, 4, 2),
    (128, False, "narrow"): ForwardConfig(64, 32, 4, 2),
    (128, False, "wide"): ForwardConfig(16, 32, 4, 1),
    (128, True, "plain"): ForwardConfig(16, 32, 4, 1, "tf32x3"),
    (128, True, "narrow"): ForwardConfig(16, 16, 8, 1),
    (128, True, "wide"): ForwardConfig(16, 16, 8, 1),
    (256, False, "plain"): ForwardConfig(32, 32, 4, 2),
    (256, False, "narrow"): ForwardConfig(16, 32, 4, 1),
    (256, False, "wide"): ForwardConfig(16, 32, 4, 1),
    (256, True, "plain"): ForwardConfig(16, 16, 8, 1, "tf32x3"),
    (256, True, "narrow"): ForwardConfig(16, 16, 8, 2, "ieee", reload_q=True),
    (256, True, "wide"): ForwardConfig(16, 16, 8, 2, "ieee", reload_q=True),
}

VARIANTS = ("plain", "narrow", "wide")


def config_variant(soft: bool, mass: bool, num_regions: int) -> str:
    """wide: R > 16; else plain (hard labels, no region mass) or narrow (soft or mass).

    MILD runs a handful of regions: splitting by R first lets the common cases compile
    with 16-wide region tiles instead of the 64 that R = 64 needs.
    """
    if num_regions > 16:
        return "wide"
    return "narrow" if soft or mass else "plain"


def padded_head_dim(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def head_dim_class(head_dim: int) -> int:
    """Config tables key head dims by 64 (any D <= 64), 128 and 256: a config that compiles
    without spills at the class's largest D holds for the smaller ones."""
    return max(64, padded_head_dim(head_dim))


def padded_regions(num_regions: int, minimum: int = 32) -> int:
    """BLOCK_R. The compile gate chose the floors: 32 for the forward kernel (16 made its
    D=256 narrow variant spill), 16 for the backward's (32 spilled at R <= 16)."""
    return max(minimum, next_power_of_2(num_regions))


def pad_head_dim(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the head dim to a multiple of 16.

    Load masks along the head dim then fall on 16-element boundaries; at 8-element
    boundaries (D = 40, say) Triton's loads cost about 100 more registers a thread and
    spill. The copy is O(N * D), small against the O(N^2 * D) attention.
    """
    D = x.shape[-1]
    return x if D % 16 == 0 else torch.nn.functional.pad(x, (0, 16 - D % 16))


def forward_config(head_dim: int, dtype: torch.dtype, soft: bool, mass: bool, num_regions: int) -> ForwardConfig:
    key = (head_dim_class(head_dim), dtype == torch.float32, config_variant(soft, mass, num_regions))
    return FORWARD_CONFIGS[key]


def sma_forward_triton(q, k, v, q_regions, k_regions, bias_log2, allow_bits, sparsity, scale,
                       num_regions, return_mass, config: ForwardConfig):
    """Launch the forward kernel. Inputs are already checked and laid out by the wrapper.

    Args:
        q_regions, k_regions: Regions (labels (B|1, N) int32, memberships (B|1, N, R) or None).
        bias_log2: (B|1, H|1, R, R) float32 bias table times log2(e), last two dims contiguous.
        allow_bits: (B|1, R) int32/int64, bit s of row r set when allow[r, s].
        sparsity: TileSparsity built with config.block_m / config.block_n.
    Returns:
        out (B, H, Nq, D) in q.dtype, lse (B, H, Nq) float32, mass (B, H, Nq, R) float32 or None.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = num_regions
    soft = q_regions.is_soft
    out = empty_like(q)
    q, k, v = (pad_head_dim(t) for t in (q, k, v))
    lse = empty((B, H, Nq), dtype=torch.float32, device=q.device)
    mass = empty((B, H, Nq, R), dtype=torch.float32, device=q.device) if return_mass else lse
    q_mem = q_regions.memberships if soft else q_regions.labels
    k_mem = k_regions.memberships if soft else k_regions.labels

    def batch_stride(t):
        return 0 if t.shape[0] == 1 else t.stride(0)

    grid = (triton.cdiv(Nq, config.block_m), B * H)
    launch(
        _sma_fwd_kernel, grid, num_warps=config.num_warps, num_stages=config.num_stages,
        Q=q, K=k, V=v, Out=out, Lse=lse, Mass=mass,
        QLabels=q_regions.labels, KLabels=k_regions.labels, QMem=q_mem, KMem=k_mem,
        Bias=bias_log2, AllowBits=allow_bits,
        PartialCount=sparsity.partial_count, PartialIndex=sparsity.partial_index,
        FullCount=sparsity.full_count, FullIndex=sparsity.full_index,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_qlab_b=batch_stride(q_regions.labels), stride_klab_b=batch_stride(k_regions.labels),
        stride_qmem_b=batch_stride(q_mem), stride_kmem_b=batch_stride(k_mem),
        stride_bias_b=batch_stride(bias_log2), stride_bias_h=0 if bias_log2.shape[1] == 1 else bias_log2.stride(1),
        stride_allow_b=batch_stride(allow_bits),
        stride_count_b=batch_stride(sparsity.partial_count), stride_index_b=batch_stride(sparsity.partial_index),
        H=H, Nq=Nq, Nk=Nk, R=R, num_k_tiles=sparsity.partial_index.shape[-1], qk_scale=scale * LOG2E,
        HEAD_DIM=q.shape[-1], OUT_DIM=D, BLOCK_D=padded_head_dim(D), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_R=padded_regions(R), SOFT=soft, RETURN_MASS=return_mass,
        UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION=kernel_precision(q.dtype, config), RELOAD_Q=config.reload_q,
    )
    return out, lse, (mass if return_mass else None)
