"""Paired multi-layer data for training and evaluation (docs/semantics.md, paired data).

A sample is a folder ``D/<name>/``: the photo, the visible mask of each person, which
people to erase, and the target (the photo with them erased and the kept people
completed), optionally with HMG inputs and the layer targets (the clean plate and each
person's amodal RGBA). ``read_sample`` checks a folder and ``write_sample`` writes one
atomically. This module is the format alone; mild/synth.py makes samples.
"""

from __future__ import annotations

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
from PIL import Image, UnidentifiedImageError

from .hmg import DEFAULT_PARSING_CLASSES, NUM_KEYPOINTS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

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


def open_image(path: Path) -> Image.Image:
    """The image file, loaded; a DataError naming it when it cannot be read."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot read the image ({error})") from None


def _read_rgb(path: Path) -> torch.Tensor:
    array = np.asarray(open_image(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _read_mask(path: Path, size, image_path: Path) -> torch.Tensor:
    mask = np.asarray(open_image(path).convert("L")) > 127
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
        image = open_image(files[n])
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
