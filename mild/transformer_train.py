"""MILD training on a diffusion transformer (FLUX.1 Fill, SD3): the flow-matching counterpart
of ``mild.train.sample_loss`` (docs/semantics.md, Training).

Per sample, as for a UNet: the layers are planned as inference plans them, each row's x0 is
the latent of its own target (``layer_targets``), and one transformer call runs every row
(multi-adapter LoRA ids, the SMA region context on the token grid with learned per-head
modulation). The noisy input at noise level sigma is ``(1 - sigma) x0 + sigma noise``
(sigma drawn logit-normal, as SD3 and FLUX train), and the transformer learns the velocity
``noise - x0``, weighted as a UNet's (``loss_weights``: 1 where the row is answered, its inpaint
region, for a person row only inside its person's silhouette; ``outside_weight`` outside it).
The ``LayerAlpha`` head learns the person rows' silhouettes from the decoded x0 estimates
``noisy - sigma * prediction``, as for a UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mild_kernels import set_adapter_ids

from .alpha import logits_of_prediction, silhouette_term


class TransformerTrainingModel(torch.nn.Module):
    """The trained modules under one forward, so that DDP sees every trainable parameter."""

    def __init__(self, transformer, alpha=None):
        super().__init__()
        self.transformer, self.alpha = transformer, alpha

    def forward(self, call: dict, alpha_inputs=None):
        """The transformer's prediction for ``call`` (its keyword arguments) and, given
        ``alpha_inputs`` = (to_images, visible, region), the alpha head's logits per row."""
        prediction = self.transformer(**call).sample
        return prediction, logits_of_prediction(self.alpha, prediction, alpha_inputs)


def prompt_embeddings(pipe) -> dict:
    """{"background", "person", ""} -> (text (T, C), pooled (C2,)), frozen."""
    from .erasing import DEFAULT_PROMPTS

    kinds = list(DEFAULT_PROMPTS)
    with torch.no_grad():
        text, pooled, _ = pipe._encode_prompts([DEFAULT_PROMPTS[k] for k in kinds] + [""], "", False,
                                               pipe.transformer.device)
    return {kind: (text[i], pooled[i]) for i, kind in enumerate(kinds + [""])}


def transformer_sample_loss(model, pipe, sample, embeds: dict, generator: torch.Generator, outside_weight: float,
                            uncond_prob: float, latent_cache: dict | None = None, alpha_weight: float = 1.0,
                            **unet_only) -> torch.Tensor:
    """The region-weighted flow-matching loss of one sample, all its layer rows in one
    transformer call, each row against its own target, plus the alpha head's silhouette loss.
    ``embeds``: :func:`prompt_embeddings`. Options of the UNet recipe that have no transformer
    counterpart (HMG dropout, plain rows, single-layer: ``mild train`` refuses them) are ignored."""
    from .erasing import layer_inputs, layer_targets, loss_weights

    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    factor = pipe.vae_scale_factor
    rows = layer_inputs(sample.image, sample.masks, factor * pipe.patch, sample.erase, sample.occlusion_order)
    L = len(rows.adapter_ids)
    cached = None if latent_cache is None else latent_cache.get(sample.name)
    if cached is None:
        targets, amodal = layer_targets(sample, rows)
        with torch.no_grad():
            cached = (pipe._latents_of(targets).to(dtype), pipe._latents_of(rows.masked_pixels()).to(dtype), amodal)
        if latent_cache is not None:
            latent_cache[sample.name] = cached
    x0, masked, amodal = cached
    channels, latent_h, latent_w = x0.shape[1:]
    sigma = torch.sigmoid(torch.randn(L, generator=generator)).to(device)  # logit-normal
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    drop = torch.rand(L, generator=generator) < uncond_prob
    noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    text = torch.stack([embeds["" if d else kind][0] for d, kind in zip(drop.tolist(), rows.kinds)]).to(device, dtype)
    pooled = torch.stack([embeds["" if d else kind][1] for d, kind in zip(drop.tolist(), rows.kinds)]).to(device, dtype)
    context = rows.context(1, 1.0, 1.0, pipe.backend, device)
    set_adapter_ids(transformer, rows.adapter_ids)
    call = dict(encoder_hidden_states=text, pooled_projections=pooled, joint_attention_kwargs={"region_context": context})
    if pipe.kind == "flux":
        model_in = torch.cat([pipe.pack(noisy), pipe.flux_condition(masked, rows.inpaint.to(device, dtype))], -1)
        call.update(hidden_states=model_in, timestep=sigma.to(dtype), txt_ids=torch.zeros(text.shape[1], 3).to(device, dtype),
                    img_ids=pipe.base._prepare_latent_image_ids(L, latent_h // 2, latent_w // 2, device, dtype),
                    guidance=torch.full((L,), pipe.default_guidance_scale, device=device, dtype=dtype)
                    if transformer.config.guidance_embeds else None)
    else:
        model_in = noisy
        if transformer.config.in_channels == 2 * channels + 1:
            inpaint = F.interpolate(rows.inpaint, size=(latent_h, latent_w), mode="nearest").to(device, dtype)
            model_in = torch.cat([noisy, inpaint, masked], 1)
        call.update(hidden_states=model_in, timestep=(1000 * sigma).to(dtype))

    def unpacked(prediction):
        if pipe.kind != "flux":
            return prediction
        height, width = rows.padded.shape[1:]
        return pipe.base._unpack_latents(prediction, height, width, factor)

    people = torch.tensor([layer.person > 0 for layer in rows.plan.layers])
    alpha_inputs = None
    if alpha_weight > 0 and pipe.alpha is not None:
        def to_images(predicted):
            return pipe._decode(noisy - sigma[:, None, None, None] * unpacked(predicted)).to(device)

        alpha_inputs = (to_images, rows.visible().to(device), rows.inpaint.to(device))
    prediction, alpha_logits = model(call, alpha_inputs)
    prediction = unpacked(prediction).float()
    goal = (noise - x0).float()
    weight = loss_weights(rows, amodal, (latent_h, latent_w), outside_weight).to(device)
    per_row = (weight * (prediction - goal) ** 2).sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * channels)
    return per_row.mean() + silhouette_term(alpha_logits, amodal, people, rows.inpaint, alpha_weight)
