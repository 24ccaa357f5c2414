"""A person layer's alpha: the person's full silhouette, predicted (docs/semantics.md, Layers).

A person pathway decodes to an image of the person whole over the scene; what of it is the
person is its alpha. ``LayerAlpha`` predicts it from what inference has: the decoded person
layer, the decoded background layer beside it (where the two differ, the person is), the
person's visible mask and the layer's inpaint region. The amodal silhouette is never an input.

The alpha is 1 on the visible mask, 0 outside the visible mask and the inpaint region, and
predicted inside the region: a person layer never covers what it was not asked to complete.

A head built with ``colour=True`` decodes the layer as LayerDiffuse's transparency decoder does:
its alpha and a correction of the layer's colour, added to the decoded person layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INPUT_CHANNELS = 3 + 3 + 1 + 1  # person layer, background layer, visible mask, inpaint region


class LayerAlpha(torch.nn.Module):
    """A small U-Net over the layer images: two full-resolution convolutions, then ``depth``
    stride-2 levels and their way back up with skips (220k parameters at the defaults; receptive
    field ~73 px). The silhouette's hidden part is a shape judgement, made better from features
    at four scales than from the one scale of the dilated stack it replaced (``kind="dilated"``,
    23k parameters, ~65 px). Measured through the pipeline, the two are level: fitted on the same
    2400 scenes, the composite over the hidden part of 40 outside occlusion scenes scores 16.31 dB
    against 16.30 (README, The tiny model); on cached layers the U-Net's fit scored up to 0.6 dB
    more. A file with the dilated head still loads as it (:meth:`from_state_dict`).

    ``colour`` (the U-Net's default) adds three output channels: a correction of the person
    layer's colour (:meth:`decode`). Fitted with ``fit_alpha_head``, it took the composite over
    those 40 scenes' hidden parts from 16.31 dB to 17.10; a file without the channels loads
    as a head without them."""

    def __init__(self, width: int = 24, depth: int = 3, kind: str = "unet", colour: bool | None = None):
        super().__init__()
        if kind not in ("unet", "dilated"):
            raise ValueError(f"kind: {kind!r} is not 'unet' or 'dilated'")
        if colour and kind != "unet":
            raise ValueError("colour: only the U-Net head corrects the layer's colour")
        self.kind, self.colour = kind, kind == "unet" if colour is None else colour
        conv = lambda c_in, c_out, **kw: [torch.nn.Conv2d(c_in, c_out, 3, padding=kw.get("dilation", 1), **kw),
                                          torch.nn.SiLU()]
        if kind == "dilated":
            layers, channels = [], INPUT_CHANNELS
            for dilation in (1, 2, 4, 8, 16):
                layers += conv(channels, width, dilation=dilation)
                channels = width
            self.net = torch.nn.Sequential(*layers, torch.nn.Conv2d(width, 1, 3, padding=1))
            return
        self.stem = torch.nn.Sequential(*conv(INPUT_CHANNELS, width), *conv(width, width, dilation=2))
        widths = [width] + [2 * width] * depth
        self.down = torch.nn.ModuleList(torch.nn.Sequential(*conv(widths[i], widths[i + 1], stride=2),
                                                            *conv(widths[i + 1], widths[i + 1]))
                                        for i in range(depth))
        self.up = torch.nn.ModuleList(torch.nn.Sequential(*conv(widths[i + 1] + widths[i], widths[i]))
                                      for i in reversed(range(depth)))
        # channel 0: the silhouette's logits; with colour, 1-3: the correction added to the person layer,
        # from zero, so that a head fitted for its alpha alone leaves the layer as decoded
        self.out = torch.nn.Conv2d(width, 4 if self.colour else 1, 3, padding=1)
        if self.colour:
            with torch.no_grad():
                self.out.weight[1:].zero_()
                self.out.bias[1:].zero_()

    @classmethod
    def from_state_dict(cls, state: dict) -> "LayerAlpha":
        """The head whose shape ``state`` has, random weights: a dilated one for files written
        before the U-Net (their tensors are ``net.*``), else a U-Net of the stored width and depth,
        with the colour correction if the file has its channels."""
        if any(k.startswith("net.") for k in state):
            return cls(width=state["net.0.weight"].shape[0], kind="dilated")
        return cls(width=state["stem.0.weight"].shape[0], depth=len({k.split(".")[1] for k in state if k.startswith("down.")}),
                   colour=state["out.weight"].shape[0] == 4)

    @classmethod
    def from_file(cls, path) -> "LayerAlpha":
        """The head stored in a safetensors file (``mild train``'s alpha.safetensors)."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        head = cls.from_state_dict(state)
        head.load_state_dict(state)
        return head

    def logits(self, person: torch.Tensor, background: torch.Tensor, visible: torch.Tensor,
               region: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) silhouette logits; images (N, 3, H, W) in [0, 1], masks (N, 1, H, W)."""
        return self.outputs(person, background, visible, region)[:, :1]

    def outputs(self, person: torch.Tensor, background: torch.Tensor, visible: torch.Tensor,
                region: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float32: the silhouette logits, then, with ``colour``, the colour correction."""
        dtype = next(self.parameters()).dtype
        inputs = torch.cat([2 * person - 1, 2 * background - 1, visible, region], 1).to(dtype)
        if self.kind == "dilated":
            return self.net(inputs).float()
        skips = [self.stem(inputs)]
        for level in self.down:
            skips.append(level(skips[-1]))
        features = skips.pop()
        for level in self.up:  # any size: each level upsamples to its skip's own size
            skip = skips.pop()
            features = level(torch.cat([F.interpolate(features, size=skip.shape[-2:], mode="bilinear",
                                                      align_corners=False), skip], 1))
        return self.out(features).float()

    def forward(self, person: torch.Tensor, background: torch.Tensor, visible: torch.Tensor,
                region: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) alpha in [0, 1]: the visible mask, plus the predicted silhouette inside the region."""
        return combine(visible.float(), region.float(), torch.sigmoid(self.logits(person, background, visible, region)))

    def decode(self, person: torch.Tensor, background: torch.Tensor, visible: torch.Tensor,
               region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (N, 1, H, W), person layer (N, 3, H, W)) in one pass: the alpha of ``forward``,
        and the person layer plus the colour correction (clamped to [0, 1]), or as given without
        ``colour``."""
        out = self.outputs(person, background, visible, region)
        return combine(visible.float(), region.float(), torch.sigmoid(out[:, :1])), self.corrected(person, out)

    def corrected(self, person: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The person layer plus the colour correction in ``outputs`` (of :meth:`outputs`), clamped
        to [0, 1]; the layer as given without ``colour``."""
        return (person.float() + outputs[:, 1:]).clamp(0, 1) if self.colour else person

    def load(self, path) -> "LayerAlpha":
        """Load a file into this head in place (resuming training keeps its optimizer's tensors);
        a file with another shape of head raises (see :meth:`from_file` to build the matching one)."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        try:
            self.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{path}: holds another shape of alpha head than this one ({error.args[0].splitlines()[0]})") from None
        return self

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))


def combine(visible: torch.Tensor, region: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The layer's alpha from its parts: visible where the person is seen, the prediction
    inside the inpaint region, 0 elsewhere."""
    return torch.maximum(visible, region * (1 - visible) * predicted)


def _row_mean(per_pixel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ``weight``-weighted mean of (N, 1, H, W) ``per_pixel`` over each row, then the mean over
    rows (a row with no weight counts 0): the reduction of every loss here."""
    return ((per_pixel * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp(min=1)).mean()


def alpha_loss(logits: torch.Tensor, amodal: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the silhouette logits against the amodal silhouette, over each
    row's inpaint region (where the alpha is predicted), averaged per row then over rows."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, amodal.float(), reduction="none")
    return _row_mean(per_pixel, region)


def colour_loss(person: torch.Tensor, target: torch.Tensor, amodal: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the corrected person layers (N, 3, H, W) against their targets (the
    person over the scene, ``layer_targets``), over the person's own pixels inside each row's
    inpaint region (where the alpha shows the layer), averaged per row then over rows."""
    weight = region * amodal.float()
    per_pixel = ((person - target) ** 2).mean(1, keepdim=True)
    return _row_mean(per_pixel, weight)


def composite_loss(alpha: torch.Tensor, person: torch.Tensor, background: torch.Tensor, target: torch.Tensor,
                   visible: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each person row composited over the background row by its alpha,
    ``alpha * person + (1 - alpha) * background``, against the target photo, over the row's
    inpaint region less the visible mask (the pixels the alpha decides), averaged per row then
    over rows: SPEC 6's composite-consistency term."""
    weight = region * (1 - visible)
    per_pixel = ((alpha * person + (1 - alpha) * background - target) ** 2).mean(1, keepdim=True)
    return _row_mean(per_pixel, weight)


def logits_of_prediction(head: "LayerAlpha | None", prediction: torch.Tensor, alpha_inputs) -> torch.Tensor | None:
    """The head's logits for every layer row of a denoiser's ``prediction``, or None without a
    head or inputs. ``alpha_inputs`` = (to_images, visible, region): ``to_images`` decodes the
    x0 estimate the prediction implies (read without gradient into the denoiser); row 0, the
    background, is every row's background (its own loss weight is 0)."""
    if alpha_inputs is None or head is None:
        return None
    to_images, visible, region = alpha_inputs
    with torch.no_grad():
        images = to_images(prediction.detach())
    return head.logits(images, images[:1].expand_as(images), visible, region)


def silhouette_term(logits: torch.Tensor | None, amodal: torch.Tensor | None, people: torch.Tensor,
                    region: torch.Tensor, weight: float) -> torch.Tensor | float:
    """``weight`` times the person rows' silhouette loss; 0 (kept in the graph, so that DDP sees
    the head used) when the sample has no person layers or no amodal silhouettes."""
    if logits is None:
        return 0.0
    if amodal is None or not people.any():
        return 0 * logits.sum()
    people = people.to(logits.device)
    return weight * alpha_loss(logits[people], amodal.to(logits.device)[people], region.to(logits.device)[people])

