"""A fixed-seed matrix over the Triton kernels' tile paths: every head dim of the SD family and
transformers, every dtype, hard and one-hot soft regions, forward and backward against float64.

Random labels make every tile mixed, so a bug confined to the pure path (say, one that
skips the second head-dim block at D=40/80/160) passed the default run four times in five.
Here the labels are region-sorted with whole key tiles of one region, a boundary tile and a
tail, and the layout itself is asked whether pure and mixed tiles both ran.
"""

import pytest
import torch

from helpers import assert_close, rel_err
from mild_kernels import prepare_regions, sma_attention, sma_attention_reference
from mild_kernels.sma.layout import TILE_N
from test_sma_backward import GRAD_TOLERANCE

R = 3
# Key tiles: [0, 64) region 0 and [64, 128) region 1 are pure; [128, 192) holds the 1|2
# boundary; the tail [192, 209) is always mixed. Queries: a 128-row tile and a tail.
REGION_SIZES = (TILE_N, TILE_N + 10, 71)
NQ = 165


def sorted_regions(soft: bool) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), r) for r, n in enumerate(REGION_SIZES)])
    return torch.nn.functional.one_hot(labels, R).float() if soft else labels


def check_against_reference(q, k, v, bias, q_regions, k_regions, allow, layout):
    """The Triton backend's out, lse and dq, dk, dv against a float64 evaluation of the reference;
    returns (the backend's leaves, the reference's leaves, grad_out) for further checks."""
    dtype, soft = q.dtype, q_regions.is_floating_point()
    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    result = sma_attention(*leaves[:3], bias=leaves[3], layout=layout, return_lse=True, backend="triton")
    grad_out = torch.randn(result.out.shape)
    (result.out.float() * grad_out).sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    out, lse, _ = sma_attention_reference(*refs[:3], q_regions.double() if soft else q_regions,
                                          k_regions.double() if soft else k_regions, refs[3], allow,
                                          return_lse=True)
    (out * grad_out.double()).sum().backward()
    assert_close("out", result.out, out, dtype)
    assert_close("lse", result.lse, lse, dtype)
    for name, mine, ref in zip(("dq", "dk", "dv"), leaves, refs):
        err = rel_err(mine.grad, ref.grad)
        assert err <= GRAD_TOLERANCE[dtype], f"{name}: relative error {err:.3e} (D={q.shape[-1]}, {dtype})"
    return leaves, refs, grad_out


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "one-hot-soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
def test_pure_and_mixed_tiles_forward_and_backward(head_dim, dtype, soft):
    # Inputs from the per-test seed (conftest: fixed by the test's id, so every run is the same)
    k_regions = sorted_regions(soft)
    Nk = k_regions.shape[0]
    q_regions = k_regions[torch.linspace(0, Nk - 1, NQ).round().long()]  # sorted too
    allow = torch.ones(R, R, dtype=torch.bool)
    allow[0, 2] = allow[2, 1] = False  # some skipped tiles, no row fully blocked
    bias = 2 * torch.randn(2, R, R)
    layout = prepare_regions(q_regions, k_regions, allow)
    assert int(layout.tiles.pure_run_count.sum()) > 0 and int(layout.tiles.mixed_count.sum()) > 0
    assert layout.info.has_mixed

    def inputs(n):
        return torch.randn(1, 2, n, head_dim).to(dtype)

    q, k, v = inputs(NQ), inputs(Nk), inputs(Nk)
    leaves, refs, grad_out = check_against_reference(q, k, v, bias, q_regions, k_regions, allow, layout)
    # dbias[a, c] sums dS over a block whose terms nearly cancel (each row of dS sums to 0), so
    # its error is bounded against the sum of |dS|, as for any sum, not against the sum itself.
    scale = dbias_term_scale(refs, q_regions, k_regions, allow, grad_out)
    err = ((leaves[3].grad.double() - refs[3].grad).norm() / scale.norm()).item()
    assert err <= GRAD_TOLERANCE[dtype] / 4, f"dbias: error {err:.3e} of the terms' scale (D={head_dim}, {dtype})"


def dbias_term_scale(refs, q_regions, k_regions, allow, grad_out) -> torch.Tensor:
    """(H, R, R) sums of |dS| over each region block, from the float64 reference."""
    q, k, v, bias = (t.detach() for t in refs)
    one_hot = [torch.nn.functional.one_hot(r.argmax(-1) if r.is_floating_point() else r, R).double()
               for r in (q_regions, k_regions)]
    labels = [m.argmax(-1) for m in one_hot]
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + one_hot[0] @ bias @ one_hot[1].T
    probs = scores.masked_fill(~allow[labels[0]][:, labels[1]], float("-inf")).softmax(-1)
    grad_out = grad_out.double()
    d_scores = probs * (grad_out @ v.transpose(-1, -2) - (grad_out * (probs @ v)).sum(-1, keepdim=True))
    return torch.einsum("qa,bhqk,kc->hac", one_hot[0], d_scores.abs(), one_hot[1])


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "one-hot-soft"])
@pytest.mark.parametrize("arch, head_dim", [(90, 128), (90, 80), (80, 80)])
def test_pure_runs_in_key_blocks_of_two_tiles(arch, head_dim, soft):
    """The shipped forward at these (arch, head dim) walks pure runs in 128-key blocks, two
    layout tiles: a run of three tiles is one full block and a last tile alone (masked), a run
    of two one block, and the last pure run ends where the keys end (no key past it may be read).
    Inputs are strided views, as a UNet hands them over."""
    from mild_kernels._runtime import target_arch
    from mild_kernels.sma.configs import forward_config

    sizes = (3 * TILE_N, 2 * TILE_N, TILE_N)  # three pure runs of 3, 2 and 1 tiles; no mixed key tile
    labels = torch.cat([torch.full((n,), r) for r, n in enumerate(sizes)])
    regions = torch.nn.functional.one_hot(labels, R).float() if soft else labels
    Nk = labels.shape[0]
    q_regions = regions[torch.linspace(0, Nk - 1, NQ).round().long()]
    allow = torch.ones(R, R, dtype=torch.bool)
    allow[2, 0] = False
    bias = 2 * torch.randn(2, R, R)
    layout = prepare_regions(q_regions, regions, allow)
    # (B, N, H, D) storage seen as (B, H, N, D), as a UNet's attention makes them: not contiguous
    q, k, v = (torch.randn(1, n, 2, head_dim).half().transpose(1, 2) for n in (NQ, Nk, Nk))
    with target_arch(arch):
        assert forward_config(head_dim, torch.float16, False, R, q.device).pure.block_n == 2 * TILE_N
        check_against_reference(q, k, v, bias, q_regions, regions, allow, layout)
