"""The SMA Triton kernels' launch configs: tile sizes, warps and pipeline stages per launch role.

The tables are chosen by ``tests/tune_configs.py``: for every key (head-dim class, fp32
inputs, variant) and launch role, the first of its candidates (larger tiles and more stages
first) that compiles for the architecture with no spill in every case of the compile gate.
From head-dim class 80 up the forward's pure launch tries a 128 x 128 tile first (a key block
of two layout tiles): sm_90 takes it at 80 and 128 (plain), sm_80 at 80 (plain; at 96 the D=88
member spilled it). From class 128 up, dK/dV tries 128-query blocks on 8 warps first
(queries-first scores): sm_90 takes it at 128 (plain and many, one stage), sm_80 at 128 (plain).
``tests/test_compile_gate.py`` holds every entry to that rule. sm_90 (wgmma) and sm_80
(mma.sync, which needs more registers for the same tiles) have tables of their own;
``TABLE_OF_ARCH`` says which one every other architecture takes.

Pure Python: choosing a config imports no Triton.
"""

from __future__ import annotations

import dataclasses

import torch

from .._runtime import device_arch
from .layout import TILE_M, TILE_N

@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch's tiles: a query block of block_m and a key block of block_n tokens."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap a thread (see _runtime.launch)
    fp32_precision: str = "ieee"  # fp32 inputs: "ieee" (FMA) or "tf32x3" (tensor cores, ~fp32 accurate)

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def tile_args(self) -> dict:
        """The kernels' block constexprs. Blocks divide the layout's tiles (SUB_M, SUB_N per tile), except a
        forward pure launch's key block, which may span two key tiles (SUB_N = 0: it walks runs of tiles)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, SUB_M=TILE_M // self.block_m,
                    SUB_N=TILE_N // self.block_n)


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """The forward's two launches tile independently: the mixed one hands over per-row state."""

    pure: KernelConfig
    mixed: KernelConfig


def _forward(pure, mixed):
    return ForwardConfig(KernelConfig(*pure), KernelConfig(*mixed))


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """dK/dV (block_m: query block per iteration, block_n: keys per program; block_m > block_n
    computes the scores queries-first, see triton_backward), and dQ's two launches (block_m:
    queries per program, block_n: key block per iteration)."""

    dkdv: KernelConfig
    dq: KernelConfig
    dq_mixed: KernelConfig


def _backward(dkdv, dq, dq_mixed):
    return BackwardConfig(KernelConfig(*dkdv), KernelConfig(*dq), KernelConfig(*dq_mixed))


VARIANTS = ("plain", "many", "mass", "wide")


def config_variant(mass: bool, num_regions: int) -> str:
    """wide: R > 16; else mass (the region mass asked for); else many: 4 < R <= 16; else plain.

    More than 4 regions widen the mixed tiles' bias operands (16 to 32 or 64 columns), and
    configs tuned at R = 4 spill there in the backward (sm_80 D=128 dK/dV 200 B): "many" is
    tuned and gated at R = 16. Hard labels and soft memberships share configs: they differ
    only in the mixed tiles' launch, which never sets the pure launch's registers.
    """
    if num_regions > 16:
        return "wide"
    if mass:
        return "mass"
    return "many" if num_regions > 4 else "plain"


HEAD_DIM_CLASSES = (48, 64, 80, 96, 128, 160, 256)  # 16-bit inputs; SD 1.5's 40, 80, 160 and SD2/XL's 64 apart
HEAD_DIM_CLASSES_FP32 = (64, 128, 256)  # fp32 is the correctness path: coarser classes


def head_dim_class(head_dim: int, fp32: bool = False) -> int:
    """Config tables key head dims by the smallest class at least as wide. A config that compiles
    without spills at the class's widest member holds for the narrower ones; the 16-bit classes
    keep the common dims apart, so that D=40 does not set D=64's registers."""
    return next(c for c in (HEAD_DIM_CLASSES_FP32 if fp32 else HEAD_DIM_CLASSES) if head_dim <= c)


def config_key(head_dim: int, dtype: torch.dtype, mass: bool, num_regions: int) -> tuple[int, bool, str]:
    fp32 = dtype == torch.float32
    return head_dim_class(head_dim, fp32), fp32, config_variant(mass, num_regions)


# The shipped configs, per (head-dim class, fp32 inputs, variant): for each launch, the first
# of tests/tune_configs.py's candidates that compiles for sm_80 and sm_90 without spills;
# tests/test_compile_gate.py holds every entry to that.
FORWARD_CONFIGS = {
    (48, False, "plain"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "many"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "wide"): _forward((128, 64, 8, 3), (128, 64, 8, 2)),
    (64, False, "plain"): _forward((128, 64, 8, 3, 128), (128, 64, 8, 3)),
    (64, False, "many"): _forward((128, 64, 8, 2, 128), (128, 64, 8, 3)),
    (64, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "wide"): _forward((128, 64, 8, 3), (128, 64, 8, 2)),
    (64, True, "plain"): _forward((64, 32, 4, 2, None, 'tf32x3'), (64, 32, 4, 2, None, 'tf32x3')),
    (64, True, "many"): _forward((64, 32, 4, 2, None, 'tf32x3'), (64, 32, 4, 2, None, 'tf32x3')),
    (64, True, "mass"): _forward((64, 32, 4, 2, None, 'tf32x3'), (64, 32, 4, 2, None, 'tf32x3')),
    (64, True, "wide"): _forward((16, 32, 4, 2, None, 'tf32x3'), (32, 32, 4, 2, None, 'tf32x3')),
    (80, False, "plain"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (80, False, "many"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (96, False, "plain"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (96, False, "many"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (80, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (96, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (80, False, "wide"): _forward((128, 64, 8, 3), (128, 64, 8, 2)),
    (96, False, "wide"): _forward((128, 64, 8, 3), (64, 32, 4, 2)),
    (128, False, "plain"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (128, False, "many"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (128, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (128, False, "wide"): _forward((128, 64, 8, 3), (64, 32, 4, 2)),
    (128, True, "plain"): _forward((16, 32, 4, 2, None, 'tf32x3'), (16, 16, 4, 2)),
    (128, True, "many"): _forward((16, 32, 4, 2, None, 'tf32x3'), (16, 16, 4, 2)),
    (128, True, "mass"): _forward((16, 32, 4, 2, None, 'tf32x3'), (16, 16, 4, 2)),
    (128, True, "wide"): _forward((16, 32, 4, 2, None, 'tf32x3'), (16, 32, 4, 2, None, 'tf32x3')),
    (160, False, "plain"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (160, False, "many"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (160, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (160, False, "wide"): _forward((16, 32, 4, 2), (32, 32, 4, 2)),
    (256, False, "plain"): _forward((32, 32, 4, 2), (128, 64, 8, 2)),
    (256, False, "many"): _forward((32, 32, 4, 2), (64, 32, 4, 2)),
    (256, False, "mass"): _forward((32, 32, 4, 2), (64, 32, 4, 2)),
    (256, False, "wide"): _forward((16, 32, 4, 2), (32, 32, 4, 2)),
    (256, True, "plain"): _forward((16, 16, 4, 2), (16, 16, 4, 2)),
    (256, True, "many"): _forward((16, 16, 4, 2), (16, 16, 4, 2)),
    (256, True, "mass"): _forward((16, 16, 8, 2), (16, 32, 4, 2)),
    (256, True, "wide"): _forward((16, 16, 4, 2), (16, 16, 4, 2)),
}


# sm_80 (Ampere): mma.sync needs more registers than wgmma for the same tiles; its own table.
FORWARD_CONFIGS_SM80 = {
    (48, False, "plain"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "many"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "wide"): _forward((128, 64, 8, 3), (64, 64, 4, 3)),
    (64, False, "plain"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "many"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "wide"): _forward((32, 32, 4, 2), (128, 64, 8, 2)),
    (64, True, "plain"): _forward((32, 32, 4, 2, None, 'tf32x3'), (32, 32, 4, 2)),
    (64, True, "many"): _forward((32, 32, 4, 2, None, 'tf32x3'), (32, 32, 4, 2)),
    (64, True, "mass"): _forward((32, 32, 4, 2, None, 'tf32x3'), (32, 32, 4, 2)),
    (64, True, "wide"): _forward((32, 32, 4, 2, None, 'tf32x3'), (16, 32, 4, 2, None, 'tf32x3')),
    (80, False, "plain"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (80, False, "many"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (96, False, "plain"): _forward((128, 64, 8, 3, 128), (128, 64, 8, 3)),
    (96, False, "many"): _forward((128, 128, 8, 2), (128, 64, 8, 3)),
    (80, False, "mass"): _forward((128, 64, 8, 3, 128), (128, 64, 8, 3)),
    (96, False, "mass"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (80, False, "wide"): _forward((64, 64, 4, 3), (128, 64, 8, 2)),
    (96, False, "wide"): _forward((32, 32, 4, 2), (128, 64, 8, 2)),
    (128, False, "plain"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (128, False, "many"): _forward((128, 64, 8, 3), (128, 64, 8, 3)),
    (128, False, "mass"): _forward((128, 64, 8, 3), (64, 32, 4, 2)),
    (128, False, "wide"): _forward((32, 32, 4, 2), (32, 32, 4, 2)),
    (128, True, "plain"): _forward((16, 16, 4, 2), (32, 32, 4, 2)),
    (128, True, "many"): _forward((16, 16, 4, 2), (32, 32, 4, 2)),
    (128, True, "mass"): _forward((16, 32, 4, 2, None, 'tf32x3'), (32, 32, 4, 2)),
    (128, True, "wide"): _forward((16, 32, 4, 2, None, 'tf32x3'), (16, 32, 4, 2)),
    (160, False, "plain"): _forward((32, 32, 4, 2), (128, 64, 8, 3)),
    (160, False, "many"): _forward((32, 32, 4, 2), (128, 64, 8, 3)),
    (160, False, "mass"): _forward((64, 64, 4, 3), (128, 64, 8, 3)),
    (160, False, "wide"): _forward((16, 32, 4, 2), (64, 32, 4, 2)),
    (256, False, "plain"): _forward((32, 32, 4, 2), (32, 32, 4, 2)),
    (256, False, "many"): _forward((32, 32, 4, 2), (32, 32, 4, 2)),
    (256, False, "mass"): _forward((32, 32, 4, 2), (32, 32, 4, 2)),
    (256, False, "wide"): _forward((16, 32, 4, 2), (32, 32, 4, 2)),
    (256, True, "plain"): _forward((32, 32, 8, 2), (32, 32, 8, 2)),
    (256, True, "many"): _forward((32, 32, 8, 2), (32, 32, 8, 2)),
    (256, True, "mass"): _forward((16, 16, 4, 2), (16, 32, 4, 2)),
    (256, True, "wide"): _forward((16, 16, 4, 2), (16, 32, 4, 2)),
}


# Per (head-dim class, fp32 inputs, variant), as FORWARD_CONFIGS. A dK/dV program owns 64 keys at
# most (the layout's key tile), so it runs one warpgroup: two would compute the same 64-row products.
BACKWARD_CONFIGS = {
    (48, False, "plain"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "many"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "mass"): _backward((64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "wide"): _backward((16, 64, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (64, False, "plain"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "many"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "mass"): _backward((64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "wide"): _backward((16, 64, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (64, True, "plain"): _backward((32, 32, 8, 2), (64, 32, 4, 2, None, 'tf32x3'), (64, 32, 8, 2)),
    (64, True, "many"): _backward((32, 32, 8, 2), (64, 32, 4, 2, None, 'tf32x3'), (64, 32, 8, 2)),
    (64, True, "mass"): _backward((16, 32, 4, 2, None, 'tf32x3'), (64, 32, 4, 2, None, 'tf32x3'), (64, 32, 4, 2, None, 'tf32x3')),
    (64, True, "wide"): _backward((16, 16, 8, 2), (64, 32, 4, 2, None, 'tf32x3'), (16, 16, 8, 2)),
    (80, False, "plain"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (80, False, "many"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (96, False, "plain"): _backward((32, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (96, False, "many"): _backward((32, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (80, False, "mass"): _backward((32, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (96, False, "mass"): _backward((32, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (80, False, "wide"): _backward((16, 16, 4, 1), (128, 64, 8, 3), (64, 32, 4, 2)),
    (96, False, "wide"): _backward((16, 16, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (128, False, "plain"): _backward((128, 64, 8, 1), (128, 64, 8, 3), (64, 32, 4, 2)),
    (128, False, "many"): _backward((128, 64, 8, 1), (128, 64, 8, 3), (64, 32, 4, 2)),
    (128, False, "mass"): _backward((16, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3)),
    (128, False, "wide"): _backward((16, 16, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (128, True, "plain"): _backward((32, 32, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
    (128, True, "many"): _backward((32, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
    (128, True, "mass"): _backward((16, 16, 8, 2), (16, 32, 4, 2, None, 'tf32x3'), (64, 32, 8, 2)),
    (128, True, "wide"): _backward((16, 16, 8, 2), (16, 32, 4, 2, None, 'tf32x3'), (16, 16, 8, 2)),
    (160, False, "plain"): _backward((16, 64, 4, 1), (128, 64, 8, 3), (64, 32, 4, 2)),
    (160, False, "many"): _backward((16, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 2)),
    (160, False, "mass"): _backward((16, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 2)),
    (160, False, "wide"): _backward((16, 16, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (256, False, "plain"): _backward((16, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    (256, False, "many"): _backward((16, 16, 4, 1), (32, 32, 4, 2), (32, 16, 4, 2)),
    (256, False, "mass"): _backward((16, 16, 4, 1), (32, 32, 4, 2), (32, 16, 8, 2)),
    (256, False, "wide"): _backward((16, 16, 4, 1), (32, 32, 4, 2), (32, 32, 4, 2)),
    (256, True, "plain"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
    (256, True, "many"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)),
    (256, True, "mass"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
    (256, True, "wide"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (16, 16, 4, 2)),
}


# sm_80 (Ampere), as FORWARD_CONFIGS_SM80.
BACKWARD_CONFIGS_SM80 = {
    (48, False, "plain"): _backward((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "many"): _backward((32, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "mass"): _backward((16, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (48, False, "wide"): _backward((16, 64, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (64, False, "plain"): _backward((32, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (64, False, "many"): _backward((16, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 3)),
    (64, False, "mass"): _backward((16, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2)),
    (64, False, "wide"): _backward((16, 64, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (64, True, "plain"): _backward((64, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    (64, True, "many"): _backward((64, 32, 8, 2), (64, 32, 8, 2), (32, 16, 4, 2, None, 'tf32x3')),
    (64, True, "mass"): _backward((16, 32, 4, 2, None, 'tf32x3'), (32, 32, 4, 2, None, 'tf32x3'), (32, 16, 4, 2, None, 'tf32x3')),
    (64, True, "wide"): _backward((16, 16, 8, 2), (32, 32, 4, 2, None, 'tf32x3'), (16, 32, 4, 2, None, 'tf32x3')),
    (80, False, "plain"): _backward((16, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 2)),
    (80, False, "many"): _backward((16, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 2)),
    (96, False, "plain"): _backward((16, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 2)),
    (96, False, "many"): _backward((16, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)),
    (80, False, "mass"): _backward((16, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 3)),
    (96, False, "mass"): _backward((16, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2)),
    (80, False, "wide"): _backward((16, 16, 4, 1), (128, 64, 8, 3), (32, 32, 4, 2)),
    (96, False, "wide"): _backward((16, 16, 4, 1), (64, 32, 4, 2), (32, 32, 4, 2)),
    (128, False, "plain"): _backward((128, 64, 8, 2), (64, 32, 4, 2), (32, 16, 4, 2)),
    (128, False, "many"): _backward((32, 32, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)),
    (128, False, "mass"): _backward((32, 32, 4, 2), (64, 32, 4, 2), (64, 32, 4, 2)),
    (128, False, "wide"): _backward((16, 16, 4, 1), (64, 32, 4, 2), (32, 32, 4, 2)),
    (128, True, "plain"): _backward((16, 16, 4, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
    (128, True, "many"): _backward((16, 16, 4, 1), (32, 32, 8, 2), (16, 16, 8, 2)),
    (128, True, "mass"): _backward((32, 32, 8, 2), (16, 32, 4, 2, None, 'tf32x3'), (32, 32, 8, 2)),
    (128, True, "wide"): _backward((16, 16, 8, 2), (16, 32, 4, 2, None, 'tf32x3'), (16, 32, 4, 2)),
    (160, False, "plain"): _backward((16, 16, 4, 1), (32, 16, 4, 2), (32, 16, 4, 2)),
    (160, False, "many"): _backward((16, 16, 4, 1), (32, 16, 4, 2), (32, 16, 4, 2)),
    (160, False, "mass"): _backward((16, 16, 4, 1), (32, 16, 4, 2), (32, 32, 4, 2)),
    (160, False, "wide"): _backward((16, 16, 4, 1), (32, 16, 4, 2), (32, 32, 4, 2)),
    (256, False, "plain"): _backward((16, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)),
    (256, False, "many"): _backward((16, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)),
    (256, False, "mass"): _backward((16, 16, 4, 1), (32, 32, 4, 2), (32, 16, 4, 2)),
    (256, False, "wide"): _backward((16, 16, 4, 1), (32, 32, 4, 2), (32, 32, 4, 2)),
    (256, True, "plain"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (16, 16, 4, 1)),
    (256, True, "many"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (16, 16, 4, 1)),
    (256, True, "mass"): _backward((16, 16, 4, 2), (32, 32, 8, 2), (16, 32, 4, 2)),
    (256, True, "wide"): _backward((16, 16, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
}

# The table each GPU architecture (compute capability, major * 10 + minor) takes.
# - sm_90 (Hopper): its own, tuned for wgmma. sm_100/103 (datacenter Blackwell): Hopper's, whose
#   register budgets hold there (tcgen05 keeps the accumulators in tensor memory).
# - sm_80 (A100): its own, tuned for mma.sync. sm_86/87 (Ampere), sm_89 (Ada: L4, L40S, RTX 40)
#   and sm_120/121 (consumer Blackwell) have mma.sync and no wgmma, like sm_80, so they take
#   sm_80's table; they have 99-101 KB of shared memory a block against sm_80's 163 KB, and a
#   config that does not fit runs with fewer pipeline stages (_runtime.launch_fitting). None of
#   them has been tuned for: no such GPU has been lent.
# An architecture not listed takes the table of the nearest listed one below it (sm_80 below sm_80).
TABLE_OF_ARCH = {80: 80, 86: 80, 87: 80, 89: 80, 90: 90, 100: 90, 103: 90, 120: 80, 121: 80}


def table_arch(arch: int) -> int:
    """The architecture whose tuned table ``arch`` runs with (80 or 90), as TABLE_OF_ARCH states."""
    listed = [a for a in TABLE_OF_ARCH if a <= arch]
    return TABLE_OF_ARCH[max(listed)] if listed else 80


def forward_config(head_dim: int, dtype: torch.dtype, mass: bool, num_regions: int, device) -> ForwardConfig:
    """The shipped forward config for the device's architecture (TABLE_OF_ARCH)."""
    table = FORWARD_CONFIGS if table_arch(device_arch(device)) == 90 else FORWARD_CONFIGS_SM80
    return table[config_key(head_dim, dtype, mass, num_regions)]


def backward_config(head_dim: int, dtype: torch.dtype, mass: bool, num_regions: int, device) -> BackwardConfig:
    """The shipped backward config for the device's architecture (TABLE_OF_ARCH)."""
    table = BACKWARD_CONFIGS if table_arch(device_arch(device)) == 90 else BACKWARD_CONFIGS_SM80
    return table[config_key(head_dim, dtype, mass, num_regions)]
