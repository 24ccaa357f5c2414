"""A tiny inpainting model, built in memory and offline.

For tests and demos: the real diffusers/transformers classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler) at toy sizes. The
tokenizer's vocabulary is written here (single characters, no merges), so nothing
is ever downloaded. The package ships weights for it (``weights/tiny.safetensors``),
trained on procedural scenes by ``mild train-tiny`` (README, The tiny model): its VAE,
its UNet with the MILD adapters and SMA modulation, and its HMG adapter.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_DIM = 32
TINY_WEIGHTS = Path(__file__).with_name("weights") / "tiny.safetensors"
TINY_FORMAT = "mild-tiny/1"


def _byte_unicode() -> list[str]:
    """CLIP's byte-to-unicode table (the characters its byte-level BPE works on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer() -> CLIPTokenizer:
    chars = _byte_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="mild-tiny-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_components(in_channels: int = 9, seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer and scheduler of a toy SD-style inpainting model."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=128)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # Sample (x0) prediction: a briefly trained tiny model regresses the clean latent, so its fill
    # is a smooth estimate of the hidden background; with epsilon its errors at high noise are
    # amplified by 1/sqrt(alpha_bar), with v it still samples a noisy guess at the region's content.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="sample")
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_weights(pipe, path) -> None:
    """The tiny pipeline's trained tensors (VAE, UNet, HMG) in one safetensors file, stored as
    float16 to keep the package small; written atomically."""
    import os

    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("vae", pipe.vae), ("unet", pipe.unet), ("hmg", pipe.hmg)):
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().to("cpu", torch.float16).contiguous()
                            for k, v in module.state_dict().items() if v.is_floating_point()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": TINY_FORMAT,
                                           "vae_scaling_factor": repr(float(pipe.vae.config.scaling_factor)),
                                           "guidance_scale": repr(float(pipe.default_guidance_scale)),
                                           "working_size": repr(pipe.working_size)})
    os.replace(tmp, path)


def load_tiny_weights(pipe, path) -> None:
    """Load a file written by :func:`save_tiny_weights` into a tiny pipeline (the parts it holds)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != TINY_FORMAT:
            raise ValueError(f"{path}: not a tiny-model weights file (format {metadata.get('format')!r})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for prefix, module in (("vae", pipe.vae), ("unet", pipe.unet), ("hmg", pipe.hmg)):
        part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if module is None or not part:
            continue
        own = module.state_dict()
        wrong = [k for k, v in part.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise ValueError(f"{path}: {prefix} tensors do not fit the tiny model (e.g. {wrong[0]})")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in part.items()}, strict=False)
    if "vae_scaling_factor" in metadata:
        pipe.vae.register_to_config(scaling_factor=float(metadata["vae_scaling_factor"]))
    if "guidance_scale" in metadata:  # the guidance the model was tuned for (its prompts are fixed)
        pipe.default_guidance_scale = float(metadata["guidance_scale"])
    if metadata.get("working_size", "None") != "None":  # the size it was trained at: larger photos run scaled
        pipe.working_size = int(metadata["working_size"])
