"""SMA processors for diffusion transformers' joint text-image attention (FLUX.1, SD3).

A diffusion transformer runs one attention over text and image tokens together: FLUX's
dual-stream blocks concatenate ``[text, image]`` (and apply rotary embeddings to both), its
single-stream blocks receive that sequence already joined, and SD3's joint blocks
concatenate ``[image, text]``. SMA then applies to every (query, key) pair of the joint
sequence (docs/semantics.md, "Joint attention"):

- image tokens carry their batch row's regions at the transformer's token grid;
- text tokens carry the context's ``text_regions`` when given, else one extra region with
  zero bias and every pair allowed, which leaves every pair that involves text unmodulated.

The context arrives the diffusers way, through ``joint_attention_kwargs``::

    transformer(..., joint_attention_kwargs={"region_context": context})

with ``RegionContext.latent_size`` set to the token grid (latents / patch size). Without a
region context each processor is diffusers' own, so an SMA-enabled transformer is the plain
transformer, bitwise, until regions are given.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from mild_kernels import sma_attention


def _refuse_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError("attention_mask: joint attention takes either an attention mask or a region_context, not both "
                         "(the region context's allow table is the mask)")


def joint_sma(context, attn, query, key, value, text_tokens: int, text_first: bool) -> torch.Tensor:
    """SMA over a joint sequence (``context``: a processors.RegionContext): q, k, v
    (B, H, S, D) in the model's token order, S = text + image tokens; returns (B, H, S, D) in
    the same order. Records CAG of the image queries (over the image regions: mass on text of
    no region counts in neither term) when the context has domains."""
    image_tokens = query.shape[2] - text_tokens
    layout = context.joint_layout_at(image_tokens, text_tokens, text_first, query.device)
    want_mass = context.domains is not None
    bias = context.joint_bias_for(attn.heads, getattr(attn, "sma_modulation", None)).to(query.device)
    result = sma_attention(layout.sort(query), layout.sort(key, "k"), layout.sort(value, "k"), bias=bias,
                           layout=layout, return_region_mass=want_mass, backend=context.backend)
    if not want_mass:
        return layout.unsort(result)
    mass = layout.unsort(result.region_mass)
    image = slice(text_tokens, None) if text_first else slice(0, image_tokens)
    context.record_cag(image_tokens, mass[:, :, image, :context.num_regions],
                       context.memberships_at(image_tokens).to(mass.device))
    return layout.unsort(result.out)


class SMAFluxAttnProcessor:
    """SMA for FLUX's ``FluxAttention``: dual-stream blocks (text through the added
    projections) and single-stream blocks (text and image already one sequence, text first)."""

    text_first = True  # what RegionContext.prepare reads to build the joint layouts

    def __init__(self):
        self.default = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 region_context=None):
        if region_context is None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        _refuse_mask(attention_mask)
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states,
                                                                                   encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # (B, S, H, D)
        query, key = attn.norm_q(query), attn.norm_k(key)
        dual = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if dual:
            text_tokens = encoder_hidden_states.shape[1]
            text_query, text_key, text_value = (t.unflatten(-1, (-1, attn.head_dim))
                                                for t in (text_query, text_key, text_value))
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query, key = torch.cat([text_query, query], 1), torch.cat([text_key, key], 1)
            value = torch.cat([text_value, value], 1)
        else:  # a single-stream block: the text is whatever precedes the image grid's tokens
            height, width = region_context.latent_size
            text_tokens = hidden_states.shape[1] - height * width
            if text_tokens < 0:
                raise ValueError(f"region_context: latent_size {region_context.latent_size} has more tokens than this "
                                 f"attention's {hidden_states.shape[1]}; for a transformer it is the token grid")
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = joint_sma(region_context, attn, *(t.transpose(1, 2) for t in (query, key, value)),
                        text_tokens=text_tokens, text_first=True)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text_out, hidden_states = hidden_states.split_with_sizes([text_tokens, hidden_states.shape[1] - text_tokens], 1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(text_out.contiguous())


class SMAJointAttnProcessor:
    """SMA for SD3's joint ``Attention`` (image tokens first, text through the added
    projections) and for SD3.5's image-only second attention."""

    text_first = False

    def __init__(self):
        self.default = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 region_context=None, **kwargs):
        if region_context is None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        _refuse_mask(attention_mask)
        batch, image_tokens = hidden_states.shape[:2]

        def heads(t):
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_tokens = 0
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            text_query, text_key, text_value = (heads(f(encoder_hidden_states))
                                                for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query, key = torch.cat([query, text_query], 2), torch.cat([key, text_key], 2)
            value = torch.cat([value, text_value], 2)
        out = joint_sma(region_context, attn, query, key, value, text_tokens=text_tokens, text_first=False)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        text_out = None
        if encoder_hidden_states is not None:
            hidden_states, text_out = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, text_out)
