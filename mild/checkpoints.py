"""MILD checkpoints: ``CKPT/step-N/`` folders written atomically, and loading them (docs/semantics.md, Training).

A step folder holds ``lora.safetensors`` (the adapters and SMA modulation, or every UNet
tensor of a trained base), ``hmg.safetensors`` and ``alpha.safetensors`` when the pipeline
has them, ``training_state.pt`` and ``meta.json`` (the architecture it loads into).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "mild-checkpoint/1"
ADAPTER_KEYS = ("lora_a", "lora_b", "sma_modulation.alpha", "sma_modulation.beta")
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                     "attention_head_dim", "down_block_types", "up_block_types", "transformer_layers_per_block")
TRANSFORMER_ARCHITECTURE_KEYS = ("in_channels", "out_channels", "patch_size", "num_layers", "num_single_layers",
                                 "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                 "dual_attention_layers")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: one line, exit status 2."""


def architecture(pipe) -> dict:
    """What a checkpoint's tensors depend on: the denoiser's shape (a UNet's, or a diffusion
    transformer's with its class), the LoRA rank and the HMG adapter."""
    denoiser = pipe.denoiser
    config = denoiser.config
    unet = hasattr(pipe, "unet")
    shape = {key: list(value) if isinstance(value, (tuple, list)) else value
             for key in (ARCHITECTURE_KEYS if unet else TRANSFORMER_ARCHITECTURE_KEYS)
             if (value := config.get(key)) is not None}
    rank = next(m.rank for m in denoiser.modules() if hasattr(m, "lora_a"))
    hmg = None if pipe.hmg is None else pipe.hmg.parsing_classes
    model = {"unet": shape} if unet else {"transformer": {"class": type(denoiser).__name__, **shape}}
    return {**model, "lora_rank": rank, "hmg_parsing_classes": hmg}


def adapter_state(unet, include_base: bool) -> dict:
    """The UNet tensors a checkpoint holds: the adapters and modulation, or everything."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in unet.state_dict().items()
            if include_base or name.endswith(ADAPTER_KEYS)}


def resolve_checkpoint(path) -> Path:
    """The step folder a checkpoint path names: ``CKPT`` (its latest step) or ``CKPT/step-N``."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a mild checkpoint (no meta.json, no 'latest' pointer)")
    return path


def load_checkpoint(pipe, path) -> dict:
    """Load a checkpoint's UNet tensors and HMG adapter into ``pipe``; returns its meta.json.

    A checkpoint of another architecture (UNet shape, LoRA rank, HMG) is refused with one line.
    """
    from safetensors.torch import load_file

    folder = resolve_checkpoint(path)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{folder}: unknown checkpoint format {meta.get('format')!r}")
    mine = architecture(pipe)
    if meta["architecture"] != mine:
        differ = sorted(k for k in set(mine) | set(meta["architecture"]) if mine.get(k) != meta["architecture"].get(k))
        raise CheckpointError(f"{folder} was trained for another architecture (differs in {', '.join(differ)}); "
                         "load it into the model it was trained on")
    load_unet_tensors(pipe.denoiser, load_file(str(folder / "lora.safetensors")), folder / "lora.safetensors")
    if pipe.hmg is not None and (folder / "hmg.safetensors").is_file():
        pipe.hmg.load(folder / "hmg.safetensors")
    if (folder / "alpha.safetensors").is_file():  # a layered checkpoint brings its alpha head
        from .alpha import LayerAlpha

        try:  # in place where the shapes agree; else the head the file holds (one written before the colour channels)
            pipe.alpha = pipe.alpha.load(folder / "alpha.safetensors") if pipe.alpha is not None else None
        except ValueError:
            pipe.alpha = None
        if pipe.alpha is None:
            pipe.alpha = LayerAlpha.from_file(folder / "alpha.safetensors").to(pipe.denoiser.device)
    return meta


def load_unet_tensors(unet, tensors: dict, source) -> None:
    """Copy named UNet tensors in, refusing unknown names and wrong shapes with one line."""
    own = unet.state_dict()
    unknown = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items()
             if k in own and v.shape != own[k].shape]
    if unknown or wrong:
        raise CheckpointError(f"{source}: does not fit this UNet ("
                         + (f"unknown keys such as {unknown[0]}" if unknown else f"shape {wrong[0]}") + ")")
    unet.load_state_dict(tensors, strict=False)


def save_checkpoint(out: Path, step: int, pipe, optimizer, meta: dict, include_base: bool, keep: int = 2) -> Path:
    """Write ``out/step-N`` atomically and point ``out/latest`` at it; keep the last ``keep`` steps."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step-{step:07d}"
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(adapter_state(pipe.denoiser, include_base), str(tmp / "lora.safetensors"),
              metadata={"format": CHECKPOINT_FORMAT})
    if pipe.hmg is not None:
        pipe.hmg.save(tmp / "hmg.safetensors")
    if pipe.alpha is not None:
        pipe.alpha.save(tmp / "alpha.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
               tmp / "training_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "format": CHECKPOINT_FORMAT, "step": step}, indent=1))
    for file in tmp.iterdir():  # durable before the rename makes them the checkpoint
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out / f".latest.tmp-{os.getpid()}"
    pointer.write_text(final.name)
    os.replace(pointer, out / "latest")
    for old in sorted(out.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
