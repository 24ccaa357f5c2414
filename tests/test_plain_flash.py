"""The plain flash attention (benchmarks/plain_flash.py) against a float64 reference.

Odd sizes throughout: query and key tails inside a tile, and tiles small enough that the
unmasked steady-state loop runs several times before the peeled, masked last tile.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plain_flash import (  # noqa: E402
    BackwardConfig, ForwardConfig, TileConfig, plain_flash_attention, plain_flash_backward, plain_flash_forward)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Small tiles: several unmasked iterations and a masked tail at N_q = 77, N_k = 131.
SMALL_FORWARD = ForwardConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
SMALL_BACKWARD = BackwardConfig(dkdv=TileConfig(block_m=16, block_n=32, num_warps=4, num_stages=2),
                                dq=TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=2),
                                preprocess_block_m=32)


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def reference(q, k, v, do, scale):
    """(out, lse, dq, dk, dv) in float64."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    out = torch.softmax(scores, -1) @ v
    out.backward(do.double())
    return out.detach(), torch.logsumexp(scores, -1).detach(), q.grad, k.grad, v.grad


def inputs(device, dtype, n_q, n_k, head_dim, heads=1):
    q = torch.randn(1, heads, n_q, head_dim, device=device).to(dtype)
    k = torch.randn(1, heads, n_k, head_dim, device=device).to(dtype)
    v = torch.randn(1, heads, n_k, head_dim, device=device).to(dtype)
    do = torch.randn(1, heads, n_q, head_dim, device=device).to(dtype)
    return q, k, v, do


def check(got, want, dtype):
    names = ("out", "lse", "dq", "dk", "dv")
    errors = {name: relative_error(g, w) for name, g, w in zip(names, got, want)}
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# 40/80/160: two head-dim blocks, 40's masked; 128: dK/dV queries-first (plain_flash.TILES)
@pytest.mark.parametrize("head_dim", [64, 16, 40, 80, 128, 160])
def test_forward_and_backward_at_odd_sizes(device, dtype, head_dim):
    q, k, v, do = inputs(device, dtype, 77, 131, head_dim)
    scale = head_dim ** -0.5
    out, lse = plain_flash_forward(q, k, v)
    dq, dk, dv = plain_flash_backward(do, q, k, v, out, lse)
    check((out, lse, dq, dk, dv), reference(q, k, v, do, scale), dtype)


# dK/dV with the query block the wider: its scores queries-first
SMALL_BACKWARD_QUERIES_FIRST = BackwardConfig(dkdv=TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=2),
                                              dq=SMALL_BACKWARD.dq, preprocess_block_m=32)


@pytest.mark.parametrize("backward", [SMALL_BACKWARD, SMALL_BACKWARD_QUERIES_FIRST], ids=["keys-first", "queries-first"])
@pytest.mark.parametrize("n_q,n_k", [(77, 131), (64, 128), (5, 9)])
def test_small_tiles_steady_state_and_tails(device, n_q, n_k, backward):
    """Many loop iterations, no tail at all (multiples of every tile), and a tail only."""
    q, k, v, do = inputs(device, torch.float32, n_q, n_k, 32)
    out, lse = plain_flash_forward(q, k, v, scale=0.3, config=SMALL_FORWARD)
    dq, dk, dv = plain_flash_backward(do, q, k, v, out, lse, scale=0.3, config=backward)
    check((out, lse, dq, dk, dv), reference(q, k, v, do, 0.3), torch.float32)


def test_autograd_with_strided_inputs(device):
    """(B, N, H, D) tensors viewed as (B, H, N, D): the kernels follow the strides."""
    q, k, v = (torch.randn(2, n, 3, 16, device=device).to(torch.float16).transpose(1, 2).requires_grad_()
               for n in (45, 40, 40))
    do = torch.randn(2, 45, 3, 16, device=device).to(torch.float16).transpose(1, 2)
    assert not q.is_contiguous() and q.shape == (2, 3, 45, 16)
    out = plain_flash_attention(q, k, v)
    out.backward(do)
    want_out, _, *want_grads = reference(q, k, v, do, 16 ** -0.5)
    errors = [relative_error(g, w) for g, w in zip((out, q.grad, k.grad, v.grad), (want_out, *want_grads))]
    assert max(errors) < TOLERANCE[torch.float16], errors
