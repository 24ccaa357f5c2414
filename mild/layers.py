"""From person masks to MILD's denoising layers (docs/semantics.md, multi-layer denoising).

- Layer 0, the background pathway: it inpaints the dilated union of the erased people,
  and its domain is {0}.
- Layer i, one per kept person i that overlaps or touches an erased person: it inpaints
  the part of the erased union next to person i (within ``near`` pixels of it), and its
  domain is {i}. It completes what the erased people hid of person i.

Each layer carries the region masks SMA sees in that pathway, its allow table, its
adapter id (0 background LoRA, 1 foreground LoRA), its compositing alpha and depth.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

BACKGROUND_ADAPTER, FOREGROUND_ADAPTER = 0, 1


@dataclasses.dataclass
class Layer:
    person: int  # 0 for the background pathway, else the kept person i (1-based)
    inpaint: torch.Tensor  # (H, W) {0, 1}: where this pathway generates
    region_masks: torch.Tensor  # (P, H, W): person masks as this pathway's SMA sees them
    allow: torch.Tensor  # (R, R) bool
    alpha: torch.Tensor  # (H, W) in [0, 1]: coverage when composited over the layers behind it
    depth: float  # compositing order, back (small) to front (large)

    @property
    def domain(self) -> list[int]:
        return [self.person]

    @property
    def adapter_id(self) -> int:
        return BACKGROUND_ADAPTER if self.person == 0 else FOREGROUND_ADAPTER


@dataclasses.dataclass
class LayerPlan:
    layers: list[Layer]  # back to front
    erased_union: torch.Tensor  # (H, W) {0, 1}
    paste_region: torch.Tensor  # (H, W) in [0, 1], exactly 0 outside the dilated erased union


def default_dilation(height: int, width: int) -> int:
    """The pixels added around the erased union when the caller gives none: ~3% of the short side."""
    return max(2, min(height, width) // 32)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0]


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A soft ramp inside ``mask``: a box blur of it, kept at exactly 0 outside it."""
    if radius <= 0:
        return mask.float()
    size = 2 * radius + 1
    blurred = F.avg_pool2d(mask[None, None].float(), size, stride=1, padding=radius, count_include_pad=False)[0, 0]
    return blurred * (mask > 0)


def plan_layers(instance_masks: torch.Tensor, erase: list[int] | None = None, occlusion_order=None, *,
                dilation: int = 8, near: int | None = None, feather_radius: int | None = None) -> LayerPlan:
    """Build the layers for one image.

    Args:
        instance_masks: (P, H, W) person masks in [0, 1] (binary or soft; > 0.5 counts as inside).
        erase: person ids to erase, counted from 1 in mask order; None erases everyone.
        occlusion_order: per person, a depth (larger is nearer the camera) ordering the
            foreground layers; None keeps mask order.
        dilation: pixels added around the erased union (the background pathway's region).
        near: how far from person i the erased union counts as "next to" it (default H // 8).
        feather_radius: width of the paste ramp, inside the dilated union (default dilation // 2).
    """
    P, H, W = instance_masks.shape
    if P == 0:
        raise ValueError("instance_masks: at least one person mask is needed")
    persons = instance_masks.float() > 0.5
    if not persons.flatten(1).any(1).all():
        empty = [i + 1 for i in range(P) if not persons[i].any()]
        raise ValueError(f"instance_masks: person(s) {empty} have empty masks")
    erase = list(range(1, P + 1)) if erase is None else sorted(set(int(i) for i in erase))
    if not erase or min(erase) < 1 or max(erase) > P:
        raise ValueError(f"erase: ids must lie in [1, {P}] (persons counted from 1), got {erase}")
    near = max(1, H // 8) if near is None else near
    feather_radius = dilation // 2 if feather_radius is None else feather_radius
    depths = (list(range(P)) if occlusion_order is None else [float(d) for d in occlusion_order])
    if len(depths) != P:
        raise ValueError(f"occlusion_order: needs one depth per person ({P}), got {len(depths)}")

    erased = torch.zeros(H, W, dtype=torch.bool, device=instance_masks.device)
    for i in erase:
        erased |= persons[i - 1]
    region = dilate(erased, dilation) > 0
    kept = [i for i in range(1, P + 1) if i not in erase]
    R = P + 1

    background_allow = torch.ones(R, R, dtype=torch.bool)
    background_allow[0, 1:] = False  # the background pathway never copies people into the hole
    kept_masks = persons.float().clone()
    for i in erase:
        kept_masks[i - 1] = 0  # erased people are background to be painted over
    layers = [Layer(0, region.float(), kept_masks, background_allow, torch.ones(H, W, device=region.device), -1.0)]

    touching_union = dilate(erased, 1) > 0
    for i in sorted(kept, key=lambda i: depths[i - 1]):
        if not (touching_union & persons[i - 1]).any():
            continue
        inpaint = region & (dilate(persons[i - 1], near) > 0) & ~persons[i - 1]
        if not inpaint.any():
            continue
        masks = kept_masks.clone()
        masks[i - 1] = torch.maximum(masks[i - 1], inpaint.float())  # the hidden part joins person i
        allow = torch.ones(R, R, dtype=torch.bool)
        allow[i, 1:] = False
        allow[i, i] = True  # person i completes itself from its own visible part and the scene
        layers.append(Layer(i, inpaint.float(), masks, allow, feather(inpaint, feather_radius), depths[i - 1]))
    return LayerPlan(layers, erased.float(), feather(region, feather_radius))
