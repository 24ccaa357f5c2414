"""The ``mild`` command line.

    mild erase IMAGE --masks m1.png m2.png [--erase 1] -o out.png [--model DIR | --tiny]
    mild erase --input-dir D --output-dir O [--model DIR | --tiny]     (torchrun-able)
    mild synth --out D [--count N] [--cutouts C --backgrounds B]        paired training data
    mild train --data D (--model DIR | --tiny) --out CKPT [--resume]    (torchrun-able)
    mild eval --data D (--model DIR | --tiny) [--checkpoint CKPT]       against single-layer and Telea
    mild train-tiny                 rebuild the tiny MILD and single-layer models (~72 min on 2 cores)
    mild profile [profiler arguments]   benchmarks/profile_e2e.py; writes ./mild_profile (or --out)
    mild demo [--out DIR]           a built-in scene erased by the trained tiny model

Dataset layout: every sample is a folder ``D/<name>/`` holding ``image.png`` (or .jpg),
``mask_1.png``, ``mask_2.png``, ... (persons counted from 1) and optionally
``erase.json`` (a list of ids). The result goes to ``O/<name>.png``. Under torchrun each
rank takes every world_size-th sample (gloo on the CPU, nccl on GPUs); outputs are
written atomically and existing ones are skipped, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, nothing written."""


def open_image(path, mode: str, what: str):
    """The file at ``path`` converted to ``mode``; any unreadable file (decompression bombs
    included: PIL refuses headers that claim more than ~179 Mpixels) is a CLIError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CLIError(f"cannot read {what} {path}: {error}") from None


def load_image(path):
    return open_image(path, "RGB", "image")


def load_mask(path, size):
    import numpy as np

    mask = np.asarray(open_image(path, "L", "mask"), dtype=np.float32) / 255
    if mask.shape != size:
        raise CLIError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[1]}x{size[0]}")
    if not (mask > 0.5).any():
        raise CLIError(f"mask {path} is empty")
    return mask


def build_pipeline(args):
    import torch

    from .pipeline import MILDPipeline
    from .checkpoints import CheckpointError, load_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: this machine has no CUDA device (use --device cpu)")
    if args.tiny:
        pipe = MILDPipeline.tiny(seed=args.seed, backend=args.backend)
    else:
        if not args.model:
            raise CLIError("give --model DIR (a local diffusers inpainting folder) or --tiny")
        from .transformer_pipeline import transformer_kind

        model = Path(args.model)
        if not model.is_dir() or not ((model / "unet").is_dir() or transformer_kind(model)):
            raise CLIError(f"--model {model} is not a diffusers model folder (it needs unet/, vae/, text_encoder/, "
                           "tokenizer/ and scheduler/, or a FLUX.1 Fill / SD3 pipeline's model_index.json and "
                           "folders; nothing is downloaded)")
        try:
            pipe = MILDPipeline.from_pretrained(model, backend=args.backend, lora_weights=args.lora,
                                                hmg_weights=args.hmg)
        except (OSError, ValueError) as error:
            raise CLIError(f"--model {model}: {str(error).splitlines()[0]}") from None
    if args.checkpoint:
        try:
            load_checkpoint(pipe, args.checkpoint)
        except CheckpointError as error:
            raise CLIError(str(error)) from None
    pipe.compile = True if args.compile == "default" else args.compile
    pipe.to(device)
    if device == "cuda" and not args.tiny:  # FLUX and SD3 overflow fp16: they run in bf16
        pipe.to(torch.bfloat16 if hasattr(pipe, "transformer") else torch.float16)
    return pipe


def write_atomically(image, path: Path) -> None:
    from PIL import Image

    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format=image_format)
    os.replace(tmp, path)


def load_sample(image_path, mask_paths, erase):
    """(image, masks, erase), checked before any model is loaded or any file written."""
    import numpy as np

    if not mask_paths:
        raise CLIError("give at least one person mask (--masks)")
    image = load_image(image_path)
    masks = np.stack([load_mask(p, (image.height, image.width)) for p in mask_paths])
    if erase is not None and (not erase or min(erase) < 1 or max(erase) > len(mask_paths)):
        raise CLIError(f"--erase ids must lie in [1, {len(mask_paths)}] (persons counted from 1, in --masks order)")
    return image, masks, erase


def erase_sample(pipe, sample, output: Path, args, progress=True):
    import torch

    image, masks, erase = sample
    pipe.set_progress_bar_config(disable=not progress)
    try:
        result = pipe(image, masks, erase=erase, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator().manual_seed(args.seed))
    except ValueError as error:
        raise CLIError(str(error)) from None
    write_atomically(result.image, output)


MASK_NAME = re.compile(r"mask_(\d+)\.png")


def dataset_samples(input_dir: Path) -> list[str]:
    """The sample folders' names (hidden folders are not samples)."""
    return sorted(p.name for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_dataset_sample(folder: Path):
    """(image path, mask paths in person order, erase ids or None); a malformed sample is a CLIError."""
    images = [folder / f"image{s}" for s in IMAGE_SUFFIXES if (folder / f"image{s}").exists()]
    if not images:
        raise CLIError(f"no image{', image'.join(IMAGE_SUFFIXES)} in the folder")
    numbered = {}
    for path in folder.glob("mask*"):
        match = MASK_NAME.fullmatch(path.name)
        if not match:
            raise CLIError(f"{path.name}: mask files must be named mask_<n>.png (persons counted from 1)")
        numbered[int(match.group(1))] = path
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise CLIError(f"masks are numbered {sorted(numbered)}; they must be mask_1.png .. mask_{len(numbered)}.png")
    erase, erase_file = None, folder / "erase.json"
    if erase_file.exists():
        try:
            erase = json.loads(erase_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CLIError(f"erase.json: cannot read it: {error}") from None
        if not (isinstance(erase, list) and all(type(i) is int for i in erase)):
            raise CLIError(f"erase.json: must be a list of person ids (integers), got {json.dumps(erase)[:80]}")
    return images[0], [numbered[i] for i in sorted(numbered)], erase


def run_dataset(args):
    from tqdm import tqdm

    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.is_dir():
        raise CLIError(f"--input-dir {input_dir} is not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    from .distributed import distributed_rank

    rank, world = distributed_rank()
    samples = dataset_samples(input_dir)[rank::world]
    todo = [name for name in samples if not (output_dir / f"{name}.png").exists()]
    pipe = build_pipeline(args) if todo else None
    failures = 0
    for name in tqdm(todo, desc=f"rank {rank}/{world}", unit="image", position=rank):
        try:  # a bad sample is reported and skipped; the others still run
            sample = load_sample(*read_dataset_sample(input_dir / name))
            erase_sample(pipe, sample, output_dir / f"{name}.png", args, progress=False)
        except CLIError as error:
            failures += 1
            tqdm.write(f"mild: {name}: {error}", file=sys.stderr)  # above the bar, not onto its line
        except Exception as error:  # an input nothing checked for still costs one sample, not the run
            failures += 1
            tqdm.write(f"mild: {name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                       file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    print(f"rank {rank}: {len(todo) - failures} written, {len(samples) - len(todo)} already done, {failures} failed")
    return 1 if failures else 0


def add_model_arguments(parser) -> None:
    """--model/--tiny, --checkpoint, --device and --backend: how erase and eval build the pipeline."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local diffusers inpainting model folder")
    source.add_argument("--tiny", action="store_true", help="the tiny model with its shipped weights (no download)")
    parser.add_argument("--checkpoint", help="a `mild train` checkpoint (CKPT or CKPT/step-N) loaded on top")
    parser.add_argument("--lora", help="safetensors with the background/foreground LoRA adapters")
    parser.add_argument("--hmg", help="safetensors with the HMG adapter")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        choices=(True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="run the UNet through torch.compile(fullgraph=True), optionally in MODE (compiles "
                             "once per resolution and layer count; pays off over many steps or images)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mild", description="MILD: erase people from photos, layer by layer.")
    commands = parser.add_subparsers(dest="command", required=True)
    erase = commands.add_parser("erase", help="erase people from an image, or from a dataset folder")
    erase.add_argument("image", nargs="?", help="the photo (single-image mode)")
    erase.add_argument("--masks", nargs="+", default=[], help="person masks, one image each (person 1, 2, ...)")
    erase.add_argument("--erase", type=int, nargs="+", help="ids of the people to erase (default: all)")
    erase.add_argument("-o", "--output", help="output image (single-image mode)")
    erase.add_argument("--input-dir", help="dataset mode: a folder of sample folders")
    erase.add_argument("--output-dir", help="dataset mode: where results go")
    add_model_arguments(erase)
    erase.add_argument("--steps", type=int, default=None,
                       help="denoising steps (default: the model's own: 30, or the tiny model's 1)")
    erase.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's; 7.5 for SD)")
    erase.add_argument("--seed", type=int, default=0)
    # Only the chosen command's arguments are built: their builders live in modules that import
    # torch, and `mild --help` should start at once.
    chosen = next((word for word in argv if not word.startswith("-")), None)
    synth = commands.add_parser("synth", help="build paired training samples (procedural or cut-outs)")
    train = commands.add_parser("train", help="train MILD's adapters on paired samples (torchrun-able)")
    evaluation = commands.add_parser("eval", help="PSNR/SSIM/CAG on held-out samples against baselines")
    train_tiny = commands.add_parser("train-tiny", help="rebuild the shipped tiny model's weights")
    if chosen == "synth":
        from .synth import add_synth_arguments

        add_synth_arguments(synth)
    elif chosen == "train":
        from .train import add_train_arguments

        add_train_arguments(train)
    elif chosen == "eval":
        from .evaluate import add_eval_arguments

        add_eval_arguments(evaluation)
        add_model_arguments(evaluation)
    elif chosen == "train-tiny":
        from .train import add_train_tiny_arguments

        add_train_tiny_arguments(train_tiny)
    commands.add_parser("profile", help="the end-to-end throughput profiler (benchmarks/profile_e2e.py)",
                        add_help=False)
    demo = commands.add_parser("demo", help="erase a person from a built-in scene with the tiny model")
    demo.add_argument("--out", default="demo_out", help="where the images go")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default: the tiny model's own)")
    demo.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    demo.add_argument("--figure", help="also write one picture of the run (input, truth, result, each layer and "
                                       "its alpha) to this path, as README's docs/images/demo.png")
    return parser.parse_known_args(argv)


def demo_scene(size: int = 128):
    """A synthetic photo (sky, ground, two overlapping figures), the figures' masks, and the
    truth without the front figure (the red one whole)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    sky = torch.stack([0.45 + 0.2 * ys, 0.6 + 0.2 * ys, 0.95 - 0.1 * ys])
    ground = torch.stack([0.35 + 0.1 * xs, 0.55 - 0.1 * ys, 0.25 + 0 * xs])
    background = torch.where(ys > 0.62, ground, sky) + 0.03 * torch.randn(3, size, size, generator=gen)
    image, masks, target = background, [], background
    for cx, cy, color in ((0.4, 0.55, (0.8, 0.2, 0.2)), (0.58, 0.6, (0.2, 0.3, 0.8))):
        body = (((xs - cx) / 0.11) ** 2 + ((ys - cy) / 0.28) ** 2) < 1
        head = (((xs - cx) / 0.07) ** 2 + ((ys - cy + 0.33) / 0.07) ** 2) < 1
        figure = body | head
        paint = torch.tensor(color)[:, None, None].expand(3, size, size)
        image = torch.where(figure, paint, image)
        target = torch.where(figure, paint, target) if not masks else target
        masks.append(figure)
    masks[0] = masks[0] & ~masks[1]  # the blue figure stands in front of the red one
    return image.clamp(0, 1), torch.stack(masks).float(), target.clamp(0, 1)


def run_demo(args) -> int:
    import time

    import torch
    from PIL import Image

    from .pipeline import MILDPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, masks, truth = demo_scene()

    def save(tensor, name):
        array = (tensor.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(out / name)

    save(image, "input.png")
    save(truth, "truth.png")
    for i, mask in enumerate(masks, start=1):
        save(mask[None].expand(3, -1, -1), f"mask_{i}.png")
    pipe = MILDPipeline.tiny(seed=0, backend=args.backend)
    start = time.perf_counter()
    result = pipe(image, masks, erase=[2], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    save(result.image, "erased.png")
    for i, (layer, alpha) in enumerate(zip(result.layers, result.alphas)):
        save(layer, f"layer_{i}.png")
        save(alpha.expand(3, -1, -1), f"alpha_{i}.png")
    if args.figure:
        demo_figure(image, truth, masks[1], result, args.figure)
    outside = result.plan.paste_region == 0
    unchanged = bool(torch.equal(result.image[:, outside], image[:, outside]))
    from .evaluate import masked_psnr

    print(f"erased person 2 of 2 with {len(result.plan.layers)} layers in {seconds:.1f} s "
          f"(tiny trained model, {args.steps or pipe.default_steps} steps); pixels outside the erased region unchanged: {unchanged}")
    print(f"where person 2 stood, PSNR against the truth: {masked_psnr(result.image, truth, masks[1]):.1f} dB "
          f"(the input there: {masked_psnr(image, truth, masks[1]):.1f} dB)")
    for layer, per_resolution in sorted(result.cag.items()):
        cells = ", ".join(f"{res}: {value:+.3f}" for res, value in per_resolution.items())
        print(f"CAG of layer {layer} (domain {result.plan.layers[layer].domain}): {cells}")
    print(f"wrote {out}/input.png, truth.png, mask_*.png, erased.png, layer_*.png and alpha_*.png"
          + (f"; the figure {args.figure}" if args.figure else ""))
    return 0 if unchanged else 1


def demo_figure(image, truth, erased_mask, result, path) -> None:
    """One row: the input with the erased person outlined, the truth, the result, then every
    layer beside the alpha it was composited with."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    panels = [(image, "input (blue erased)"), (truth, "truth"), (result.image, "MILD")]
    for index, (layer, alpha) in enumerate(zip(result.layers, result.alphas)):
        name = "background" if index == 0 else f"person {result.plan.layers[index].person}"
        panels.append((layer, f"layer {index}: {name}"))
        if index:
            panels.append((alpha.expand(3, -1, -1), f"layer {index} alpha"))
    figure = Figure(figsize=(2.0 * len(panels), 2.3), layout="constrained")
    for ax, (tensor, title) in zip(figure.subplots(1, len(panels)), panels):
        ax.imshow(tensor.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.axes[0].contour(erased_mask.numpy(), levels=[0.5], colors="white", linewidths=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def profiler_path() -> Path:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_e2e.py"
    if not path.exists():
        raise CLIError(f"the profiler lives in the source checkout ({path}); run mild from an editable install")
    return path


# What other packages print that says nothing about this run: kineto's profiler start/stop
# lines (C++, straight to the stream, often glued to a progress bar's line).
PROFILER_NOISE = re.compile(rb"(?:USDT|INFO|WARNING):\d{4}-\d\d-\d\d [^\n]*\n")


def run_profiler(extra: list[str]) -> int:
    """benchmarks/profile_e2e.py in a subprocess: results under ./mild_profile unless --out
    says otherwise, other packages' logging quietened and kineto's lines dropped from stderr."""
    import subprocess

    if not any(arg == "--out" or arg.startswith("--out=") for arg in extra):
        extra = ["--out", "mild_profile", *extra]
    env = dict(os.environ, DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.Popen([sys.executable, str(profiler_path()), *extra], stderr=subprocess.PIPE, env=env)
    pending = b""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        pending += chunk
        *complete, pending = re.split(rb"(?<=[\r\n])", pending)  # progress bars redraw after \r
        text = PROFILER_NOISE.sub(b"", b"".join(complete))
        sys.stderr.buffer.write(text)
        sys.stderr.flush()
    sys.stderr.buffer.write(PROFILER_NOISE.sub(b"", pending))
    return proc.wait()


def check_erase_arguments(args) -> None:
    """The numeric flags of `mild erase`, before any model is built or file written."""
    import math

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise CLIError(f"--guidance must be a finite number >= 0, got {args.guidance}")


def run_training_command(args) -> int:
    """synth, train, train-tiny and eval: their modules' user errors become CLIErrors."""
    from .data import DataError
    from .synth import run_synth
    from .evaluate import run_eval
    from .checkpoints import CheckpointError
    from .train import TrainError, run_train, run_train_tiny

    try:
        if args.command == "synth":
            return run_synth(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "train-tiny":
            return run_train_tiny(args)
        return run_eval(args, build_pipeline(args))
    except (DataError, TrainError, CheckpointError) as error:
        raise CLIError(str(error)) from None


def main(argv=None) -> int:
    # transformers' advice about torchvision, printed on importing diffusers' pipelines, says
    # nothing about a run; TRANSFORMERS_VERBOSITY set by the user still wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "profile":
            return run_profiler(extra)
        if extra:
            raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
        if args.command == "demo":
            return run_demo(args)
        if args.command in ("synth", "train", "train-tiny", "eval"):
            return run_training_command(args)
        check_erase_arguments(args)
        if args.input_dir or args.output_dir:
            if not (args.input_dir and args.output_dir) or args.image:
                raise CLIError("dataset mode takes --input-dir and --output-dir, and no IMAGE")
            return run_dataset(args)
        if not args.image or not args.output:
            raise CLIError("single-image mode takes IMAGE, --masks and -o OUTPUT")
        output = Path(args.output)
        if not output.parent.exists():
            raise CLIError(f"output folder {output.parent} does not exist")
        if output.is_dir():
            raise CLIError(f"-o {output} is a folder; give an image file name (e.g. {output / 'erased.png'})")
        if output.suffix.lower() not in IMAGE_SUFFIXES:
            raise CLIError(f"-o {output}: the suffix must be one of {', '.join(IMAGE_SUFFIXES)} (the image format)")
        sample = load_sample(args.image, args.masks, args.erase)
        erase_sample(build_pipeline(args), sample, output, args)
        print(f"wrote {output}")
        return 0
    except CLIError as error:
        print(f"mild: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
