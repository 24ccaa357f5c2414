"""MILD on diffusion transformers: FLUX.1 Fill and SD3 / SD3.5 inpainting (docs/semantics.md).

The layers are planned as for a UNet (``layer_inputs``); every denoising step runs all of them
in one transformer call: rows differ in LoRA adapter (multi-adapter LoRA on the attention and
feed-forward linears), SMA region tables (the joint-attention processors) and prompt.

- FLUX.1 Fill is guidance-distilled: its guidance embedding takes the guidance scale, so a
  step is one row per layer. Its 384 input channels are the packed noisy latents, the packed
  masked-image latents and the 8 x 8 mask.
- SD3 runs both classifier-free-guidance halves (2 rows per layer); a 16-channel transformer
  gets the known region blended back each step (``KnownRegion``), a 33-channel inpainting one
  the mask and masked latents as extra channels.

``FusedStep`` takes the flow-matching Euler step of every row in one launch. The prompts are
encoded, and latents packed, by diffusers' own FluxFillPipeline / StableDiffusion3InpaintPipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mild_kernels import FusedStep, KnownRegion, MultiLoRALinear, apply_multi_lora, set_adapter_ids

from .erasing import (DEFAULT_PROMPTS, NUM_ADAPTERS, MILDOutput, check_call_numbers, composite_output,
                      conditional_cag, decode_layers, layer_inputs, to_image_tensor, to_masks, to_output)
from .processors import enable_sma

TRANSFORMER_PIPELINES = {"FluxFillPipeline": "flux", "StableDiffusion3InpaintPipeline": "sd3",
                         "StableDiffusion3Pipeline": "sd3"}


def transformer_kind(path) -> str | None:
    """"flux" or "sd3" when ``path``'s model_index.json names one of their pipelines, else None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    return TRANSFORMER_PIPELINES.get(json.loads(index.read_text()).get("_class_name"))


class MILDTransformerPipeline:
    """Multi-layer person erasing with a diffusion transformer.

    Args:
        base: diffusers' FluxFillPipeline or StableDiffusion3InpaintPipeline (its components).
        alpha: an optional trained ``LayerAlpha`` head (else each person layer is composited
            through a fixed feathered band over its inpaint region).
        lora_rank: rank of the background and foreground adapters on the transformer's
            attention and feed-forward linears (B starts at zero: no effect until trained).
        backend: kernel backend for every mild_kernels call.
        compile: run the loop's transformer calls through ``torch.compile(fullgraph=True)`` (True,
            or a mode name), as ``MILDPipeline(compile=...)`` does its UNet's.
    """

    def __init__(self, base, alpha=None, lora_rank: int = 4, backend: str = "auto", compile: bool | str = False):
        from diffusers import FluxFillPipeline

        self.base, self.alpha, self.backend = base, alpha, backend
        self.compile = compile
        self._compiled = None  # (mode, compiled transformer)
        self.kind = "flux" if isinstance(base, FluxFillPipeline) else "sd3"
        self.transformer = base.transformer
        self.patch = 2 if self.kind == "flux" else self.transformer.config.patch_size  # FLUX packs 2 x 2 latents
        self.default_guidance_scale = 30.0 if self.kind == "flux" else 7.0
        self.default_steps = 28  # what a call without num_inference_steps uses
        enable_sma(self.transformer)
        if not any(isinstance(m, MultiLoRALinear) for m in self.transformer.modules()):
            apply_multi_lora(self.transformer, NUM_ADAPTERS, lora_rank, backend=backend, mlp=True)

    @classmethod
    def from_pretrained(cls, path, *, torch_dtype=None, lora_weights=None, lora_rank: int = 4, backend: str = "auto",
                        compile: bool | str = False) -> "MILDTransformerPipeline":
        """Load a local FLUX.1 Fill or SD3 inpainting folder (a diffusers ``save_pretrained``
        layout); never downloads. ``lora_weights``: the adapters, keys as in the transformer's
        state dict (``...lora_a`` / ``...lora_b``)."""
        from diffusers import FluxFillPipeline, StableDiffusion3InpaintPipeline

        kind = transformer_kind(path)
        if kind is None:
            raise ValueError(f"path: {path} holds no FLUX Fill or SD3 pipeline (model_index.json)")
        load = dict(local_files_only=True, **({"torch_dtype": torch_dtype} if torch_dtype else {}))
        base_class = FluxFillPipeline if kind == "flux" else StableDiffusion3InpaintPipeline
        # SD3's optional parts (T5, the IP-Adapter's image encoder) may be absent from a folder
        stored = json.loads((Path(path) / "model_index.json").read_text())
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
                  if kind == "sd3" and stored.get(name, [None])[0] is None}
        pipe = cls(base_class.from_pretrained(path, **absent, **load), lora_rank=lora_rank, backend=backend,
                   compile=compile)
        if lora_weights is not None:
            from safetensors.torch import load_file

            from .checkpoints import load_unet_tensors

            load_unet_tensors(pipe.transformer, load_file(str(lora_weights)), f"lora_weights {lora_weights}")
        return pipe

    hmg = None  # Human Morphology Guidance feeds a UNet's down blocks: none here yet

    @property
    def vae_scale_factor(self) -> int:
        return self.base.vae_scale_factor

    @property
    def denoiser(self):
        """The model that denoises (what ``mild train`` adapts and checkpoints)."""
        return self.transformer

    @property
    def components(self) -> dict:
        return self.base.components

    def set_progress_bar_config(self, **kwargs) -> None:
        self.base.set_progress_bar_config(**kwargs)

    def to(self, *args, **kwargs) -> "MILDTransformerPipeline":
        self.base.to(*args, **kwargs)
        if self.alpha is not None:
            self.alpha.to(self.transformer.device)
        return self

    def _denoising_transformer(self):
        """The transformer as the denoising loop calls it: compiled once per ``compile`` setting
        (the region context is prepared before the loop, so it traces as one graph)."""
        if not self.compile:
            return self.transformer
        mode = None if self.compile is True else self.compile
        if self._compiled is None or self._compiled[0] != mode:
            self._compiled = (mode, torch.compile(self.transformer, fullgraph=True, dynamic=False, mode=mode))
        return self._compiled[1]

    # ------------------------------------------------------------ helpers
    def _encode_prompts(self, texts: list[str], negative: str, guided: bool, device):
        """(text, pooled, text_ids) embeddings of the rows: conditional only (FLUX), or the
        unconditional rows then the conditional ones (SD3, classifier-free guidance)."""
        base = self.base
        if self.kind == "flux":
            # T5's length: FLUX's 512, or fewer where its tokenizer stops earlier (the toy model's)
            return base.encode_prompt(prompt=texts, prompt_2=texts, device=device,
                                      max_sequence_length=min(512, base.tokenizer_2.model_max_length))
        text, negative_text, pooled, negative_pooled = base.encode_prompt(
            prompt=texts, prompt_2=texts, prompt_3=texts, device=device, do_classifier_free_guidance=guided,
            negative_prompt=[negative] * len(texts), negative_prompt_2=[negative] * len(texts),
            negative_prompt_3=[negative] * len(texts))
        if guided:
            text, pooled = torch.cat([negative_text, text]), torch.cat([negative_pooled, pooled])
        return text, pooled, None

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(L, C, h, w) latents -> FLUX's (L, h/2 * w/2, 4C) tokens of 2 x 2 patches."""
        L, C, h, w = latents.shape
        return self.base._pack_latents(latents, L, C, h, w)

    def flux_condition(self, masked: torch.Tensor, inpaint: torch.Tensor) -> torch.Tensor:
        """FLUX Fill's condition tokens: the masked photo's latents (L, C, h, w) and the pixel
        inpaint mask (L, 1, H, W) as its 8 x 8 cells (64 channels at latent resolution), both
        packed, side by side: what FluxFillPipeline.prepare_mask_latents makes."""
        L, _, h, w = masked.shape
        f = self.vae_scale_factor
        cells = inpaint[:, 0].view(L, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(L, f * f, h, w)
        return torch.cat([self.pack(masked), self.pack(cells.to(masked.dtype))], -1)

    def _latents_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [0, 1] -> the transformer's latents (mean of the posterior)."""
        vae = self.base.vae
        latents = vae.encode((2 * pixels - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.base.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)

    def _timesteps(self, steps: int, image_tokens: int, device):
        from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps

        scheduler = self.base.scheduler
        sigmas = np.linspace(1.0, 1 / steps, steps) if self.kind == "flux" else None
        mu = None
        if scheduler.config.get("use_dynamic_shifting", False):
            mu = calculate_shift(image_tokens, scheduler.config.get("base_image_seq_len", 256),
                                 scheduler.config.get("max_image_seq_len", 4096),
                                 scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        return retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, **({} if mu is None else {"mu": mu}))[0]

    # ------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, image, instance_masks, erase=None, occlusion_order=None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 prompts: dict | None = None, negative_prompt: str = "", alpha: float = 1.0, beta: float = 1.0,
                 dilation: int | None = None, prompt_embeds: dict | None = None,
                 negative_prompt_embeds: tuple | None = None, keypoints=None, parsing=None) -> MILDOutput:
        """Erase people from one image (the arguments as in ``MILDPipeline.__call__``).

        ``prompt_embeds``: instead of prompts, {"background": (text (T, C), pooled (C2,)),
        "person": ...}, and for SD3's guidance ``negative_prompt_embeds`` = (text, pooled).

        Human Morphology Guidance (keypoints, parsing) feeds a UNet's down blocks and has no
        transformer counterpart yet: passing it is a ValueError.
        """
        given = [name for name, value in (("keypoints", keypoints), ("parsing", parsing)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: Human Morphology Guidance needs a UNet; "
                             f"{type(self.transformer).__name__} takes masks, erase ids and an occlusion order")
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        num_inference_steps = self.default_steps if num_inference_steps is None else num_inference_steps
        check_call_numbers(num_inference_steps, guidance_scale, 0.0, alpha, beta, dilation)
        pixels, was_pil = to_image_tensor(image)
        masks = to_masks(instance_masks, pixels.shape[1:])
        factor = self.vae_scale_factor * self.patch
        rows = layer_inputs(pixels, masks, factor, erase, occlusion_order, dilation)
        plan, L = rows.plan, len(rows.plan.layers)
        transformer, device, dtype = self.transformer, self.transformer.device, self.transformer.dtype
        height, width = rows.padded.shape[1:]
        latent_h, latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        grid = (latent_h // self.patch, latent_w // self.patch)  # the image tokens
        guided = self.kind == "sd3" and guidance_scale != 1.0
        halves = 2 if guided else 1

        with torch.profiler.record_function("mild::encode"):
            if prompt_embeds is None:
                prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
                text, pooled, text_ids = self._encode_prompts([prompts[kind] for kind in rows.kinds], negative_prompt,
                                                              guided, device)
            else:
                text, pooled = (torch.stack([prompt_embeds[kind][part] for kind in rows.kinds]) for part in (0, 1))
                if guided:
                    text = torch.cat([negative_prompt_embeds[0][None].expand_as(text), text])
                    pooled = torch.cat([negative_prompt_embeds[1][None].expand_as(pooled), pooled])
                text_ids = torch.zeros(text.shape[1], 3)
            text, pooled = text.to(device, dtype), pooled.to(device, dtype)
            text_ids = None if text_ids is None else text_ids.to(device, dtype)
        channels = self.base.vae.config.latent_channels
        noise = torch.randn((L, channels, latent_h, latent_w), generator=generator).to(device, dtype)
        inpaint_latent = F.interpolate(rows.inpaint, size=(latent_h, latent_w), mode="nearest").to(device, dtype)
        with torch.profiler.record_function("mild::vae_encode"):
            masked = self._latents_of(rows.masked_pixels()).to(dtype)  # (L, C, h, w)
        known, extra = None, None
        if self.kind == "flux":
            extra = self.flux_condition(masked, rows.inpaint.to(device, dtype))
            latents = self.pack(noise)
            image_ids = self.base._prepare_latent_image_ids(L, latent_h // 2, latent_w // 2, device, dtype)
        else:
            latents = noise
            if transformer.config.in_channels == 2 * channels + 1:  # an SD3 inpainting transformer
                extra = torch.cat([inpaint_latent, masked], 1).repeat(halves, 1, 1, 1)
            else:
                photo = self._latents_of(rows.padded[None]).to(dtype).expand(L, -1, -1, -1).contiguous()
                known = KnownRegion(photo, inpaint_latent, noise.clone())

        context = rows.context(halves, alpha, beta, self.backend, device)  # on the token grid: rows.latent_size
        context.prepare(transformer, text.shape[1], device)
        set_adapter_ids(transformer, rows.adapter_ids * halves)
        timesteps = self._timesteps(num_inference_steps, grid[0] * grid[1], device)
        denoise = self._denoising_transformer()
        fused = FusedStep(self.base.scheduler, backend=self.backend)
        for t in self.base.progress_bar(timesteps):
            model_in = torch.cat([latents] * halves)
            if extra is not None:
                model_in = torch.cat([model_in, extra], -1 if self.kind == "flux" else 1)
            call = dict(hidden_states=model_in, timestep=t.expand(model_in.shape[0]).to(dtype), encoder_hidden_states=text,
                        pooled_projections=pooled, joint_attention_kwargs={"region_context": context})
            if self.kind == "flux":
                call.update(timestep=call["timestep"] / 1000, txt_ids=text_ids, img_ids=image_ids,
                            guidance=torch.full((L,), float(guidance_scale), device=device, dtype=dtype)
                            if transformer.config.guidance_embeds else None)
            with torch.profiler.record_function("mild::transformer"):
                prediction = denoise(**call).sample
            uncond, cond = prediction.chunk(2) if guided else (prediction, prediction)
            with torch.profiler.record_function("mild::step"):
                latents = fused.step(uncond, cond, t, latents, guidance_scale if guided else 1.0, known_region=known)
        set_adapter_ids(transformer, None)

        if self.kind == "flux":
            latents = self.base._unpack_latents(latents, height, width, self.vae_scale_factor)
        with torch.profiler.record_function("mild::vae_decode"):
            decoded = self._decode(latents)
        H, W = pixels.shape[1:]
        alphas, decoded = decode_layers(self.alpha, rows, decoded)
        alphas = alphas[..., :H, :W]
        result, layers = composite_output(rows, decoded, pixels, alphas, self.backend)
        return MILDOutput(to_output(result, was_pil), layers, alphas.cpu(), conditional_cag(context, L), plan)

