"""A person layer's alpha: the person's full silhouette, predicted (docs/semantics.md, Layers).

A person pathway decodes to an image of the person whole over the scene; what of it is the
person is its alpha. ``LayerAlpha`` predicts it from what inference has: the decoded person
layer, the decoded background layer beside it (where the two differ, the person is), the
person's visible mask and the layer's inpaint region. The amodal silhouette is never an input.

The alpha is 1 on the visible mask, 0 outside the visible mask and the inpaint region, and
predicted inside the region: a person layer never covers what it was not asked to complete.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INPUT_CHANNELS = 3 + 3 + 1 + 1  # person layer, background layer, visible mask, inpaint region


class LayerAlpha(torch.nn.Module):
    """A small dilated convolutional network (receptive field ~60 px) over the layer images."""

    def __init__(self, width: int = 24):
        super().__init__()
        layers, channels = [], INPUT_CHANNELS
        for dilation in (1, 2, 4, 8, 16):
            layers += [torch.nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), torch.nn.SiLU()]
            channels = width
        layers.append(torch.nn.Conv2d(width, 1, 3, padding=1))
        self.net = torch.nn.Sequential(*layers)

    def logits(self, person: torch.Tensor, background: torch.Tensor, visible: torch.Tensor,
               region: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) silhouette logits; images (N, 3, H, W) in [0, 1], masks (N, 1, H, W)."""
        inputs = torch.cat([2 * person - 1, 2 * background - 1, visible, region], 1)
        return self.net(inputs.to(self.net[0].weight.dtype)).float()

    def forward(self, person: torch.Tensor, background: torch.Tensor, visible: torch.Tensor,
                region: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) alpha in [0, 1]: the visible mask, plus the predicted silhouette inside the region."""
        return combine(visible.float(), region.float(), torch.sigmoid(self.logits(person, background, visible, region)))

    def load(self, path) -> "LayerAlpha":
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))
        return self

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))


def combine(visible: torch.Tensor, region: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The layer's alpha from its parts: visible where the person is seen, the prediction
    inside the inpaint region, 0 elsewhere."""
    return torch.maximum(visible, region * (1 - visible) * predicted)


def alpha_loss(logits: torch.Tensor, amodal: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the silhouette logits against the amodal silhouette, over each
    row's inpaint region (where the alpha is predicted), averaged per row then over rows."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, amodal.float(), reduction="none")
    return ((per_pixel * region).sum((1, 2, 3)) / region.sum((1, 2, 3)).clamp(min=1)).mean()


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

