"""Human Morphology Guidance (docs/semantics.md): pose, parsing and occlusion as UNet residuals.

Per person the guidance image stacks
- 17 COCO keypoint heatmaps (Gaussians scaled by the keypoint's confidence),
- 19 limb maps (the COCO skeleton's segments, weighted by the smaller end confidence),
- a one-hot parsing map (``parsing_classes`` channels),
- the occlusion-order map (1 channel),
at image resolution. diffusers' T2IAdapter (the "full_adapter" design) turns it into
one residual per UNet down block, passed as ``down_intrablock_additional_residuals``.
The adapter is optional: a pipeline without HMG inputs never calls it.
"""

from __future__ import annotations

import torch
from diffusers import T2IAdapter

NUM_KEYPOINTS = 17
# COCO-17 skeleton, 0-based keypoint indices.
COCO_LIMBS = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
              (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
DEFAULT_PARSING_CLASSES = 20


def guidance_channels(parsing_classes: int = DEFAULT_PARSING_CLASSES) -> int:
    return NUM_KEYPOINTS + len(COCO_LIMBS) + parsing_classes + 1


def render_keypoints(keypoints: torch.Tensor, size, sigma: float) -> torch.Tensor:
    """(17, H, W) heatmaps of (17, 3) keypoints (x, y in pixels, confidence)."""
    H, W = size
    ys = torch.arange(H, dtype=torch.float32, device=keypoints.device)[:, None]
    xs = torch.arange(W, dtype=torch.float32, device=keypoints.device)[None, :]
    x, y, conf = (keypoints[:, i, None, None].float() for i in range(3))
    return conf * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))


def render_limbs(keypoints: torch.Tensor, size, width: float) -> torch.Tensor:
    """(19, H, W) maps: 1 within ``width`` pixels of each limb segment, times its confidence."""
    H, W = size
    ys = torch.arange(H, dtype=torch.float32, device=keypoints.device)[:, None]
    xs = torch.arange(W, dtype=torch.float32, device=keypoints.device)[None, :]
    ends = torch.tensor(COCO_LIMBS, device=keypoints.device)
    start, end = keypoints.float()[ends[:, 0]], keypoints.float()[ends[:, 1]]  # (19, 3) each
    xa, ya, xb, yb = (c[:, None, None] for c in (start[:, 0], start[:, 1], end[:, 0], end[:, 1]))
    dx, dy = xb - xa, yb - ya
    length2 = (dx * dx + dy * dy).clamp(min=1e-6)
    t = (((xs - xa) * dx + (ys - ya) * dy) / length2).clamp(0, 1)
    dist2 = (xs - xa - t * dx) ** 2 + (ys - ya - t * dy) ** 2
    return torch.minimum(start[:, 2], end[:, 2])[:, None, None] * (dist2 <= width ** 2).float()


def guidance_image(size, keypoints=None, parsing=None, occlusion=None, parsing_classes=DEFAULT_PARSING_CLASSES,
                   sigma=None) -> torch.Tensor:
    """(C, H, W) guidance for one person; absent inputs give zero channels."""
    H, W = size
    sigma = sigma or max(1.0, min(H, W) / 64)
    device = next((t.device for t in (keypoints, parsing, occlusion) if isinstance(t, torch.Tensor)), None)
    parts = []
    if keypoints is not None:
        keypoints = torch.as_tensor(keypoints, dtype=torch.float32, device=device)
        if keypoints.shape != (NUM_KEYPOINTS, 3):
            raise ValueError(f"keypoints: need ({NUM_KEYPOINTS}, 3) COCO keypoints (x, y, confidence) per person, "
                             f"got {tuple(keypoints.shape)}")
        parts += [render_keypoints(keypoints, size, sigma), render_limbs(keypoints, size, sigma)]
    else:
        parts.append(torch.zeros(NUM_KEYPOINTS + len(COCO_LIMBS), H, W, device=device))
    if parsing is not None:
        parsing = torch.as_tensor(parsing, device=device).long()
        if parsing.shape != (H, W) or parsing.min() < 0 or parsing.max() >= parsing_classes:
            raise ValueError(f"parsing: need an (H, W) = {(H, W)} map of class ids in [0, {parsing_classes})")
        parts.append(torch.nn.functional.one_hot(parsing, parsing_classes).permute(2, 0, 1).float())
    else:
        parts.append(torch.zeros(parsing_classes, H, W, device=device))
    if occlusion is not None:
        occlusion = torch.as_tensor(occlusion, dtype=torch.float32, device=device)
        if occlusion.shape != (H, W):
            raise ValueError(f"occlusion_order: need an (H, W) = {(H, W)} map")
        parts.append(occlusion[None] / occlusion.abs().max().clamp(min=1e-6))
    else:
        parts.append(torch.zeros(1, H, W, device=device))
    return torch.cat(parts)


class HumanMorphologyGuidance(torch.nn.Module):
    """A T2I-Adapter over HMG guidance images, with per-row on/off weights."""

    def __init__(self, unet_block_channels, parsing_classes: int = DEFAULT_PARSING_CLASSES, num_res_blocks: int = 1,
                 downscale_factor: int = 8):
        super().__init__()
        self.parsing_classes = parsing_classes
        self.adapter = T2IAdapter(in_channels=guidance_channels(parsing_classes), channels=list(unet_block_channels),
                                  num_res_blocks=num_res_blocks, downscale_factor=downscale_factor,
                                  adapter_type="full_adapter")

    @classmethod
    def for_unet(cls, unet, vae_scale_factor: int = 8, **kwargs):
        return cls(unet.config.block_out_channels, downscale_factor=vae_scale_factor, **kwargs)

    def load(self, path) -> "HumanMorphologyGuidance":
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))
        return self

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    def forward(self, guidance: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
        """Residuals for each down block, scaled per row (0 turns a row's guidance off)."""
        features = self.adapter(guidance)
        return [f * weights.to(f.dtype)[:, None, None, None] for f in features]
