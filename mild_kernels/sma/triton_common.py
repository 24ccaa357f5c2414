"""What the SMA forward and backward Triton kernels share: jit helpers (block loads, dot
operands, the bias columns and the region product) and the host side of a launch (head-dim
blocks, strides in 16-byte units, the bias dot's shape, the dot precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpreting, next_power_of_2
from .configs import KernelConfig
from .layout import soft_operand_regions

# Constant expressions, so that jit code can read them (jit code refuses a plain global float).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2


@triton.jit
def _load_block(base, rows, stride, limit, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASK_ROWS: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of the rows ``rows``; only the edges that can be out of range are masked."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if MASK_ROWS:
        if COL0 + WIDTH > HEAD_DIM:
            block = tl.load(ptrs, mask=(rows[:, None] < limit) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            block = tl.load(ptrs, mask=rows[:, None] < limit, other=0.0)
    else:
        if COL0 + WIDTH > HEAD_DIM:
            block = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            block = tl.load(ptrs)
    return block


@triton.jit
def _query_block(H, Nq, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr):
    """This program's query block: (batch row, head) as one index and apart, its row of the layout's
    tile lists (SUB_M blocks a layout tile), its query rows and which of them are in range."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_bh, pid_bh // H, pid_bh % H, pid_m // SUB_M, offs_m, offs_m < Nq


@triton.jit
def _load_head_blocks(base, rows, stride, limit, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                      UPCAST: tl.constexpr):
    """Rows as dot operands in the two head-dim blocks [0, D0) and [D0, D0 + D1) (the second is the
    first again when D1 == 0)."""
    x0 = _as_operand(_load_block(base, rows, stride, limit, 0, D0, HEAD_DIM, True), UPCAST)
    x1 = x0
    if D1 > 0:
        x1 = _as_operand(_load_block(base, rows, stride, limit, D0, D1, HEAD_DIM, True), UPCAST)
    return x0, x1


@triton.jit
def _as_operand(x, UPCAST: tl.constexpr):
    """A dot operand: as loaded on a GPU; in fp32 under the interpreter, which computes 16-bit dots wrongly."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _query_bias_columns(lq, offs_m, in_m, qmem_base, bias_base, stride_bias_r, R, COLS: tl.constexpr,
                        TERMS: tl.constexpr, RP: tl.constexpr, SOFT: tl.constexpr):
    """(BLOCK_M, COLS) float32 in log2 units: column t holds (Mq W)[q, t // TERMS] (0 past R).

    Hard labels gather rows of the table; soft memberships take one small dot, exact to ~fp32.
    """
    cols = tl.arange(0, COLS)
    region = cols // TERMS
    if SOFT:
        offs_r = tl.arange(0, RP)
        mq = tl.load(qmem_base + offs_m[:, None] * R + offs_r[None, :], mask=in_m[:, None] & (offs_r[None, :] < R),
                     other=0.0)
        w = tl.load(bias_base + offs_r[:, None] * stride_bias_r + region[None, :],
                    mask=(offs_r[:, None] < R) & (region[None, :] < R), other=0.0).to(tl.float32)
        x = tl.dot(mq, w, input_precision="tf32x3")  # ~fp32-exact; an FMA dot holds whole rows a thread
    else:
        x = tl.load(bias_base + lq[:, None] * stride_bias_r + region[None, :], mask=region[None, :] < R,
                    other=0.0).to(tl.float32)
    return x * LOG2E


@triton.jit
def _qw_columns(qw_base, offs_m, in_m, R, Nq, COLS: tl.constexpr, TERMS: tl.constexpr):
    """(rows, COLS) from the QW table (B, H, R, Nq): column t holds qw[q, t // TERMS] (log2 units; 0 past R)."""
    region = tl.arange(0, COLS) // TERMS
    return tl.load(qw_base + region[None, :] * Nq + offs_m[:, None], mask=in_m[:, None] & (region[None, :] < R),
                   other=0.0)


@triton.jit
def _split_operand(x, TERMS_Q: tl.constexpr, UPCAST: tl.constexpr):
    """A float32 dot operand whose columns come in (hi, lo) pairs when TERMS_Q == 2: the bf16
    high half in even columns and the bf16 rest in odd ones (16 mantissa bits in all)."""
    if TERMS_Q == 2:
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
        x = tl.where((tl.arange(0, x.shape[1]) % 2 == 0)[None, :], hi, lo)
    return _as_operand(x, UPCAST)


@triton.jit
def _bias_key_operand(lk, offs_n, in_n, kop_base, stride_kop, R, KR: tl.constexpr, TERMS_Q: tl.constexpr,
                      TERMS_K: tl.constexpr, SOFT: tl.constexpr, UPCAST: tl.constexpr, COL0: tl.constexpr = 0):
    """The key side (BLOCK_N, KR) of the bias dot (its columns from COL0 on): one-hot rows for hard
    labels (exact in bf16), else the layout's pre-split memberships (16-bit) or fp32 memberships."""
    cols = COL0 + tl.arange(0, KR)
    region = cols // (TERMS_Q * TERMS_K)
    if SOFT:
        if TERMS_K == 2:
            x = tl.load(kop_base + offs_n[:, None] * stride_kop + cols[None, :], mask=in_n[:, None], other=0.0)
        else:
            x = tl.load(kop_base + offs_n[:, None] * stride_kop + region[None, :],
                        mask=in_n[:, None] & (region[None, :] < R), other=0.0)
    else:
        x = tl.where(lk[:, None] == region[None, :], 1.0, 0.0)  # via float32: the interpreter's bool-to-bf16 gives 0
        if TERMS_Q == 2:
            x = x.to(tl.bfloat16)
    return _as_operand(x, UPCAST)


@triton.jit
def _region_product(acc, side_base, stride_r, stride_q, offs_m, in_m, lk, offs_n, in_n, kop_base, stride_kop, R,
                    KR: tl.constexpr, TERMS_Q: tl.constexpr, TERMS_K: tl.constexpr, SOFT: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """acc + X Mk^T for wide region counts (R > 16, KR > 64), 64 columns of the split operands at
    a time, both sides read per call: held across a loop, 256 columns would not fit in registers.

    X[q, r] is read at side_base + r * stride_r + q * stride_q (the QW table, or dMass); the
    product is (queries, keys), or (keys, queries) with KEYS_FIRST, as dK/dV holds its scores.
    """
    for c0 in tl.static_range(0, KR, 64):
        region = (c0 + tl.arange(0, 64)) // (TERMS_Q * TERMS_K)
        x = tl.load(side_base + region[None, :] * stride_r + offs_m[:, None] * stride_q,
                    mask=in_m[:, None] & (region[None, :] < R), other=0.0)
        q_op = _split_operand(x, TERMS_Q, UPCAST)  # chunks start at even columns: the hi/lo parity holds
        k_op = _bias_key_operand(lk, offs_n, in_n, kop_base, stride_kop, R, 64, TERMS_Q, TERMS_K, SOFT, UPCAST, c0)
        if KEYS_FIRST:
            acc = tl.dot(k_op, tl.trans(q_op), acc, input_precision=PRECISION if TERMS_Q == 1 else "tf32")
        else:
            acc = tl.dot(q_op, tl.trans(k_op), acc, input_precision=PRECISION if TERMS_Q == 1 else "tf32")
    return acc


@triton.jit
def _pair_dot(keys, queries, acc, QUERY_MAJOR: tl.constexpr, PRECISION: tl.constexpr):
    """acc + the (key, query) products of keys (BLOCK_N, d) and queries (BLOCK_M, d) in a dK/dV
    kernel's frame: (queries, keys) with QUERY_MAJOR, else (keys, queries). The frame's rows are
    the dot's M, along which Triton lays all warps of a dot that feeds another dot."""
    if QUERY_MAJOR:
        return tl.dot(queries, tl.trans(keys), acc, input_precision=PRECISION)
    else:
        return tl.dot(keys, tl.trans(queries), acc, input_precision=PRECISION)


@triton.jit
def _per_query(x, QUERY_MAJOR: tl.constexpr):
    """A per-query vector broadcast along the frame's query axis."""
    if QUERY_MAJOR:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _per_key(x, QUERY_MAJOR: tl.constexpr):
    """A per-key vector broadcast along the frame's key axis."""
    if QUERY_MAJOR:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _keys_first(pairs, QUERY_MAJOR: tl.constexpr):
    """A frame's (keys, queries) block, the A operand of the dV and dK dots."""
    if QUERY_MAJOR:
        return tl.trans(pairs)
    else:
        return pairs


@triton.jit
def _resume_blocks(State, rows, resume, cols0, cols1, HEAD_DIM: tl.constexpr, D1: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """The two head-dim blocks of fp32 rows a mixed launch left in ``State`` (zeros where ``resume`` is off)."""
    block0 = tl.load(State + rows[:, None] * HEAD_DIM + cols0[None, :],
                     mask=resume[:, None] & (cols0[None, :] < HEAD_DIM), other=0.0)
    block1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 16), dtype=tl.float32)
    if D1 > 0:
        block1 = tl.load(State + rows[:, None] * HEAD_DIM + cols1[None, :],
                         mask=resume[:, None] & (cols1[None, :] < HEAD_DIM), other=0.0)
    return block0, block1


@triton.jit
def _load_cols(ptrs, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A block whose rows are all in range: mask only columns past the head dim, if any."""
    if COL0 + WIDTH > HEAD_DIM:
        block = tl.load(ptrs, mask=(COL0 + tl.arange(0, WIDTH) < HEAD_DIM)[None, :], other=0.0)
    else:
        block = tl.load(ptrs)
    return block


@triton.jit
def _load_rows(ptrs, in_rows, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A block of rows, masked by row (and by column past the head dim, if any)."""
    if COL0 + WIDTH > HEAD_DIM:
        block = tl.load(ptrs, mask=in_rows[:, None] & (COL0 + tl.arange(0, WIDTH) < HEAD_DIM)[None, :], other=0.0)
    else:
        block = tl.load(ptrs, mask=in_rows[:, None], other=0.0)
    return block


def kernel_args(kernel, pool: dict, *more: dict, **extra) -> dict:
    """The arguments ``kernel`` declares, taken from ``pool`` updated by ``more`` and ``extra``: one
    pool serves the launches of an op whose kernels read different parts of it."""
    available = {**pool}
    for part in more:
        available.update(part)
    available.update(extra)
    missing = [name for name in kernel.arg_names if name not in available]
    if missing:
        raise TypeError(f"{kernel.__name__}: no value for {missing}")
    return {name: available[name] for name in kernel.arg_names}


def kernel_precision(dtype: torch.dtype, config: KernelConfig) -> str:
    """A launch's PRECISION: "split" for 16-bit inputs; the interpreter computes fp32 and ignores precision."""
    if interpreting():
        return "ieee" if dtype == torch.float32 else "split"
    return config.fp32_precision if dtype == torch.float32 else "split"


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(D0, D1): the head dim as a power-of-two block plus a second one (0 if none).

    SD 1.5's 40, 80 and 160 run as 32+16, 64+16 and 128+32: 80 pays for 80 columns,
    not the 128 a single power-of-two block would take (37% wasted). Only the second
    block can reach past the head dim (40: its last 8 columns are masked).
    """
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (0 if rest <= 0 else max(16, next_power_of_2(rest)))


def pad_head_dim(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad a head dim that is not a multiple of 8 (16 bytes of fp16), so that loads stay vectorised."""
    D = x.shape[-1]
    return x if D % 8 == 0 else torch.nn.functional.pad(x, (0, 8 - D % 8))


def bias_dot_shape(num_regions: int, soft: bool, precision: str) -> tuple[int, int, int]:
    """(KR, TERMS_Q, TERMS_K): the bias dot's width and how many bf16 halves each side carries."""
    if precision != "split":
        return max(16, next_power_of_2(num_regions)), 1, 1
    if soft:
        return 4 * soft_operand_regions(num_regions), 2, 2
    return 2 * max(8, next_power_of_2(num_regions)), 2, 1


def batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def stride_unit(*tensors: torch.Tensor) -> int:
    """STRIDE_UNIT: the elements in 16 bytes if every batch, head and token stride of these
    (B, H, N, D) tensors is a multiple of it, else 1.

    The strides are passed divided by it and multiplied back in the kernel, so the compiler
    knows that rows start on 16 bytes: the JIT hints only 16-divisible ints, and SD 1.5's
    head dim of 40 makes a head stride of 40, which would leave every row load scalar and
    out of the cp.async pipeline.
    """
    unit = 16 // tensors[0].element_size()
    return unit if all(s % unit == 0 for t in tensors for s in t.stride()[:3]) else 1


def unit_strides(t: torch.Tensor, unit: int) -> tuple[int, int, int]:
    return tuple(s // unit for s in t.stride()[:3])


def fp32_memberships(regions) -> torch.Tensor:
    """The kernels read float32 memberships; a layout keeps float64 ones for the torch backend."""
    return regions.memberships.to(torch.float32).contiguous()
