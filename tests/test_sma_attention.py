"""Parity of sma_attention (both backends) with a float64 evaluation of the reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close, count_host_reads
from mild_kernels import (SMAOutput, prepare_regions, region_sort, sma_attention, sma_attention_reference,
                          soft_regions)
from mild_kernels._runtime import poison_outputs
from mild_kernels.sma.sparsity import tile_sparsity
from mild_kernels.sma.torch_chunked import SCORE_BUDGET
from mild_kernels.sma.layout import TILE_M


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_regions(batch, tokens, num_regions, soft, device):
    shape = (batch, tokens) if batch else (tokens,)
    if not soft:
        return torch.randint(0, num_regions, shape, device=device)
    # Mostly pure tokens with fractional ones mixed in, as at mask boundaries.
    logits = 4 * torch.randn(*shape, num_regions, device=device)
    logits[..., 0] += torch.where(torch.rand(shape, device=device) < 0.5, 0.0, 20.0)
    return torch.softmax(logits, -1)


def make_case(B=2, H=2, Nq=77, Nk=131, D=40, R=5, dtype=torch.float32, soft=False, bias_kind="BHRR",
              allow_kind="BRR", batched_labels=True, blocked=0.35, device="cpu"):
    q, k, v = (torch.randn(B, H, n, D, device=device).to(dtype) for n in (Nq, Nk, Nk))
    labels_batch = B if batched_labels else 0
    q_regions = random_regions(labels_batch, Nq, R, soft, device)
    k_regions = random_regions(labels_batch, Nk, R, soft, device)
    bias = {None: None, "RR": (R, R), "HRR": (H, R, R), "BHRR": (B, H, R, R)}[bias_kind]
    bias = None if bias is None else 2 * torch.randn(bias, device=device)
    allow = {None: None, "RR": (R, R), "BRR": (B, R, R)}[allow_kind]
    allow = None if allow is None else torch.rand(allow, device=device) >= blocked
    return dict(q=q, k=k, v=v, q_regions=q_regions, k_regions=k_regions, bias=bias, allow=allow)


def float64(case):
    return {name: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for name, t in case.items()}


def check_against_reference(case, backend, dtype, factor=1.0):
    with poison_outputs():
        got = sma_attention(**case, return_lse=True, return_region_mass=True, backend=backend)
    out, lse, mass = sma_attention_reference(**float64(case), return_lse=True, return_region_mass=True)
    assert got.out.dtype == dtype
    assert_close("out", got.out, out, dtype, factor)
    assert_close("lse", got.lse, lse, dtype, factor)
    assert_close("region_mass", got.region_mass, mass, dtype, factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_matches_float64_reference(backend, dtype, soft, device):
    check_against_reference(make_case(dtype=dtype, soft=soft, device=device), backend, dtype)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_torch_backend_off_the_cpu_skips_no_tile_and_reads_nothing(soft, monkeypatch, device):
    """Where host reads are not free the chunked torch path visits every key tile (blocked
    pairs -inf) instead of reading the tile lists: same results, no read in a prepared call."""
    from mild_kernels import _runtime
    from mild_kernels.sma import torch_chunked

    monkeypatch.setattr(_runtime, "host_reads_are_free", lambda device: False)
    monkeypatch.setattr(torch_chunked, "USE_FUSED_CPU", False)
    case = make_case(soft=soft, blocked=0.5, device=device)
    check_against_reference(case, "torch", torch.float32)
    leaves = {**case, **{n: case[n].detach().requires_grad_() for n in "qkv"}}
    layout = prepare_regions(case["q_regions"], case["k_regions"], case["allow"], tiles=False)
    grad = torch.randn(case["q"].shape, device=device)
    with count_host_reads() as reads:
        out = sma_attention(leaves["q"], leaves["k"], leaves["v"], bias=case["bias"], layout=layout, backend="torch")
        (out * grad).sum().backward()
    assert reads == []
    ref_leaves = {**float64(case), **{n: case[n].double().requires_grad_() for n in "qkv"}}
    (sma_attention_reference(**ref_leaves) * grad.double()).sum().backward()
    for name in "qkv":
        assert_close(f"d{name}", leaves[name].grad, ref_leaves[name].grad, torch.float32, factor=4)


def test_autocast_runs_in_its_dtype_like_sdpa(backend, device):
    """Under torch.autocast fp32 q, k, v run in bf16, as SDPA's would (autocast never casts for
    a custom op); the fp32 leaves get fp32 gradients."""
    case = make_case(Nq=45, Nk=70, soft=True, device=device)
    leaves = {**case, **{n: case[n].detach().requires_grad_() for n in "qkv"}}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = sma_attention(**leaves, backend=backend)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().square().sum(), [leaves[n] for n in "qkv"])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert_close("out", out, sma_attention_reference(**float64(case)), torch.bfloat16)


@pytest.mark.parametrize("head_dim", [16, 40, 64, 80, 128, 160, 256])
def test_every_head_dim(backend, head_dim, device):
    for dtype in (torch.float16, torch.float32):
        case = make_case(B=1, H=1, Nq=70, Nk=93, D=head_dim, R=3, dtype=dtype, device=device)
        check_against_reference(case, backend, dtype)


@pytest.mark.parametrize("bias_kind", [None, "RR", "HRR", "BHRR"])
@pytest.mark.parametrize("allow_kind", [None, "RR", "BRR"])
def test_table_broadcasting(backend, bias_kind, allow_kind, device):
    case = make_case(B=2, H=2, Nq=33, Nk=47, D=16, R=4, bias_kind=bias_kind, allow_kind=allow_kind,
                     batched_labels=bias_kind != "RR", device=device)
    check_against_reference(case, backend, torch.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes(backend, data, device):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    case = make_case(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), Nq=draw(st.integers(1, 140)),
        Nk=draw(st.integers(1, 140)), D=draw(st.sampled_from([16, 24, 40, 48, 64, 80])),
        R=draw(st.integers(1, 7)), dtype=dtype, soft=draw(st.booleans()),
        bias_kind=draw(st.sampled_from([None, "HRR", "BHRR"])), allow_kind=draw(st.sampled_from([None, "RR", "BRR"])),
        batched_labels=draw(st.booleans()), blocked=draw(st.sampled_from([0.0, 0.5, 0.8])), device=device)
    check_against_reference(case, backend, dtype)


def test_many_regions(backend, device):
    case = make_case(B=1, H=2, Nq=90, Nk=80, D=32, R=64, soft=True, device=device)
    check_against_reference(case, backend, torch.float32)
    case = make_case(B=1, H=2, Nq=90, Nk=80, D=32, R=64, soft=False, device=device)
    check_against_reference(case, backend, torch.float32)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_fully_blocked_rows(backend, soft, device):
    case = make_case(B=2, H=2, Nq=50, Nk=70, D=32, R=4, soft=soft, allow_kind="BRR", blocked=0.0, device=device)
    case["allow"][0, 2, :] = False  # row 0: queries of region 2 see nothing
    case["allow"][1, :, :] = False  # row 1: nothing is allowed at all
    with poison_outputs():
        got = sma_attention(**case, return_lse=True, return_region_mass=True, backend=backend)
    labels = case["q_regions"].argmax(-1) if soft else case["q_regions"]
    blocked = torch.zeros(2, 50, dtype=torch.bool, device=device)
    blocked[0] = labels[0] == 2
    blocked[1] = True
    assert blocked[0].any() and not blocked[0].all()
    rows = blocked[:, None, :].expand(2, 2, 50)
    for name, t in got._asdict().items():
        assert not t.isnan().any(), f"{name} has NaN"
    assert (got.out[rows] == 0).all()
    assert (got.lse[rows] == float("-inf")).all()
    assert (got.region_mass[rows] == 0).all()
    check_against_reference(case, backend, torch.float32)


def sorted_region_case(device):
    """Region-sorted tokens where every region owns whole layout tiles, with block-diagonal allow."""
    R, H, D = 4, 2, 32
    tokens = R * TILE_M  # TILE_M is a multiple of TILE_N: every query tile and key tile is region-pure
    labels = torch.arange(R, device=device).repeat_interleave(TILE_M)
    q, k, v = (torch.randn(1, H, tokens, D, device=device) for _ in range(3))
    allow = torch.eye(R, dtype=torch.bool, device=device)
    allow[0, 1] = allow[1, 0] = True
    return dict(q=q, k=k, v=v, q_regions=labels, k_regions=labels, bias=torch.randn(H, R, R, device=device),
                allow=allow)


def test_skipped_tiles_are_never_loaded(backend, device):
    case = sorted_region_case(device)
    expected = sma_attention_reference(**float64(case))
    # Keys of region 3 are only visible to region-3 queries; poison them for everyone else:
    # any load of a skipped tile turns the other rows into NaN. (Through a prepared layout,
    # which does not read q, k, v: a raw call refuses NaN inputs.)
    k, v = case["k"].clone(), case["v"].clone()
    region3 = case["k_regions"] == 3
    k[:, :, region3] = float("nan")
    v[:, :, region3] = float("nan")
    layout = prepare_regions(case["q_regions"], case["k_regions"], case["allow"])
    got = sma_attention(case["q"], k, v, bias=case["bias"], layout=layout, backend=backend)
    others = case["q_regions"] != 3
    assert not got[:, :, others].isnan().any(), "a skipped tile was loaded"
    assert_close("out", got[:, :, others], expected[:, :, others], torch.float32)


def test_most_tiles_are_skipped_when_sorted(device):
    """With sorted tokens and a block-diagonal allow table most tile pairs are skipped."""
    R, tokens = 6, 6 * 128
    labels = torch.arange(R, device=device).repeat_interleave(128)[torch.randperm(tokens, device=device)]
    allow = torch.eye(R, dtype=torch.bool, device=device)
    raster = tile_sparsity(labels[None], labels[None], allow[None], R, 64, 64)
    perm = region_sort(labels).perm
    ordered = tile_sparsity(labels[perm][None], labels[perm][None], allow[None], R, 64, 64)
    pairs = raster.partial_index.shape[-1] * raster.partial_index.shape[-2]
    visited_sorted = int(ordered.partial_count.sum() + ordered.full_count.sum())
    visited_raster = int(raster.partial_count.sum() + raster.full_count.sum())
    assert visited_raster == pairs  # raster order mixes every label into every tile
    assert visited_sorted == R * 2 * 2 <= 0.2 * pairs  # each region: its own 2 x 2 tiles
    assert int(ordered.partial_count.sum()) == 0  # region-pure tiles need no mask


def test_region_sort_round_trip(backend, device):
    """Sorting tokens by region and undoing it leaves the output unchanged."""
    case = make_case(B=1, H=2, Nq=100, Nk=100, D=32, R=4, bias_kind="HRR", allow_kind="RR", batched_labels=False,
                     device=device)
    case["k_regions"] = case["q_regions"]
    case["k"], case["v"] = case["k"][:, :, :100], case["v"][:, :, :100]
    plain = sma_attention(**case, backend=backend)
    perm, inverse = region_sort(case["q_regions"])
    permuted = dict(case, q=case["q"][:, :, perm], k=case["k"][:, :, perm], v=case["v"][:, :, perm],
                    q_regions=case["q_regions"][perm], k_regions=case["k_regions"][perm])
    restored = sma_attention(**permuted, backend=backend)[:, :, inverse]
    assert_close("out", restored, plain, torch.float32)


def test_return_types(device):
    case = make_case(B=1, H=1, Nq=9, Nk=11, D=16, R=2, device=device)
    assert isinstance(sma_attention(**case), torch.Tensor)
    got = sma_attention(**case, return_lse=True)
    assert isinstance(got, SMAOutput) and got.region_mass is None and got.lse.shape == (1, 1, 9)
    got = sma_attention(**case, return_region_mass=True)
    assert got.lse is None and got.region_mass.shape == (1, 1, 9, 2)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in (result if isinstance(result, (tuple, list)) else [result]):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return result


def test_torch_backend_memory_is_bounded():
    B, H, N, D, R = 2, 4, 1536, 16, 3
    case = make_case(B=B, H=H, Nq=N, Nk=N, D=D, R=R, device="cpu")
    with LargestTensor() as probe:
        sma_attention(**case, return_lse=True, return_region_mass=True, backend="torch")
    dense = B * H * N * N
    assert probe.numel <= 2 * SCORE_BUDGET < dense / 4, f"largest temporary {probe.numel} vs dense {dense}"


def test_auto_backend_on_cpu_uses_torch():
    case = make_case(B=1, H=1, Nq=20, Nk=20, D=16, R=2)
    expected = sma_attention(**case, backend="torch")
    assert torch.equal(sma_attention(**case), expected)


# ---------------------------------------------------------------- bad input
def bad_inputs():
    R = 3

    def case(**change):
        base = make_case(B=2, H=2, Nq=8, Nk=8, D=16, R=R, bias_kind="HRR", allow_kind="RR")
        base.update(change)
        return base

    q = torch.randn(2, 2, 8, 16)
    yield "q", case(q=q[0])
    yield "k", case(k=torch.randn(2, 3, 8, 16))
    yield "v", case(v=torch.randn(2, 2, 9, 16))
    yield "k, v", case(k=torch.randn(2, 2, 8, 16).half())
    yield "q", case(q=torch.randn(2, 2, 8, 8), k=torch.randn(2, 2, 8, 8), v=torch.randn(2, 2, 8, 8))
    yield "q", case(q=q.to(torch.int32))
    yield "q_regions", case(q_regions=torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]))
    yield "k_regions", case(k_regions=torch.tensor([0, 1, -1, 0, 0, 1, 2, 0]))
    yield "q_regions", case(q_regions=torch.zeros(7, dtype=torch.long))
    yield "q_regions", case(q_regions=torch.full((8, R), 0.5))
    yield "q_regions", case(q_regions=torch.zeros(3, 8, dtype=torch.long))
    yield "bias", case(bias=torch.randn(4, R, R))
    yield "bias", case(bias=torch.full((R, R), float("-inf")))
    yield "bias", case(bias=torch.tensor([[0.0, float("nan"), 0], [0, 0, 0], [0, 0, 0]]))
    yield "bias", case(bias=torch.full((R, R), -3e38))  # past +-1e38 the kernels' log2 units overflow
    yield "allow", case(allow=torch.ones(R, R))
    yield "allow", case(allow=torch.ones(R, R + 1, dtype=torch.bool))
    yield "regions", case(bias=None, allow=None, q_regions=torch.softmax(torch.randn(8, 65), -1),
                          k_regions=torch.softmax(torch.randn(8, 65), -1))
    yield "backend", dict(case(), backend="cuda-magic")
    yield "scale", dict(case(), scale=float("nan"))
    if torch.cuda.is_available():
        yield "k", case(k=torch.randn(2, 2, 8, 16, device="cuda"))


@pytest.mark.parametrize("expected_name,kwargs", list(bad_inputs()))
def test_bad_input_raises_value_error(expected_name, kwargs):
    with pytest.raises(ValueError, match=f"^{expected_name}"):
        sma_attention(**kwargs)


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(B=1, H=1, Nq=8, Nk=8, D=16, R=2)
    with pytest.raises(ValueError, match="^backend"):
        sma_attention(**case, backend="triton")


# ---------------------------------------------------------------- regions
def test_soft_regions_are_area_averages():
    masks = torch.zeros(2, 8, 12)
    masks[0, :4, :6] = 1
    masks[1, 2:8, 3:9] = 1  # overlaps person 0 on a 2x3 patch
    regions = soft_regions(masks, (4, 6))
    assert regions.shape == (24, 3)
    torch.testing.assert_close(regions.sum(-1), torch.ones(24))
    pixels = torch.stack([1 - masks.clamp(0, 1).sum(0).clamp(max=1)] + [m / masks.sum(0).clamp(min=1) for m in masks])
    expected = pixels.view(3, 4, 2, 6, 2).mean((2, 4)).flatten(1).T
    torch.testing.assert_close(regions, expected)
    assert soft_regions(masks[None], 4).shape == (1, 16, 3)


def test_region_sort_is_stable_and_inverts():
    labels = torch.randint(0, 5, (3, 40))
    perm, inverse = region_sort(labels)
    ordered = labels.gather(1, perm)
    assert (ordered[:, 1:] >= ordered[:, :-1]).all()
    for row in range(3):
        for r in range(5):
            positions = perm[row][ordered[row] == r]
            assert (positions[1:] > positions[:-1]).all()
    assert torch.equal(ordered.gather(1, inverse), labels)
    soft = torch.nn.functional.one_hot(labels, 5).float()
    assert torch.equal(region_sort(soft).perm, perm)


def test_region_sort_and_soft_regions_refuse_ill_formed_input():
    with pytest.raises(ValueError, match="labels: float tensors are soft memberships"):
        region_sort(torch.rand(40))
    with pytest.raises(ValueError, match="labels: hard labels must be"):
        region_sort(torch.randint(0, 3, (2, 3, 4)))
    masks = torch.rand(2, 8, 8)
    masks[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="instance_masks: contains NaN"):
        soft_regions(masks, 4)


def test_soft_labels_tie_to_lowest_index():
    regions = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.2, 0.4, 0.4]])
    q = torch.randn(1, 1, 3, 16)
    allow = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    got = sma_attention(q, q, q, regions, regions, allow=allow, return_region_mass=True, backend="torch")
    ref = sma_attention_reference(q, q, q, regions, regions, allow=allow, return_region_mass=True)
    torch.testing.assert_close(got.region_mass, ref[2])
    assert math.isfinite(float(got.out.abs().sum()))


@pytest.mark.parametrize("order", ["sorted", "raster"])
def test_cpu_hard_labels_take_the_region_pair_path(monkeypatch, order):
    """The torch backend's CPU path for hard labels (torch_region_pairs.py) is the one these tests cover."""
    from mild_kernels.sma import torch_region_pairs

    calls = []
    original = torch_region_pairs.sma_forward_by_region_pairs
    monkeypatch.setattr(torch_region_pairs, "sma_forward_by_region_pairs",
                        lambda *args: calls.append(1) or original(*args))
    case = make_case(B=2, H=3, Nq=90, Nk=61, D=40, R=6, blocked=0.5)
    if order == "sorted":
        for name in ("q_regions", "k_regions"):
            case[name] = case[name].sort(-1).values
    case["allow"][1, 3, :] = False  # row 1: queries of region 3 see nothing
    check_against_reference(case, "torch", torch.float32)
    assert calls, "hard labels on the CPU did not take the region-pair path"


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)], ids=["no-heads", "no-batch"])
def test_empty_batch_or_heads_give_empty_results(backend, soft, shape, device):
    """A zero-size B or H is an empty result and an empty gradient (aten's fused CPU kernel dies on no heads)."""
    B, H = shape
    case = make_case(B=max(B, 1), H=max(H, 1), Nq=20, Nk=24, D=16, R=3, soft=soft, batched_labels=False,
                     bias_kind="RR", allow_kind="RR", device=device)
    q, k, v = (torch.randn(B, H, t.shape[2], 16, device=device, requires_grad=True)
               for t in (case["q"], case["k"], case["v"]))
    bias = case["bias"].requires_grad_()
    got = sma_attention(q, k, v, case["q_regions"], case["k_regions"], bias, case["allow"], backend=backend,
                        return_lse=True, return_region_mass=True)
    assert got.out.shape == q.shape and got.lse.shape == (B, H, 20) and got.region_mass.shape == (B, H, 20, 3)
    (got.out.sum() + got.region_mass.sum()).backward()
    assert q.grad.shape == q.shape and (bias.grad == 0).all()


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("magnitude", [1e3, 1e20, 1e31, 1e38])
def test_huge_finite_bias_never_unblocks_a_pair(backend, soft, magnitude, device):
    """Blocked pairs stay blocked and rows stay normalised whatever the bias. With hard labels the
    result is the float64 reference's both where the bias is modest and where it swamps the
    scores (|W| >= 1e20); soft memberships blend huge entries, which no fp32 evaluation of
    Mq W Mk^T can follow to the scores' precision, so there the properties are the check."""
    case = make_case(B=1, H=2, Nq=45, Nk=70, D=16, R=3, soft=soft, bias_kind="HRR", allow_kind="RR", blocked=0.0,
                     batched_labels=False, device=device)
    case["allow"][0, 1] = case["allow"][1, 0] = False
    bias = torch.tensor([[-1.0, 1.0, -0.5], [1.0, 0.25, -1.0], [-1.0, 1.0, -0.75]], device=device)
    case["bias"] = magnitude * torch.stack([bias, -bias.T])
    got = sma_attention(**case, return_lse=True, return_region_mass=True, backend=backend)
    if not soft:  # a hard key's mass is its region's: none may reach the blocked one
        labels = case["q_regions"]
        blocked_region = torch.where(labels == 0, 1, torch.where(labels == 1, 0, -1))
        for row in torch.nonzero(blocked_region >= 0)[:, 0].tolist():
            assert (got.region_mass[0, :, row, blocked_region[row]] == 0).all(), f"query {row} sees a blocked region"
    assert not got.out.isnan().any() and not got.lse.isnan().any()
    torch.testing.assert_close(got.region_mass.sum(-1), torch.ones(1, 2, 45, device=device))
    if not soft or magnitude <= 1e3:
        check_against_reference(case, backend, torch.float32, factor=4.0 if magnitude == 1e3 else 1.0)


def test_float64_memberships_work_on_every_backend(backend, device):
    """float64 soft memberships are memberships: the Triton kernels read them as float32."""
    case = make_case(B=2, H=2, Nq=37, Nk=45, D=16, R=4, soft=True, device=device)
    expected = sma_attention(**case, return_lse=True, return_region_mass=True, backend=backend)
    case64 = dict(case, q_regions=case["q_regions"].double(), k_regions=case["k_regions"].double())
    case64["q"].requires_grad_()
    got = sma_attention(**case64, return_lse=True, return_region_mass=True, backend=backend)
    for name in SMAOutput._fields:
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    got.out.sum().backward()
    assert case64["q"].grad.isfinite().all()
