"""`mild eval`: the masked metrics against direct formulas, the baselines, and the report files."""

import argparse
import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from mild import MILDPipeline, plan_layers
from mild.data import DataError
from mild.synth import procedural_sample, synthesize
from mild.evaluate import (ALEXNET_WEIGHTS, METHODS, EvalReport, add_eval_arguments, erased_union, evaluate,
                           inpaint_region, lpips_metric, masked_psnr, masked_ssim, mean_interval, pixel_kinds,
                           run_eval, telea)

SIZE, STEPS = 64, 2


@pytest.fixture(scope="module")
def tiny_pipe():
    # Random weights (nothing to load); the torch backend, since the kernels are tested elsewhere.
    return MILDPipeline.tiny(seed=0, weights=None, backend="torch")


@pytest.fixture(scope="module")
def samples():
    return [procedural_sample(seed, size=SIZE) for seed in (1, 2)]


@pytest.fixture(scope="module")
def evaluated(tiny_pipe, samples):
    return evaluate(tiny_pipe, samples, steps=STEPS, progress=False)


def random_mask(size, generator):
    mask = (torch.rand(size, size, generator=generator) > 0.6).float()
    mask[0, 0] = 1  # never empty
    return mask


# ------------------------------------------------------------------ metrics
def test_psnr_matches_float64_formula():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 16, 16, generator=generator), torch.rand(3, 16, 16, generator=generator)
    mask = random_mask(16, generator)
    inside = mask.numpy() > 0.5
    difference = pred.double().numpy()[:, inside] - target.double().numpy()[:, inside]
    expected = 10 * np.log10(1 / np.mean(difference ** 2))
    assert masked_psnr(pred, target, mask) == pytest.approx(expected, rel=1e-12)


def test_psnr_of_identical_images_is_inf():
    image = torch.rand(3, 8, 8)
    assert masked_psnr(image, image.clone(), torch.ones(8, 8)) == math.inf


def direct_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of every pixel, window by window in float64: Gaussian weights (11, sigma 1.5)
    over reflect-padded channels."""
    offsets = np.arange(11) - 5
    g = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        xp, yp = np.pad(x[c], 5, mode="reflect"), np.pad(y[c], 5, mode="reflect")
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                a, b = xp[i:i + 11, j:j + 11], yp[i:i + 11, j:j + 11]
                mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
                var_a = (weights * (a - mu_a) ** 2).sum()
                var_b = (weights * (b - mu_b) ** 2).sum()
                cov = (weights * (a - mu_a) * (b - mu_b)).sum()
                out[c, i, j] = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / \
                    ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return out


def test_ssim_matches_direct_float64_formula():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 12, 14, generator=generator)
    y = (x + 0.2 * torch.randn(3, 12, 14, generator=generator)).clamp(0, 1)
    mask = random_mask(12, generator)
    mask = torch.cat([mask, torch.zeros(12, 2)], 1)
    expected = direct_ssim_map(x.double().numpy(), y.double().numpy())[:, mask.numpy() > 0.5].mean()
    assert masked_ssim(x, y, mask) == pytest.approx(expected, rel=1e-9)


def test_ssim_of_constant_images_has_a_closed_form():
    # No variance anywhere: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.25, 0.75  # exact in float32
    expected = (2 * a * b + 0.01 ** 2) / (a * a + b * b + 0.01 ** 2)
    value = masked_ssim(torch.full((3, 16, 16), a), torch.full((3, 16, 16), b), torch.ones(16, 16))
    assert value == pytest.approx(expected, rel=1e-9)


def test_ssim_is_one_on_identity_symmetric_and_falls_with_noise():
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, 32, 32, generator=generator)
    noise = torch.randn(3, 32, 32, generator=generator)
    mask = random_mask(32, generator)
    slightly, badly = (image + 0.05 * noise).clamp(0, 1), (image + 0.3 * noise).clamp(0, 1)
    assert masked_ssim(image, image.clone(), mask) == pytest.approx(1.0, abs=1e-12)
    assert masked_ssim(image, badly, mask) == pytest.approx(masked_ssim(badly, image, mask), rel=1e-12)
    assert 1 > masked_ssim(image, slightly, mask) > masked_ssim(image, badly, mask)


def test_metrics_ignore_pixels_outside_the_mask():
    generator = torch.Generator().manual_seed(3)
    pred, target = torch.rand(3, 32, 32, generator=generator), torch.rand(3, 32, 32, generator=generator)
    mask = torch.zeros(32, 32)
    mask[4:12, 4:12] = 1
    changed = pred.clone()
    changed[:, 12:, :] = torch.rand(3, 20, 32, generator=generator)  # anywhere outside the mask
    assert masked_psnr(changed, target, mask) == masked_psnr(pred, target, mask)
    # SSIM windows reach 5 pixels past the mask: change only pixels farther away than that.
    far = pred.clone()
    far[:, 18:, :] = torch.rand(3, 14, 32, generator=generator)
    assert masked_ssim(far, target, mask) == pytest.approx(masked_ssim(pred, target, mask), abs=1e-12)
    assert masked_ssim(changed, target, mask) != masked_ssim(pred, target, mask)  # the window does see nearby pixels


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="mask: empty"):
        masked_psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 8), torch.zeros(8, 8))


def test_lpips_is_unavailable_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    assert lpips_metric() is None


def test_lpips_with_local_weights_averages_its_spatial_map_over_the_mask(tmp_path, monkeypatch):
    class FakeLPIPS(torch.nn.Module):  # stands in for lpips.LPIPS: a distance map of the inputs' size
        def __init__(self, net, spatial, verbose):
            super().__init__()
            assert (net, spatial) == ("alex", True)

        def forward(self, in0, in1, normalize):
            assert normalize  # our images are in [0, 1]
            return (in0 - in1).abs().mean(1, keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert lpips_metric() is None  # the package alone is not enough: the weights must be local
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ALEXNET_WEIGHTS).write_bytes(b"")
    masked_lpips = lpips_metric()
    pred, target, mask = torch.rand(3, 8, 8), torch.rand(3, 8, 8), torch.zeros(8, 8)
    mask[2:5, 3:7] = 1
    expected = (pred - target).abs().mean(0)[mask > 0].mean().item()
    assert masked_lpips(pred, target, mask) == pytest.approx(expected)


# ------------------------------------------------------------------ baselines
def test_telea_fills_the_hole_and_keeps_the_rest():
    photo = torch.zeros(3, 48, 48)
    photo[1] = torch.linspace(0.2, 0.8, 48)[None, :]  # a smooth green ramp
    photo[:, 16:32, 20:30] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]  # a magenta "person"
    masks = torch.zeros(1, 48, 48)
    masks[0, 16:32, 20:30] = 1
    region = inpaint_region(erased_union(masks, None))
    result = telea(photo, region)
    inside, outside = region > 0, region == 0
    assert torch.equal(result[:, outside], photo[:, outside])
    assert (result[:, inside] != photo[:, inside]).any(0).all()
    assert result[[0, 2]][:, masks[0] > 0].max() < 0.1  # the magenta is gone, filled from the ramp around


def single_layer_result(pipe, photo, masks, erase=None):
    return pipe(photo, masks, erase=erase, num_inference_steps=STEPS, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), single_layer=True)


def test_single_layer_repaints_only_the_dilated_union_in_one_plain_row(tiny_pipe, samples, monkeypatch):
    sample = samples[0]
    region = inpaint_region(erased_union(sample.masks, sample.erase))
    calls = []
    forward = type(tiny_pipe.unet).forward
    monkeypatch.setattr(type(tiny_pipe.unet), "forward", lambda self, sample_in, *a, **k: calls.append(
        (sample_in.shape[0], k["cross_attention_kwargs"]["region_context"])) or forward(self, sample_in, *a, **k))
    out = single_layer_result(tiny_pipe, sample.image, sample.masks, sample.erase)
    assert len(out.plan.layers) == 1 and out.layers.shape[0] == 1
    assert calls and all(rows == 1 for rows, _ in calls)  # one row; at guidance scale 1 no unconditional half
    context = calls[0][1]
    assert bool(context.allow.all()) and float(context.alpha) == 0 and float(context.beta) == 0  # plain attention
    result = out.image
    assert result.shape == sample.image.shape and result.isfinite().all()
    outside = region == 0
    assert outside.any() and torch.equal(result[:, outside], sample.image[:, outside])
    assert not torch.equal(result[:, region > 0], sample.image[:, region > 0])
    monkeypatch.undo()
    assert torch.equal(result, single_layer_result(tiny_pipe, sample.image, sample.masks, sample.erase).image)


def test_single_layer_handles_sizes_off_the_vae_grid(tiny_pipe):
    photo = torch.rand(3, 50, 46)
    masks = torch.zeros(1, 50, 46)
    masks[0, 12:28, 10:18] = 1
    result = single_layer_result(tiny_pipe, photo, masks).image
    region = plan_layers(masks, None, dilation=max(2, 46 // 32)).paste_region
    assert result.shape == (3, 50, 46)
    assert torch.equal(result[:, region == 0], photo[:, region == 0])


def test_hidden_silhouette_iou_reads_the_image_against_the_truth(samples):
    """IoU of the completed silhouette: the truth itself scores 1; the photo, where the erased
    person still stands over the hidden part, scores the visible part only."""
    from mild.evaluate import completed_silhouette_iou, hidden_iou

    sample = procedural_sample(5, size=SIZE, kind="occluded")
    region = inpaint_region(erased_union(sample.masks, sample.erase))
    assert hidden_iou(sample.target, sample, region) == 1.0
    kept = [i for i in range(len(sample.masks)) if i + 1 not in sample.erase]
    person = next(i for i in kept if ((sample.people[i, 3] > 0.5) & (sample.masks[i] < 0.5) & (region > 0)).any())
    truth = (sample.people[person, 3] > 0.5) & (region > 0.5)
    seen = (sample.masks[person] > 0.5) & (region > 0.5)
    hidden = truth & ~seen
    plate_filled = torch.where(hidden, sample.plate, sample.target)  # the hidden part painted as background
    expected = float(seen.sum() / truth.sum())
    assert completed_silhouette_iou(plate_filled, sample, person, region) == pytest.approx(expected, abs=1e-6)
    assert completed_silhouette_iou(sample.image, sample, person, region) < 1
    assert expected < 0.95


# ------------------------------------------------------------------ evaluate and the report
def test_evaluate_scores_every_method_and_reports_cag(evaluated, samples):
    report, results = evaluated
    assert [(row["sample"], row["method"]) for row in report.rows] == \
        [(sample.name, method) for sample in samples for method in METHODS]
    for row in report.rows:
        assert math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1
        assert ("lpips" in row) == (lpips_metric() is not None)
    for sample in samples:
        assert set(results[sample.name]) == set(METHODS)
        assert torch.equal(results[sample.name]["input"], sample.image)
        dilation = max(2, SIZE // 32)  # MILDPipeline's default
        plan = plan_layers(sample.masks, sample.erase, sample.occlusion_order, dilation=dilation)
        layers = [row for row in report.cag if row["sample"] == sample.name]
        assert [row["layer"] for row in layers] == list(range(len(plan.layers)))
        assert [row["domain"] for row in layers] == [layer.domain for layer in plan.layers]
        assert all(-1 <= row["cag"] <= 1 for row in layers)
    summary = {row["method"]: row for row in report.summary()}
    assert list(summary) == list(METHODS) and all(row["samples"] == 2 for row in summary.values())
    assert summary["telea"]["psnr"] == pytest.approx(
        np.mean([row["psnr"] for row in report.rows if row["method"] == "telea"]))
    assert {"psnr_background", "psnr_hidden"} <= set(report.metrics)  # procedural samples carry layer targets
    for row in summary.values():
        for metric in report.metrics:
            if row[f"{metric}_n"]:
                assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"]


def test_evaluate_is_reproducible(tiny_pipe, samples, evaluated):
    _, results = evaluated
    _, again = evaluate(tiny_pipe, samples[:1], steps=STEPS, methods=("single-layer", "mild"), progress=False)
    for method in ("mild", "single-layer"):
        assert torch.equal(again[samples[0].name][method], results[samples[0].name][method])


def test_evaluate_refuses_unknown_methods_and_missing_targets(tiny_pipe, samples):
    with pytest.raises(ValueError, match="unknown"):
        evaluate(tiny_pipe, samples, methods=("mild", "magic"), progress=False)
    no_target = procedural_sample(3, size=SIZE)
    no_target.target = None
    with pytest.raises(DataError, match="no target"):
        evaluate(tiny_pipe, [no_target], methods=("input",), progress=False)


def test_markdown_table_and_lpips_column():
    rows = [{"sample": "a", "method": "mild", "psnr": 20.0, "ssim": 0.5},
            {"sample": "a", "method": "input", "psnr": 10.0, "ssim": 0.2}]
    cag = [{"sample": "a", "layer": 0, "domain": [0], "cag": 0.25},
           {"sample": "a", "layer": 1, "domain": [2], "cag": 0.75}]
    text = EvalReport(rows, cag).markdown()
    assert "| mild | **20.00 [20.00, 20.00]** | **0.5000 [0.5000, 0.5000]** | 1 |" in text
    assert "| input | 10.00 [10.00, 10.00] | 0.2000 [0.2000, 0.2000] | 1 |" in text
    assert "LPIPS: unavailable (no local weights)" in text
    assert "layer 0: 0.2500" in text and "layer 1: 0.7500" in text
    with_lpips = EvalReport([{**row, "lpips": 0.1 * (i + 1)} for i, row in enumerate(rows)], cag).markdown()
    assert "LPIPS ↓" in with_lpips and "unavailable" not in with_lpips and "**0.1000 [0.1000, 0.1000]**" in with_lpips


def test_textured_scenes_are_reported_by_texture_amplitude():
    rows = [{"sample": f"s{i}", "method": method, "psnr": psnr + i, "ssim": 0.5, "amplitude": amplitude}
            for i, amplitude in enumerate((0.22, 0.28, 0.45)) for method, psnr in (("mild", 20.0), ("telea", 15.0))]
    rows.append({"sample": "plain", "method": "mild", "psnr": 30.0, "ssim": 0.5})  # not textured: in no bin
    report = EvalReport(rows, [])
    by_bin = {(row["amplitude"], row["method"]): row for row in report.amplitude_summary()}
    assert set(by_bin) == {("0.2-0.3", "mild"), ("0.2-0.3", "telea"), ("0.4-0.5", "mild"), ("0.4-0.5", "telea")}
    assert by_bin["0.2-0.3", "mild"]["psnr"] == pytest.approx(20.5) and by_bin["0.2-0.3", "mild"]["samples"] == 2
    assert by_bin["0.4-0.5", "telea"]["psnr"] == pytest.approx(17.0)
    assert "| 0.2-0.3 | mild | 20.50 [" in report.markdown()


def test_mean_interval_is_a_reproducible_bootstrap_of_the_mean():
    rng = np.random.default_rng(1)
    few, many = rng.normal(15, 3, 10), rng.normal(15, 3, 400)
    for values in (few, many):
        mean, low, high, n = mean_interval(list(values) + [math.nan, math.inf])  # non-finite values are left out
        assert n == len(values) and mean == pytest.approx(values.mean()) and low < mean < high
        assert mean_interval(values) == mean_interval(values)  # fixed seed
        # close to the normal approximation's half-width 1.96 s / sqrt(n)
        assert (high - low) / 2 == pytest.approx(1.96 * values.std(ddof=1) / math.sqrt(n), rel=0.35)
    assert mean_interval([])[3] == 0 and math.isnan(mean_interval([math.nan])[0])


def test_pixel_kinds_split_the_erased_region_by_the_kept_peoples_amodal_silhouettes():
    sample = procedural_sample(0, size=64)
    erased = erased_union(sample.masks, sample.erase)
    kinds = pixel_kinds(sample, erased)
    assert torch.equal(kinds["background"] + kinds["hidden"], erased)  # a partition of the region
    kept = [i for i in range(len(sample.masks)) if i + 1 not in sample.erase]
    silhouettes = (sample.people[kept, 3] > 0.5).any(0) if kept else torch.zeros(64, 64, dtype=torch.bool)
    assert torch.equal(kinds["hidden"] > 0, (erased > 0) & silhouettes)
    sample.people = None
    assert pixel_kinds(sample, erased) == {}


def eval_args(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_eval_arguments():
    args = eval_args(["--data", "d"])
    assert (args.out, args.limit, args.steps, args.guidance, args.seed, args.methods) == \
        ("eval_out", None, None, None, 0, list(METHODS))  # steps and guidance None: the model's defaults
    assert eval_args(["--data", "d", "--methods", "telea", "input"]).methods == ["telea", "input"]
    for bad in (["--methods", "magic"], ["--limit", "0"], []):
        with pytest.raises(SystemExit):
            eval_args(bad if bad == [] else ["--data", "d", *bad])


def test_run_eval_writes_the_four_files(tiny_pipe, tmp_path, capsys):
    synthesize(tmp_path / "data", 3, size=SIZE, progress=False)
    out = tmp_path / "out"
    args = eval_args(["--data", str(tmp_path / "data"), "--out", str(out), "--limit", "2", "--steps", str(STEPS)])
    assert run_eval(args, tiny_pipe) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["samples"] == 2 and report["settings"]["steps"] == STEPS
    assert len(report["rows"]) == 2 * len(METHODS) and [row["method"] for row in report["summary"]] == list(METHODS)
    assert report["cag"] and all(row["layer"] >= 0 for row in report["cag"])
    with open(out / "eval.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 2 * len(METHODS)
    markdown = (out / "eval.md").read_text()
    assert markdown.startswith("| method |") and "CAG per MILD layer" in markdown
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert markdown in printed and f"to {out}" in printed


def test_run_eval_needs_targets(tiny_pipe, tmp_path):
    synthesize(tmp_path / "data", 1, size=SIZE, progress=False)
    (tmp_path / "data" / "sample_00000" / "target.png").unlink()
    with pytest.raises(DataError, match="target"):
        run_eval(eval_args(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]), tiny_pipe)
