"""Paired multi-layer data for training and evaluation (docs/semantics.md, paired data).

A sample is a folder ``D/<name>/``: the photo, the visible mask of each person, which
people to erase, and the target (the photo with them erased and the kept people
completed), optionally with HMG inputs. ``read_sample`` checks a folder and
``write_sample`` writes one atomically. ``synthesize`` makes samples either from
procedural scenes (offline, no inputs) or by compositing cut-out people onto
background photos.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .hmg import DEFAULT_PARSING_CLASSES, NUM_KEYPOINTS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# HMG inputs as a user has them: a pose estimator also places the joints another person hides,
# with lower confidence; a human parser labels only the pixels it sees.
HIDDEN_KEYPOINT_CONFIDENCE = 0.3

# Parsing class ids of the procedural figures (the LIP numbering, below DEFAULT_PARSING_CLASSES).
# The person's left is the image's right: the figures face the camera.
BACKGROUND, HAIR, UPPER_CLOTHES, FACE, LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG = 0, 2, 5, 13, 14, 15, 16, 17


class DataError(ValueError):
    """A bad sample or data folder: one line naming the file and what is wrong."""


@dataclasses.dataclass(eq=False)  # tensors have no single truth value: compare fields, not samples
class PairedSample:
    name: str
    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    masks: torch.Tensor  # (P, H, W) float32 in {0, 1}: the visible part of each person
    erase: list[int] | None  # 1-based ids, None = everyone
    target: torch.Tensor | None  # (3, H, W) float32 in [0, 1]
    keypoints: torch.Tensor | None = None  # (P, 17, 3) float32 (x, y, conf); conf 0 for persons without keypoints
    parsing: torch.Tensor | None = None  # (P, H, W) int64 class ids
    occlusion_order: list[float] | None = None  # one depth per person, larger = nearer the camera
    # Layer targets (docs/semantics.md, Paired data): what each MILD layer reconstructs on its own.
    plate: torch.Tensor | None = None  # (3, H, W) the clean background, with no person at all
    people: torch.Tensor | None = None  # (P, 4, H, W) each person's amodal RGBA: full appearance, full silhouette
    scene: dict | None = None  # how a synthetic scene was drawn (kind, texture, amplitude, ...): scene.json


# ------------------------------------------------------------------ reading


def list_samples(root) -> list[Path]:
    """The sample folders under ``root`` (those holding an image), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    # Dot folders are write_sample's temporaries.
    samples = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _image_path(p))
    if not samples:
        raise DataError(f"{root} holds no sample folder (a folder with image.png, .jpg or .jpeg)")
    return samples


def read_sample(folder, *, require_target: bool = False) -> PairedSample:
    """Read and check one sample folder; a folder without target.png is an inference sample."""
    folder = Path(folder)
    image_path = _image_path(folder)
    if image_path is None:
        raise DataError(f"{folder} has no image.png (or image.jpg, image.jpeg)")
    image = _read_rgb(image_path)
    size = tuple(image.shape[1:])
    mask_paths = _numbered_files(folder, "mask")
    if not mask_paths:
        raise DataError(f"{folder} has no person masks (mask_1.png, mask_2.png, ...)")
    _require_contiguous(folder, "mask", mask_paths, len(mask_paths))
    masks = torch.stack([_read_mask(mask_paths[n], size, image_path) for n in sorted(mask_paths)])
    P = len(masks)

    target = None
    target_path = folder / "target.png"
    if target_path.exists():
        target = _read_rgb(target_path)
        _require_size(target_path, tuple(target.shape[1:]), size, image_path)
    elif require_target:
        raise DataError(f"{folder} has no target.png (training and evaluation need the erased truth)")

    plate = None
    plate_path = folder / "plate.png"
    if plate_path.exists():
        plate = _read_rgb(plate_path)
        _require_size(plate_path, tuple(plate.shape[1:]), size, image_path)
    return PairedSample(name=folder.name, image=image, masks=masks, erase=_read_erase(folder / "erase.json", P),
                        target=target, keypoints=_read_keypoints(folder / "keypoints.json", P),
                        parsing=_read_parsing(folder, P, size, image_path),
                        occlusion_order=_read_occlusion(folder / "occlusion.json", P), plate=plate,
                        people=_read_people(folder, P, size, image_path), scene=_read_scene(folder / "scene.json"))


def _image_path(folder: Path) -> Path | None:
    return next((folder / f"image{s}" for s in IMAGE_SUFFIXES if (folder / f"image{s}").is_file()), None)


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot read the image ({error})") from None


def _read_rgb(path: Path) -> torch.Tensor:
    array = np.asarray(_open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _read_mask(path: Path, size, image_path: Path) -> torch.Tensor:
    mask = np.asarray(_open(path).convert("L")) > 127
    _require_size(path, mask.shape, size, image_path)
    if not mask.any():
        raise DataError(f"{path} is empty (no pixel above 127)")
    return torch.from_numpy(mask.astype(np.float32))


def _require_size(path: Path, got, want, image_path: Path) -> None:
    if got != want:
        raise DataError(f"{path} is {got[1]}x{got[0]} but {image_path.name} is {want[1]}x{want[0]}")


def _numbered_files(folder: Path, stem: str) -> dict[int, Path]:
    """{n: path} of ``<stem>_<n>.png``; any other name starting with ``stem`` is an error."""
    pattern = re.compile(rf"{stem}_([1-9][0-9]*)\.png")
    files = {}
    for path in sorted(folder.glob(f"{stem}*")):
        match = pattern.fullmatch(path.name)
        if match is None:
            raise DataError(f"{path}: not a valid name; {stem} files are {stem}_1.png, {stem}_2.png, ...")
        files[int(match[1])] = path
    return files


def _require_contiguous(folder: Path, stem: str, files: dict[int, Path], count: int) -> None:
    for n in range(1, count + 1):
        if n not in files:
            raise DataError(f"{folder / f'{stem}_{n}.png'} is missing ({stem} files must be numbered 1..{count} "
                            f"without gaps)")
    extra = [n for n in files if n > count]
    if extra:
        raise DataError(f"{files[min(extra)]} has no mask_{min(extra)}.png (there are {count} persons)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read it as JSON ({error})") from None


def _read_erase(path: Path, P: int) -> list[int] | None:
    if not path.exists():
        return None
    ids = _read_json(path)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{path}: need a JSON list of person ids, got {ids!r}")
    if not ids or min(ids) < 1 or max(ids) > P or len(set(ids)) != len(ids):
        raise DataError(f"{path}: need distinct person ids in [1, {P}], at least one; got {ids}")
    return ids


def _read_keypoints(path: Path, P: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    table = _read_json(path)
    if not isinstance(table, dict):
        raise DataError(f'{path}: need {{"<person id>": [[x, y, conf] x {NUM_KEYPOINTS}], ...}}')
    keypoints = torch.zeros(P, NUM_KEYPOINTS, 3)  # confidence 0: persons without keypoints
    for key, value in table.items():
        if not (key.isdigit() and 1 <= int(key) <= P):
            raise DataError(f"{path}: person id {key!r} is not in [1, {P}]")
        try:
            points = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            points = np.zeros(0)
        if points.shape != (NUM_KEYPOINTS, 3) or not np.isfinite(points).all():
            raise DataError(f"{path}: person {key} needs {NUM_KEYPOINTS} finite [x, y, conf] triples, "
                            f"got shape {points.shape}")
        keypoints[int(key) - 1] = torch.from_numpy(points)
    return keypoints


def _per_person_images(folder: Path, stem: str, P: int, size, image_path: Path) -> list | None:
    """[(path, image)] of ``<stem>_1.png`` .. ``<stem>_P.png``, each the photo's size, or None
    without any; every person's file or none."""
    files = _numbered_files(folder, stem)
    if not files:
        return None
    _require_contiguous(folder, stem, files, P)
    images = []
    for n in range(1, P + 1):
        image = _open(files[n])
        _require_size(files[n], (image.height, image.width), size, image_path)
        images.append((files[n], image))
    return images


def _read_parsing(folder: Path, P: int, size, image_path: Path) -> torch.Tensor | None:
    images = _per_person_images(folder, "parsing", P, size, image_path)
    if images is None:
        return None
    maps = []
    for path, image in images:
        if len(image.getbands()) != 1:
            raise DataError(f"{path}: need a single-channel (L) map of class ids, got mode {image.mode}")
        classes = np.asarray(image).astype(np.int64)
        if classes.min() < 0 or classes.max() >= DEFAULT_PARSING_CLASSES:
            raise DataError(f"{path}: class ids must lie in [0, {DEFAULT_PARSING_CLASSES}), "
                            f"found {int(classes.max())}")
        maps.append(torch.from_numpy(classes))
    return torch.stack(maps)


def _read_people(folder: Path, P: int, size, image_path: Path) -> torch.Tensor | None:
    """(P, 4, H, W) amodal RGBA per person from person_<n>.png, or None without them."""
    images = _per_person_images(folder, "person", P, size, image_path)
    if images is None:
        return None
    people = []
    for path, image in images:
        if image.mode != "RGBA":
            raise DataError(f"{path}: an amodal person layer must be RGBA (its alpha is the full silhouette), "
                            f"got mode {image.mode}")
        people.append(torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255))
    return torch.stack(people)


def _read_scene(path: Path) -> dict | None:
    if not path.exists():
        return None
    scene = _read_json(path)
    if not isinstance(scene, dict):
        raise DataError(f"{path}: need a JSON object describing the scene, got {type(scene).__name__}")
    return scene


def _read_occlusion(path: Path, P: int) -> list[float] | None:
    if not path.exists():
        return None
    depths = _read_json(path)
    numbers = isinstance(depths, list) and all(isinstance(d, (int, float)) and not isinstance(d, bool)
                                               and math.isfinite(d) for d in depths)
    if not numbers or len(depths) != P:
        raise DataError(f"{path}: need a list of {P} depths (one per person), got {depths!r}")
    return [float(d) for d in depths]


# ------------------------------------------------------------------ writing


def write_sample(folder, sample: PairedSample) -> None:
    """Write ``sample`` as ``folder``: into a temporary sibling, then renamed, so a sample
    folder is either complete or absent. An existing folder is never overwritten."""
    folder = Path(folder)
    if folder.exists():
        raise DataError(f"{folder} already exists; not overwriting it")
    _check_sample(sample)
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
        _write_files(temporary, sample)
        os.rename(temporary, folder)
    except BaseException as error:  # interrupts too: never leave half a sample behind
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise DataError(f"cannot write {folder}: {error}") from None
        raise


def _check_sample(sample: PairedSample) -> None:
    """Refuse what read_sample would refuse, before anything is written."""
    def fail(what):
        raise DataError(f"sample {sample.name}: {what}")

    if sample.image.ndim != 3 or sample.image.shape[0] != 3:
        fail(f"image must be (3, H, W), got {tuple(sample.image.shape)}")
    H, W = sample.image.shape[1:]
    if sample.masks.ndim != 3 or len(sample.masks) == 0 or sample.masks.shape[1:] != (H, W):
        fail(f"masks must be (P >= 1, {H}, {W}), got {tuple(sample.masks.shape)}")
    P = len(sample.masks)
    if not (_numpy(sample.masks) > 0.5).any((1, 2)).all():
        fail("a person mask is empty")
    if sample.target is not None and sample.target.shape != sample.image.shape:
        fail(f"target must be (3, {H}, {W}), got {tuple(sample.target.shape)}")
    if sample.erase is not None and (not sample.erase or min(sample.erase) < 1 or max(sample.erase) > P
                                     or len(set(sample.erase)) != len(sample.erase)):
        fail(f"erase must hold distinct ids in [1, {P}], got {sample.erase}")
    if sample.keypoints is not None and sample.keypoints.shape != (P, NUM_KEYPOINTS, 3):
        fail(f"keypoints must be ({P}, {NUM_KEYPOINTS}, 3), got {tuple(sample.keypoints.shape)}")
    if sample.parsing is not None:
        if sample.parsing.shape != (P, H, W):
            fail(f"parsing must be ({P}, {H}, {W}), got {tuple(sample.parsing.shape)}")
        classes = _numpy(sample.parsing)
        if classes.min() < 0 or classes.max() >= DEFAULT_PARSING_CLASSES:
            fail(f"parsing class ids must lie in [0, {DEFAULT_PARSING_CLASSES})")
    if sample.occlusion_order is not None and len(sample.occlusion_order) != P:
        fail(f"occlusion_order needs {P} depths, got {len(sample.occlusion_order)}")
    if sample.plate is not None and sample.plate.shape != sample.image.shape:
        fail(f"plate must be (3, {H}, {W}), got {tuple(sample.plate.shape)}")
    if sample.people is not None and sample.people.shape != (P, 4, H, W):
        fail(f"people must be ({P}, 4, {H}, {W}) amodal RGBA layers, got {tuple(sample.people.shape)}")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # numpy, not torch, for the many small per-file operations: torch's thread pool costs more than they do.
    return tensor.detach().cpu().numpy()


def _to_bytes(image: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(_numpy(image.float()).transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)  # fast; the images are small


def _write_files(folder: Path, sample: PairedSample) -> None:
    _save_png(_to_bytes(sample.image), folder / "image.png")
    for n, mask in enumerate(_numpy(sample.masks), start=1):
        _save_png((mask > 0.5).astype(np.uint8) * 255, folder / f"mask_{n}.png")
    if sample.erase is not None:
        (folder / "erase.json").write_text(json.dumps([int(i) for i in sample.erase]))
    if sample.target is not None:
        _save_png(_to_bytes(sample.target), folder / "target.png")
    if sample.keypoints is not None:
        table = {str(n): points.tolist() for n, points in enumerate(_numpy(sample.keypoints.float()), start=1)}
        (folder / "keypoints.json").write_text(json.dumps(table))
    if sample.parsing is not None:
        for n, classes in enumerate(_numpy(sample.parsing), start=1):
            _save_png(classes.astype(np.uint8), folder / f"parsing_{n}.png")
    if sample.occlusion_order is not None:
        (folder / "occlusion.json").write_text(json.dumps([float(d) for d in sample.occlusion_order]))
    if sample.plate is not None:
        _save_png(_to_bytes(sample.plate), folder / "plate.png")
    if sample.people is not None:
        for n, rgba in enumerate(sample.people, start=1):
            _save_png(_to_bytes(rgba), folder / f"person_{n}.png")
    if sample.scene is not None:
        (folder / "scene.json").write_text(json.dumps(sample.scene, sort_keys=True))


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
    image = _open(path)
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise DataError(f"{path}: a cut-out needs an alpha channel (the person's silhouette), got mode {image.mode}")
    image = image.convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box is None:
        raise DataError(f"{path}: the alpha channel is empty")
    return image.crop(box)


def _background_crop(rng, path: Path, size: int) -> np.ndarray:
    image = _open(path).convert("RGB")
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
