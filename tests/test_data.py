"""Paired training data: the format (mild.data: reading, writing) and synthesis (mild.synth: the two generators and the synth command)."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mild import synth
from mild.data import DataError, PairedSample, list_samples, read_sample, write_sample
from mild.synth import cutout_sample, procedural_sample, run_synth, synthesize

SIZE = 32


def erased_union(sample):
    ids = sample.erase or range(1, len(sample.masks) + 1)
    return sample.masks[[i - 1 for i in ids]].amax(0) > 0


def same(x, y):
    return x is None and y is None or x is not None and y is not None and torch.equal(x, y)


def fields_equal(a, b):
    return (a.erase == b.erase and a.occlusion_order == b.occlusion_order
            and all(same(getattr(a, f), getattr(b, f))
                    for f in ("image", "masks", "target", "keypoints", "parsing", "plate", "people")))


def hand_sample(P=2, target=True):
    """A small sample built by hand: person 2 stands in front of person 1."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(P, SIZE, SIZE)
    for i in range(P):
        masks[i, 4 + 4 * i: 24 + 4 * i, 4 + 6 * i: 16 + 6 * i] = 1
    for i in range(P - 1):
        masks[i][masks[i + 1:].amax(0) > 0] = 0
    return PairedSample(name="hand", image=torch.rand(3, SIZE, SIZE, generator=gen), masks=masks, erase=[P],
                        target=torch.rand(3, SIZE, SIZE, generator=gen) if target else None,
                        keypoints=torch.rand(P, 17, 3, generator=gen) * SIZE,
                        parsing=torch.randint(0, 20, (P, SIZE, SIZE), generator=gen),
                        occlusion_order=[float(i + 1) for i in range(P)])


@pytest.fixture
def sample_dir(tmp_path):
    folder = tmp_path / "hand"
    write_sample(folder, hand_sample())
    return folder


# ------------------------------------------------------------------ procedural scenes


def test_procedural_is_deterministic():
    a, b, c = procedural_sample(5), procedural_sample(5), procedural_sample(6)
    assert fields_equal(a, b)
    assert a.image.shape != c.image.shape or not torch.equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(24))
def test_procedural_sample_is_consistent(seed):
    s = procedural_sample(seed, size=64)
    P = len(s.masks)
    assert s.image.shape == s.target.shape == (3, 64, 64) and s.image.dtype == torch.float32
    assert 0 <= s.image.min() and s.image.max() <= 1
    assert set(s.masks.unique().tolist()) <= {0.0, 1.0} and s.masks.flatten(1).any(1).all()
    assert s.masks.sum(0).max() <= 1  # visible parts: no pixel belongs to two people
    assert s.erase and set(s.erase) <= set(range(1, P + 1))
    assert len(s.occlusion_order) == P and len(set(s.occlusion_order)) == P
    assert s.keypoints.shape == (P, 17, 3) and s.parsing.shape == (P, 64, 64)
    assert 0 <= s.parsing.min() and s.parsing.max() < 20
    assert (s.parsing[s.masks > 0] > 0).all() and (s.parsing[s.masks == 0] == 0).all()  # visible pixels only

    erased = erased_union(s)
    assert torch.equal(s.image[:, ~erased], s.target[:, ~erased])
    changed = (s.image - s.target).abs().amax(0)[erased] > 1 / 255
    assert changed.float().mean() > 0.5


def test_procedural_keypoints_lie_on_their_figure():
    inside = total = 0
    for seed in range(10):
        s = procedural_sample(seed, size=64)
        for silhouette, points in zip(s.people[:, 3] > 0.5, s.keypoints):
            seen = points[points[:, 2] > 0]
            x, y = seen[:, 0].round().long().clamp(0, 63), seen[:, 1].round().long().clamp(0, 63)
            inside += int(silhouette[y, x].sum())
            total += len(seen)
    assert total > 0 and inside >= 0.95 * total


def test_procedural_keypoints_are_estimated_and_hidden_ones_less_sure():
    """As a pose estimator: joints on a hidden part are placed, with confidence 0.3; joints on the
    visible part keep 1 (HMG never sees the hidden silhouette itself)."""
    hidden_joints = 0
    for seed in range(20):
        s = procedural_sample(seed, size=64)
        for mask, silhouette, points in zip(s.masks > 0, s.people[:, 3] > 0.5, s.keypoints):
            x, y = points[:, 0].round().long().clamp(0, 63), points[:, 1].round().long().clamp(0, 63)
            on_image = points[:, 2] > 0
            hidden = on_image & silhouette[y, x] & ~mask[y, x]
            assert torch.all(points[hidden, 2] == synth.HIDDEN_KEYPOINT_CONFIDENCE)
            assert torch.all(points[on_image & ~hidden, 2] == 1)
            hidden_joints += int(hidden.sum())
    assert hidden_joints >= 10


def test_procedural_scenes_have_occlusion_to_complete():
    """Most scenes hold several people, and often a kept person was hidden by an erased one."""
    samples = [procedural_sample(seed, size=64) for seed in range(40)]
    assert sum(len(s.masks) >= 2 for s in samples) >= 24
    completed = 0
    for s in samples:
        kept = [i for i in range(1, len(s.masks) + 1) if i not in s.erase]
        hidden_then_shown = [((s.people[i - 1, 3] > 0.5) & erased_union(s)).any() for i in kept]
        completed += any(hidden_then_shown)
    assert completed >= 8


def test_procedural_respects_max_people():
    assert all(len(procedural_sample(seed, size=64, max_people=1).masks) == 1 for seed in range(5))
    assert all(len(procedural_sample(seed, size=64, max_people=2).masks) <= 2 for seed in range(10))


# ------------------------------------------------------------------ reading and writing


def test_round_trip(tmp_path):
    original = procedural_sample(3, size=64)
    write_sample(tmp_path / "s", original)
    back = read_sample(tmp_path / "s", require_target=True)
    assert back.name == "s"
    assert torch.equal(back.masks, original.masks)
    assert (back.image - original.image).abs().max() <= 0.5 / 255 + 1e-6
    assert (back.target - original.target).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(back.keypoints, original.keypoints) and torch.equal(back.parsing, original.parsing)
    assert back.erase == original.erase and back.occlusion_order == original.occlusion_order


def composite(plate, people, depths, keep=None):
    """The float64 'over' of the plate and the people back to front (keep: 0-based ids, default all)."""
    out = plate.double()
    for i in sorted(range(len(people)), key=lambda i: depths[i]):
        if keep is None or i in keep:
            alpha = people[i, 3:].double()
            out = out * (1 - alpha) + people[i, :3].double() * alpha
    return out


def check_layer_targets(sample, tolerance):
    """The plate and amodal people composite to the photo, and without the erased ones to the
    target; each person's alpha covers its visible mask."""
    P = len(sample.masks)
    assert sample.plate.shape == sample.image.shape and sample.people.shape == (P, 4, *sample.image.shape[1:])
    depths = sample.occlusion_order
    assert (composite(sample.plate, sample.people, depths) - sample.image.double()).abs().max() <= tolerance
    kept = [i for i in range(P) if i + 1 not in (sample.erase or range(1, P + 1))]
    assert (composite(sample.plate, sample.people, depths, kept) - sample.target.double()).abs().max() <= tolerance
    assert (sample.people[:, 3][sample.masks > 0] > 0.5).all()  # amodal covers visible


def test_procedural_samples_carry_their_layer_targets():
    completed = 0
    for seed in range(12):
        sample = procedural_sample(seed, size=64)
        check_layer_targets(sample, 1e-6)
        hidden = (sample.people[:, 3] > 0.5) & (sample.masks == 0)  # amodal pixels another person hides
        completed += int(hidden.flatten(1).sum(1).max()) > 10
    assert completed >= 3  # occluded people come whole


def test_layer_targets_round_trip_and_are_deterministic(tmp_path):
    for name in ("a", "b"):
        write_sample(tmp_path / name, procedural_sample(11, size=SIZE))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    P = len(read_sample(tmp_path / "a").masks)
    assert "plate.png" in names and [f"person_{n}.png" for n in range(1, P + 1)] == [
        n for n in names if n.startswith("person_")]
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert Image.open(tmp_path / "a" / "person_1.png").mode == "RGBA"
    back = read_sample(tmp_path / "a", require_target=True)
    original = procedural_sample(11, size=SIZE)
    assert (back.plate - original.plate).abs().max() <= 0.5 / 255 + 1e-6
    assert (back.people - original.people).abs().max() <= 0.5 / 255 + 1e-6
    check_layer_targets(back, 4 / 255)  # 8-bit plate, colours and alpha


def test_samples_without_layer_targets_still_load(sample_dir):
    """Older samples (and real photos without amodal annotation) have no plate or people."""
    back = read_sample(sample_dir, require_target=True)
    assert back.plate is None and back.people is None


def test_inference_sample_without_target_or_extras(tmp_path):
    sample = hand_sample(target=False)
    sample.erase = sample.keypoints = sample.parsing = sample.occlusion_order = None
    write_sample(tmp_path / "s", sample)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["image.png", "mask_1.png", "mask_2.png"]
    back = read_sample(tmp_path / "s")
    assert back.target is None and back.erase is None and back.keypoints is None and back.parsing is None
    with pytest.raises(DataError, match="target.png"):
        read_sample(tmp_path / "s", require_target=True)


def test_rgb_and_jpeg_inputs_read(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(folder / "image.jpg")
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[5:9, 5:9] = 200
    Image.fromarray(mask).save(folder / "mask_1.png")
    sample = read_sample(folder)
    assert sample.masks.sum() == 16 and sample.image.shape == (3, SIZE, SIZE)


def test_missing_keypoints_get_zero_confidence(sample_dir):
    (sample_dir / "keypoints.json").write_text(json.dumps({"2": [[1, 2, 0.5]] * 17}))
    keypoints = read_sample(sample_dir).keypoints
    assert keypoints[0].abs().sum() == 0 and torch.equal(keypoints[1, 0], torch.tensor([1, 2, 0.5]))


def save_gray(path, size=SIZE, value=255):
    Image.new("L", (size, size), value).save(path)


def break_sample(folder, case):
    """Damage a valid two-person sample folder; return the file name the error must give."""
    if case == "unreadable image":
        (folder / "image.png").write_bytes(b"not a png")
        return "image.png"
    if case == "no image":
        (folder / "image.png").unlink()
        return "image.png"
    if case == "unreadable mask":
        (folder / "mask_2.png").write_bytes(b"\x89PNG broken")
        return "mask_2.png"
    if case == "unreadable erase.json":
        (folder / "erase.json").write_text("[1,")
        return "erase.json"
    if case == "unreadable keypoints.json":
        (folder / "keypoints.json").write_text("{")
        return "keypoints.json"
    if case == "target size":
        save_gray(folder / "target.png", size=16)
        return "target.png is 16x16 but image.png is 32x32"
    if case == "mask size":
        save_gray(folder / "mask_1.png", size=16)
        return "mask_1.png is 16x16 but image.png is 32x32"
    if case == "parsing size":
        save_gray(folder / "parsing_2.png", size=16, value=3)
        return "parsing_2.png is 16x16 but image.png is 32x32"
    if case == "parsing class":
        save_gray(folder / "parsing_1.png", value=25)
        return "parsing_1.png"
    if case == "parsing missing":
        (folder / "parsing_1.png").unlink()
        return "parsing_1.png"
    if case == "parsing extra":
        save_gray(folder / "parsing_3.png", value=1)
        return "parsing_3.png"
    if case == "empty mask":
        save_gray(folder / "mask_2.png", value=127)  # 127 is not inside
        return "mask_2.png is empty"
    for bad in ("mask_x.png", "mask_01.png", "mask.png", "mask_0.png", "mask_1.jpg"):
        if case == bad:
            save_gray(folder / bad)
            return bad
    if case == "mask gap":
        (folder / "mask_2.png").rename(folder / "mask_3.png")
        return "mask_2.png is missing"
    if case == "no masks":
        for path in folder.glob("mask_*.png"):
            path.unlink()
        return "mask_1.png"
    for ids in ([], [0], [3], [1, 1], ["1"], {"1": 1}):
        if case == f"erase {ids}":
            (folder / "erase.json").write_text(json.dumps(ids))
            return "erase.json"
    if case == "keypoints 16x3":
        (folder / "keypoints.json").write_text(json.dumps({"1": [[0, 0, 1]] * 16}))
        return "keypoints.json"
    if case == "keypoints 17x2":
        (folder / "keypoints.json").write_text(json.dumps({"1": [[0, 0]] * 17}))
        return "keypoints.json"
    if case == "keypoints person 3":
        (folder / "keypoints.json").write_text(json.dumps({"3": [[0, 0, 1]] * 17}))
        return "keypoints.json"
    if case == "occlusion length":
        (folder / "occlusion.json").write_text(json.dumps([1.0, 2.0, 3.0]))
        return "occlusion.json"
    if case == "plate size":
        Image.new("RGB", (16, 16)).save(folder / "plate.png")
        return "plate.png is 16x16 but image.png is 32x32"
    if case == "person layer not RGBA":
        Image.new("RGB", (SIZE, SIZE)).save(folder / "person_1.png")
        Image.new("RGBA", (SIZE, SIZE)).save(folder / "person_2.png")
        return "person_1.png"
    if case == "person layer missing":
        Image.new("RGBA", (SIZE, SIZE)).save(folder / "person_1.png")
        return "person_2.png is missing"
    if case == "scene not an object":
        (folder / "scene.json").write_text(json.dumps(["textured"]))
        return "scene.json"
    if case == "occlusion not numbers":
        (folder / "occlusion.json").write_text(json.dumps(["near", "far"]))
        return "occlusion.json"
    raise AssertionError(case)


CASES = ["unreadable image", "no image", "unreadable mask", "unreadable erase.json", "unreadable keypoints.json",
         "target size", "mask size", "parsing size", "parsing class", "parsing missing", "parsing extra",
         "empty mask", "mask_x.png", "mask_01.png", "mask.png", "mask_0.png", "mask_1.jpg", "mask gap", "no masks",
         "erase []", "erase [0]", "erase [3]", "erase [1, 1]", "erase ['1']", "erase {'1': 1}",
         "keypoints 16x3", "keypoints 17x2", "keypoints person 3", "occlusion length", "occlusion not numbers",
         "plate size", "person layer not RGBA", "person layer missing", "scene not an object"]


@pytest.mark.parametrize("case", CASES)
def test_bad_sample_names_the_file(sample_dir, case):
    read_sample(sample_dir, require_target=True)  # valid before the damage
    expected = break_sample(sample_dir, case)
    with pytest.raises(DataError) as error:
        read_sample(sample_dir)
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_list_samples(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        list_samples(tmp_path / "absent")
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match="holds no sample folder"):
        list_samples(tmp_path)
    for name in ("b", "a", ".a.123-abc.tmp"):
        write_sample(tmp_path / name, hand_sample())
    (tmp_path / "c.png").write_bytes(b"")
    assert [p.name for p in list_samples(tmp_path)] == ["a", "b"]


def test_write_refuses_to_overwrite(sample_dir):
    with pytest.raises(DataError, match="already exists"):
        write_sample(sample_dir, hand_sample())


def test_write_refuses_a_bad_sample(tmp_path):
    sample = hand_sample()
    sample.erase = [3]
    with pytest.raises(DataError, match="erase"):
        write_sample(tmp_path / "s", sample)
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    save = Image.Image.save
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(DataError, match="disk full"):
        write_sample(tmp_path / "out" / "s", hand_sample())
    assert len(calls) == 2
    assert list((tmp_path / "out").iterdir()) == []  # no sample folder and no temporary left


# ------------------------------------------------------------------ cut-out compositing


def make_cutouts(folder, count=2):
    """RGBA people: an opaque ellipse with a head, and fully transparent around them."""
    folder.mkdir()
    ys, xs = np.mgrid[0:40, 0:16]
    body = ((xs - 7.5) / 7) ** 2 + ((ys - 26) / 13) ** 2 <= 1
    head = (xs - 7.5) ** 2 + (ys - 6) ** 2 <= 25
    for i in range(count):
        rgba = np.zeros((40, 16, 4), np.uint8)
        rgba[..., :3] = (200 - 80 * i, 40 + 80 * i, 90)
        rgba[..., 3] = (body | head) * 255
        Image.fromarray(rgba, "RGBA").save(folder / f"person_{i}.png")
    return sorted(folder.iterdir())


def make_backgrounds(folder, count=2):
    folder.mkdir()
    for i in range(count):
        gradient = np.linspace(0, 255, 48 * 60 * 3).reshape(48, 60, 3).astype(np.uint8)
        Image.fromarray(np.roll(gradient, 40 * i, axis=2)).save(folder / f"bg_{i}.jpg")
    return sorted(folder.iterdir())


def test_cutout_sample(tmp_path):
    cutouts, backgrounds = make_cutouts(tmp_path / "people"), make_backgrounds(tmp_path / "bg")
    several = 0
    for seed in range(8):
        s = cutout_sample(seed, cutouts, backgrounds, size=SIZE)
        assert fields_equal(s, cutout_sample(seed, cutouts, backgrounds, size=SIZE))
        P = len(s.masks)
        several += P >= 2
        assert s.image.shape == s.target.shape == (3, SIZE, SIZE)
        assert s.keypoints is None and s.parsing is None and len(s.occlusion_order) == P
        assert s.masks.flatten(1).any(1).all() and s.masks.sum(0).max() <= 1
        erased = erased_union(s)
        # Resizing softens the alpha edge: a pixel-wide fringe of an erased person lies outside its mask.
        fringe = torch.nn.functional.max_pool2d(erased[None].float(), 5, stride=1, padding=2)[0] > 0
        assert torch.equal(s.image[:, ~fringe], s.target[:, ~fringe])
        assert ((s.image - s.target).abs().amax(0)[erased] > 1 / 255).float().mean() > 0.5
        check_layer_targets(s, 1e-6)  # cut-outs are amodal by construction
    assert several >= 4


def test_cutout_errors_name_the_file(tmp_path):
    make_cutouts(tmp_path / "people")
    backgrounds = make_backgrounds(tmp_path / "bg")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="does not exist"):
        synthesize(out, 1, cutouts_dir=tmp_path / "absent", backgrounds_dir=tmp_path / "bg", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        synthesize(out, 1, cutouts_dir=tmp_path / "people", backgrounds_dir=tmp_path / "empty", progress=False)
    with pytest.raises(DataError, match="both"):
        synthesize(out, 1, cutouts_dir=tmp_path / "people", progress=False)
    Image.new("RGB", (16, 40)).save(tmp_path / "people" / "opaque.png")
    with pytest.raises(DataError, match="opaque.png.*alpha"):
        synthesize(out, 1, cutouts_dir=tmp_path / "people", backgrounds_dir=tmp_path / "bg", progress=False)
    with pytest.raises(DataError, match="opaque.png.*alpha"):
        cutout_sample(0, [tmp_path / "people" / "opaque.png"], backgrounds, size=SIZE)
    assert not out.exists() or list(out.iterdir()) == []


def test_synthesize_cutouts(tmp_path):
    make_cutouts(tmp_path / "people"), make_backgrounds(tmp_path / "bg")
    written = synthesize(tmp_path / "out", 3, size=SIZE, cutouts_dir=tmp_path / "people",
                         backgrounds_dir=tmp_path / "bg", progress=False)
    assert [p.name for p in written] == ["sample_00000", "sample_00001", "sample_00002"]
    assert all(read_sample(p, require_target=True).parsing is None for p in written)


# ------------------------------------------------------------------ synthesize and the synth command


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_synthesize_skips_existing_and_does_not_depend_on_them(tmp_path):
    full = synthesize(tmp_path / "full", 4, seed=3, size=SIZE, progress=False)
    assert len(full) == 4
    partial = tmp_path / "partial"
    assert len(synthesize(partial, 2, seed=3, size=SIZE, progress=False)) == 2
    first = folder_bytes(partial / "sample_00001")
    (partial / "sample_00000").rename(tmp_path / "moved")
    written = synthesize(partial, 4, seed=3, size=SIZE, progress=False)
    assert [p.name for p in written] == ["sample_00000", "sample_00002", "sample_00003"]
    assert folder_bytes(partial / "sample_00001") == first
    for name in ("sample_00000", "sample_00001", "sample_00002", "sample_00003"):
        assert folder_bytes(partial / name) == folder_bytes(tmp_path / "full" / name)
    other = synthesize(tmp_path / "other", 1, seed=4, size=SIZE, progress=False)
    assert folder_bytes(other[0]) != folder_bytes(tmp_path / "full" / "sample_00000")


def parse(argv):
    parser = argparse.ArgumentParser()
    synth.add_synth_arguments(parser)
    return parser.parse_args(argv)


def test_run_synth(tmp_path, capsys):
    args = parse(["--out", str(tmp_path / "d"), "--count", "3", "--size", "32", "--seed", "1", "--max-people", "2"])
    assert (args.count, args.size, args.seed, args.max_people) == (3, 32, 1, 2)
    assert run_synth(args) == 0
    assert run_synth(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"wrote 3 procedural samples to {tmp_path / 'd'} (0 already there)",
                     f"wrote 0 procedural samples to {tmp_path / 'd'} (3 already there)"]
    samples = list_samples(tmp_path / "d")
    assert len(samples) == 3
    assert all(len(read_sample(p, require_target=True).masks) <= 2 for p in samples)


def test_synth_arguments_defaults_and_errors(tmp_path):
    args = parse(["--out", "x"])
    assert (args.count, args.seed, args.size, args.max_people, args.cutouts, args.backgrounds, args.scene) == \
        (64, 0, 128, 3, None, None, "mixed")
    assert parse(["--out", "x", "--scene", "occluded"]).scene == "occluded"
    with pytest.raises(SystemExit):
        parse(["--out", "x", "--scene", "foggy"])
    with pytest.raises(SystemExit):
        parse([])  # --out is required
    with pytest.raises(DataError, match="--cutouts and --backgrounds"):
        run_synth(parse(["--out", str(tmp_path / "d"), "--cutouts", str(tmp_path)]))
    for flags, message in ((["--size", "30"], "multiple of 8"), (["--count", "0"], "count"),
                           (["--max-people", "0"], "max_people"), (["--seed", "-1"], "seed")):
        with pytest.raises(DataError, match=message):
            run_synth(parse(["--out", str(tmp_path / "d")] + flags))
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ scene kinds


def hidden_by_erased(sample) -> float:
    """The largest fraction of a kept person's amodal silhouette that erased people cover."""
    P = len(sample.masks)
    silhouettes = sample.people[:, 3] > 0.5
    erased = torch.zeros_like(silhouettes[0])
    for i in sample.erase:
        erased |= silhouettes[i - 1]
    kept = [i for i in range(P) if i + 1 not in sample.erase]
    return max((float((silhouettes[k] & erased).sum() / silhouettes[k].sum()) for k in kept), default=0.0)


def test_occluded_scenes_hide_a_kept_person_behind_an_erased_one():
    for seed in range(20):
        sample = procedural_sample(seed, size=64, kind="occluded")
        assert sample.scene == {"kind": "occluded"} and len(sample.masks) >= 2
        check_layer_targets(sample, 1e-6)
        assert hidden_by_erased(sample) >= synth.MIN_HIDDEN_FRACTION
    mixed = [hidden_by_erased(procedural_sample(seed, size=64)) >= 0.3 for seed in range(20)]
    assert sum(mixed) < 20  # the default mix is not all like that


def test_textured_scenes_draw_strong_textures_at_any_orientation():
    scenes = [procedural_sample(seed, size=64, kind="textured").scene for seed in range(24)]
    assert {scene["texture"] for scene in scenes} == set(synth.STRONG_TEXTURES)
    assert all(0.2 <= scene["amplitude"] <= 0.5 and 6 <= scene["period"] <= 30 for scene in scenes)
    angles = [scene["angle"] for scene in scenes]
    assert min(angles) < 0.8 and max(angles) > 2.3  # not only axis-aligned
    stripes = procedural_sample(next(i for i, s in enumerate(scenes) if s["texture"] == "stripes"), size=64,
                                kind="textured")
    plate = stripes.plate.mean(0)
    assert (plate - torch.nn.functional.avg_pool2d(plate[None, None], 9, 1, 4)[0, 0]).abs().mean() > 0.01


def test_synthesize_takes_the_scene_kinds_in_turn_and_writes_scene_json(tmp_path):
    written = synthesize(tmp_path / "all", len(synth.SCENE_KINDS), seed=1, size=SIZE, progress=False, scene="all")
    kinds = [read_sample(folder).scene["kind"] for folder in written]
    assert kinds == list(synth.SCENE_KINDS)
    assert json.loads((written[1] / "scene.json").read_text())["kind"] == "textured"
    with pytest.raises(DataError, match="scene must be one of"):
        synthesize(tmp_path / "bad", 1, size=SIZE, progress=False, scene="foggy")
    with pytest.raises(DataError, match="kind: must be one of"):
        procedural_sample(0, kind="foggy")
    make_cutouts(tmp_path / "people"), make_backgrounds(tmp_path / "bg")
    with pytest.raises(DataError, match="cut-out compositing takes none"):
        synthesize(tmp_path / "c", 1, size=SIZE, cutouts_dir=tmp_path / "people", backgrounds_dir=tmp_path / "bg",
                   progress=False, scene="occluded")
