"""`mild eval`: MILD against simpler erasers on paired data (photo, person masks, truth).

Every method erases the same people from the same photo; each result is scored against
the truth over the erased region, the union of the erased people's masks (outside it
the truth is the photo, so pixels there would only dilute the differences):

- ``mild``: the MILDPipeline itself.
- ``single-layer``: plain inpainting, ``MILDPipeline(..., single_layer=True)``: one pass over
  the dilated erased union with MILD's background prompt, no adapter, no SMA, no HMG. It runs
  the baseline pipeline: for the tiny model, the single-layer model trained with MILD's
  architecture, steps and data (``tiny_single.safetensors``); for a real model, its own base
  UNet. What the layers add over plain inpainting.
- ``telea``: OpenCV's Telea inpainting over the dilated erased union (no learning at all).
- ``input``: the photo unchanged, the floor.

Metrics: masked PSNR and SSIM, and LPIPS when the ``lpips`` package and its AlexNet
weights are already on this machine (nothing is downloaded). Samples with layer targets
(the kept people's amodal silhouettes, mild.data) also split the erased region by kind:
``psnr_background`` over its background-only pixels and ``psnr_hidden`` over the parts of
kept people that the erased ones hid, and ``iou_hidden``: the IoU, inside the repainted
region, of each kept person's completed silhouette (the pixels whose colour is nearer the
person's true appearance than the true plate's) with the true amodal silhouette. Textured scenes (scene.json's amplitude) are also
reported by texture amplitude. Each mean comes with a 95% bootstrap interval over the
samples. MILD's CAG per layer is reported beside them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import DataError, list_samples, read_sample
from .layers import default_dilation, dilate

METHODS = ("mild", "single-layer", "telea", "input")
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's file name in the torch hub cache
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # (K * L)^2 with L = 1 for images in [0, 1]
AMPLITUDE_BINS = ((0.2, 0.3), (0.3, 0.4), (0.4, 0.51))  # textured scenes' amplitudes lie in [0.2, 0.5]


# ------------------------------------------------------------------ metrics
def _inside(mask: torch.Tensor) -> torch.Tensor:
    inside = mask > 0.5
    if not inside.any():
        raise ValueError("mask: empty; a masked metric needs at least one pixel")
    return inside


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (peak 1.0) over the masked pixels of every channel; inf when they are identical.

    pred, target: (C, H, W) in [0, 1]; mask: (H, W), > 0.5 counts as inside.
    """
    inside = _inside(mask)
    error = (pred.double() - target.double())[:, inside]
    mse = error.square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def kept_people(sample) -> list[int]:
    """The people (counted from 0) that the sample does not erase."""
    erase = set(sample.erase or range(1, len(sample.masks) + 1))
    return [i for i in range(len(sample.masks)) if i + 1 not in erase]


def pixel_kinds(sample, erased: torch.Tensor) -> dict:
    """{"background": (H, W), "hidden": (H, W)} {0, 1} splits of the erased region: pixels no kept
    person covers, and the kept people's hidden parts (their amodal silhouettes inside the region).
    Empty without the sample's layer targets."""
    if sample.people is None:
        return {}
    kept = kept_people(sample)
    covered = (sample.people[kept, 3] > 0.5).any(0) if kept else torch.zeros_like(erased, dtype=torch.bool)
    inside = erased > 0.5
    return {"background": (inside & ~covered).float(), "hidden": (inside & covered).float()}


def mean_interval(values, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple:
    """(mean, low, high, n) of the finite values: a percentile bootstrap interval of the mean
    (fixed seed: the same values give the same interval). NaNs when there is no finite value."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return math.nan, math.nan, math.nan, 0
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, len(finite), (resamples, len(finite)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(finite.mean()), float(low), float(high), len(finite)


def _gaussian_window(device) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    window = torch.exp(-offsets.square() / (2 * SSIM_SIGMA ** 2))
    return window / window.sum()


def ssim_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(C, H, W) SSIM of every pixel and channel (Wang et al. 2004, Gaussian window).

    The local statistics are Gaussian-weighted means over a reflect-padded image, so the
    map has the image's size and any pixel can be read, borders included.
    """
    x, y = pred.double()[:, None], target.double()[:, None]  # channels as a batch
    window = _gaussian_window(x.device)
    pad = SSIM_WINDOW // 2

    def local_mean(image):  # separable: rows, then columns
        image = F.pad(image, (pad, pad, pad, pad), mode="reflect")
        image = F.conv2d(image, window.view(1, 1, 1, -1))
        return F.conv2d(image, window.view(1, 1, -1, 1))

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.square()
    var_y = local_mean(y * y) - mu_y.square()
    cov = local_mean(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / \
        ((mu_x.square() + mu_y.square() + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return ssim[:, 0]


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """SSIM computed on the full image per channel, averaged over the masked pixels and channels."""
    inside = _inside(mask)
    return ssim_map(pred, target)[:, inside].mean().item()


def lpips_metric():
    """A masked LPIPS (AlexNet) function, or None unless ``lpips`` imports and the backbone's
    weights are already in the torch hub cache: evaluation never downloads anything."""
    try:
        import lpips
    except Exception:  # not installed, or torchvision missing under it
        return None
    if not (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS).is_file():
        return None
    model = lpips.LPIPS(net="alex", spatial=True, verbose=False).eval()

    @torch.no_grad()
    def masked_lpips(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
        inside = _inside(mask)
        distance = model(pred[None].float(), target[None].float(), normalize=True)[0, 0]  # (H, W)
        return distance[inside].mean().item()

    return masked_lpips


# ------------------------------------------------------------------ methods
def erased_union(masks: torch.Tensor, erase: list[int] | None) -> torch.Tensor:
    """(H, W) {0, 1}: the union of the erased people's masks (ids from 1; None = everyone)."""
    chosen = masks if erase is None else masks[[i - 1 for i in erase]]
    return (chosen > 0.5).any(0).float()


def inpaint_region(erased: torch.Tensor) -> torch.Tensor:
    """(H, W) {0, 1}: the erased union dilated as MILDPipeline dilates it by default, so that
    every method repaints the same pixels."""
    H, W = erased.shape
    return (dilate(erased, default_dilation(H, W)) > 0).float()


def paste(result: torch.Tensor, photo: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The photo with ``result`` inside the {0, 1} region: only the region may differ."""
    return torch.where(region > 0, result.to(photo.dtype), photo)


def telea(photo: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """OpenCV's Telea inpainting of the region (radius 3), on the 8-bit photo."""
    pixels = (photo.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    hole = (region > 0).to(torch.uint8).numpy()
    import cv2  # here, so that only `mild eval` needs OpenCV

    filled = cv2.inpaint(np.ascontiguousarray(pixels), hole, 3, cv2.INPAINT_TELEA)
    return paste(torch.from_numpy(filled).permute(2, 0, 1).float() / 255, photo, region)


def completed_silhouette_iou(result: torch.Tensor, sample, person: int, region: torch.Tensor) -> float:
    """IoU, inside ``region``, of kept person ``person``'s (from 0) silhouette as ``result``
    draws it with the true amodal silhouette: a pixel is the person's when its colour is
    nearer the person's true appearance than the true plate's (method-independent: it asks
    only what the image shows). NaN when the person has no amodal pixel in the region."""
    inside = region > 0.5
    truth = (sample.people[person, 3] > 0.5) & inside
    if not truth.any():
        return math.nan
    to_person = (result - sample.people[person, :3]).square().sum(0)
    to_plate = (result - sample.plate).square().sum(0)
    drawn = (to_person < to_plate) & inside
    return float((drawn & truth).sum() / (drawn | truth).sum())


def hidden_iou(result: torch.Tensor, sample, region: torch.Tensor) -> float:
    """The mean ``completed_silhouette_iou`` over the kept people hidden in the region, or NaN."""
    if sample.people is None or sample.plate is None:
        return math.nan
    hidden = [i for i in kept_people(sample) if ((sample.people[i, 3] > 0.5) & (sample.masks[i] <= 0.5) & (region > 0.5)).any()]
    return _finite_mean(completed_silhouette_iou(result, sample, i, region) for i in hidden)


def _finite_mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def cag_rows(name: str, out) -> list[dict]:
    """One row per MILD layer: its CAG averaged over the attention resolutions."""
    return [{"sample": name, "layer": index, "domain": list(layer.domain),
             "cag": _finite_mean(float(v) for v in out.cag.get(index, {}).values())}
            for index, layer in enumerate(out.plan.layers)]


# ------------------------------------------------------------------ report
@dataclasses.dataclass
class EvalReport:
    rows: list[dict]  # one per (sample, method): {"sample", "method", "psnr", "ssim", ["lpips"]}
    cag: list[dict]  # one per (sample, layer): {"sample", "layer", "domain", "cag"}
    notes: list[str] = dataclasses.field(default_factory=list)  # methods skipped, and why

    @property
    def metrics(self) -> list[str]:
        optional = ("lpips", "psnr_background", "psnr_hidden", "iou_hidden")
        return ["psnr", "ssim"] + [m for m in optional if any(m in row for row in self.rows)]

    def summary(self) -> list[dict]:
        """Per method, in the order they ran: every metric's mean over the samples where it is
        finite, its 95% bootstrap interval (``<metric>_low``/``_high``) and count (``_n``)."""
        methods = list(dict.fromkeys(row["method"] for row in self.rows))
        summary = []
        for method in methods:
            rows = [row for row in self.rows if row["method"] == method]
            entry = {"method": method}
            for metric in self.metrics:
                mean, low, high, n = mean_interval(row.get(metric, math.nan) for row in rows)
                entry.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high, f"{metric}_n": n})
            summary.append({**entry, "samples": len(rows)})
        return summary

    def amplitude_summary(self) -> list[dict]:
        """Textured scenes (scene.json's amplitude) by texture amplitude: per bin and method the
        erased-region PSNR's mean, 95% interval and count."""
        summary = []
        for low, high in AMPLITUDE_BINS:
            rows = [row for row in self.rows if low <= row.get("amplitude", -1) < high]
            for method in dict.fromkeys(row["method"] for row in rows):
                mean, lo, hi, n = mean_interval(row["psnr"] for row in rows if row["method"] == method)
                summary.append({"amplitude": f"{low:.1f}-{min(high, 0.5):.1f}", "method": method, "psnr": mean,
                                "psnr_low": lo, "psnr_high": hi, "samples": n})
        return summary

    def cag_summary(self) -> list[dict]:
        """Per layer index: the mean CAG over the samples that have that layer."""
        layers = sorted({row["layer"] for row in self.cag})
        return [{"layer": layer, "cag": _finite_mean(row["cag"] for row in self.cag if row["layer"] == layer),
                 "samples": sum(row["layer"] == layer for row in self.cag)} for layer in layers]

    def markdown(self) -> str:
        summary = self.summary()
        headers = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓",
                   "psnr_background": "background-only PSNR ↑", "psnr_hidden": "hidden-person PSNR ↑",
                   "iou_hidden": "hidden-person silhouette IoU ↑"}
        finite = {m: [row[m] for row in summary if math.isfinite(row[m])] for m in self.metrics}
        best = {m: (min if m == "lpips" else max)(values) for m, values in finite.items() if values}
        lines = ["| method | " + " | ".join(headers[m] for m in self.metrics) + " | samples |",
                 "|---|" + "---:|" * (len(self.metrics) + 1)]
        for row in summary:
            cells = []
            for m in self.metrics:
                digits = 2 if m.startswith("psnr") else 4
                cell = f"{row[m]:.{digits}f} [{row[m + '_low']:.{digits}f}, {row[m + '_high']:.{digits}f}]"
                if not math.isfinite(row[m]):
                    cell = "–"
                elif row[m] == best.get(m) and len(summary) > 1:
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['samples']} |")
        lines += ["", "Metrics over the erased people's masks, against the truth: means over the samples with 95% "
                  "bootstrap intervals. Background-only and hidden-person PSNR split that region by the kept "
                  "people's amodal silhouettes (samples with layer targets only); the silhouette IoU compares, in the "
                  "repainted region, the pixels each method draws in a hidden person's colour with their true "
                  "amodal silhouette."]
        if "lpips" not in self.metrics:
            lines.append("LPIPS: unavailable (no local weights)")
        by_amplitude = self.amplitude_summary()
        if by_amplitude:
            lines += ["", "Textured scenes by texture amplitude (erased-region PSNR):", "",
                      "| amplitude | method | PSNR (dB) | samples |", "|---|---|---:|---:|"]
            lines += [f"| {row['amplitude']} | {row['method']} | {row['psnr']:.2f} [{row['psnr_low']:.2f}, "
                      f"{row['psnr_high']:.2f}] | {row['samples']} |" for row in by_amplitude]
            lines.append("")
        layers = self.cag_summary()
        if layers:
            lines.append("CAG per MILD layer (mean over samples and resolutions; layer 0 is the background): " +
                         ", ".join(f"layer {row['layer']}: {row['cag']:.4f} ({row['samples']} samples)"
                                   for row in layers))
        lines += self.notes
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ evaluation
def evaluate(pipe, samples: list, *, steps: int | None = None, guidance: float | None = None, seed: int = 0, methods=METHODS,
             progress: bool = True, baseline=None) -> tuple[EvalReport, dict]:
    """Run every method on every sample and score it against the sample's target.

    ``baseline``: the pipeline the single-layer method runs (default ``pipe`` itself: its base UNet).
    ``steps``: denoising steps of both diffusion methods (None: each pipeline's ``default_steps``).

    Returns the report and {sample name: {method: (3, H, W) result in [0, 1]}} for figures.
    Each method gets a fresh generator seeded with ``seed`` on every sample, so a result
    does not depend on which other samples or methods ran.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
    names = [sample.name for sample in samples]
    if len(set(names)) != len(names):
        raise ValueError("samples: names must be unique, the results are keyed by them")
    methods = list(methods)
    guidance = pipe.default_guidance_scale if guidance is None else guidance  # one scale for both diffusion methods
    notes = []
    baseline = pipe if baseline is None else baseline
    for model in (pipe, baseline):
        model.set_progress_bar_config(disable=True)
    masked_lpips = lpips_metric()

    rows, cag, results = [], [], {}
    for sample in tqdm(samples, desc="mild eval", unit="sample", disable=not progress):
        if sample.target is None:
            raise DataError(f"{sample.name}: no target image to score against")
        photo, target = sample.image.float(), sample.target.float()
        erased = erased_union(sample.masks, sample.erase)
        region = inpaint_region(erased)
        outputs = {}
        for method in methods:
            generator = torch.Generator().manual_seed(seed)
            if method == "mild":
                out = pipe(photo, sample.masks, erase=sample.erase, keypoints=sample.keypoints,
                           parsing=sample.parsing, occlusion_order=sample.occlusion_order,
                           num_inference_steps=steps, guidance_scale=guidance, generator=generator)
                outputs[method] = out.image.float().cpu()
                cag += cag_rows(sample.name, out)
            elif method == "single-layer":
                outputs[method] = baseline(photo, sample.masks, erase=sample.erase, num_inference_steps=steps,
                                           guidance_scale=guidance, generator=generator,
                                           single_layer=True).image.float().cpu()
            elif method == "telea":
                outputs[method] = telea(photo, region)
            else:
                outputs[method] = photo.clone()
        kinds = pixel_kinds(sample, erased)
        for method, result in outputs.items():
            row = {"sample": sample.name, "method": method, "psnr": masked_psnr(result, target, erased),
                   "ssim": masked_ssim(result, target, erased)}
            if masked_lpips is not None:
                row["lpips"] = masked_lpips(result, target, erased)
            for kind, pixels in kinds.items():
                row[f"psnr_{kind}"] = masked_psnr(result, target, pixels) if pixels.any() else math.nan
            if kinds:
                row["iou_hidden"] = hidden_iou(result, sample, region)
            if sample.scene and "amplitude" in sample.scene:
                row["amplitude"] = float(sample.scene["amplitude"])
            rows.append(row)
        results[sample.name] = outputs
    return EvalReport(rows, cag, notes), results


def example_figure(samples: list, results: dict, path, max_rows: int = 4) -> None:
    """A grid, one sample a row: the photo with the erased people outlined, the truth, then
    every method's result titled with its masked PSNR."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    shown = [sample for sample in samples if sample.name in results][:max_rows]
    if not shown:
        raise ValueError("example_figure: no sample has results")
    methods = list(results[shown[0].name])
    columns = 2 + len(methods)
    figure = Figure(figsize=(2.2 * columns, 2.4 * len(shown)), layout="constrained")
    axes = figure.subplots(len(shown), columns, squeeze=False)

    def show(ax, image, title):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])

    for row, sample in zip(axes, shown):
        erased = erased_union(sample.masks, sample.erase)
        show(row[0], sample.image, f"{sample.name}\ninput")
        row[0].contour(erased.numpy(), levels=[0.5], colors="red", linewidths=1)
        show(row[1], sample.target, "target")
        for ax, method in zip(row[2:], methods):
            result = results[sample.name][method]
            show(ax, result, f"{method}\nPSNR {masked_psnr(result, sample.target, erased):.2f} dB")
    figure.savefig(path, dpi=100)


# ------------------------------------------------------------------ command line
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_eval_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="a folder of paired samples (each with a target image)")
    parser.add_argument("--out", default="eval_out", help="where eval.csv, eval.json, eval.md and examples.png go")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="denoising steps of the diffusion methods (default: each model's own)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's; 7.5 for SD)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every method's generator, per sample")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which methods to compare (default: all)")


def _json_number(value):
    """JSON has no inf or NaN: write them as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _json_rows(rows: list[dict]) -> list[dict]:
    return [{key: _json_number(value) for key, value in row.items()} for row in rows]


def run_eval(args, pipe) -> int:
    """`mild eval`: score the methods on --data and write the tables and a figure to --out."""
    folders = list_samples(args.data)
    if args.limit is not None:
        folders = folders[:args.limit]
    samples = [read_sample(folder, require_target=True) for folder in folders]
    guidance = pipe.default_guidance_scale if args.guidance is None else args.guidance
    baseline = None
    if getattr(args, "tiny", False) and "single-layer" in args.methods:  # the equal-budget single-layer model
        from .pipeline import MILDPipeline

        baseline = MILDPipeline.tiny(weights="single-layer", backend=pipe.backend).to(pipe.device)
    report, results = evaluate(pipe, samples, steps=args.steps, guidance=guidance, seed=args.seed,
                               methods=args.methods, baseline=baseline)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.csv", "w", newline="") as file:
        extra = ["amplitude"] if any("amplitude" in row for row in report.rows) else []
        writer = csv.DictWriter(file, fieldnames=["sample", "method", *report.metrics, *extra])
        writer.writeheader()
        writer.writerows(report.rows)
    steps = pipe.default_steps if args.steps is None else args.steps
    settings = {"data": str(args.data), "samples": len(samples), "limit": args.limit, "steps": steps,
                "guidance": guidance, "seed": args.seed, "methods": list(args.methods)}
    (out / "eval.json").write_text(json.dumps(
        {"settings": settings, "summary": _json_rows(report.summary()), "rows": _json_rows(report.rows),
         "cag": _json_rows(report.cag), "cag_summary": _json_rows(report.cag_summary()),
         "by_amplitude": _json_rows(report.amplitude_summary()), "notes": report.notes},
        indent=2, allow_nan=False) + "\n")
    markdown = report.markdown()
    (out / "eval.md").write_text(markdown)
    example_figure(samples, results, out / "examples.png")
    print(markdown, end="")
    print(f"mild eval: wrote eval.csv, eval.json, eval.md and examples.png to {out}")
    return 0
