"""Prepared regions: validate once, classify tiles once, reuse across layers and steps.

``prepare_regions`` is to ``sma_attention`` what FlexAttention's ``create_block_mask``
is to ``flex_attention``. It checks the labels or memberships and the allow table,
optionally sorts tokens by region, and builds the tile lists the Triton kernels walk.
A call with a prepared :class:`SMALayout` then reads no tensor value on the host (no
GPU sync) and launches only the kernels: a UNet step makes ~70 attention calls at
three or four resolutions, so the regions are prepared once per resolution.

Tiles (``TILE_M`` query tokens x ``TILE_N`` key tokens) are classified by the hard
labels present in each:

- skipped: no (label(q), label(k)) pair across the two tiles is allowed; never loaded;
- pure: the key tile is *uniform* (every key carries one region c, one-hot if soft,
  and the tile has no tail). The bias ``(Mq W)[q, c]`` is then constant along each
  query row: the kernels fold it into the exp2 shift, with no gather and no bias dot,
  and apply ``allow`` per row. When tokens are region-sorted almost every pair is pure;
- mixed: the rest (key tiles at region boundaries, fractional memberships, the key
  tail). These run the exact path: the bias as one small dot of split operands and the
  element-wise allow mask.

Every kernel's query block divides TILE_M and its key block divides TILE_N, so one set
of lists serves every config.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._checks import check_tensor, require
from .._runtime import next_power_of_2
from .regions import MAX_REGIONS, Regions, check_region_values, memberships, normalize_regions, region_sort
from .sparsity import compact, tile_presence

TILE_M = 128
TILE_N = 64
REGION_BITS = 6  # a pure-list entry is key_tile << REGION_BITS | region (R <= 64)


class TileLists(NamedTuple):
    """Device-side tile lists of one layout, in the order the custom ops take them.

    A run is a stretch of consecutive key tiles (or query tiles) that a kernel walks with
    plain pointer increments: with region-sorted tokens a query tile has one pure run per
    region, and a key tile one run of active query tiles.
    """

    pure_run_count: torch.Tensor  # (B|1, QT) int32
    pure_runs: torch.Tensor  # (B|1, QT, KT, 2): (first key tile << REGION_BITS | region, length)
    mixed_count: torch.Tensor  # (B|1, QT)
    mixed_index: torch.Tensor  # (B|1, QT, KT): key tiles, the first mixed_count valid
    kv_run_count: torch.Tensor  # (B|1, KT): runs of active query tiles per key tile
    kv_runs: torch.Tensor  # (B|1, KT, QT, 2): (first query tile, length)
    key_order: torch.Tensor  # (B|1, KT): mixed key tiles first (the slower programs start first), then uniform
    key_region: torch.Tensor  # (B|1, KT): region of a uniform key tile, -1 for a mixed one


class TileInfo(NamedTuple):
    """What the host must know about the lists to launch, read once at prepare time."""

    has_mixed: bool  # any mixed (query tile, key tile) pair
    any_blocked: bool  # allow blocks some pair


class SMALayout(NamedTuple):
    """Validated regions of one (query, key) token pair of sequences, with their tile lists.

    Build it with :func:`prepare_regions`; pass it as ``sma_attention(q, k, v, layout=...)``.
    When it was built with ``sort=True`` its regions are in region-sorted token order:
    ``layout.sort(x, "q")`` brings queries (and ``"k"`` keys and values) into that order
    and ``layout.unsort(out)`` brings the output back.
    """

    num_regions: int
    q_regions: Regions
    k_regions: Regions
    allow: torch.Tensor | None  # (B|1, R, R) bool
    allow_bits: torch.Tensor  # (B|1, R): bit c of row a set when allow[a, c]
    k_split: torch.Tensor | None  # soft keys: the bias dot's key operand, split into bf16 halves
    tiles: TileLists | None
    tile_flags: torch.Tensor | None  # int32 (has_mixed, any_blocked) on the device
    info: TileInfo | None  # the same, read on the host (None until read)
    q_perm: torch.Tensor | None  # (B|1, Nq) region-sort permutation, or None
    q_inverse: torch.Tensor | None
    k_perm: torch.Tensor | None
    k_inverse: torch.Tensor | None

    @property
    def batch(self) -> int:
        """The batch it was prepared for: 1 when every part is shared by all rows."""
        return max(int(t.shape[0]) for t in self._batched_parts())  # int(): static under torch.compile

    def _batched_parts(self) -> list[torch.Tensor]:
        parts = [self.q_regions.labels, self.k_regions.labels, self.allow_bits]
        parts += [t for t in (self.q_regions.memberships, self.k_regions.memberships, self.allow, self.k_split,
                              self.q_perm, self.q_inverse, self.k_perm, self.k_inverse) if t is not None]
        return parts + list(self.tiles or ())

    def check(self) -> None:
        """Raise a ValueError unless the parts agree with each other (shapes only: no host read).

        prepare_regions builds consistent layouts; this catches one edited or built by hand.
        """
        R, B, Nq, Nk = self.num_regions, self.batch, self.q_tokens, self.k_tokens
        require(1 <= R <= MAX_REGIONS, f"layout: num_regions={R} is outside [1, {MAX_REGIONS}]")
        for t in self._batched_parts():
            require(int(t.shape[0]) in (1, B), f"layout: a part has batch {t.shape[0]}, others {B}")
        expected = {"q_regions.memberships": (self.q_regions.memberships, (Nq, R)),
                    "k_regions.memberships": (self.k_regions.memberships, (Nk, R)),
                    "allow": (self.allow, (R, R)), "allow_bits": (self.allow_bits, (R,)),
                    "q_perm": (self.q_perm, (Nq,)), "q_inverse": (self.q_inverse, (Nq,)),
                    "k_perm": (self.k_perm, (Nk,)), "k_inverse": (self.k_inverse, (Nk,))}
        if self.tiles is not None:
            QT, KT = -(-Nq // TILE_M), -(-Nk // TILE_N)
            shapes = dict(pure_run_count=(QT,), pure_runs=(QT, KT, 2), mixed_count=(QT,), mixed_index=(QT, KT),
                          kv_run_count=(KT,), kv_runs=(KT, QT, 2), key_order=(KT,), key_region=(KT,))
            expected.update({f"tiles.{name}": (getattr(self.tiles, name), shape) for name, shape in shapes.items()})
            require(self.tile_flags is not None and self.tile_flags.shape == (2,),
                    "layout: tile lists without their (2,) tile flags")
        for name, (t, shape) in expected.items():
            if t is None:
                continue
            require(tuple(t.shape[1:]) == shape,
                    f"layout: {name} has shape {tuple(t.shape)}, expected (B|1, {', '.join(map(str, shape))}) for "
                    f"{Nq} query tokens, {Nk} key tokens and {R} regions")
        require(self.q_regions.is_soft == self.k_regions.is_soft, "layout: one side soft, the other hard")
        devices = {t.device for t in self._batched_parts()}
        require(len(devices) == 1, f"layout: parts on several devices {sorted(map(str, devices))}")

    @property
    def q_tokens(self) -> int:
        return self.q_regions.labels.shape[1]

    @property
    def k_tokens(self) -> int:
        return self.k_regions.labels.shape[1]

    def sort(self, x: torch.Tensor, side: str = "q") -> torch.Tensor:
        """x (B, H, N, D) with its tokens in the layout's order (unchanged when unsorted)."""
        perm = self.q_perm if side == "q" else self.k_perm
        return x if perm is None else _gather_tokens(x, perm)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Query-side x (B, H, Nq, ...) back in the caller's token order."""
        return x if self.q_inverse is None else _gather_tokens(x, self.q_inverse)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, ...) with the tokens of batch row b reordered by index[b] (or index[0])."""
    index = index.to(torch.int64).view(index.shape[0], 1, index.shape[1], *([1] * (x.dim() - 3)))
    return x.gather(2, index.expand(x.shape[0], *x.shape[1:]))


def allow_bitmask(allow: torch.Tensor | None, num_regions: int, device) -> torch.Tensor:
    """(B|1, R) integers whose bit c of row a is allow[a, c]; int32 when R <= 32."""
    if allow is None:
        allow = torch.ones(1, num_regions, num_regions, dtype=torch.bool, device=device)
    weights = torch.ones(num_regions, dtype=torch.int64, device=device) << torch.arange(num_regions, device=device)
    bits = (allow.long() * weights).sum(-1)  # distinct powers of two: the sum is the OR
    return (bits.to(torch.int32) if num_regions <= 32 else bits).contiguous()


def soft_operand_regions(num_regions: int) -> int:
    """Regions per term of the 16-bit soft bias dot: 4 of them make its width 16, tl.dot's least."""
    return max(4, next_power_of_2(num_regions))


def split_key_operand(k_memberships: torch.Tensor, num_regions: int) -> torch.Tensor:
    """The key side of the mixed tiles' bias dot for 16-bit kernels, split once here.

    A membership m = hi + lo with hi = bf16(m), lo = bf16(m - hi) (16 mantissa bits).
    Column 4 r + 2 j + i holds hi (j = 0) or lo (j = 1) of region r, for both values of
    i; the kernel's query operand puts hi (i = 0) or lo (i = 1) of (Mq W)[q, r] there,
    so one dot sums all four products (hi + lo)(hi + lo). Width 4 * next_pow2(R).
    """
    width = soft_operand_regions(num_regions)
    m = torch.nn.functional.pad(k_memberships.float(), (0, width - num_regions))
    hi = m.to(torch.bfloat16)
    lo = (m - hi.float()).to(torch.bfloat16)
    halves = torch.stack([hi, lo], -1)  # (..., r, j)
    return halves[..., None].expand(*halves.shape, 2).reshape(*m.shape[:-1], 4 * width).contiguous()


def build_tiles(q_regions: Regions, k_regions: Regions, allow: torch.Tensor | None, num_regions: int):
    """(TileLists, flags) for TILE_M x TILE_N tiles; flags is int32 (has_mixed, any_blocked)."""
    R = num_regions
    q_present = tile_presence(q_regions.labels, TILE_M, R)  # (B|1, QT, R)
    k_present = tile_presence(k_regions.labels, TILE_N, R)  # (B|1, KT, R)
    batch = max(q_present.shape[0], k_present.shape[0], 1 if allow is None else allow.shape[0])
    QT, KT = q_present.shape[1], k_present.shape[1]
    if allow is None:
        active = torch.ones(batch, QT, KT, dtype=torch.bool, device=q_present.device)
    else:
        active = ((q_present @ allow.float() @ k_present.transpose(-1, -2)) > 0).expand(batch, QT, KT)
    uniform = k_present.sum(-1) == 1  # one region in the tile
    if k_regions.is_soft:  # ... and every key one-hot on it
        one_hot = k_regions.memberships.amax(-1) == 1
        one_hot = torch.nn.functional.pad(one_hot, (0, KT * TILE_N - one_hot.shape[1]), value=False)
        uniform &= one_hot.view(one_hot.shape[0], KT, TILE_N).all(-1)
    if k_regions.labels.shape[1] % TILE_N:
        uniform[:, -1] = False  # the key tail runs the masked path
    key_region = torch.where(uniform, k_present.argmax(-1), -1).to(torch.int32).expand(batch, KT)
    uniform = uniform.expand(batch, KT)
    pure = active & uniform[:, None, :]
    mixed = active & ~uniform[:, None, :]
    # Pure runs: consecutive pure key tiles of one region.
    same_region = key_region[:, 1:] == key_region[:, :-1]
    joins_previous = torch.zeros_like(pure)
    joins_previous[..., 1:] = pure[..., :-1] & same_region[:, None, :]
    joins_next = torch.zeros_like(pure)
    joins_next[..., :-1] = pure[..., 1:] & same_region[:, None, :]
    pure_run_count, pure_runs = _runs(pure & ~joins_previous, pure & ~joins_next)
    heads = (pure_runs[..., 0] << REGION_BITS) | torch.gather(
        key_region, 1, pure_runs[..., 0].flatten(1).long()).view_as(pure_runs[..., 0])
    pure_runs = torch.stack([heads, pure_runs[..., 1]], -1).to(torch.int32).contiguous()
    mixed_count, mixed_index = compact(mixed)
    active_t = active.transpose(1, 2)  # (B, KT, QT)
    starts = active_t.clone()
    starts[..., 1:] &= ~active_t[..., :-1]
    ends = active_t.clone()
    ends[..., :-1] &= ~active_t[..., 1:]
    kv_run_count, kv_runs = _runs(starts, ends)
    _, key_order = compact(~uniform)
    tiles = TileLists(pure_run_count, pure_runs, mixed_count, mixed_index, kv_run_count, kv_runs, key_order,
                      key_region.contiguous())
    blocked = torch.zeros((), dtype=torch.bool, device=active.device) if allow is None else ~allow.all()
    return tiles, torch.stack([mixed.any(), blocked]).to(torch.int32)


def _runs(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, (first, length) pairs) of the runs that begin where ``starts`` and end where ``ends``."""
    count, first = compact(starts)
    _, last = compact(ends)
    return count, torch.stack([first, last - first + 1], -1).contiguous()


@torch.library.custom_op("mild_kernels::sma_prepare", mutates_args=())
def sma_prepare(q_labels: torch.Tensor, k_labels: torch.Tensor, q_memberships: Optional[torch.Tensor],
                k_memberships: Optional[torch.Tensor], allow: Optional[torch.Tensor], num_regions: int,
                tiles: bool) -> list[torch.Tensor]:
    """The value checks and the derived tensors of a layout: [k_split or empty, allow_bits, and with
    ``tiles`` the TileLists and the flags]. A custom op, so torch.compile traces callers whole."""
    R = num_regions
    qr, kr = Regions(q_labels, q_memberships), Regions(k_labels, k_memberships)
    check_region_values("q_regions", qr, R)
    check_region_values("k_regions", kr, R)
    derived = [split_key_operand(k_memberships, R) if kr.is_soft else q_labels.new_empty(0, dtype=torch.float32),
               allow_bitmask(allow, R, q_labels.device)]
    if tiles:
        lists, flags = build_tiles(qr, kr, allow, R)
        derived += [*lists, flags]
    return derived


@sma_prepare.register_fake
def _(q_labels, k_labels, q_memberships, k_memberships, allow, num_regions, tiles):
    R = num_regions
    (bq, nq), (bk, nk) = q_labels.shape, k_labels.shape
    ba = 1 if allow is None else allow.shape[0]
    if k_memberships is not None:
        k_split = k_labels.new_empty((bk, nk, 4 * soft_operand_regions(R)), dtype=torch.bfloat16)
    else:
        k_split = q_labels.new_empty(0, dtype=torch.float32)
    derived = [k_split, q_labels.new_empty((ba, R), dtype=torch.int32 if R <= 32 else torch.int64)]
    if tiles:
        batch, QT, KT = max(bq, bk, ba), -(-nq // TILE_M), -(-nk // TILE_N)
        shapes = [(batch, QT), (batch, QT, KT, 2), (batch, QT), (batch, QT, KT), (batch, KT), (batch, KT, QT, 2),
                  (batch, KT), (batch, KT), (2,)]
        derived += [q_labels.new_empty(shape, dtype=torch.int32) for shape in shapes]
    return derived


def prepare_regions(q_regions, k_regions=None, allow=None, *, num_regions: int | None = None, sort: bool | str = False,
                    batch: int | None = None, tiles: bool = True, read_info: bool = True) -> SMALayout:
    """Check regions once and build what sma_attention needs to run on them.

    Args:
        q_regions: query regions: hard labels (N,) / (B, N) of an integer dtype, or soft
            memberships (N, R) / (B, N, R) summing to 1 per token.
        k_regions: key regions in the same forms; None for the query regions (self-attention).
        allow: bool (R, R) or (B, R, R); allow[a, c] False blocks queries of region a from keys
            of region c. None allows every pair.
        num_regions: R; needed only when nothing else states it (hard labels, no allow table):
            then it defaults to 1 + the largest label.
        sort: reorder each side's tokens by hard label (stable), so that tiles are
            region-pure; use ``layout.sort`` / ``layout.unsort`` on q, k, v and the output.
            ``"q"`` sorts the queries only (cross-attention: a few text keys gain little
            from sorting, and unsorted they need no gather).
        batch: the attention's batch size when regions are shared (checks only).
        tiles: build the Triton kernels' tile lists (the torch backend does not read them).
        read_info: read the two tile flags on the host now (one sync), so that calls need none.

    Returns:
        An SMALayout. With read_info, every host read of a tensor value happens here.
    """
    check_tensor("q_regions", q_regions)
    if k_regions is None:
        k_regions = q_regions
    check_tensor("k_regions", k_regions)
    R = num_regions if num_regions is not None else _stated_regions(q_regions, k_regions, allow)
    require(1 <= R <= MAX_REGIONS, f"regions: R={R} regions, but at most {MAX_REGIONS} are supported")
    q_batch = _batch_of(q_regions)
    k_batch = _batch_of(k_regions)
    B = batch or max(q_batch, k_batch, 1 if allow is None or allow.dim() == 2 else allow.shape[0])
    qr = normalize_regions("q_regions", q_regions, B, tokens_of(q_regions), R)
    kr = normalize_regions("k_regions", k_regions, B, tokens_of(k_regions), R)
    if qr.is_soft != kr.is_soft:  # one soft side makes both soft: one-hot rows are exact
        qr, kr = (_as_soft(r, R) for r in (qr, kr))
    require(qr.labels.device == kr.labels.device,
            f"k_regions: is on {kr.labels.device} but q_regions is on {qr.labels.device}")
    allow3 = None
    if allow is not None:
        check_tensor("allow", allow, ndims=(2, 3), dtypes=(torch.bool,))
        require(tuple(allow.shape[-2:]) == (R, R) and (allow.dim() == 2 or allow.shape[0] == B),
                f"allow: shape {tuple(allow.shape)} must be (R, R) or (B, R, R) with R={R}, B={B}")
        require(allow.device == qr.labels.device, f"allow: is on {allow.device} but the regions are on "
                f"{qr.labels.device}")
        allow3 = allow.reshape((1,) * (3 - allow.dim()) + tuple(allow.shape)).clone(
            memory_format=torch.contiguous_format)  # the layout's own copy (see normalize_regions)
    require(sort in (False, True, "q"), f"sort: must be False, True or 'q', got {sort!r}")
    q_perm = q_inverse = k_perm = k_inverse = None
    if sort:
        q_perm, q_inverse = region_sort(qr.labels)
        qr = _permute_regions(qr, q_perm)
        if sort == "q":
            pass
        elif k_regions is q_regions:
            k_perm, k_inverse, kr = q_perm, q_inverse, _permute_regions(kr, q_perm)
        else:
            k_perm, k_inverse = region_sort(kr.labels)
            kr = _permute_regions(kr, k_perm)
    k_split, allow_bits, *lists = sma_prepare(qr.labels, kr.labels, qr.memberships, kr.memberships, allow3, R, tiles)
    tile_lists = TileLists(*lists[:-1]) if tiles else None
    flags = lists[-1] if tiles else None
    info = TileInfo(*(bool(v) for v in flags.tolist())) if tiles and read_info else None
    return SMALayout(R, qr, kr, allow3, allow_bits, k_split if kr.is_soft else None, tile_lists, flags, info,
                     q_perm, q_inverse, k_perm, k_inverse)


def _stated_regions(q_regions, k_regions, allow) -> int:
    if isinstance(allow, torch.Tensor) and allow.dim() >= 2:
        return int(allow.shape[-1])
    for regions in (q_regions, k_regions):
        if regions.is_floating_point() and regions.dim() >= 2:
            return int(regions.shape[-1])
    labels = [r for r in (q_regions, k_regions) if r.numel() > 0 and not r.is_floating_point()]
    return 1 + max(int(r.max()) for r in labels) if labels else 1


def _batch_of(regions: torch.Tensor) -> int:
    spatial = regions.dim() - (1 if regions.is_floating_point() else 0)
    return regions.shape[0] if spatial == 2 else 1


def tokens_of(regions: torch.Tensor) -> int:
    spatial = regions.dim() - (1 if regions.is_floating_point() else 0)
    return regions.shape[spatial - 1] if spatial >= 1 else 0


def _as_soft(regions: Regions, num_regions: int) -> Regions:
    if regions.is_soft:
        return regions
    return Regions(regions.labels, memberships(regions.labels, num_regions, torch.float32).contiguous())


def _permute_regions(regions: Regions, perm: torch.Tensor) -> Regions:
    labels = regions.labels.gather(1, perm.to(torch.int64)).contiguous()
    if not regions.is_soft:
        return Regions(labels, None)
    mem = regions.memberships
    return Regions(labels, mem.gather(1, perm.to(torch.int64)[..., None].expand(-1, -1, mem.shape[-1])).contiguous())
