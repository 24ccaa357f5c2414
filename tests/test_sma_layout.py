"""Prepared layouts (prepare_regions): tile classes, reuse without host syncs, and the launches a call makes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close, count_host_reads
from mild_kernels import prepare_regions, sma_attention, sma_attention_reference, soft_regions
from mild_kernels._runtime import record_launches
from mild_kernels.sma.layout import REGION_BITS, TILE_M, TILE_N
from test_sma_attention import float64


class AtenOps(TorchDispatchMode):
    """The aten ops a call runs outside the custom ops (which it sees as single ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def sorted_regions(sizes, soft=False, fractional=0):
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    if not soft:
        return labels
    regions = torch.nn.functional.one_hot(labels, len(sizes)).float()
    if fractional:  # tokens at a boundary with split memberships, as soft_regions gives
        cut = sizes[0]
        regions[cut - fractional: cut] = torch.tensor([0.6, 0.4] + [0.0] * (len(sizes) - 2))
    return regions


def test_tile_classes_of_region_sorted_tokens():
    sizes = (100, 300, 64, 200)  # boundaries at 100, 400 and 464: key tiles 1, 6 and 7 hold two regions
    labels = sorted_regions(sizes)
    allow = torch.ones(4, 4, dtype=torch.bool)
    allow[0, 2] = False
    layout = prepare_regions(labels, allow=allow)
    tiles, info = layout.tiles, layout.info
    assert info.has_mixed and info.any_blocked
    key_region = tiles.key_region[0].tolist()
    assert key_region == [0, -1, 1, 1, 1, 1, -1, -1, 3, 3, -1]  # the last key tile has a tail: mixed
    assert tiles.key_order[0, :4].tolist() == [1, 6, 7, 10]  # mixed key tiles first
    for q_tile in range(tiles.pure_run_count.shape[1]):
        runs = tiles.pure_runs[0, q_tile, : int(tiles.pure_run_count[0, q_tile])].tolist()
        decoded = [(head >> REGION_BITS, head & ((1 << REGION_BITS) - 1), length) for head, length in runs]
        assert decoded == [(0, 0, 1), (2, 1, 4), (8, 3, 2)]  # consecutive uniform tiles of one region
        assert tiles.mixed_index[0, q_tile, : int(tiles.mixed_count[0, q_tile])].tolist() == [1, 6, 7, 10]
    # Queries of region 0 may not see region 2, but every query tile holds other regions too.
    assert (tiles.kv_run_count[0] == 1).all() and (tiles.kv_runs[0, :, 0].tolist() == [[0, 6]] * 11)  # all 6 query tiles


def test_skipped_and_fractional_tiles():
    R = 3
    labels = torch.arange(R).repeat_interleave(TILE_M)
    allow = torch.eye(R, dtype=torch.bool)
    layout = prepare_regions(labels, allow=allow)
    pairs = int(layout.tiles.pure_run_count.sum()) + int(layout.tiles.mixed_count.sum())
    assert not layout.info.has_mixed and pairs == R  # each query tile: one run of its own region's key tiles
    soft = sorted_regions((2 * TILE_N, 2 * TILE_N), soft=True, fractional=3)
    layout = prepare_regions(soft)
    assert layout.tiles.key_region[0].tolist() == [0, -1, 1, 1]  # fractional memberships make a tile mixed


@pytest.mark.parametrize("soft", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["hard", "soft"])
def test_a_prepared_layout_gives_the_raw_call_result(soft, device):
    sizes = (150, 90, 201)
    regions = sorted_regions(sizes, soft=soft, fractional=5).to(device)
    q, k, v = (torch.randn(2, 2, sum(sizes), 40, device=device) for _ in range(3))
    bias = 2 * torch.randn(2, 3, 3, device=device)
    allow = torch.ones(3, 3, dtype=torch.bool, device=device)
    allow[1, 2] = False
    layout = prepare_regions(regions, allow=allow)
    for backend in ("torch", "triton"):
        raw = sma_attention(q, k, v, regions, regions, bias, allow, return_lse=True, return_region_mass=True,
                            backend=backend)
        prepared = sma_attention(q, k, v, bias=bias, layout=layout, return_lse=True, return_region_mass=True,
                                 backend=backend)
        for name in raw._fields:
            assert torch.equal(getattr(raw, name), getattr(prepared, name)), (backend, name)


def test_sorting_through_the_layout_round_trips(device):
    labels = torch.randint(0, 4, (2, 300), device=device)
    q, k, v = (torch.randn(2, 2, 300, 32, device=device) for _ in range(3))
    bias = torch.randn(2, 4, 4, device=device)
    allow = torch.rand(2, 4, 4, device=device) > 0.3
    expected = sma_attention_reference(**float64(dict(q=q, k=k, v=v, q_regions=labels, k_regions=labels, bias=bias,
                                                      allow=allow)))
    layout = prepare_regions(labels, allow=allow, sort=True)
    assert (layout.q_regions.labels.diff(dim=-1) >= 0).all()
    out = sma_attention(layout.sort(q), layout.sort(k, "k"), layout.sort(v, "k"), bias=bias, layout=layout,
                        backend="triton")
    assert_close("out", layout.unsort(out), expected, torch.float32)


def _prepared_call(soft, mass, backward):
    """A headline-like call on a prepared layout: region-sorted soft or hard regions with boundaries."""
    sizes = (300, 450, 274)
    regions = sorted_regions(sizes, soft=soft, fractional=4 if soft else 0)
    allow = torch.ones(3, 3, dtype=torch.bool)
    allow[0, 2] = False
    layout = prepare_regions(regions, allow=allow)
    q, k, v = (torch.randn(1, 2, sum(sizes), 64).requires_grad_(backward) for _ in range(3))
    bias = torch.randn(2, 3, 3).requires_grad_(backward)
    return layout, (q, k, v), bias


@pytest.mark.parametrize("soft,mass", [(False, False), (True, True)], ids=["hard", "soft-mass"])
def test_a_prepared_call_reads_no_tensor_value_and_launches_only_its_kernels(soft, mass):
    layout, (q, k, v), bias = _prepared_call(soft, mass, backward=True)
    assert layout.info.has_mixed
    with count_host_reads() as reads, AtenOps() as aten, record_launches() as launches:
        result = sma_attention(q, k, v, bias=bias, layout=layout, return_lse=True, return_region_mass=mass,
                               backend="triton")
    assert reads == [], f"host reads during a prepared call: {reads}"
    # Outside the custom op only views and allocations; inside it, exactly the two forward launches.
    assert "mild_kernels.sma_forward" in aten.ops
    assert set(aten.ops) <= {"mild_kernels.sma_forward", "aten.view", "aten._unsafe_view", "aten.expand",
                             "aten.detach", "aten.alias"}, aten.ops
    assert [launch.kernel.__name__ for launch in launches] == ["_sma_fwd_mixed_kernel", "_sma_fwd_pure_kernel"]

    loss = result.out.sum() + result.lse.sum() + (result.region_mass.sum() if mass else 0)
    with count_host_reads() as reads, record_launches() as launches:
        loss.backward()
    assert reads == [], f"host reads during the backward pass: {reads}"
    assert [launch.kernel.__name__ for launch in launches] == [
        "_sma_bwd_preprocess", "_sma_bwd_dkdv_kernel", "_sma_bwd_dq_mixed_kernel", "_sma_bwd_dq_pure_kernel",
        "_sma_bwd_dbias_kernel"]


def test_each_launch_takes_exactly_its_kernels_arguments():
    """One argument pool feeds an op's kernels: each launch gets the parameters its kernel declares,
    in that kernel's names, and a missing one is an error that names it (not a silent default)."""
    from mild_kernels.sma.triton_common import kernel_args
    from mild_kernels.sma.triton_forward import _sma_fwd_mixed_kernel, _sma_fwd_pure_kernel

    layout, (q, k, v), bias = _prepared_call(soft=True, mass=False, backward=False)
    with record_launches() as launches:
        sma_attention(q, k, v, bias=bias, layout=layout, backend="triton")
    for launch, kernel in zip(launches, (_sma_fwd_mixed_kernel, _sma_fwd_pure_kernel)):
        assert launch.kernel is kernel and list(launch.kwargs) == kernel.arg_names
    pool = {name: 0 for name in _sma_fwd_pure_kernel.arg_names if name != "Runs"}
    with pytest.raises(TypeError, match="Runs"):
        kernel_args(_sma_fwd_pure_kernel, pool)
    assert kernel_args(_sma_fwd_pure_kernel, pool, {"Runs": 1, "Unused": 2})["Runs"] == 1


def test_a_raw_call_prepares_once_and_reads_two_flags():
    """Raw regions still work: one prepare per call, whose only host read is the tile flags."""
    layout, (q, k, v), bias = _prepared_call(soft=False, mass=False, backward=False)
    regions, allow = layout.q_regions.labels, layout.allow
    with count_host_reads() as reads, record_launches() as launches:
        sma_attention(q, k, v, regions, regions, bias, allow, backend="triton")
    assert len(launches) == 2
    # value checks of q, k, v (one read), the regions and the bias (a few each), and the two tile flags
    assert reads.count("tolist") == 1 and len(reads) <= 8, reads


def test_layout_errors():
    labels = torch.randint(0, 3, (40,))
    layout = prepare_regions(labels, num_regions=3)
    q = torch.randn(1, 2, 41, 16)
    with pytest.raises(ValueError, match="^layout: prepared for 40 query"):
        sma_attention(q, q, q, layout=layout)
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="^layout: carries the regions"):
        sma_attention(q, q, q, labels, labels, layout=layout)
    with pytest.raises(ValueError, match="^bias: shape"):
        sma_attention(q, q, q, bias=torch.randn(4, 4), layout=layout)
    with pytest.raises(ValueError, match="^q_regions: labels must lie in"):
        prepare_regions(labels, num_regions=2)
    with pytest.raises(ValueError, match="^allow: shape"):
        prepare_regions(labels, allow=torch.ones(2, 2, dtype=torch.bool), num_regions=3)
    with pytest.raises(ValueError, match="^layout: expected an SMALayout"):
        sma_attention(q, q, q, layout=labels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_layout_with_a_per_batch_allow_table_is_refused_for_another_batch(backend, batch):
    """The allow table's batch counts, not only the labels' (a batch-2 table once ran batch 3:
    SIGSEGV on Triton, row 2 on allow[1] on torch)."""
    layout = prepare_regions(torch.randint(0, 3, (100,)), allow=torch.rand(2, 3, 3) > 0.3)
    assert layout.batch == 2
    q = torch.randn(batch, 2, 100, 16)
    with pytest.raises(ValueError, match="^layout: prepared for batch 2"):
        sma_attention(q, q, q, layout=layout, backend=backend)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_a_layout_keeps_its_own_copy_of_what_it_was_prepared_from(soft):
    """Editing the caller's labels, memberships or allow table after prepare_regions changes
    neither backend's answer (torch once read the caller's allow, Triton a snapshot)."""
    regions = torch.softmax(4 * torch.randn(150, 3), -1) if soft else torch.randint(0, 3, (150,), dtype=torch.int32)
    allow = torch.rand(3, 3) > 0.4
    allow.diagonal().fill_(True)
    layout = prepare_regions(regions, allow=allow)
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    before = {b: sma_attention(q, k, v, layout=layout, backend=b) for b in ("torch", "triton")}
    allow.fill_(False)
    regions.copy_(regions.flip(0))
    for backend, out in before.items():
        assert torch.equal(sma_attention(q, k, v, layout=layout, backend=backend), out), backend
    assert_close("triton vs torch", before["triton"], before["torch"].double(), torch.float32)


def test_an_edited_layout_is_a_clear_error_never_a_crash():
    """A layout whose parts disagree (edited with _replace, or built by hand) is refused from
    shapes alone, before any kernel runs."""
    layout = prepare_regions(torch.randint(0, 3, (2, 200)), allow=torch.rand(2, 3, 3) > 0.3)
    other = prepare_regions(torch.randint(0, 4, (2, 150)))
    q = torch.randn(2, 2, 200, 16)
    edits = {
        "allow": layout.allow[:1].expand(5, 3, 3),
        "allow_bits": other.allow_bits,
        "tiles": other.tiles,
        "q_regions": other.q_regions,
        "num_regions": 4,
    }
    for field, value in edits.items():
        broken = layout._replace(**{field: value})
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match="^layout: "):
                sma_attention(q, q, q, layout=broken, backend=backend)


def test_soft_regions_of_overlapping_feathered_masks_always_prepare():
    """Three soft-edged overlapping person mattes: 1 - sum once rounded to -2e-8 and
    prepare_regions refused the background membership (172 of 200 random draws)."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(200):
        hard = (torch.rand(3, 40, 40, generator=generator) > 0.4).float()
        feathered = torch.nn.functional.avg_pool2d(hard[None], 7, 1, 3)[0]
        masks = feathered * torch.rand(3, 1, 1, generator=generator).add(0.5).clamp(max=1)
        regions = soft_regions(masks, (16, 16))
        assert regions.min() >= 0 and regions.max() <= 1
        assert torch.allclose(regions.sum(-1), torch.ones(256), atol=1e-6)
        prepare_regions(regions)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sorting_only_the_queries(backend):
    """sort="q" (cross-attention): queries in region order, keys left as they are (no gather)."""
    q_regions = torch.softmax(3 * torch.randn(2, 150, 3), -1)
    k_regions = torch.randint(0, 3, (2, 19))
    allow = torch.rand(2, 3, 3) > 0.3
    allow[:, :, 0] = True
    layout = prepare_regions(q_regions, k_regions, allow, sort="q")
    assert layout.k_perm is None and layout.q_perm is not None
    q, k, v = torch.randn(2, 2, 150, 32), torch.randn(2, 2, 19, 32), torch.randn(2, 2, 19, 32)
    out = layout.unsort(sma_attention(layout.sort(q), k, v, layout=layout, backend=backend))
    expected = sma_attention_reference(q.double(), k.double(), v.double(), q_regions.double(), k_regions,
                                       allow=allow)
    assert_close("out", out, expected, torch.float32)
