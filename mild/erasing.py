"""What both erase pipelines share (MILDPipeline on UNets, MILDTransformerPipeline on
diffusion transformers): a call's inputs checked, its layers as model rows, each layer's
alpha, and the composite back into the photo."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from mild_kernels import composite_layers

from .alpha import LayerAlpha
from .layers import LayerPlan, default_dilation, dilate, plan_layers
from .processors import RegionContext

NUM_ADAPTERS = 2  # 0: background LoRA, 1: foreground LoRA
DEFAULT_PROMPTS = {"background": "empty background scene, nothing in front", "person": "a person, complete body"}


@dataclasses.dataclass
class MILDOutput:
    image: object  # PIL.Image when the input was one, else a (3, H, W) float tensor in [0, 1]
    layers: torch.Tensor  # (L, 3, H, W) decoded layers in [0, 1], back to front
    alphas: torch.Tensor  # (L, 1, H, W) each layer's alpha as composited (the background's is 1)
    cag: dict  # {layer: {"HxW": CAG}} for the conditional rows, per attention resolution
    plan: LayerPlan


def to_image_tensor(image) -> tuple[torch.Tensor, bool]:
    """(3, H, W) float32 in [0, 1], and whether the input was a PIL image."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255, True
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image: expected an (H, W, 3) array, got shape {image.shape}")
        if not np.isfinite(image).all():
            raise ValueError("image: contains NaN or inf; pixels must lie in [0, 1]")
        return torch.from_numpy(image.astype(np.float32) / (255 if image.dtype == np.uint8 else 1)).permute(2, 0, 1), False
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        image = image.float()
        if not bool(torch.isfinite(image).all()):
            raise ValueError("image: contains NaN or inf; pixels must lie in [0, 1]")
        return image, False
    raise ValueError(f"image: expected a PIL image, an (H, W, 3) array or a (3, H, W) tensor, got {type(image).__name__}")


def check_call_numbers(steps, guidance_scale, eta, alpha, beta, dilation) -> None:
    """The pipeline call's numeric arguments, before any work (each a ValueError naming it)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"num_inference_steps: must be an integer >= 1, got {steps!r}")
    for name, value, low in (("guidance_scale", guidance_scale, None), ("eta", eta, 0.0), ("alpha", alpha, None),
                             ("beta", beta, None)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and (low is None or value >= low)):
            raise ValueError(f"{name}: must be a finite number{'' if low is None else f' >= {low:g}'}, got {value!r}")
    if dilation is not None and (isinstance(dilation, bool) or not isinstance(dilation, numbers.Integral)
                                 or dilation < 0):
        raise ValueError(f"dilation: must be an integer >= 0 (pixels) or None, got {dilation!r}")


def to_masks(instance_masks, size) -> torch.Tensor:
    """(P, H, W) float32 person masks from a tensor, an array or a list of images/arrays."""
    if isinstance(instance_masks, (list, tuple)):
        planes = []
        for mask in instance_masks:
            array = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask, dtype=np.float32)
            planes.append(torch.from_numpy(array / (255 if array.max() > 1 else 1)))
        masks = torch.stack(planes) if planes else torch.zeros(0, *size)
    else:
        masks = torch.as_tensor(instance_masks, dtype=torch.float32)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != tuple(size):
        raise ValueError(f"instance_masks: need (P, H, W) masks of the image's size {tuple(size)}, "
                         f"got {tuple(masks.shape)}")
    return masks


CONDITION_FILLS = ("grey", "smooth", "copy", "layered")  # LayerInputs.masked_pixels


@dataclasses.dataclass
class LayerInputs:
    """One image's layers as UNet rows (one row per layer; CFG doubles them)."""
    plan: LayerPlan
    pad: tuple[int, int]  # (bottom, right) replicate padding to the VAE's multiple
    latent_size: tuple[int, int]
    padded: torch.Tensor  # (3, H', W') the padded photo
    inpaint: torch.Tensor  # (L, 1, H', W') where each layer generates
    inpaint_latent: torch.Tensor  # (L, 1, h, w) the same at latent resolution (nearest)
    region_masks: torch.Tensor  # (L, P, H', W') person masks as each layer's SMA sees them
    allow: torch.Tensor  # (L, R, R)
    adapter_ids: list  # per layer: 0 background LoRA, 1 foreground LoRA
    kinds: list  # per layer: "background" or "person" (its prompt)
    guide: torch.Tensor | None  # (L, C, H', W') HMG images, or None without HMG inputs
    guide_weights: torch.Tensor | None  # (L,) HMG on/off per layer

    def visible(self) -> torch.Tensor:
        """(L, 1, H', W') each layer's person as the photo shows it (0 for the background layer)."""
        kept = self.plan.layers[0].region_masks  # the kept people's visible masks (erased ones zeroed)
        planes = [torch.zeros_like(kept[0]) if layer.person == 0 else kept[layer.person - 1]
                  for layer in self.plan.layers]
        return F.pad(torch.stack(planes)[:, None], (0, self.pad[1], 0, self.pad[0]))

    def background_only(self) -> "LayerInputs":
        """The background layer alone: one pass over the dilated erased union (single-layer inpainting)."""
        plan = dataclasses.replace(self.plan, layers=self.plan.layers[:1])
        return dataclasses.replace(
            self, plan=plan, inpaint=self.inpaint[:1], inpaint_latent=self.inpaint_latent[:1],
            region_masks=self.region_masks[:1], allow=self.allow[:1], adapter_ids=self.adapter_ids[:1],
            kinds=self.kinds[:1], guide=None if self.guide is None else self.guide[:1],
            guide_weights=None if self.guide_weights is None else self.guide_weights[:1])

    def masked_pixels(self, fill: str = "grey") -> torch.Tensor:
        """(L, 3, H', W') the photo with each layer's region blanked: the UNet's condition.

        ``fill``: "grey", mid-grey (0 once the VAE maps [0, 1] to [-1, 1]), as SD inpainting
        models were trained; "smooth", the known pixels pulled in smoothly (:func:`smooth_fill`);
        "copy", the known pixels copied in at the translations that best continue them
        (:func:`copy_fill`); "layered", each row from its own layer: the background row's region
        copied from the known pixels no kept person covers, person i's row's pulled in smoothly
        from person i's visible pixels, so that every pathway starts from its own layer."""
        rows = len(self.inpaint)
        photo = self.padded[None].expand(rows, -1, -1, -1)
        if fill == "grey":
            return photo * (1 - self.inpaint) + 0.5 * self.inpaint
        if fill == "smooth":
            return smooth_fill(photo, self.inpaint)
        if fill == "copy":
            return copy_fill(photo, self.inpaint)
        if fill != "layered":
            raise ValueError(f"fill: expected one of {CONDITION_FILLS}, got {fill!r}")
        kept = self.plan.layers[0].region_masks  # the kept people's visible masks
        scene = F.pad(1 - kept.amax(0), (0, self.pad[1], 0, self.pad[0])) > 0.5  # nobody's, and not the padding
        people = [index for index, layer in enumerate(self.plan.layers) if layer.person > 0]
        background = [index for index, layer in enumerate(self.plan.layers) if layer.person == 0]
        filled = photo.clone()
        filled[people] = torch.where(self.inpaint[people] > 0,
                                     smooth_fill(photo[people], (self.visible()[people] <= 0.5).to(photo.dtype)), photo[people])
        filled[background] = copy_fill(photo[background], self.inpaint[background], scene[None, None])
        return filled

    def context(self, halves: int, alpha, beta, backend: str, device) -> RegionContext:
        """The region context of ``halves`` copies of the rows (2 for classifier-free guidance)."""
        L = len(self.adapter_ids)
        return RegionContext(instance_masks=self.region_masks.to(device), latent_size=self.latent_size,
                             row_image=torch.arange(L).repeat(halves), alpha=alpha, beta=beta,
                             allow=self.allow.repeat(halves, 1, 1).to(device),
                             domains=[layer.domain for layer in self.plan.layers] * halves, backend=backend)


def smooth_fill(pixels: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``pixels`` (N, C, H, W) with the ``hole`` (N, 1, H, W, {0, 1}) filled from the known pixels
    by push-pull: a pyramid of known-pixel averages is built down to one cell, then each level's
    holes take the bilinearly upsampled level below. A smooth membrane across the hole, the
    colours of its border carried inwards (a fully unknown image comes back mid-grey)."""
    known = 1 - hole.to(pixels.dtype)
    levels = [(pixels * known, known)]
    while max(levels[-1][1].shape[-2:]) > 1:
        values, weights = levels[-1]
        levels.append((F.avg_pool2d(values, 2, ceil_mode=True), F.avg_pool2d(weights, 2, ceil_mode=True)))
    values, weights = levels[-1]
    fill = torch.where(weights > 0, values / weights.clamp(min=1e-12), torch.full_like(values, 0.5))
    for values, weights in reversed(levels[:-1]):  # values are weight-premultiplied averages
        fill = values + (1 - weights) * F.interpolate(fill, size=values.shape[-2:], mode="bilinear", align_corners=False)
    return fill


def _correlate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(2H - 1, 2W - 1): the sum over pixels p (and over the leading dimensions of the (..., H, W)
    maps) of a(p) b(p + d), for every translation d, index (H - 1, W - 1) holding d = 0. By FFT
    over a zero-padded grid, so nothing wraps around; the leading dimensions are summed before
    the one inverse transform."""
    H, W = a.shape[-2:]
    product = torch.fft.rfft2(a, s=(2 * H, 2 * W)).conj() * torch.fft.rfft2(b, s=(2 * H, 2 * W))
    product = product.reshape(-1, *product.shape[-2:]).sum(0)
    return torch.fft.irfft2(product, s=(2 * H, 2 * W)).roll((H - 1, W - 1), (0, 1))[:2 * H - 1, :2 * W - 1]


def copy_fill(pixels: torch.Tensor, hole: torch.Tensor, source: torch.Tensor | None = None, *,
              translations: int = 6) -> torch.Tensor:
    """``pixels`` (N, C, H, W) with the ``hole`` (N, 1, H, W, {0, 1}) filled by copying ``source``
    pixels (N, 1, H, W, {0, 1}; default: every pixel outside the hole) from elsewhere in the image.

    Every translation d is scored at once (FFT cross-correlations) by how well the source pixels
    at p + d predict the source pixels p of a ring around the hole (mean squared difference);
    translations shorter than ~3% of the short side, longer than 45% of it, or that bring too
    little source into the ring or the hole are not used. Each hole pixel copies the best of the
    ``translations`` best scored whose source pixel is known; what none covers is filled by
    :func:`smooth_fill` from the source. A texture that repeats (stripes, checks, bricks, a
    horizon) comes back continued where a smooth fill blurs it to its mean."""
    N, C, H, W = pixels.shape
    hole = hole.to(torch.bool).expand(N, 1, H, W)
    source = ~hole if source is None else source.to(torch.bool) & ~hole
    ring_width, shortest, longest = max(2, min(H, W) // 10), max(2, min(H, W) // 32), 0.45 * min(H, W)
    dy, dx = torch.meshgrid(torch.arange(1 - H, H), torch.arange(1 - W, W), indexing="ij")
    length = (dy.double().square() + dx.double().square()).sqrt()
    filled = smooth_fill(pixels, (~source).to(pixels.dtype))
    out = torch.where(hole, filled, pixels)
    for n in range(N):
        gap, known = hole[n, 0], source[n, 0]
        if not gap.any() or not known.any():
            continue
        image, own = pixels[n].double().cpu(), known.double().cpu()
        ring = (dilate(gap.float(), ring_width) > 0).double().cpu() * own
        pairs = _correlate(ring, own)  # ring pixels whose translate is known
        # sum over p of ring(p) own(p + d) |I(p) - I(p + d)|^2, expanded into three correlations
        squares = image.square().sum(0)
        error = _correlate(torch.cat([(ring * squares)[None], ring * image, ring[None]]),
                           torch.cat([own[None], -2 * own * image, (own * squares)[None]]))
        covered = _correlate(gap.double().cpu(), own) / gap.sum()
        usable = (pairs > 0.5 * ring.sum()) & (covered > 0.3) & (length >= shortest) & (length <= longest)
        score = torch.where(usable, error / pairs.clamp(min=1) + 1e-9 * length, torch.tensor(math.inf, dtype=torch.float64))
        todo = gap.clone()
        for index in torch.argsort(score.flatten(), stable=True)[:translations].tolist():
            if not math.isfinite(score.flatten()[index]):
                break
            ys, xs = torch.nonzero(todo, as_tuple=True)
            ty, tx = ys + int(dy.flatten()[index]), xs + int(dx.flatten()[index])
            inside = (ty >= 0) & (ty < H) & (tx >= 0) & (tx < W)
            ys, xs, ty, tx = ys[inside], xs[inside], ty[inside], tx[inside]
            take = known[ty, tx]
            out[n, :, ys[take], xs[take]] = pixels[n, :, ty[take], tx[take]]
            todo[ys[take], xs[take]] = False
    return out


def layer_inputs(pixels: torch.Tensor, masks: torch.Tensor, factor: int, erase=None, occlusion_order=None,
                 dilation: int | None = None, guidance=None) -> LayerInputs:
    """Plan the layers of one image and build their per-row model inputs, the photo padded to
    a multiple of ``factor`` pixels (the VAE's, times a transformer's patch size).
    ``guidance(plan, (H, W))``: the HMG images and weights, or None."""
    H, W = pixels.shape[1:]
    plan = plan_layers(masks, erase, occlusion_order, dilation=default_dilation(H, W) if dilation is None else dilation)
    pad = ((-H) % factor, (-W) % factor)
    latent_size = ((H + pad[0]) // factor, (W + pad[1]) // factor)

    def pad_mask(m):
        return F.pad(m, (0, pad[1], 0, pad[0]))

    inpaint = torch.stack([pad_mask(layer.inpaint) for layer in plan.layers])[:, None]  # (L, 1, H, W)
    hmg = None if guidance is None else guidance(plan, (H, W))
    return LayerInputs(
        plan=plan, pad=pad, latent_size=latent_size,
        padded=F.pad(pixels[None], (0, pad[1], 0, pad[0]), mode="replicate")[0], inpaint=inpaint,
        inpaint_latent=F.interpolate(inpaint, size=latent_size, mode="nearest"),
        region_masks=torch.stack([pad_mask(layer.region_masks) for layer in plan.layers]),
        allow=torch.stack([layer.allow for layer in plan.layers]),
        adapter_ids=[layer.adapter_id for layer in plan.layers],
        kinds=["background" if layer.person == 0 else "person" for layer in plan.layers],
        guide=None if hmg is None else F.pad(hmg[0], (0, pad[1], 0, pad[0])),
        guide_weights=None if hmg is None else hmg[1])


def composite_output(rows: LayerInputs, decoded: torch.Tensor, pixels: torch.Tensor, alphas: torch.Tensor,
                     backend: str):
    """The decoded layers (L, 3, H', W') composited back to front by their alphas (L, 1, H, W) and
    pasted into the photo through the feathered erased union. Outside its inpaint region a layer
    is the photo: those pixels are known, and the person layers' visible parts are composited
    with alpha 1. Returns (result (3, H, W), layers (L, 3, H, W)), on the CPU."""
    H, W = pixels.shape[1:]
    decoded = torch.where(rows.inpaint.to(decoded.device) > 0, decoded, rows.padded[None].to(decoded.device))
    layers = decoded[..., :H, :W]
    with torch.profiler.record_function("mild::composite"):
        result = composite_layers(layers[:, None], alphas[:, None], pixels[None].to(layers.device),
                                  rows.plan.paste_region[None, None].float().to(layers.device), backend=backend)[0]
    return result.cpu(), layers.cpu()


def conditional_cag(context: RegionContext, layers: int) -> dict:
    """{layer: {"HxW": CAG}} of the conditional rows (the last ``layers`` rows of the context)."""
    cag = {}
    rows = len(context.row_image)
    for (row, (h, w)), value in context.cag().items():
        if row >= rows - layers:
            cag.setdefault(row - (rows - layers), {})[f"{h}x{w}"] = value
    return cag


def decode_layers(head: LayerAlpha | None, rows: LayerInputs, decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas (L, 1, H', W'), layers (L, 3, H', W')): each layer's alpha, 1 for the background;
    for a person layer, its silhouette predicted by the ``head`` from the decoded layers (or,
    without a head, the plan's fixed feathered band over its inpaint region). The layers are the
    decoded ones, the person layers' colour corrected by a ``colour`` head."""
    device = decoded.device
    fixed = torch.stack([F.pad(layer.alpha, (0, rows.pad[1], 0, rows.pad[0])) for layer in rows.plan.layers])
    alphas = fixed[:, None].float().to(device)
    if head is None or len(rows.plan.layers) == 1:
        return alphas, decoded
    people = slice(1, None)  # layer 0 is the background; the others are people
    on = next(head.parameters()).device
    predicted, persons = head.decode(decoded[people].to(on), decoded[:1].expand_as(decoded[people]).to(on),
                                     rows.visible()[people].to(on), rows.inpaint[people].to(on))
    return torch.cat([alphas[:1], predicted.to(device)]), torch.cat([decoded[:1], persons.to(device, decoded.dtype)])


def to_output(result: torch.Tensor, as_pil: bool):
    """(3, H, W) in [0, 1] as a PIL image when the input was one."""
    if not as_pil:
        return result
    from PIL import Image

    return Image.fromarray((result.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def layer_targets(sample, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What each layer row reconstructs on its own (SPEC 6), padded as ``rows.padded``:

    - (L, 3, H', W') images: the background row's is the plate inside its inpaint region (the
      target elsewhere); person i's row's is person i's amodal RGBA over the target;
    - (L, 1, H', W') the rows' amodal silhouettes (the background's is 1), or None.

    A sample without plate or people falls back to the target for those rows.
    """
    target = sample.target.float()
    H, W = target.shape[1:]
    images, silhouettes = [], []
    for index, layer in enumerate(rows.plan.layers):
        if layer.person == 0:
            region = rows.inpaint[index, 0, :H, :W]
            plate = target if sample.plate is None else sample.plate.float()
            images.append(region * plate + (1 - region) * target)
            silhouettes.append(torch.ones(1, H, W))
        elif sample.people is None:
            images.append(target)
            silhouettes.append(torch.full((1, H, W), math.nan))
        else:
            person = sample.people[layer.person - 1].float()
            images.append(person[3:] * person[:3] + (1 - person[3:]) * target)
            silhouettes.append(person[3:])
    pad = (0, rows.pad[1], 0, rows.pad[0])
    amodal = None if sample.people is None else F.pad(torch.stack(silhouettes), pad)
    return F.pad(torch.stack(images), pad, mode="replicate"), amodal


def loss_weights(rows, amodal: torch.Tensor | None, size: tuple, outside_weight: float) -> torch.Tensor:
    """(L, 1, h, w) each row's loss weight at latent ``size`` (area-averaged from pixels): 1 where
    the row is answered, ``outside_weight`` outside its inpaint region (the known pixels). The
    background row is answered over its whole region; a person row, given the rows' amodal
    silhouettes (``layer_targets``), only where its person is: a layer's appearance is its
    person's, and its colour elsewhere is covered by alpha 0 (learning it there taught the layer
    a blend of the person and the background wherever the silhouette is uncertain)."""
    answered = rows.inpaint if amodal is None else rows.inpaint * amodal
    region = F.interpolate(rows.inpaint, size=size, mode="area")
    return F.interpolate(answered, size=size, mode="area") + outside_weight * (1 - region)
