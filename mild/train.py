"""MILD training: ``mild train --data DIR (--model DIR | --tiny) --out CKPT`` (docs/semantics.md, Training).

Every optimizer step, each rank takes ``--accumulate`` samples of its shard. Per sample:

1. the layers are planned as inference plans them (``MILDPipeline.prepare_layers``);
2. each row's x0 is the VAE latent of its own target (``layer_targets``): the background
   row's is the clean plate inside its inpaint region, person i's row's is person i whole
   (amodal) over the target; a sample without layer targets falls back to the target for
   every row. A row's condition is the photo with its region blanked, and its noisy input
   is its x0 noised at a random timestep;
3. one UNet call runs every layer row of the sample: multi-adapter LoRA ids, the SMA
   region context (learned per-head modulation) and the HMG residuals;
4. the loss is the noise-prediction error per row, weighted 1 where the row is answered (its
   inpaint region; a person row's only inside its person's amodal silhouette, the layer's
   appearance) and ``--outside-weight`` outside the region, averaged over rows; plus, for person rows,
   ``--alpha-weight`` times the ``LayerAlpha`` head's silhouette loss, the head reading the
   decoded x0 estimates of the person and background rows (what inference composites).

The base UNet, VAE and text encoder are frozen: the LoRA adapters, the SMA modulation, the
HMG adapter and the alpha head learn (``--train-base`` also trains the UNet itself; for the
tiny model; ``--single-layer`` trains it as one plain inpainter, the equal-budget baseline).
Under torchrun the model runs in torch DDP (gloo on the CPU, nccl on GPUs); each rank reads
its own shard. Checkpoints are folders ``CKPT/step-NNNNNNN/`` written atomically (a
temporary folder renamed into place, then the ``CKPT/latest`` pointer replaced), so a run
killed while saving leaves the previous checkpoint loadable; ``--resume`` continues from it
and repeats the same loss sequence, because every random draw of a step comes from a
generator seeded by (seed, step, rank, micro-step).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from mild_kernels import set_adapter_ids

from .alpha import logits_of_prediction, silhouette_term
from .checkpoints import ADAPTER_KEYS, architecture, load_checkpoint, resolve_checkpoint, save_checkpoint
from .erasing import CONDITION_FILLS, layer_targets, loss_weights  # noqa: F401  (layer_targets: imported from here too)

LOG_FIELDS = ("step", "loss", "val_loss", "lr", "seconds")


class TrainError(ValueError):
    """A user error in training or checkpoint loading: one line, exit status 2."""


# ------------------------------------------------------------------ the training step
class TrainingModel(torch.nn.Module):
    """The trained modules under one forward, so that DDP sees every trainable parameter."""

    def __init__(self, unet, hmg, alpha=None):
        super().__init__()
        self.unet, self.hmg, self.alpha = unet, hmg, alpha

    def forward(self, model_in, timesteps, text, context, guide, guide_weights, added_cond_kwargs=None,
                alpha_inputs=None):
        """The UNet's prediction and, given ``alpha_inputs`` = (to_images, visible, region), the
        alpha head's logits for every row (row 0, the background, reads itself: its loss weight is 0)."""
        residuals = None if self.hmg is None else self.hmg(guide, guide_weights)
        prediction = self.unet(model_in, timesteps, text, cross_attention_kwargs={"region_context": context},
                               down_intrablock_additional_residuals=residuals,
                               added_cond_kwargs=added_cond_kwargs).sample
        return prediction, logits_of_prediction(self.alpha, prediction, alpha_inputs)


def is_transformer_pipeline(pipe) -> bool:
    from .transformer_pipeline import MILDTransformerPipeline

    return isinstance(pipe, MILDTransformerPipeline)


def text_embeddings(pipe) -> dict:
    """The frozen prompt embeddings of the two pathway kinds and of the empty prompt (for a
    diffusion transformer, (text, pooled) pairs: ``transformer_train.prompt_embeddings``)."""
    from .pipeline import DEFAULT_PROMPTS

    if is_transformer_pipeline(pipe):
        from .transformer_train import prompt_embeddings

        return prompt_embeddings(pipe)
    with torch.no_grad():
        kinds = list(DEFAULT_PROMPTS)
        embeds = pipe._embed([DEFAULT_PROMPTS[k] for k in kinds] + [""])
    return {**{k: embeds[i] for i, k in enumerate(kinds)}, "": embeds[-1]}


def estimated_x0(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latent that a prediction of the scheduler's kind (sample, epsilon or v) implies."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return prediction
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].to(noisy.dtype)[:, None, None, None]
    if kind == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction  # v


def sample_loss(model, pipe, sample, embeds: dict, generator: torch.Generator, outside_weight: float,
                uncond_prob: float, latent_cache: dict | None = None, added_cond_kwargs: dict | None = None,
                hmg_dropout: float = 0.0, plain_rows: float = 0.0, single_layer: bool = False,
                alpha_weight: float = 1.0, last_timestep: float = 0.0) -> torch.Tensor:
    """The region-weighted noise-prediction loss of one sample, all its layer rows in one UNet call,
    each row against its own target (``layer_targets``), plus the alpha head's silhouette loss.

    ``embeds``: {"background", "person", ""} -> (T, C) prompt embeddings (:func:`text_embeddings`).
    ``latent_cache``: a dict keeping each sample's VAE latents (the VAE is frozen, so they never
    change), to encode every sample once per run instead of once per visit.
    ``added_cond_kwargs``: for UNets with added conditioning (SDXL's text_time), one
    {"text_embeds": (C2,), "time_ids": (6,)} used for every row, as in the pipeline.
    ``hmg_dropout``: the probability of training the sample without its HMG inputs, so that
    the model also works when inference has none (HMG is optional).
    ``plain_rows``: the probability that a row trains as plain single-layer inpainting: no
    adapter, zero bias and every region pair allowed (which is plain attention). Only for a
    trained base (the tiny model): the base alone then inpaints, as `mild eval`'s
    single-layer baseline runs it.
    ``last_timestep``: the probability that a row trains at the last timestep (T - 1) instead of
    a uniform one: the one a one-step sampler runs, where the prediction is the estimate of the
    mean (uniform timesteps give it 1/T of the training).
    ``single_layer``: train as one plain inpainter (the equal-budget baseline of `mild eval`):
    the background row alone, over the dilated erased union, against the composite target,
    with every row plain and no HMG.

    A diffusion transformer's pipeline (FLUX.1 Fill, SD3) takes the flow-matching loss of
    ``transformer_train.transformer_sample_loss`` instead, with the same rows and weights."""
    if is_transformer_pipeline(pipe):
        from .transformer_train import transformer_sample_loss

        return transformer_sample_loss(model, pipe, sample, embeds, generator, outside_weight, uncond_prob,
                                       latent_cache, alpha_weight=alpha_weight)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    rows = pipe.prepare_layers(sample.image, sample.masks, sample.erase, sample.keypoints, sample.parsing,
                               sample.occlusion_order)
    if single_layer:
        rows = rows.background_only()
        sample = dataclasses.replace(sample, plate=None, people=None)
        hmg_dropout, plain_rows, alpha_weight = 1.0, 1.0, 0.0
    L = len(rows.adapter_ids)
    cached = None if latent_cache is None else latent_cache.get(sample.name)
    if cached is None:
        targets, amodal = layer_targets(sample, rows)
        with torch.no_grad():
            condition = rows.masked_pixels(pipe.condition_fill)
            cached = (pipe._encode_image(targets).to(dtype), pipe._encode_image(condition).to(dtype), amodal)
        if latent_cache is not None:
            latent_cache[sample.name] = cached
    x0, condition, amodal = cached
    scheduler = pipe.scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (L,), generator=generator)
    if last_timestep > 0:  # drawn only then: runs without it keep their random sequence
        last = torch.rand(L, generator=generator) < last_timestep
        timesteps = torch.where(last, scheduler.config.num_train_timesteps - 1, timesteps)
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    drop = torch.rand(L, generator=generator) < uncond_prob  # classifier-free guidance needs the empty prompt too
    without_hmg = bool(torch.rand((), generator=generator) < hmg_dropout)
    plain = torch.rand(L, generator=generator) < plain_rows
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    model_in = noisy
    from .pipeline import condition_offset, is_inpainting_unet

    inpainting = is_inpainting_unet(pipe.unet)
    if inpainting:
        model_in = torch.cat([noisy, rows.inpaint_latent.to(device, dtype), condition], 1)
    offset = condition_offset(pipe, condition.to(device) if inpainting else None)  # None, or added to the UNet's x0
    offset = 0 if offset is None else offset
    text = torch.stack([embeds["" if d else kind] for d, kind in zip(drop.tolist(), rows.kinds)]).to(device, dtype)
    guide, weights = (None, None) if without_hmg else (rows.guide, rows.guide_weights)
    if pipe.hmg is not None and guide is None:  # no HMG inputs: zero residuals, but DDP sees the adapter used
        from .hmg import guidance_channels

        guide = torch.zeros(L, guidance_channels(pipe.hmg.parsing_classes), *rows.padded.shape[1:])
        weights = torch.zeros(L)
    if guide is not None:
        guide, weights = guide.to(device, dtype), weights.to(device, dtype)
    strength = (~plain).float()
    context = rows.context(halves=1, alpha=strength, beta=strength, backend=pipe.backend, device=device)
    if plain.any():
        context.allow = context.allow.clone()
        context.allow[plain.to(context.allow.device)] = True
    set_adapter_ids(pipe.unet, [-1 if p else a for p, a in zip(plain.tolist(), rows.adapter_ids)])
    added = None if added_cond_kwargs is None else {
        name: value.to(device, dtype)[None].expand(L, *value.shape) for name, value in added_cond_kwargs.items()}
    people = torch.tensor([layer.person > 0 for layer in rows.plan.layers])
    alpha_inputs = None
    if alpha_weight > 0 and pipe.alpha is not None:  # also without person rows, so that DDP sees the head used
        def to_images(predicted):
            return pipe._decode(estimated_x0(scheduler, noisy, predicted + offset, timesteps)).to(device)

        alpha_inputs = (to_images, rows.visible().to(device), rows.inpaint.to(device))
    prediction, alpha_logits = model(model_in, timesteps, text, context, guide, weights, added, alpha_inputs)
    prediction = (prediction + offset).float()
    kind = scheduler.config.prediction_type
    goal = {"epsilon": noise, "sample": x0}.get(kind)
    if goal is None:
        goal = scheduler.get_velocity(x0, noise, timesteps)
    weight = loss_weights(rows, amodal, rows.latent_size, outside_weight).to(device)
    per_row = (weight * (prediction - goal.float()) ** 2).sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * goal.shape[1])
    return per_row.mean() + silhouette_term(alpha_logits, amodal, people, rows.inpaint, alpha_weight)


def learning_rate(args, step: int) -> float:
    """The rate of optimizer step ``step`` (from 0) under ``--lr-schedule``."""
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(args.steps, 1), 1.0))))


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Every random draw of one micro-step comes from here: resuming repeats them exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 64 + micro)


def validation_loss(model, pipe, samples, embeds, seed, outside_weight, **loss_options) -> float:
    """The loss on a fixed set of samples with fixed timesteps and noise (no prompt dropout)."""
    with torch.no_grad():
        losses = [sample_loss(model, pipe, s, embeds, step_generator(seed, -1, 0, i), outside_weight, 0.0,
                              **loss_options).item()
                  for i, s in enumerate(samples)]
    return sum(losses) / len(losses)


# ------------------------------------------------------------------ the run
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="a folder of paired samples (docs/semantics.md, Paired data), or 'procedural': "
                             "procedural scenes drawn on the fly (occlusion-heavy, strong textures; never written)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local diffusers inpainting model folder")
    source.add_argument("--tiny", action="store_true", help="the tiny model (its shipped weights)")
    source.add_argument("--tiny-random", action="store_true", help="the tiny model with random weights")
    parser.add_argument("--tiny-weights", help="with --tiny: a tiny-model weights file instead of the shipped one")
    parser.add_argument("--out", required=True, help="checkpoint folder (CKPT/step-N, CKPT/latest, CKPT/log.csv)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="cosine: from --lr down to a tenth of it over the run")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--accumulate", type=int, default=1, help="samples per rank per optimizer step")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--outside-weight", type=float, default=0.1,
                        help="loss weight of latent pixels outside a row's inpaint region (inside: 1)")
    parser.add_argument("--uncond-prob", type=float, default=0.1, help="probability of the empty prompt per row")
    parser.add_argument("--hmg-dropout", type=float, default=0.5,
                        help="probability of a sample trained without its HMG inputs (inference may have none)")
    parser.add_argument("--plain-rows", type=float, default=0.0,
                        help="with --train-base: probability of a row trained as plain inpainting (no adapter, no SMA)")
    parser.add_argument("--last-timestep", type=float, default=0.0,
                        help="probability that a row trains at the last timestep, the one a one-step sampler runs")
    parser.add_argument("--single-layer", action="store_true",
                        help="with --train-base: train one plain inpainter (one row per sample, the composite "
                             "target, no adapters, SMA, HMG or alpha): the equal-budget baseline")
    parser.add_argument("--alpha-weight", type=float, default=1.0,
                        help="weight of the person layers' silhouette loss (the LayerAlpha head)")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--val-every", type=int, default=0, help="validation loss every N steps (0: first and last)")
    parser.add_argument("--val-samples", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="continue from CKPT/latest")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--train-base", action="store_true", help="train the UNet itself too (tiny models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--no-progress", action="store_true")


def check_arguments(args) -> None:
    for name in ("steps", "accumulate", "lora_rank", "save_every", "val_samples"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and args.lr < float("inf")):
        raise TrainError(f"--lr must be a finite number > 0, got {args.lr}")
    if not all(0 <= value <= 1 for value in (args.outside_weight, args.uncond_prob, args.hmg_dropout, args.plain_rows,
                                             args.last_timestep)):
        raise TrainError("--outside-weight, --uncond-prob, --hmg-dropout, --plain-rows and --last-timestep must lie in [0, 1]")
    if not (args.alpha_weight >= 0 and math.isfinite(args.alpha_weight)):
        raise TrainError(f"--alpha-weight must be a finite number >= 0, got {args.alpha_weight}")
    if args.single_layer and not args.train_base:
        raise TrainError("--single-layer trains the base UNet as a plain inpainter; it needs --train-base")
    if args.plain_rows and not args.train_base:
        raise TrainError("--plain-rows trains the base UNet as a plain inpainter; it needs --train-base")
    if args.train_base and args.model:
        raise TrainError("--train-base trains a tiny model's UNet; with --model the base stays frozen")


def build_training_pipeline(args):
    from .pipeline import MILDPipeline

    from .alpha import LayerAlpha

    if args.model:
        pipe = MILDPipeline.from_pretrained(args.model, backend=args.backend, lora_rank=args.lora_rank)
        pipe.alpha = None if args.single_layer else LayerAlpha()
        return pipe
    weights = None if args.tiny_random else (args.tiny_weights or "shipped")
    pipe = MILDPipeline.tiny(seed=args.seed, backend=args.backend, weights=weights, lora_rank=args.lora_rank,
                             with_hmg=not args.single_layer)
    if args.single_layer:
        pipe.alpha = None
    return pipe


def load_shard(root, rank: int, world: int, count: int = 0, seed: int = 0):
    """This rank's samples (every ``world``-th folder), each checked before anything is trained
    or written: a bad sample stops the run with one line naming its file. ``root`` "procedural":
    ``count`` scenes per rank drawn on the fly (``ProceduralStream``), each rank its own."""
    from .data import DataError, list_samples, read_sample
    from .synth import ProceduralStream

    if str(root) == "procedural":
        return ProceduralStream(max(count, 1), seed=seed * 1009 + rank)
    try:
        folders = list_samples(root)
        if len(folders) < world:
            raise TrainError(f"--data holds {len(folders)} samples, fewer than the {world} ranks")
        return [read_sample(folder, require_target=True) for folder in folders[rank::world]]
    except DataError as error:
        raise TrainError(str(error)) from None


def run_train(args) -> int:
    from tqdm import tqdm

    from .distributed import distributed_rank

    check_arguments(args)
    out = Path(args.out)
    if not args.resume and (out / "latest").exists():
        raise TrainError(f"{out} already holds a checkpoint; pass --resume to continue it, or another --out")
    rank, world = distributed_rank()
    shard = load_shard(args.data, rank, world, count=args.steps * args.accumulate, seed=args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    pipe = build_training_pipeline(args).to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.denoiser  # the UNet, or a diffusion transformer
    for module in pipe.components.values():  # the VAE, the text encoders and the denoiser: frozen
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    for name, param in denoiser.named_parameters():
        param.requires_grad_(args.train_base or name.endswith(ADAPTER_KEYS))
    for module in (pipe.hmg, pipe.alpha):
        if module is not None:
            module.requires_grad_(True)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()

    meta = {"architecture": architecture(pipe), "args": {k: v for k, v in vars(args).items() if k != "command"}}
    start = 0
    if args.resume and (out / "latest").exists():
        folder = resolve_checkpoint(out)
        load_checkpoint(pipe, folder)
        state = torch.load(folder / "training_state.pt", weights_only=False)
        start = state["step"]
        torch.set_rng_state(state["torch_rng"])
    if is_transformer_pipeline(pipe):
        from .transformer_train import TransformerTrainingModel

        model = plain_model = TransformerTrainingModel(denoiser, pipe.alpha)
    else:
        model = plain_model = TrainingModel(pipe.unet, pipe.hmg, pipe.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if start:
        optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(args, start)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for stale in out.glob(".step-*.tmp-*") if rank == 0 else ():  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)

    embeds = text_embeddings(pipe)
    latent_cache = None if args.data == "procedural" else {}  # drawn scenes are each seen once
    loss_options = dict(single_layer=args.single_layer, alpha_weight=args.alpha_weight)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    order = {}  # epoch -> this rank's sample order, seeded so that a resumed run reads the same samples

    def nth_sample(k):
        epoch, position = divmod(k, len(shard))
        if epoch not in order:
            order[epoch] = torch.randperm(len(shard), generator=torch.Generator().manual_seed(args.seed + epoch))
        return shard[int(order[epoch][position])]

    log = TrainingLog(out, start) if rank == 0 else None
    val_set = shard[: args.val_samples]
    if args.data == "procedural":  # scenes of their own, never trained on
        from .synth import ProceduralStream

        val_set = ProceduralStream(args.val_samples, seed=args.seed * 1009 + 999_983)[:]

    def validate():  # rank 0 alone, so outside DDP (whose forward may talk to the other ranks)
        with autocast:
            return validation_loss(plain_model, pipe, val_set, embeds, args.seed, args.outside_weight, **loss_options)

    bar = tqdm(total=args.steps, initial=start, desc="mild train", unit="step", disable=rank != 0 or args.no_progress)
    val = validate() if rank == 0 and start == 0 else None
    if val is not None:
        log.writerow({"step": 0, "val_loss": f"{val:.6f}"})
    began = time.perf_counter()
    for step in range(start, args.steps):
        total = 0.0
        for micro in range(args.accumulate):
            sample = nth_sample(step * args.accumulate + micro)
            sync = micro == args.accumulate - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss = sample_loss(model, pipe, sample, embeds, step_generator(args.seed, step, rank, micro),
                                   args.outside_weight, args.uncond_prob, latent_cache,
                                   hmg_dropout=args.hmg_dropout, plain_rows=args.plain_rows,
                                   last_timestep=args.last_timestep,
                                   **loss_options) / args.accumulate
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:  # the next step's rate: a function of the step alone, so resume-safe
            group["lr"] = learning_rate(args, step + 1)
        if world > 1:
            import torch.distributed as dist

            reduced = torch.tensor([total], device=device)
            dist.all_reduce(reduced)
            total = reduced.item() / world
        if not torch.isfinite(torch.tensor(total)):
            raise TrainError(f"the loss diverged at step {step + 1} ({total}); lower --lr")
        done = step + 1
        if rank == 0:
            last = done == args.steps
            val = validate() if last or (args.val_every and done % args.val_every == 0) else None
            log.writerow({"step": done, "loss": f"{total:.6f}", "val_loss": "" if val is None else f"{val:.6f}",
                          "lr": f"{learning_rate(args, step):.3g}", "seconds": f"{time.perf_counter() - began:.2f}"})
            bar.set_postfix(loss=f"{total:.4f}", **({} if val is None else {"val": f"{val:.4f}"}))
            if done % args.save_every == 0 or last:
                save_checkpoint(out, done, pipe, optimizer, meta, include_base=args.train_base)
        bar.update(1)
    bar.close()
    set_adapter_ids(denoiser, None)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        log.close()
        print(f"trained {args.steps - start} steps on {world} rank(s) ({len(shard)} samples on rank 0); "
              f"checkpoint {resolve_checkpoint(out)}, log {out / 'log.csv'}")
    return 0


class TrainingLog:
    """CKPT/log.csv, continued on resume: rows after the resumed step are dropped first."""

    def __init__(self, out: Path, start: int):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "log.csv"
        kept = []
        if start and self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= start]
        self.handle = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)

    def writerow(self, row: dict) -> None:
        self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


# ------------------------------------------------------------------ the tiny model's shipped weights
def add_train_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="MILD weights file (default: the package's mild/weights/tiny.safetensors); the "
                             "single-layer baseline goes beside it as tiny_single.safetensors")
    parser.add_argument("--work", default="tiny_train", help="folder for the checkpoints and training logs")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps, for each of the two models")
    parser.add_argument("--last-timestep", type=float, default=0.25,
                        help="probability that a row trains at the last timestep, where the tiny model samples in one step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--condition-fill", choices=CONDITION_FILLS, default="layered",
                        help="the condition's holes (LayerInputs.masked_pixels): mid-grey as SD inpainting, the "
                             "known pixels pulled in smoothly or copied in, or each layer from its own pixels (the "
                             "single-layer baseline, a plain inpainter, takes 'copy' for 'layered')")
    parser.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                        help="the UNet predicts x0 minus the condition's latents (the filled photo), from a zero start")
    parser.add_argument("--gate-scenes", type=int, default=24,
                        help="held-out scenes of the autoencoder gate (its round trip against Telea)")
    parser.add_argument("--sample-steps", type=int, default=1,
                        help="the denoising steps stored as the model's default: one step gives its x0 estimate, the "
                             "mean that PSNR rewards (more steps sample detail, and score lower)")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="the guidance scale stored as the model's default (its prompts are fixed, so ~1)")
    parser.add_argument("--alpha-scenes", type=int, default=2400,
                        help="after training, fit the alpha head on the MILD model's own one-step layers of this many "
                             "scenes (fit_alpha_head; 0: keep the jointly trained head)")
    parser.add_argument("--only", choices=("mild", "single-layer"), help="rebuild one of the two models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def fit_alpha_head(pipe, samples, *, epochs: int = 3, lr: float = 1e-3, hmg_fraction: float = 0.5, seed: int = 0,
                   colour_weight: float = 10.0, composite_weight: float = 10.0, progress: bool = True) -> list[float]:
    """Fit the pipeline's ``LayerAlpha`` head, the UNet frozen, on the layers the pipeline itself
    decodes for ``samples`` (PairedSamples with people), with its default steps and guidance: the
    inputs the head reads at inference. Joint training shows it the x0 estimates of random
    timesteps, which at low noise reveal the silhouette; a one-step sampler gives it the estimate
    from pure noise, which does not. A fraction ``hmg_fraction`` of the samples runs with their
    HMG inputs, the rest with masks only. Binary cross-entropy against the amodal silhouettes
    (``alpha_loss``), plus, for a ``colour`` head, ``colour_weight`` times the corrected person
    layers' squared error against their targets (``colour_loss``), plus ``composite_weight``
    times the error of each person layer composited over the background layer against the
    target (``composite_loss``); Adam with a cosine rate over ``epochs`` passes. Returns each
    pass's mean loss."""
    from tqdm import tqdm

    from .alpha import alpha_loss, colour_loss, combine, composite_loss

    head = pipe.alpha
    if head is None:
        raise ValueError("fit_alpha_head: the pipeline has no alpha head")
    generator = torch.Generator().manual_seed(seed)
    inputs, seen = [], {}
    decode, bar_config = pipe.decode_layers, dict(getattr(pipe, "_progress_bar_config", {}))
    # intercepted where the pipeline hands its decoded layers to the head: the inputs exactly as inference has them
    pipe.decode_layers = lambda rows, decoded: seen.update(rows=rows, decoded=decoded) or decode(rows, decoded)
    pipe.set_progress_bar_config(disable=True)  # one bar for the samples, not one per call
    try:
        for index, sample in enumerate(tqdm(samples, desc="alpha head: decoding layers", disable=not progress)):
            with_hmg = bool(torch.rand((), generator=generator) < hmg_fraction)
            guide = dict(keypoints=sample.keypoints, parsing=sample.parsing,
                         occlusion_order=sample.occlusion_order) if with_hmg else {}
            with torch.no_grad():
                pipe(sample.image, sample.masks, erase=sample.erase, generator=torch.Generator().manual_seed(seed + index),
                     **guide)
            rows, decoded = seen["rows"], seen["decoded"].float().cpu()
            targets, amodal = layer_targets(sample, rows)
            if amodal is None or len(rows.plan.layers) < 2:
                continue
            people = slice(1, None)  # row 0 is the background, every person row's background
            photo = torch.nn.functional.pad(sample.target.float(), (0, rows.pad[1], 0, rows.pad[0]), mode="replicate")
            inputs.append((decoded[people], decoded[:1].expand_as(decoded[people]), rows.visible()[people],
                           rows.inpaint[people], amodal[people], targets[people], photo.expand_as(decoded[people])))
    finally:
        del pipe.decode_layers
        pipe._progress_bar_config = bar_config
    if not inputs:
        raise ValueError("fit_alpha_head: no sample has a person layer with an amodal silhouette")
    device = next(head.parameters()).device
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    total, losses = epochs * len(inputs), []
    head.train()
    with tqdm(total=total, desc="alpha head: fitting", unit="sample", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(inputs), generator=generator).tolist()
            running = 0.0
            for index in order:
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * bar.n / total))
                person, background, visible, region, amodal, target, photo = (x.to(device) for x in inputs[index])
                out = head.outputs(person, background, visible, region)
                corrected = head.corrected(person, out)
                loss = alpha_loss(out[:, :1], amodal, region)
                if head.colour:
                    loss = loss + colour_weight * colour_loss(corrected, target, amodal, region)
                if composite_weight:
                    alpha = combine(visible, region, torch.sigmoid(out[:, :1]))
                    loss = loss + composite_weight * composite_loss(alpha, corrected, background, photo, visible, region)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += float(loss.detach())
                bar.update()
            losses.append(running / len(inputs))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    head.eval()
    return losses


def autoencoder_gate(pipe, samples) -> tuple[float, float]:
    """(round trip, Telea): mean PSNR over the erased region of ``samples`` of the truth encoded
    and decoded by the pipeline's autoencoder, and of OpenCV's Telea fill. The tiny model's
    fill can be no better than its autoencoder's round trip; its gate is Telea + 5 dB."""
    from .evaluate import erased_union, inpaint_region, masked_psnr, telea

    round_trip, fills = [], []
    for sample in samples:
        erased = erased_union(sample.masks, sample.erase)
        with torch.no_grad():
            decoded = pipe._decode(pipe._encode_image(sample.target[None]))[0].cpu()
        round_trip.append(min(masked_psnr(decoded, sample.target, erased), 99.0))  # lossless: inf, shown as 99
        fills.append(masked_psnr(telea(sample.image, inpaint_region(erased)), sample.target, erased))
    return sum(round_trip) / len(round_trip), sum(fills) / len(fills)


def run_train_tiny(args) -> int:
    """Rebuild the shipped tiny models from scratch on scenes drawn on the fly: MILD (UNet, MILD
    adapters, SMA modulation, HMG adapter, alpha head, every layer against its own target) and,
    with the same architecture, steps and data, the single-layer baseline. Prints the
    autoencoder gate first."""
    from .synth import ProceduralStream
    from .pipeline import MILDPipeline
    from .tiny import TINY_WEIGHTS, save_tiny_weights

    out = Path(args.out) if args.out else TINY_WEIGHTS
    single_out = out.with_name(out.stem + "_single" + out.suffix) if args.out else out.with_name("tiny_single.safetensors")
    work = Path(args.work)
    began = time.perf_counter()
    pipe = MILDPipeline.tiny(seed=args.seed, weights=None)
    held_out = ProceduralStream(args.gate_scenes, seed=args.seed + 7_777_777)[:]
    with torch.no_grad():  # latents at unit variance, as the SD VAE's 0.18215 puts them
        latents = pipe.vae.encode(2 * torch.stack([s.target for s in held_out]) - 1).latent_dist.mean
    scaling = float(1 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    pipe.residual_to_condition = args.residual
    if args.residual:  # the untrained model's x0 is then the filled condition itself
        torch.nn.init.zeros_(pipe.unet.conv_out.weight)
        torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    round_trip, telea_psnr = autoencoder_gate(pipe, held_out)
    verdict = "passes" if round_trip >= telea_psnr + 5 else "FAILS"
    print(f"autoencoder gate: round trip of the truth {round_trip:.1f} dB in the erased region of {len(held_out)} "
          f"held-out scenes, Telea {telea_psnr:.1f} dB: {verdict} (needs Telea + 5 dB)")
    work.mkdir(parents=True, exist_ok=True)
    common = ["--data", "procedural", "--tiny", "--train-base", "--steps", str(args.steps),
              "--lr", str(args.lr), "--lr-schedule", "cosine", "--outside-weight", "0.5", "--last-timestep", str(args.last_timestep), "--save-every", "500", "--val-every", "500",
              "--seed", str(args.seed), "--backend", "torch"] + ["--no-progress"] * args.no_progress
    for name, flags, path in (("mild", [], out), ("single-layer", ["--single-layer"], single_out)):
        if args.only not in (None, name):
            continue
        checkpoints = work / f"checkpoints-{name}"
        shutil.rmtree(checkpoints, ignore_errors=True)
        # the untrained model, staged as a weights file: its condition fill and residual travel with it
        pipe.condition_fill = "copy" if name == "single-layer" and args.condition_fill == "layered" else args.condition_fill
        stage = work / f"untrained-{name}.safetensors"
        save_tiny_weights(pipe, stage)
        parser = argparse.ArgumentParser()
        add_train_arguments(parser)
        print(f"training the {name} model: {args.steps} steps, condition fill {pipe.condition_fill}")
        run_train(parser.parse_args(common + flags + ["--tiny-weights", str(stage), "--out", str(checkpoints)]))
        trained = MILDPipeline.tiny(weights=stage, with_hmg=name == "mild")
        if name == "single-layer":
            trained.alpha = None
        load_checkpoint(trained, checkpoints)
        trained.default_guidance_scale = args.guidance
        trained.default_steps = args.sample_steps
        trained.working_size = held_out[0].image.shape[-1]  # the scenes' size: larger photos run scaled to it
        if trained.alpha is not None and args.alpha_scenes:
            losses = fit_alpha_head(trained, ProceduralStream(args.alpha_scenes, seed=args.seed + 31_337),
                                    seed=args.seed, progress=not args.no_progress)
            print(f"alpha head fitted on the model's own layers of {args.alpha_scenes} scenes: loss "
                  + " -> ".join(f"{loss:.4f}" for loss in losses))
        save_tiny_weights(trained, path)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); training log {checkpoints / 'log.csv'}")
    print(f"mild train-tiny: {(time.perf_counter() - began) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mild.train")
    add_train_arguments(parser)
    try:
        sys.exit(run_train(parser.parse_args()))
    except TrainError as error:
        print(f"mild: error: {error}", file=sys.stderr)
        sys.exit(2)
