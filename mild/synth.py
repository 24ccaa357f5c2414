"""Synthetic paired samples (``mild synth``): procedural scenes drawn offline from a seed, or
cut-out people composited onto background photos. Every sample carries its layer targets
(the clean plate and each person's amodal RGBA) and HMG inputs as a user has them (keypoints
with hidden joints at lower confidence, the parsing of the visible pixels). The format they
are written in is mild/data.py's.
"""

from __future__ import annotations

import argparse
import collections.abc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data import IMAGE_SUFFIXES, DataError, PairedSample, open_image, write_sample

# HMG inputs as a user has them: a pose estimator also places the joints another person hides,
# with lower confidence; a human parser labels only the pixels it sees.
HIDDEN_KEYPOINT_CONFIDENCE = 0.3

# Parsing class ids of the procedural figures (the LIP numbering, below DEFAULT_PARSING_CLASSES).
# The person's left is the image's right: the figures face the camera.
BACKGROUND, HAIR, UPPER_CLOTHES, FACE, LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG = 0, 2, 5, 13, 14, 15, 16, 17


# ------------------------------------------------------------------ scenes, shared by both generators


def _grid(size: int):
    """(ys, xs) pixel coordinates; pixel centres at integers, as mild.hmg renders keypoints."""
    ys, xs = np.mgrid[0:size, 0:size]
    return ys.astype(np.float32), xs.astype(np.float32)


def _people_count(rng, max_people: int) -> int:
    # Mostly two or more, so that people overlap and kept ones have hidden parts.
    if max_people < 2 or rng.random() < 0.15:
        return 1
    return int(rng.integers(2, max_people + 1))


def _place(rng, size: int, placed: list, height: float):
    """(centre x, foot y) of a new figure; near an earlier one with probability 0.6, so they overlap."""
    if placed and rng.random() < 0.6:
        ref_x, ref_foot, ref_height = placed[rng.integers(len(placed))]
        x = ref_x + rng.choice([-1, 1]) * rng.uniform(0.1, 0.35) * ref_height
        foot = ref_foot + rng.uniform(-0.1, 0.1) * size
    else:
        x = rng.uniform(0.1, 0.9) * size
        foot = rng.uniform(0.65, 1.05) * size
    return float(x), float(np.clip(foot, 0.95 * height, 1.1 * size))


def _visible_parts(silhouettes: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """Each silhouette minus the silhouettes of the people nearer the camera."""
    nearer = (depths[None, :] > depths[:, None]).astype(np.float32)  # [i, j]: j is in front of i
    hidden = np.einsum("ij,jhw->ihw", nearer, silhouettes.astype(np.float32)) > 0
    return silhouettes & ~hidden


def _keep_visible(silhouettes: np.ndarray, depths: np.ndarray) -> list[int]:
    """Indices of the people that stay visible (>= 1% of their silhouette). Dropping someone
    only uncovers the others, so repeating until nobody drops settles."""
    keep = list(range(len(depths)))
    while keep:
        visible = _visible_parts(silhouettes[keep], depths[keep]).sum((1, 2))
        whole = silhouettes[keep].sum((1, 2))
        tiny = (visible == 0) | (visible < 0.01 * whole)
        if not tiny.any():
            break
        keep = [k for k, drop in zip(keep, tiny) if not drop]
    return keep


def _choose_erase(rng, silhouettes: np.ndarray, depths: np.ndarray) -> list[int]:
    """A random non-empty set of 1-based ids; mostly one that hides part of a kept person."""
    P = len(depths)
    if P == 1:
        return [1]
    hides = [(e, k) for e in range(P) for k in range(P)
             if depths[e] > depths[k] and (silhouettes[e] & silhouettes[k]).any()]
    erase = {i for i in range(P) if rng.random() < 0.5}
    if hides and rng.random() < 0.7:
        front, behind = hides[rng.integers(len(hides))]
        erase = (erase | {front}) - {behind}
    if not erase:
        erase = {int(rng.integers(P))}
    return sorted(i + 1 for i in erase)


def _assemble(rng, name: str, background: np.ndarray, layers: list, depths: np.ndarray, choose=None):
    """The sample of people (rgb (3, H, W), alpha (H, W)) over ``background``, and the
    indices of the people kept; None when nobody stays visible, or when ``choose`` (an erase
    chooser like _choose_erase) finds no erase set it wants."""
    silhouettes = np.stack([alpha > 0.5 for _, alpha in layers])
    keep = _keep_visible(silhouettes, depths)
    if not keep:
        return None, keep
    layers, silhouettes, depths = [layers[k] for k in keep], silhouettes[keep], depths[keep]
    erase = (choose or _choose_erase)(rng, silhouettes, depths)
    if erase is None:
        return None, keep
    image, target = background.copy(), background.copy()
    for i in np.argsort(depths, kind="stable"):  # back to front
        rgb, alpha = layers[i]
        image = image * (1 - alpha) + rgb * alpha
        if i + 1 not in erase:  # the target shows the kept people whole: their hidden parts completed
            target = target * (1 - alpha) + rgb * alpha
    # Layer targets: the plate, and every kept person whole (straight alpha; no colour outside it)
    people = np.stack([np.concatenate([rgb * (alpha > 0), alpha[None]]) for rgb, alpha in layers])
    sample = PairedSample(name=name, image=torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)),
                          masks=torch.from_numpy(_visible_parts(silhouettes, depths).astype(np.float32)),
                          erase=erase, target=torch.from_numpy(np.clip(target, 0, 1).astype(np.float32)),
                          occlusion_order=[float(d) for d in depths],
                          plate=torch.from_numpy(np.clip(background, 0, 1).astype(np.float32)),
                          people=torch.from_numpy(np.clip(people, 0, 1).astype(np.float32)))
    return sample, keep


def _sample_seed(seed: int, index: int) -> int:
    """Sample ``index``'s own seed: samples do not depend on each other or on the run order."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ------------------------------------------------------------------ procedural scenes


def _colour(rng) -> np.ndarray:
    return rng.uniform(0.05, 0.95, 3).astype(np.float32)


def _blend(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)[None]
    return a[:, None, None] * (1 - t) + b[:, None, None] * t


def _stripes(rng, u, v):
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(3, 12)
    return 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (u * np.cos(angle) + v * np.sin(angle)) + rng.uniform(0, 6.3))


def _checkerboard(rng, u, v):
    cells = rng.integers(3, 11)
    return ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(np.float32)


def _bricks(rng, u, v):
    rows = rng.integers(6, 17)
    row = np.floor(v * rows)
    shifted = u * rows / 2 + 0.5 * (row % 2)  # every other row shifted by half a brick
    return ((v * rows % 1 < 0.15) | (shifted % 1 < 0.08)).astype(np.float32)  # 1 on the mortar


def _blobs(rng, u, v):
    total = np.zeros_like(u)
    for _ in range(rng.integers(2, 6)):
        cx, cy, sigma = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        total += np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sigma ** 2))
    return np.clip(total, 0, 1)


def _smooth_noise(rng, u, v):
    cells = int(rng.integers(4, 13))
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=u.shape, mode="bilinear", align_corners=False)[0, 0].numpy()


TEXTURES = (_stripes, _checkerboard, _bricks, _blobs, _smooth_noise)


def _background(rng, size: int) -> np.ndarray:
    """(3, H, W): a sky gradient over ground at a random (slightly tilted) horizon, maybe a
    wall standing on it, and a few textures; smooth enough for an 8x autoencoder."""
    ys, xs = _grid(size)
    u, v = xs / (size - 1), ys / (size - 1)
    horizon = rng.uniform(0.3, 0.75) + rng.uniform(-0.1, 0.1) * (u - 0.5)
    ground = v > horizon
    image = np.where(ground, _blend(_colour(rng), _colour(rng), (v - horizon) / (1 - horizon)),
                     _blend(_colour(rng), _colour(rng), v / horizon))
    regions = [ground, ~ground]
    if rng.random() < 0.4:
        left, width, top = rng.uniform(0, 0.7), rng.uniform(0.2, 0.6), rng.uniform(0.05, 0.25)
        wall = (u > left) & (u < left + width) & (v > top) & ~ground
        image = np.where(wall, _colour(rng)[:, None, None], image)
        regions.append(wall)
    for _ in range(rng.integers(0, 3)):
        region = regions[rng.integers(len(regions))]
        pattern = TEXTURES[rng.integers(len(TEXTURES))](rng, u, v)
        strength = rng.uniform(0.15, 0.5) * pattern
        image = np.where(region, image * (1 - strength) + _colour(rng)[:, None, None] * strength, image)
    image = image + rng.normal(0, rng.uniform(0, 0.02), image.shape)  # low-amplitude grain
    return np.clip(image, 0, 1).astype(np.float32)


def _near_segment(xs, ys, a, b, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of the segment a-b (a thick limb)."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2 <= radius ** 2


def _figure(rng, size: int, x: float, foot: float, height: float):
    """A person-like figure facing the camera: (rgb (3, H, W), silhouette (H, W) bool,
    parsing (H, W) int64, keypoints (17, 3) COCO-17 in pixels)."""
    ys, xs = _grid(size)
    h = height
    head_r = 0.085 * h
    head = (x, foot - h + head_r)
    shoulder_y, hip_y = foot - 0.79 * h, foot - 0.47 * h
    joints = {}
    for side, sign in (("left", 1), ("right", -1)):  # the person's left is the image's right
        shoulder = (x + sign * 0.12 * h, shoulder_y)
        raise_arm, bend = rng.uniform(-0.3, 1.4), rng.uniform(-0.8, 0.8)
        elbow = (shoulder[0] + sign * 0.17 * h * np.sin(raise_arm), shoulder[1] + 0.17 * h * np.cos(raise_arm))
        wrist = (elbow[0] + sign * 0.16 * h * np.sin(raise_arm + bend), elbow[1] + 0.16 * h * np.cos(raise_arm + bend))
        hip = (x + sign * 0.07 * h, hip_y)
        spread, knee_bend = rng.uniform(-0.05, 0.35), rng.uniform(-0.2, 0.2)
        knee = (hip[0] + sign * 0.24 * h * np.sin(spread), hip[1] + 0.24 * h * np.cos(spread))
        ankle = (knee[0] + sign * 0.23 * h * np.sin(spread + knee_bend), knee[1] + 0.23 * h * np.cos(spread + knee_bend))
        joints.update({f"{side}_shoulder": shoulder, f"{side}_elbow": elbow, f"{side}_wrist": wrist,
                       f"{side}_hip": hip, f"{side}_knee": knee, f"{side}_ankle": ankle})

    shirt, trousers, hair_colour = _colour(rng), _colour(rng), _colour(rng) * 0.6
    skin = np.array(rng.choice([[0.95, 0.8, 0.7], [0.8, 0.6, 0.45], [0.55, 0.38, 0.25], [0.35, 0.24, 0.16]]),
                    dtype=np.float32) * rng.uniform(0.9, 1.1)
    torso_y, torso_b = (shoulder_y + hip_y) / 2, (hip_y - shoulder_y) / 2 + 0.03 * h
    on_head = (xs - head[0]) ** 2 + (ys - head[1]) ** 2 <= head_r ** 2
    parts = [  # back to front within the figure: (pixels, parsing class, colour)
        (_near_segment(xs, ys, joints["left_hip"], joints["left_knee"], 0.055 * h)
         | _near_segment(xs, ys, joints["left_knee"], joints["left_ankle"], 0.05 * h), LEFT_LEG, trousers),
        (_near_segment(xs, ys, joints["right_hip"], joints["right_knee"], 0.055 * h)
         | _near_segment(xs, ys, joints["right_knee"], joints["right_ankle"], 0.05 * h), RIGHT_LEG, trousers),
        ((np.abs(xs - x) / (0.15 * h)) ** 4 + (np.abs(ys - torso_y) / torso_b) ** 4 <= 1, UPPER_CLOTHES, shirt),
        (_near_segment(xs, ys, joints["left_shoulder"], joints["left_elbow"], 0.04 * h)
         | _near_segment(xs, ys, joints["left_elbow"], joints["left_wrist"], 0.035 * h), LEFT_ARM, shirt),
        (_near_segment(xs, ys, joints["right_shoulder"], joints["right_elbow"], 0.04 * h)
         | _near_segment(xs, ys, joints["right_elbow"], joints["right_wrist"], 0.035 * h), RIGHT_ARM, shirt),
        (_near_segment(xs, ys, head, (x, shoulder_y), 0.035 * h) | on_head, FACE, skin),
        (on_head & (ys < head[1] - 0.3 * head_r), HAIR, hair_colour),
    ]
    rgb = np.zeros((3, size, size), dtype=np.float32)
    parsing = np.full((size, size), BACKGROUND, dtype=np.int64)
    for pixels, label, colour in parts:
        rgb[:, pixels] = colour[:, None]
        parsing[pixels] = label
    light = 1 + 0.12 * np.clip((x - xs) / (0.25 * h), -1, 1)  # lit from the left: a slight shading
    rgb = np.clip(rgb * light, 0, 1)

    points = [(x, head[1] + 0.25 * head_r),  # nose
              (x + 0.35 * head_r, head[1] - 0.05 * head_r), (x - 0.35 * head_r, head[1] - 0.05 * head_r),  # eyes
              (x + 0.95 * head_r, head[1]), (x - 0.95 * head_r, head[1])]  # ears
    points += [joints[f"{side}_{joint}"] for joint in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle")
               for side in ("left", "right")]
    keypoints = np.array([(px, py, 1.0) for px, py in points], dtype=np.float32)
    outside = (keypoints[:, :2] < -0.5).any(1) | (keypoints[:, :2] >= size - 0.5).any(1)
    keypoints[outside, 2] = 0
    return rgb, parsing > 0, parsing, keypoints


SCENE_KINDS = ("mixed", "textured", "occluded", "occluded-textured")
STRONG_TEXTURES = ("stripes", "checks", "bricks")
MIN_HIDDEN_FRACTION = 0.3  # "occluded" scenes: a kept person at least this much hidden by an erased one


def _strong_texture(rng, size: int) -> tuple[np.ndarray, dict]:
    """(H, W) in [0, 1]: stripes, checks or bricks at any orientation, period 6-30 px: the
    high-contrast backgrounds where diffusion-free inpainting (Telea) smears."""
    ys, xs = _grid(size)
    kind = STRONG_TEXTURES[rng.integers(len(STRONG_TEXTURES))]
    period, angle = float(rng.uniform(6, 30)), float(rng.uniform(0, np.pi))
    a = (xs * np.cos(angle) + ys * np.sin(angle)) / period  # along the pattern, in periods
    b = (-xs * np.sin(angle) + ys * np.cos(angle)) / period
    if kind == "stripes":
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * a + rng.uniform(0, 2 * np.pi))
    elif kind == "checks":
        pattern = (np.floor(a) + np.floor(b)) % 2
    else:  # bricks two periods long, a period high, every other row shifted by half a brick
        row = np.floor(b)
        pattern = ((b % 1 < 0.15) | ((a / 2 + 0.5 * (row % 2)) % 1 < 0.08)).astype(np.float32)
    return pattern.astype(np.float32), {"texture": kind, "period": round(period, 3), "angle": round(angle, 4)}


def _textured_background(rng, size: int) -> tuple[np.ndarray, dict]:
    """A sky gradient over ground at a random horizon, one strong texture of amplitude
    0.2-0.5 over the ground (or, one time in three, the whole picture), and grain."""
    ys, xs = _grid(size)
    u, v = xs / (size - 1), ys / (size - 1)
    horizon = rng.uniform(0.3, 0.75) + rng.uniform(-0.1, 0.1) * (u - 0.5)
    ground = v > horizon
    image = np.where(ground, _blend(_colour(rng), _colour(rng), (v - horizon) / (1 - horizon)),
                     _blend(_colour(rng), _colour(rng), v / horizon))
    pattern, scene = _strong_texture(rng, size)
    amplitude = float(rng.uniform(0.2, 0.5))
    where = ground if rng.random() < 2 / 3 else np.ones_like(ground)
    strength = amplitude * pattern
    image = np.where(where, image * (1 - strength) + _colour(rng)[:, None, None] * strength, image)
    image = image + rng.normal(0, 0.01, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), {**scene, "amplitude": round(amplitude, 4)}


def _hidden_fraction(silhouettes: np.ndarray, front: int, behind: int) -> float:
    return float((silhouettes[front] & silhouettes[behind]).sum() / max(1, silhouettes[behind].sum()))


def _erase_an_occluder(rng, silhouettes: np.ndarray, depths: np.ndarray) -> list[int] | None:
    """An erase set holding a person who hides at least MIN_HIDDEN_FRACTION of a kept one, or
    None when the scene has no such pair (the caller draws again)."""
    pairs = [(e, k) for e in range(len(depths)) for k in range(len(depths))
             if depths[e] > depths[k] and _hidden_fraction(silhouettes, e, k) >= MIN_HIDDEN_FRACTION]
    if not pairs:
        return None
    front, behind = pairs[rng.integers(len(pairs))]
    others = {i for i in range(len(depths)) if i not in (front, behind) and rng.random() < 0.3}
    return sorted(i + 1 for i in others | {front})


def _occluding_figures(rng, size: int, max_people: int) -> list:
    """Placements for 2..max(2, max_people) figures, the second standing close in front of the first."""
    count = int(rng.integers(2, max(2, max_people) + 1))
    height = rng.uniform(0.45, 0.8) * size
    x, foot = rng.uniform(0.25, 0.75) * size, rng.uniform(0.8, 1.05) * size
    placed = [(x, foot, height), (x + rng.choice([-1, 1]) * rng.uniform(0.0, 0.15) * height,
                                  foot + rng.uniform(0, 0.08) * size, height * rng.uniform(0.85, 1.15))]
    placed = [(px, float(np.clip(pf, 0.95 * ph, 1.1 * size)), ph) for px, pf, ph in placed]
    for _ in range(count - 2):
        other_height = rng.uniform(0.35, 0.8) * size
        placed.append((*_place(rng, size, placed, other_height), other_height))
    return placed


def procedural_sample(seed: int, size: int = 128, max_people: int = 3, name: str | None = None,
                      kind: str = "mixed") -> PairedSample:
    """A synthetic scene of 1..max_people overlapping figures; the same seed gives the same sample.

    ``kind``: "mixed" (varied backgrounds, people who often overlap), "textured" (a sky and
    ground under one strong stripes/checks/bricks texture, amplitude 0.2-0.5, period 6-30 px,
    any orientation), "occluded" (a kept person at least 30% hidden by an erased one) or
    "occluded-textured" (both). The scene's kind and texture go to ``sample.scene``.
    """
    if kind not in SCENE_KINDS:
        raise DataError(f"kind: must be one of {SCENE_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    name = name or f"procedural_{seed}"
    occluded = kind.startswith("occluded")
    if kind in ("textured", "occluded-textured"):
        background, scene = _textured_background(rng, size)
    else:
        background, scene = _background(rng, size), {}
    while True:  # until somebody stays visible (almost always at once) and, occluded, someone is hidden
        if occluded:
            figures = [_figure(rng, size, *where) for where in _occluding_figures(rng, size, max_people)]
        else:  # placement and drawing interleave: the random stream (and so every sample) as it always was
            figures, placed = [], []
            for _ in range(_people_count(rng, max_people)):
                height = rng.uniform(0.35, 0.8) * size
                x, foot = _place(rng, size, placed, height)
                placed.append((x, foot, height))
                figures.append(_figure(rng, size, x, foot, height))
        depths = (rng.permutation(len(figures)) + 1).astype(np.float64)
        if occluded:
            depths[1] = depths.max() + 1  # the second figure stands in front of the first
        layers = [(rgb, silhouette.astype(np.float32)) for rgb, silhouette, _, _ in figures]
        sample, keep = _assemble(rng, name, background, layers, depths,
                                 _erase_an_occluder if occluded else None)
        if sample is not None:
            break
    sample.scene = {"kind": kind, **scene}
    visible = sample.masks.numpy() > 0.5
    amodal = sample.people[:, 3].numpy() > 0.5
    sample.parsing = torch.from_numpy(np.stack([figures[k][2] for k in keep]) * visible)
    sample.keypoints = torch.from_numpy(np.stack([_as_estimated(figures[k][3], amodal[i], visible[i])
                                                  for i, k in enumerate(keep)]))
    return sample


def _as_estimated(keypoints: np.ndarray, amodal: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Keypoints as a pose estimator reports them: a joint on the person's hidden part keeps its
    place with HIDDEN_KEYPOINT_CONFIDENCE."""
    out = keypoints.copy()
    size = amodal.shape[0]
    x = np.clip(np.rint(out[:, 0]).astype(int), 0, size - 1)
    y = np.clip(np.rint(out[:, 1]).astype(int), 0, size - 1)
    hidden = (out[:, 2] > 0) & amodal[y, x] & ~visible[y, x]
    out[hidden, 2] = HIDDEN_KEYPOINT_CONFIDENCE
    return out


class ProceduralStream(collections.abc.Sequence):
    """``count`` procedural scenes drawn on the fly, never written: sample k depends only on
    (seed, k), its kind drawn with the probabilities of ``mix`` ({kind: weight}). The default
    mix is occlusion-heavy (70% of scenes have a kept person at least 30% hidden by an erased
    one; half of those over a strong texture) with 20% more strong textures."""

    DEFAULT_MIX = {"occluded": 0.35, "occluded-textured": 0.35, "textured": 0.2, "mixed": 0.1}

    def __init__(self, count: int, seed: int = 0, size: int = 128, max_people: int = 3, mix: dict | None = None):
        self.count, self.seed, self.size, self.max_people = count, seed, size, max_people
        self.mix = dict(self.DEFAULT_MIX if mix is None else mix)
        unknown = [k for k in self.mix if k not in SCENE_KINDS]
        if unknown or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise DataError(f"mix: needs non-negative weights of kinds in {SCENE_KINDS}, got {self.mix}")

    def __len__(self) -> int:
        return self.count

    def kind(self, index: int) -> str:
        kinds = list(self.mix)
        weights = np.array([self.mix[k] for k in kinds], dtype=np.float64)
        draw = np.random.default_rng([self.seed, index, 1]).random()
        return kinds[int(np.searchsorted(np.cumsum(weights / weights.sum()), draw, side="right").clip(0, len(kinds) - 1))]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        index %= self.count
        return procedural_sample(_sample_seed(self.seed, index), self.size, self.max_people,
                                 name=f"stream_{self.seed}_{index}", kind=self.kind(index))


# ------------------------------------------------------------------ cut-out compositing


def _image_files(folder, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what} folder {folder} holds no .png/.jpg/.jpeg image")
    return files


def _load_cutout(path: Path) -> Image.Image:
    """An RGBA person cropped to its alpha's bounding box."""
    image = open_image(path)
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise DataError(f"{path}: a cut-out needs an alpha channel (the person's silhouette), got mode {image.mode}")
    image = image.convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box is None:
        raise DataError(f"{path}: the alpha channel is empty")
    return image.crop(box)


def _background_crop(rng, path: Path, size: int) -> np.ndarray:
    image = open_image(path).convert("RGB")
    side = rng.uniform(0.6, 1.0) * min(image.size)
    left, top = rng.uniform(0, image.width - side), rng.uniform(0, image.height - side)
    crop = image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255


def _paste(array: np.ndarray, size: int, left: int, top: int) -> np.ndarray:
    """``array`` (C, h, w) placed at (left, top) on a zero (C, size, size) canvas, clipped to it."""
    canvas = np.zeros((array.shape[0], size, size), dtype=np.float32)
    h, w = array.shape[1:]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + w, size), min(top + h, size)
    if x0 < x1 and y0 < y1:
        canvas[:, y0:y1, x0:x1] = array[:, y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def cutout_sample(seed: int, cutouts: list[Path], backgrounds: list[Path], size: int = 128, max_people: int = 3,
                  name=None) -> PairedSample:
    """Cut-out people (RGBA, alpha = silhouette) composited onto a background photo crop;
    the target composites only the kept ones. No keypoints or parsing."""
    if not cutouts or not backgrounds:
        raise DataError("cut-out compositing needs at least one cut-out and one background")
    rng = np.random.default_rng(seed)
    name = name or f"cutout_{seed}"
    background = _background_crop(rng, Path(backgrounds[rng.integers(len(backgrounds))]), size)
    while True:  # until somebody stays visible
        layers, placed = [], []
        for _ in range(_people_count(rng, max_people)):
            person = _load_cutout(Path(cutouts[rng.integers(len(cutouts))]))
            height = rng.uniform(0.35, 0.8) * size
            scale = min(height / person.height, size / person.width)
            person = person.resize((max(1, round(person.width * scale)), max(1, round(person.height * scale))),
                                   Image.BILINEAR)
            if rng.random() < 0.5:
                person = person.transpose(Image.FLIP_LEFT_RIGHT)
            x, foot = _place(rng, size, placed, person.height)
            placed.append((x, foot, person.height))
            rgba = _paste(np.asarray(person, dtype=np.float32).transpose(2, 0, 1) / 255, size,
                          round(x - person.width / 2), round(foot - person.height))
            layers.append((rgba[:3], rgba[3]))
        depths = (rng.permutation(len(layers)) + 1).astype(np.float64)
        # alpha > 127 is the silhouette; softer edges still blend into the photo.
        sample, _ = _assemble(rng, name, background, layers, depths)
        if sample is not None:
            return sample


# ------------------------------------------------------------------ synthesize and its command


def synthesize(out, count: int, seed: int = 0, size: int = 128, cutouts_dir=None, backgrounds_dir=None,
               max_people: int = 3, progress: bool = True, scene: str = "mixed") -> list[Path]:
    """Write ``count`` samples ``out/sample_00000`` ... and return the folders written now.

    Procedural scenes of the ``scene`` kind (procedural_sample's; "all" takes the kinds in
    turn), or cut-out compositing when both folders are given. Sample i depends only on
    (seed, i), and existing sample folders are skipped: a rerun completes a partial run
    with the same samples."""
    if scene not in (*SCENE_KINDS, "all"):
        raise DataError(f"scene must be one of {(*SCENE_KINDS, 'all')}, got {scene!r}")
    if cutouts_dir is not None and scene != "mixed":
        raise DataError("scene kinds are procedural; cut-out compositing takes none")
    kinds = SCENE_KINDS if scene == "all" else (scene,)
    if count < 1:
        raise DataError(f"count must be at least 1, got {count}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if size < 32 or size % 8:
        raise DataError(f"size must be a multiple of 8 (the autoencoder's downsampling), at least 32; got {size}")
    if max_people < 1:
        raise DataError(f"max_people must be at least 1, got {max_people}")
    if (cutouts_dir is None) != (backgrounds_dir is None):
        raise DataError("cut-out compositing takes both a cut-outs folder and a backgrounds folder, or neither")
    if cutouts_dir is not None:
        cutouts = _image_files(cutouts_dir, "cut-outs")
        for path in cutouts:  # check them all now rather than fail halfway through the run
            _load_cutout(path)
        backgrounds = _image_files(backgrounds_dir, "backgrounds")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in tqdm(range(count), desc="synth", unit="sample", disable=not progress):
        folder = out / f"sample_{index:05d}"
        if folder.exists():
            continue
        sample_seed = _sample_seed(seed, index)
        if cutouts_dir is None:
            sample = procedural_sample(sample_seed, size, max_people, name=folder.name, kind=kinds[index % len(kinds)])
        else:
            sample = cutout_sample(sample_seed, cutouts, backgrounds, size, max_people, name=folder.name)
        write_sample(folder, sample)
        written.append(folder)
    return written


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="where the sample folders go")
    parser.add_argument("--count", type=int, default=64, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--cutouts", metavar="DIR", help="RGBA people cut-outs (with --backgrounds)")
    parser.add_argument("--backgrounds", metavar="DIR", help="background photos (with --cutouts)")
    parser.add_argument("--max-people", type=int, default=3, help="at most this many people per sample")
    parser.add_argument("--scene", choices=(*SCENE_KINDS, "all"), default="mixed",
                        help="procedural scene kind: mixed (varied), textured (strong stripes/checks/bricks), "
                             "occluded (a kept person >= 30%% hidden by an erased one), or all of them in turn")


def run_synth(args) -> int:
    if (args.cutouts is None) != (args.backgrounds is None):
        raise DataError("--cutouts and --backgrounds go together: give both or neither")
    written = synthesize(args.out, args.count, seed=args.seed, size=args.size, cutouts_dir=args.cutouts,
                         backgrounds_dir=args.backgrounds, max_people=args.max_people, scene=args.scene)
    kind = "procedural" if args.cutouts is None else "cut-out"
    print(f"wrote {len(written)} {kind} samples to {args.out} ({args.count - len(written)} already there)")
    return 0
