"""Token regions: hard labels, soft memberships, and region-sorted token order.

A token's region is either a hard label (an integer in [0, R)) or a soft
membership (a length-R vector in [0, 1] that sums to 1). A soft token's hard
label is its argmax, ties going to the lowest index. See docs/semantics.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._checks import check_tensor, require

MAX_REGIONS = 64
MEMBERSHIP_SUM_TOLERANCE = 1e-3


class Regions(NamedTuple):
    """Regions of one token sequence, batch dim kept (1 when shared by all rows)."""

    labels: torch.Tensor  # (B or 1, N) int32: the hard label of every token
    memberships: torch.Tensor | None  # (B or 1, N, R) float32 for soft regions, else None

    @property
    def is_soft(self) -> bool:
        return self.memberships is not None


class RegionSort(NamedTuple):
    """A stable token permutation that groups tokens by region, and its inverse.

    ``x.index_select(-2, perm)`` (per batch row) orders tokens by hard label;
    indexing the result with ``inverse`` restores the original order.
    """

    perm: torch.Tensor
    inverse: torch.Tensor


def is_soft(regions: torch.Tensor) -> bool:
    return regions.is_floating_point()


def hard_labels(regions: torch.Tensor) -> torch.Tensor:
    """Hard labels of hard or soft regions (argmax; torch.argmax picks the first maximum)."""
    return regions.argmax(dim=-1) if is_soft(regions) else regions


def memberships(regions: torch.Tensor, num_regions: int, dtype: torch.dtype) -> torch.Tensor:
    """Membership vectors of hard or soft regions: one-hot rows for hard labels."""
    if is_soft(regions):
        return regions.to(dtype)
    return F.one_hot(regions.long(), num_regions).to(dtype)


def num_regions_of(q_regions: torch.Tensor, k_regions: torch.Tensor, bias, allow) -> int:
    """R, read from the first argument that states it; hard labels alone need a scan."""
    for table in (bias, allow):
        if isinstance(table, torch.Tensor) and table.dim() >= 2:
            return int(table.shape[-1])
    for regions in (q_regions, k_regions):
        if isinstance(regions, torch.Tensor) and is_soft(regions) and regions.dim() >= 2:
            return int(regions.shape[-1])
    labels = [r for r in (q_regions, k_regions) if isinstance(r, torch.Tensor) and r.numel() > 0]
    return 1 + max(int(r.max()) for r in labels) if labels else 1


def normalize_regions(name: str, regions, batch: int, tokens: int, num_regions: int) -> Regions:
    """Check one side's regions and bring them to the kernels' layout."""
    check_tensor(name, regions)
    soft = is_soft(regions)
    if soft:
        require(regions.dim() in (2, 3), f"{name}: soft memberships must be (N, R) or (B, N, R), got shape {tuple(regions.shape)}")
        require(regions.shape[-1] == num_regions, f"{name}: has {regions.shape[-1]} regions but the bias/allow tables have {num_regions}")
    else:
        require(regions.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8),
                f"{name}: hard labels must be an integer tensor, got {regions.dtype}")
        require(regions.dim() in (1, 2), f"{name}: hard labels must be (N,) or (B, N), got shape {tuple(regions.shape)}")
    spatial = regions.dim() - (1 if soft else 0)
    batched = regions.unsqueeze(0) if spatial == 1 else regions
    require(batched.shape[0] in (1, batch), f"{name}: batch dim {batched.shape[0]} does not match B={batch}")
    require(batched.shape[1] == tokens, f"{name}: has {batched.shape[1]} tokens but the attention has {tokens}")
    # Copies, never views of the caller's tensor: a layout must not change when the caller edits it.
    if soft:
        kept = batched.to(torch.promote_types(batched.dtype, torch.float32), memory_format=torch.contiguous_format,
                          copy=True)
        return Regions(hard_labels(kept).to(torch.int32).contiguous(), kept)
    return Regions(batched.to(torch.int32, memory_format=torch.contiguous_format, copy=True), None)


def check_region_values(name: str, regions: Regions, num_regions: int) -> None:
    """The data-dependent checks: labels in range, memberships in [0, 1] summing to 1."""
    if regions.is_soft:
        values = regions.memberships
        require(bool(((values >= 0) & (values <= 1)).all()), f"{name}: memberships must lie in [0, 1]")
        require(bool(((values.sum(-1) - 1).abs() <= MEMBERSHIP_SUM_TOLERANCE).all()),
                f"{name}: memberships must sum to 1 over regions (within {MEMBERSHIP_SUM_TOLERANCE})")
    elif regions.labels.numel():
        low, high = int(regions.labels.min()), int(regions.labels.max())
        require(low >= 0 and high < num_regions, f"{name}: labels must lie in [0, {num_regions}), got [{low}, {high}]")


def soft_regions(instance_masks: torch.Tensor, size) -> torch.Tensor:
    """Soft region memberships of every token at one attention resolution.

    Args:
        instance_masks: (P, H, W) or (B, P, H, W) person masks, binary or soft, in [0, 1].
        size: the token grid (h, w), or an int for a square grid.

    Returns:
        (h*w, P+1) or (B, h*w, P+1) float32 memberships in raster order; region 0
        is the background. Per pixel the persons' values are normalised so that
        they sum to at most 1 and the background takes the rest; each token
        takes the area average of its pixels (``F.interpolate(mode="area")``).
    """
    check_tensor("instance_masks", instance_masks, ndims=(3, 4))
    require(instance_masks.is_floating_point() or instance_masks.dtype == torch.bool,
            "instance_masks: must be a float or bool tensor")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    require(h > 0 and w > 0, f"size: must be positive, got {size}")
    require(instance_masks.shape[-2] > 0 and instance_masks.shape[-1] > 0,
            f"instance_masks: needs pixels, got shape {tuple(instance_masks.shape)}")
    if not torch.compiler.is_compiling():  # traced, NaN memberships still fail prepare_regions' check (in its op)
        require(not bool(instance_masks.isnan().any()), "instance_masks: contains NaN; masks must lie in [0, 1]")
    unbatched = instance_masks.dim() == 3
    persons = (instance_masks.unsqueeze(0) if unbatched else instance_masks).float().clamp(0, 1)
    total = persons.sum(1, keepdim=True)
    persons = persons / total.clamp(min=1)
    # 1 - sum rounds below 0 where feathered masks overlap (-2e-8): clamp, then renormalise per token.
    pixels = torch.cat([(1 - persons.sum(1, keepdim=True)).clamp(min=0), persons], dim=1)
    tokens = F.interpolate(pixels, size=(h, w), mode="area")
    tokens = tokens / tokens.sum(1, keepdim=True)
    out = tokens.flatten(2).transpose(1, 2).contiguous()
    return out[0] if unbatched else out


def region_sort(labels: torch.Tensor) -> RegionSort:
    """The stable permutation that sorts tokens by hard label, and its inverse.

    ``labels`` may be hard labels (N,) / (B, N) or soft memberships (N, R) / (B, N, R).
    """
    check_tensor("labels", labels)
    if labels.is_floating_point():
        require(labels.dim() in (2, 3), f"labels: float tensors are soft memberships (N, R) or (B, N, R); got shape "
                                        f"{tuple(labels.shape)} (hard labels are an integer (N,) or (B, N) tensor)")
    else:
        require(labels.dim() in (1, 2), f"labels: hard labels must be (N,) or (B, N), got shape {tuple(labels.shape)}")
    hard = hard_labels(labels)
    perm = torch.sort(hard, dim=-1, stable=True).indices
    inverse = torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return RegionSort(perm, inverse)
