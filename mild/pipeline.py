"""MILDPipeline: multi-layer erasing on diffusers' inpainting components (docs/semantics.md).

One call erases people from one image:

1. ``plan_layers`` builds the background pathway and one pathway per kept person that
   the erased people touch.
2. Every denoising step runs all layers and both classifier-free-guidance halves (one
   at guidance scale 1) in one batched UNet call: rows differ in LoRA adapter (background / foreground, through
   mild_kernels' multi-adapter LoRA), SMA region tables (mild_kernels.sma_attention in
   the attention processors) and prompt embedding; optional HMG residuals join them.
3. ``FusedStep`` updates every layer's latents in one kernel launch.
4. The layers are decoded; each person layer's alpha (its full silhouette) is predicted from
   the decoded layers by the ``LayerAlpha`` head; the layers are composited back to front,
   each by its own alpha, and pasted into the photo through the feathered erased union
   (``composite_layers``): outside it, every pixel is the input's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from mild_kernels import FusedStep, KnownRegion, MultiLoRALinear, apply_multi_lora, composite_layers, set_adapter_ids

from .alpha import LayerAlpha
from .erasing import (CONDITION_FILLS, DEFAULT_PROMPTS, NUM_ADAPTERS, LayerInputs, MILDOutput, check_call_numbers,  # noqa: F401
                      composite_output, conditional_cag, decode_layers, layer_inputs, to_image_tensor, to_masks,
                      to_output)
from .hmg import HumanMorphologyGuidance, guidance_image
from .layers import default_dilation, plan_layers
from .processors import enable_sma
from .tiny import TINY_SINGLE_WEIGHTS, TINY_WEIGHTS, PixelPatchAutoencoder, load_tiny_weights, tiny_components

def is_inpainting_unet(unet) -> bool:
    """An inpainting UNet takes the noisy latents, the mask and the masked image's latents
    (SD's 4 + 1 + 4 = 9 channels); otherwise it takes the latents alone."""
    return unet.config.in_channels == 2 * unet.config.out_channels + 1


def condition_offset(pipe, condition_latents: torch.Tensor | None) -> torch.Tensor | None:
    """What the pipeline adds to its UNet's output: with ``residual_to_condition``, the condition's
    latents (the UNet predicts x0 minus them); else None. Only an inpainting UNet predicting x0
    (prediction_type "sample") can: a ValueError otherwise."""
    if not pipe.residual_to_condition:
        return None
    if condition_latents is None or pipe.scheduler.config.prediction_type != "sample":
        raise ValueError("residual_to_condition: needs an inpainting UNet that predicts x0 (prediction_type 'sample')")
    return condition_latents


class MILDPipeline(DiffusionPipeline):
    """Multi-layer person erasing. Build with ``from_pretrained(local_dir)`` or ``tiny()``.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: diffusers inpainting components; the
            UNet may be a 9-channel inpainting UNet or a 4-channel one (then the fused step
            applies the known-region blend). Without a text encoder, calls pass prompt embeddings.
        hmg: an optional HumanMorphologyGuidance adapter.
        alpha: an optional trained ``LayerAlpha`` head. Without one, a person layer is
            composited through a fixed feathered band over its inpaint region.
        lora_rank: rank of the background and foreground LoRA adapters put on the UNet's
            attention projections (B starts at zero: no effect until trained or loaded).
        backend: kernel backend for every mild_kernels call ("auto", "triton", "torch").
        compile: run the denoising loop's UNet calls through ``torch.compile(unet, fullgraph=True)``;
            True for the default mode, or a mode name ("max-autotune", "reduce-overhead"). The
            region context is prepared before the loop, so the UNet traces as one static graph,
            compiled once per resolution and layer count. Settable later as ``pipe.compile``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel | None, tokenizer: CLIPTokenizer | None,
                 unet: UNet2DConditionModel, scheduler, hmg: HumanMorphologyGuidance | None = None,
                 alpha: LayerAlpha | None = None, lora_rank: int = 4, backend: str = "auto", compile: bool | str = False):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.hmg = hmg
        self.alpha = alpha
        self.backend = backend
        self.compile = compile
        self._compiled = None  # (mode, compiled UNet)
        self.default_guidance_scale = 7.5  # what a call without guidance_scale uses (the tiny model's file sets its own)
        self.default_steps = 30  # what a call without num_inference_steps uses (the tiny model's file sets its own)
        self.working_size = None  # longest side to diffuse at (None: the photo's size); the tiny model's file sets 128
        self.condition_fill = "grey"  # how the condition's holes are filled (LayerInputs.masked_pixels); SD's is grey
        # True: the UNet predicts x0 minus the condition's latents (an x0-predicting inpainting UNet
        # only), so that it need not carry the condition through its narrow first level; the tiny
        # model's file sets it
        self.residual_to_condition = False
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        enable_sma(unet)
        if not any(isinstance(m, MultiLoRALinear) for m in unet.modules()):  # a UNet shared by pipelines
            apply_multi_lora(unet, NUM_ADAPTERS, lora_rank, backend=backend)

    @classmethod
    def from_pretrained(cls, path, *, torch_dtype=None, hmg_weights=None, lora_weights=None, alpha_weights=None,
                        lora_rank: int = 4,
                        backend: str = "auto", compile: bool | str = False, **kwargs) -> "MILDPipeline":
        """Load real weights from a local diffusers inpainting folder; never downloads. A FLUX.1
        Fill or SD3 inpainting folder gives a ``MILDTransformerPipeline`` (same call).

        ``hmg_weights`` / ``lora_weights``: optional safetensors files for the HMG adapter
        and for the LoRA adapters (keys as in the UNet's state dict, ``...lora_a`` / ``...lora_b``);
        ``alpha_weights``: the person layers' ``LayerAlpha`` head (``mild train``'s alpha.safetensors).
        A ``vae`` folder saved from a ``PixelPatchAutoencoder`` (the tiny model's) loads as one.
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"path: {path} is not a local model folder (nothing is downloaded)")
        from .transformer_pipeline import MILDTransformerPipeline, transformer_kind

        if transformer_kind(path) is not None:  # FLUX.1 Fill or SD3: the transformer pipeline
            if hmg_weights is not None:
                raise ValueError("hmg_weights: Human Morphology Guidance needs a UNet; this folder holds a "
                                 "diffusion transformer")
            pipe = MILDTransformerPipeline.from_pretrained(path, torch_dtype=torch_dtype, lora_weights=lora_weights,
                                                           lora_rank=lora_rank, backend=backend, compile=compile)
            if alpha_weights is not None:
                pipe.alpha = LayerAlpha.from_file(alpha_weights)
            return pipe
        load = dict(local_files_only=True, **({"torch_dtype": torch_dtype} if torch_dtype else {}))
        vae_class = AutoencoderKL
        if '"PixelPatchAutoencoder"' in (path / "vae" / "config.json").read_text():
            vae_class = PixelPatchAutoencoder
        pipe = cls(vae=vae_class.from_pretrained(path, subfolder="vae", **load),
                   text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load),
                   tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
                   unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load),
                   scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True),
                   lora_rank=lora_rank, backend=backend, compile=compile)
        if lora_weights is not None:
            from safetensors.torch import load_file

            from .checkpoints import load_unet_tensors

            load_unet_tensors(pipe.unet, load_file(str(lora_weights)), f"lora_weights {lora_weights}")
        if hmg_weights is not None:
            pipe.hmg = HumanMorphologyGuidance.for_unet(pipe.unet, pipe.vae_scale_factor).load(hmg_weights)
        if alpha_weights is not None:
            pipe.alpha = LayerAlpha.from_file(alpha_weights)
        return pipe

    @classmethod
    def tiny(cls, seed: int = 0, inpainting: bool = True, with_hmg: bool = True, backend: str = "auto",
             weights="shipped", lora_rank: int = 4, compile: bool | str = False) -> "MILDPipeline":
        """The tiny pipeline, built in memory and offline (demos, tests).

        ``weights``: "shipped" (the package's trained weights, mild/weights/tiny.safetensors),
        "single-layer" (the equal-budget single-layer baseline, tiny_single.safetensors), a path
        to a file written by ``mild train-tiny``, or None for random weights from ``seed``.
        ``inpainting``: False builds a plain (non-inpainting) UNet, untrained.
        """
        pipe = cls(**tiny_components(inpainting, seed), alpha=LayerAlpha(), backend=backend, lora_rank=lora_rank,
                   compile=compile)
        if with_hmg:
            pipe.hmg = HumanMorphologyGuidance.for_unet(pipe.unet, pipe.vae_scale_factor)
        if weights is not None:
            path = {"shipped": TINY_WEIGHTS, "single-layer": TINY_SINGLE_WEIGHTS}.get(weights) or Path(weights)
            if not path.is_file():
                raise ValueError(f"weights: {path} does not exist (build it with `mild train-tiny`)")
            if not inpainting:
                raise ValueError("weights: the trained tiny model is an inpainting UNet; pass weights=None")
            load_tiny_weights(pipe, path)
            return pipe
        generator = torch.Generator().manual_seed(seed)
        for name, param in pipe.unet.named_parameters():
            if name.endswith("lora_b"):  # random adapters, so that the two pathways differ
                param.data = 0.02 * torch.randn(param.shape, generator=generator)
        return pipe

    # ------------------------------------------------------------ helpers
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [0, 1] -> scaled latents (mean of the posterior)."""
        vae = self.vae
        latents = vae.encode((2 * pixels - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return latents * vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def _guidance(self, plan, size, keypoints, parsing, occlusion_order):
        """(L, C, H, W) HMG images per layer and (L,) on/off weights, or None without HMG inputs."""
        if self.hmg is None or all(x is None for x in (keypoints, parsing, occlusion_order)):
            return None

        def pick(values, person):
            return None if values is None or person == 0 else values[person - 1]

        occlusion_maps = None
        if occlusion_order is not None:
            depth = torch.as_tensor(occlusion_order, dtype=torch.float32)
            occlusion_maps = [plan.layers[0].region_masks[i] * depth[i] for i in range(len(depth))]
        images = [guidance_image(size, pick(keypoints, layer.person), pick(parsing, layer.person),
                                 pick(occlusion_maps, layer.person), self.hmg.parsing_classes)
                  for layer in plan.layers]
        weights = torch.tensor([0.0 if layer.person == 0 else 1.0 for layer in plan.layers])
        return torch.stack(images), weights

    def prepare_layers(self, pixels: torch.Tensor, masks: torch.Tensor, erase=None, keypoints=None, parsing=None,
                       occlusion_order=None, dilation: int | None = None) -> "LayerInputs":
        """Plan the layers of one image and build their per-row UNet inputs (before CFG doubles
        the rows): shared by inference (``__call__``) and training (mild.train)."""
        return layer_inputs(pixels, masks, self.vae_scale_factor, erase, occlusion_order, dilation,
                            lambda plan, size: self._guidance(plan, size, keypoints, parsing, occlusion_order))

    # ------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, image, instance_masks, erase=None, keypoints=None, parsing=None, occlusion_order=None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None,
                 prompts: dict | None = None, negative_prompt: str = "", eta: float = 0.0,
                 alpha: float = 1.0, beta: float = 1.0, dilation: int | None = None, prompt_embeds: dict | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 added_cond_kwargs: dict | None = None, single_layer: bool = False) -> MILDOutput:
        """Erase people from one image.

        Args:
            image: PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1].
            instance_masks: (P, H, W) person masks, or a list of P mask images.
            erase: ids of the people to erase, counted from 1 in mask order; None erases all.
            keypoints: per person, (17, 3) COCO keypoints (x, y, confidence) in pixels.
            parsing: per person, an (H, W) map of parsing class ids.
            occlusion_order: per person, a depth (larger is nearer); orders the foreground layers.
            alpha, beta: the default SMA modulation (same-region boost, cross-region penalty).
            prompts: {"background": ..., "person": ...} prompts of the two pathway kinds.
            prompt_embeds, negative_prompt_embeds: instead of prompts, {"background": (T, C),
                "person": (T, C)} and (T, C) text embeddings.
            added_cond_kwargs: for UNets with added conditioning (SDXL's text_time), one
                {"text_embeds": (C2,), "time_ids": (6,)} used for every row.
            single_layer: plain inpainting instead of the layers, the baseline MILD is measured
                against (and trained as by ``mild train --single-layer``): one pass over the
                dilated erased union with the background prompt, no adapter, no SMA (zero bias,
                every pair allowed), no HMG.
        """
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        num_inference_steps = self.default_steps if num_inference_steps is None else num_inference_steps
        check_call_numbers(num_inference_steps, guidance_scale, eta, alpha, beta, dilation)
        if self.condition_fill not in CONDITION_FILLS:
            raise ValueError(f"condition_fill: expected one of {CONDITION_FILLS}, got {self.condition_fill!r}")
        pixels, was_pil = to_image_tensor(image)
        H, W = pixels.shape[1:]
        masks = to_masks(instance_masks, (H, W))
        if self.working_size is not None and max(H, W) > self.working_size:
            return self._at_working_size(
                pixels, masks, erase, keypoints, parsing, occlusion_order, dilation, was_pil,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                prompts=prompts, negative_prompt=negative_prompt, eta=eta, alpha=alpha, beta=beta,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                added_cond_kwargs=added_cond_kwargs, single_layer=single_layer)
        rows = self.prepare_layers(pixels, masks, erase, keypoints, parsing, occlusion_order, dilation)
        if single_layer:
            rows = dataclasses.replace(rows.background_only(), allow=torch.ones_like(rows.allow[:1]), adapter_ids=[-1],
                                       guide=None, guide_weights=None)
            alpha = beta = 0.0
        plan, L, latent_size = rows.plan, len(rows.plan.layers), rows.latent_size
        device, dtype = self.unet.device, self.unet.dtype

        # Guidance at scale 1 is the conditional prediction alone: the unconditional half is not run.
        halves = 1 if guidance_scale == 1 else 2
        with torch.profiler.record_function("mild::encode"):
            if prompt_embeds is not None:
                cond = torch.stack([prompt_embeds[kind] for kind in rows.kinds])
                uncond = None if halves == 1 else negative_prompt_embeds[None].expand_as(cond)
            else:
                prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
                cond = self._embed([prompts[kind] for kind in rows.kinds])
                uncond = None if halves == 1 else self._embed([negative_prompt] * L)
            text = (cond if halves == 1 else torch.cat([uncond, cond])).to(device, dtype)
            added = None if added_cond_kwargs is None else {
                name: value.to(device, dtype)[None].expand(halves * L, *value.shape)
                for name, value in added_cond_kwargs.items()}

        inpaint_latent = rows.inpaint_latent.to(device, dtype)
        channels = self.unet.config.out_channels
        inpainting_unet = is_inpainting_unet(self.unet)
        with torch.profiler.record_function("mild::vae_encode"):
            if inpainting_unet:
                masked_latents = self._encode_image(rows.masked_pixels(self.condition_fill)).to(dtype)
            else:
                known = KnownRegion(self._encode_image(rows.padded[None]).to(dtype).expand(L, -1, -1, -1).contiguous(), inpaint_latent,
                                    torch.randn((L, channels, *latent_size), generator=generator).to(device, dtype))
        offset = condition_offset(self, masked_latents if inpainting_unet else None)
        offset = None if offset is None else offset.repeat(halves, 1, 1, 1)  # once, not per step

        context = rows.context(halves=halves, alpha=alpha, beta=beta, backend=self.backend, device=device)
        context.prepare(self.unet, text.shape[1], device)  # every host read of the loop's UNet calls, here
        unet = self._denoising_unet()
        set_adapter_ids(self.unet, rows.adapter_ids * halves)
        residuals = None
        if rows.guide is not None:
            residuals = self.hmg(rows.guide.to(device, dtype).repeat(halves, 1, 1, 1),
                                 rows.guide_weights.repeat(halves).to(device))

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        fused = FusedStep(self.scheduler, eta=eta, backend=self.backend)
        latents = torch.randn((L, channels, *latent_size), generator=generator).to(device, dtype)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(torch.cat([latents] * halves), t)
            if inpainting_unet:
                model_in = torch.cat([model_in, inpaint_latent.repeat(halves, 1, 1, 1),
                                      masked_latents.repeat(halves, 1, 1, 1)], 1)
            with torch.profiler.record_function("mild::unet"):
                noise_pred = unet(model_in, t, text, cross_attention_kwargs={"region_context": context},
                                       added_cond_kwargs=added, down_intrablock_additional_residuals=None
                                       if residuals is None else [r.clone() for r in residuals]).sample
            if offset is not None:
                noise_pred = noise_pred + offset
            noise_uncond, noise_cond = noise_pred.chunk(2) if halves == 2 else (noise_pred, noise_pred)
            step_noise = torch.randn(latents.shape, generator=generator).to(device, dtype) if eta > 0 else None
            with torch.profiler.record_function("mild::step"):
                latents = fused.step(noise_uncond, noise_cond, t, latents, guidance_scale, noise=step_noise,
                                     known_region=None if inpainting_unet else known)
        set_adapter_ids(self.unet, None)

        with torch.profiler.record_function("mild::vae_decode"):
            decoded = self._decode(latents).float()  # (L, 3, H', W')
        with torch.profiler.record_function("mild::layer_alpha"):
            # the head reads the layers as decoded, as it saw them in training
            alphas, decoded = self.decode_layers(rows, decoded)
        alphas = alphas[..., :H, :W]
        result, layers = composite_output(rows, decoded, pixels, alphas, self.backend)
        return MILDOutput(self._to_output(result, was_pil), layers, alphas.cpu(), conditional_cag(context, L), plan)

    def _at_working_size(self, pixels, masks, erase, keypoints, parsing, occlusion_order, dilation, as_pil,
                         **call) -> MILDOutput:
        """A photo larger than ``working_size``: diffuse at the working size (the longer side
        scaled to it), then paste the upsampled result into the full-size photo through the
        full-size feathered region, so that every pixel outside it is the input's. The
        returned layers and CAG are at the working size."""
        H, W = pixels.shape[1:]
        scale = self.working_size / max(H, W)
        h, w = max(8, round(H * scale)), max(8, round(W * scale))
        small = F.interpolate(pixels[None], size=(h, w), mode="area")[0]
        # a pixel that is mostly a person stays that person; a thin limb may thin out
        small_masks = (F.interpolate(masks[None].float(), size=(h, w), mode="area")[0] > 0.25).float()
        if keypoints is not None:
            factor = torch.tensor([w / W, h / H, 1.0])
            keypoints = [None if k is None else torch.as_tensor(k, dtype=torch.float32) * factor for k in keypoints]
        if parsing is not None:
            parsing = [F.interpolate(torch.as_tensor(m)[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
                       for m in parsing]
        full_dilation = default_dilation(H, W) if dilation is None else dilation
        working_size, self.working_size = self.working_size, None
        try:
            out = self(small, small_masks, erase, keypoints, parsing, occlusion_order,
                       dilation=None if dilation is None else max(1, round(dilation * scale)), **call)
        finally:
            self.working_size = working_size
        plan = plan_layers(masks, erase, occlusion_order, dilation=full_dilation)
        result = F.interpolate(out.image[None], size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
        pasted = composite_layers(result[None], torch.ones(1, 1, 1, H, W), pixels[None],
                                  plan.paste_region[None, None].float(), backend=self.backend)[0]
        return MILDOutput(self._to_output(pasted, as_pil), out.layers, out.alphas, out.cag, plan)

    def to(self, *args, **kwargs) -> "MILDPipeline":
        """diffusers' ``to`` for the registered components, and the HMG adapter and alpha head
        (not diffusers components) follow the UNet: HMG in its dtype, the alpha head in float32."""
        super().to(*args, **kwargs)
        if self.hmg is not None:
            self.hmg.to(self.unet.device, self.unet.dtype)
        if self.alpha is not None:
            self.alpha.to(self.unet.device)
        return self

    @property
    def denoiser(self):
        """The model that denoises: this pipeline's UNet (MILDTransformerPipeline's is a transformer)."""
        return self.unet

    def decode_layers(self, rows: LayerInputs, decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alphas (L, 1, H', W'), layers (L, 3, H', W')) by the alpha head (see :func:`decode_layers`)."""
        return decode_layers(self.alpha, rows, decoded)

    def _denoising_unet(self):
        """The UNet as the denoising loop calls it: compiled once per ``compile`` setting."""
        if not self.compile:
            return self.unet
        mode = None if self.compile is True else self.compile
        if self._compiled is None or self._compiled[0] != mode:
            # dynamic=False: one static graph per resolution and layer count, as CUDA graphs want
            self._compiled = (mode, torch.compile(self.unet, fullgraph=True, dynamic=False, mode=mode))
        return self._compiled[1]

    @staticmethod
    def _to_output(result: torch.Tensor, as_pil: bool):
        return to_output(result, as_pil)
