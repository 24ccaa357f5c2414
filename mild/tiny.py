"""A tiny inpainting model, built in memory and offline.

For tests and demos: the real diffusers/transformers classes (UNet2DConditionModel,
CLIPTextModel, CLIPTokenizer, DDIMScheduler) at toy sizes, and a lossless pixel-patch
autoencoder in the VAE's place (a learned VAE this small capped every fill below OpenCV:
its round trip of the true answer scored 17 dB in the erased region). The tokenizer's
vocabulary is written here (single characters, no merges), so nothing is ever downloaded.
The package ships weights for it, trained on procedural scenes by ``mild train-tiny``
(README, The tiny model): ``weights/tiny.safetensors`` (the UNet with the MILD adapters and
SMA modulation, the HMG adapter and the layer-alpha head) and ``weights/tiny_single.safetensors``
(the single-layer baseline: the same UNet trained with the same budget as one plain inpainter).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .alpha import LayerAlpha

TEXT_DIM = 32
TINY_WEIGHTS = Path(__file__).with_name("weights") / "tiny.safetensors"
TINY_SINGLE_WEIGHTS = TINY_WEIGHTS.with_name("tiny_single.safetensors")
TINY_FORMAT = "mild-tiny/2"
PATCH = 8  # pixels per latent cell along each side, as SD's VAE


class PixelPatchAutoencoder(ModelMixin, ConfigMixin):
    """A lossless autoencoder: each ``patch`` x ``patch`` block of pixels becomes one latent
    cell of 3 * patch**2 channels (pixel unshuffle), and back. Its round trip is exact, so the
    model's fill, not the autoencoder, bounds the quality. It speaks AutoencoderKL's interface
    (``encode(x).latent_dist``, ``decode(z).sample``, ``config.scaling_factor``,
    ``config.latent_channels``) so that diffusers' pipelines take it as their VAE;
    ``block_out_channels`` only states the downsampling factor, 2 ** (len - 1), as diffusers
    reads it from a VAE's config."""

    @register_to_config
    def __init__(self, patch: int = PATCH, scaling_factor: float = 1.0, latent_channels: int | None = None,
                 block_out_channels: list | None = None):
        super().__init__()
        if patch < 1 or patch & (patch - 1):
            raise ValueError(f"patch: must be a power of two, got {patch}")
        # latent_channels and block_out_channels follow from the patch; a saved config repeats them
        derived = dict(latent_channels=3 * patch * patch, block_out_channels=[3] * patch.bit_length())
        given = dict(latent_channels=latent_channels,
                     block_out_channels=None if block_out_channels is None else list(block_out_channels))
        wrong = {key: value for key, value in given.items() if value is not None and value != derived[key]}
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: follow from patch {patch} ({derived}), got {wrong}")
        self.register_to_config(**derived)
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)  # gives .device and .dtype

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, **kwargs) -> "PixelPatchAutoencoder":
        """From a folder written by ``save_pretrained``: the config is the whole model (no weights)."""
        return cls.from_config(cls.load_config(path, subfolder=subfolder, local_files_only=True))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        latents = F.pixel_unshuffle(x, self.config.patch)
        posterior = DiagonalGaussianDistribution(torch.cat([latents, torch.zeros_like(latents)], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        pixels = F.pixel_shuffle(z, self.config.patch)
        return DecoderOutput(sample=pixels) if return_dict else (pixels,)


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
    with tempfile.TemporaryDirectory(prefix="mild-tiny-tokenizer-") as name:  # read at construction, then gone
        folder = Path(name)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_unet(in_channels: int, out_channels: int, widths: tuple) -> UNet2DConditionModel:
    """The tiny UNet: two levels (cross-attention at the first, 16 x 16 latent cells), widths as given."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=out_channels, layers_per_block=1,
        block_out_channels=widths, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM, attention_head_dim=2,
        norm_num_groups=8)


def tiny_components(inpainting: bool = True, seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer and scheduler of a toy SD-style inpainting model
    (``inpainting``: a 9-channel-style UNet taking the mask and the masked image's latents,
    else a plain one)."""
    torch.manual_seed(seed)
    vae = PixelPatchAutoencoder()
    latent = vae.config.latent_channels
    unet = tiny_unet(2 * latent + 1 if inpainting else latent, latent, (64, 128))
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # Sample (x0) prediction: a briefly trained tiny model regresses the clean latent, so its fill
    # is a smooth estimate of the hidden background; with epsilon its errors at high noise are
    # amplified by 1/sqrt(alpha_bar), with v it still samples a noisy guess at the region's content.
    # Trailing timesteps: sampling starts from pure noise, so its first step must be the last trained
    # timestep (999). "Leading" spacing starts at 951 for 20 steps and at t = 1 for one step, where
    # the model reads pure noise as a nearly clean latent (erased-region PSNR on 40 held-out scenes,
    # 2026-12-03: 20 steps 14.91 -> 15.09 dB, one step 11.81 -> 15.31 dB).
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=tiny_scheduler())


def tiny_scheduler(zero_terminal_snr: bool = True) -> DDIMScheduler:
    """The tiny model's DDIM scheduler. ``zero_terminal_snr`` rescales the betas so that the last
    timestep holds no signal (diffusers' ``rescale_betas_zero_snr``; Lin et al. 2023). Without it
    the training input at t = 999 keeps sqrt(alpha_bar) = 0.068 of the clean latent, and a pixel
    patch's 192 channels repeat each colour over its 64 pixels, so a model learns to read that leak
    (averaged, it stands out of the noise); sampling starts
    from pure noise, which has none. Measured on 20 outside occlusion scenes, 2026-12-03: the
    shipped model's person layer scored 16.8 dB on hidden parts from pure noise and 18.3 dB when
    its start held the leak of its condition (the background layer: 25.7 and 27.1 dB)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                         prediction_type="sample", rescale_betas_zero_snr=zero_terminal_snr)


def tiny_sd_components(seed: int = 0) -> dict:
    """The tiny model's parts with SD's latent layout instead of its own: a 9-channel (4 + 1 + 4)
    inpainting UNet over a small, untrained AutoencoderKL (4 latent channels, 8x downsampling).
    For what must take SD's shapes: the end-to-end profiler and diffusers' own inpainting
    pipeline (which accepts only 4- or 9-channel UNets), and tests of the KL-VAE path."""
    from diffusers import AutoencoderKL

    parts = tiny_components(seed=seed)
    torch.manual_seed(seed)
    parts["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8).eval()
    parts["unet"] = tiny_unet(9, 4, (32, 64)).eval()
    return parts


def tiny_parts(pipe) -> tuple:
    """(prefix, module) of the tensors a tiny weights file holds."""
    return (("unet", pipe.unet), ("hmg", pipe.hmg), ("alpha", pipe.alpha))


def save_tiny_weights(pipe, path) -> None:
    """The tiny pipeline's trained tensors (UNet, HMG, layer alpha) in one safetensors file, stored as
    float16 to keep the package small; written atomically."""
    import os

    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in tiny_parts(pipe):
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().to("cpu", torch.float16).contiguous()
                            for k, v in module.state_dict().items() if v.is_floating_point()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": TINY_FORMAT,
                                           "vae_scaling_factor": repr(float(pipe.vae.config.scaling_factor)),
                                           "guidance_scale": repr(float(pipe.default_guidance_scale)),
                                           "steps": repr(int(pipe.default_steps)),
                                           "working_size": repr(pipe.working_size),
                                           "condition_fill": pipe.condition_fill,
                                           "residual_to_condition": repr(bool(pipe.residual_to_condition)),
                                           "zero_terminal_snr": repr(bool(pipe.scheduler.config.rescale_betas_zero_snr))})
    os.replace(tmp, path)


def load_tiny_weights(pipe, path) -> None:
    """Load a file written by :func:`save_tiny_weights` into a tiny pipeline (the parts it holds)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != TINY_FORMAT:
            raise ValueError(f"{path}: not a tiny-model weights file (format {metadata.get('format')!r})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for prefix, module in tiny_parts(pipe):
        part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if module is None:
            continue
        if not part and prefix != "unet":  # a file without this part (the single-layer model): the pipeline has none
            setattr(pipe, prefix, None)
            continue
        if prefix == "alpha":  # the head the file holds: files before the U-Net hold the dilated one
            device = next(module.parameters()).device
            module = pipe.alpha = LayerAlpha.from_state_dict(part).to(device)
        own = module.state_dict()
        wrong = [k for k, v in part.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise ValueError(f"{path}: {prefix} tensors do not fit the tiny model (e.g. {wrong[0]})")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in part.items()}, strict=False)
    if "vae_scaling_factor" in metadata:
        pipe.vae.register_to_config(scaling_factor=float(metadata["vae_scaling_factor"]))
    if "guidance_scale" in metadata:  # the guidance the model was tuned for (its prompts are fixed)
        pipe.default_guidance_scale = float(metadata["guidance_scale"])
    if "steps" in metadata:  # the denoising steps it was trained to sample with
        pipe.default_steps = int(metadata["steps"])
    pipe.condition_fill = metadata.get("condition_fill", "grey")  # files before these were recorded: grey, no residual
    pipe.residual_to_condition = metadata.get("residual_to_condition") == "True"
    zero_terminal_snr = metadata.get("zero_terminal_snr") == "True"  # files before it was recorded: trained without
    if bool(pipe.scheduler.config.rescale_betas_zero_snr) != zero_terminal_snr:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=zero_terminal_snr)
    if metadata.get("working_size", "None") != "None":  # the size it was trained at: larger photos run scaled
        pipe.working_size = int(metadata["working_size"])


def _tiny_clip(tokenizer, projection: bool = False):
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=2,
                            num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
                            projection_dim=TEXT_DIM, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_transformer_pipeline(kind: str, seed: int = 0):
    """diffusers' FluxFillPipeline ("flux") or StableDiffusion3InpaintPipeline ("sd3") at toy
    sizes, random weights: the real classes (transformer, AutoencoderKL with FLUX's 16 latent
    channels and shift, CLIP and T5 text encoders, flow-matching scheduler), for tests and the
    CPU profile. FLUX's T5 reads the tiny character tokenizer too; SD3 has no third encoder."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3InpaintPipeline)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    latent = 16
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=kind != "flux", use_post_quant_conv=kind != "flux").eval()
    tokenizer = tiny_tokenizer()
    if kind == "flux":
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_ff=64, d_kv=8,
                                                 num_layers=1, num_heads=4)).eval()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent + 4 * latent + 4 * 64, out_channels=4 * latent, num_layers=1,
            num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=_tiny_clip(tokenizer), tokenizer=tokenizer,
                                text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(), transformer=transformer)
    if kind != "sd3":
        raise ValueError(f"kind: expected 'flux' or 'sd3', got {kind!r}")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=latent, out_channels=latent, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=2 * 16,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=32).eval()
    return StableDiffusion3InpaintPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_tiny_clip(tokenizer, True), tokenizer=tokenizer, text_encoder_2=_tiny_clip(tokenizer, True),
        tokenizer_2=tiny_tokenizer(), text_encoder_3=None, tokenizer_3=None)
