"""SMA attention processors for diffusers UNets, and the region context they read.

``enable_sma(unet)`` installs :class:`SMAAttnProcessor` on every attention module.
Per-call data arrives the diffusers way, through ``cross_attention_kwargs``::

    unet(x, t, text, cross_attention_kwargs={"region_context": context})

Without a region context the processor is diffusers' own ``AttnProcessor2_0``, so an
SMA-enabled UNet is the plain UNet until regions are given.

Every self-attention module also gets an :class:`SMAModulation`: per-head gains on the
context's alpha and beta, learned in training (they start at 1, which is the default
modulation) and saved with the LoRA adapters under ``<module>.sma_modulation.alpha|beta``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mild_kernels import SMALayout, default_modulation, prepare_regions, sma_attention, soft_regions

from .cag import cross_domain_attention_gap, domain_indicator


@dataclasses.dataclass
class RegionContext:
    """Regions of every UNet batch row, with their SMA tables, cached across denoising steps.

    Args:
        instance_masks: (I, P, H, W) person masks of each image, in [0, 1], at any resolution.
        latent_size: (h, w) of the UNet's input latents; attention resolutions are found by
            halving it (rounding up), as the UNet's strided down-sampling does.
        row_image: (B,) image index of each UNet batch row (rows = images x layers x CFG halves).
        bias: per-row bias tables (B, R, R) or (B, H, R, R), or None for the default modulation
            from ``alpha`` and ``beta``.
        alpha, beta: default modulation strengths, floats or (B,) per row.
        allow: (B, R, R) bool, or None for all pairs allowed.
        domains: per row, the regions of its layer's domain, for CAG (None: no CAG).
        text_regions: (B, T) hard labels of the text tokens for cross-attention, or None for
            no modulation of cross-attention.
        sort_tokens: run self-attention on region-sorted tokens, so that whole tiles are skipped.
        backend: sma_attention's backend.
    """

    instance_masks: torch.Tensor
    latent_size: tuple[int, int]
    row_image: torch.Tensor
    bias: torch.Tensor | None = None
    alpha: float | torch.Tensor = 1.0
    beta: float | torch.Tensor = 1.0
    allow: torch.Tensor | None = None
    domains: list | None = None
    text_regions: torch.Tensor | None = None
    sort_tokens: bool = True
    backend: str = "auto"
    # Caches, fresh in every context (dataclasses.replace makes new ones, never shares them):
    _layouts: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _biases: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _cag: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # (h, w) -> (2, B) sums, counts
    _domain_rows: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # device -> (B, R)
    _memberships: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # tokens -> (B, N, R)

    @property
    def num_regions(self) -> int:
        return self.instance_masks.shape[1] + 1

    def grid(self, tokens: int) -> tuple[int, int]:
        h, w = self.latent_size
        while h * w > tokens:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != tokens:
            raise ValueError(f"region_context: {tokens} tokens match no resolution of latents {self.latent_size}")
        return h, w

    def grids(self) -> list[tuple[int, int]]:
        """Every resolution a UNet can attend at: the latents halved (rounding up) down to 1 x 1."""
        h, w = self.latent_size
        grids = [(h, w)]
        while h * w > 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            grids.append((h, w))
        return grids

    def prepare(self, unet, text_tokens: int | None = None, device=None) -> "RegionContext":
        """Do a UNet call's host work up front: the layouts of every resolution (and of
        cross-attention, with ``text_regions``), the bias table of every attention module and
        zero CAG sums. A UNet call then reads no tensor value on the host (the Triton backend)
        and fills no cache, so ``torch.compile`` traces it whole and guards on nothing that
        changes between steps. Returns the context."""
        device = unet.device if device is None else device
        joint = {getattr(m.processor, "text_first") for m in unet.modules() if hasattr(getattr(m, "processor", None),
                                                                                      "text_first")}
        if joint:  # a diffusion transformer: one token grid, joint text-image sequences
            height, width = self.latent_size
            for text_first in joint:
                for text in ({0, text_tokens or 0} if not text_first else {text_tokens or 0}):
                    self.joint_layout_at(height * width, text, text_first, device)  # SD3.5: image-only too
            if self.domains is not None:
                self._cag.setdefault((height, width), torch.zeros(2, len(self.row_image), device=device))
                self.domain_rows(device)
            for module in unet.modules():
                if hasattr(getattr(module, "processor", None), "text_first"):
                    self.joint_bias_for(module.heads, getattr(module, "sma_modulation", None))
            return self
        for h, w in self.grids():
            self.layout_at(h * w, None, device)
            if self.text_regions is not None and text_tokens is not None:
                self.layout_at(h * w, text_tokens, device)
            if self.domains is not None:
                self._cag.setdefault((h, w), torch.zeros(2, len(self.row_image), device=device))
        if self.domains is not None:
            self.domain_rows(device)
        for module in unet.modules():
            if isinstance(module, Attention):
                self.bias_for(module.heads, getattr(module, "sma_modulation", None))
        return self

    def memberships_at(self, tokens: int) -> torch.Tensor:
        """(B, N, R) soft memberships of every row's tokens at one resolution, in raster order
        (computed once per resolution)."""
        if tokens not in self._memberships:
            per_image = soft_regions(self.instance_masks.float(), self.grid(tokens))  # (I, N, R)
            self._memberships[tokens] = per_image[self.row_image.to(per_image.device)]
        return self._memberships[tokens]

    def layout_at(self, tokens: int, text_tokens: int | None, device) -> SMALayout:
        """The prepared regions of self-attention (text_tokens None) or cross-attention at one
        resolution: checked, sorted when ``sort_tokens`` and tiled once, then reused by every
        attention module and denoising step."""
        key = (tokens, text_tokens, str(device))
        if key not in self._layouts:
            memberships = self.memberships_at(tokens).to(device)
            text = None if text_tokens is None else self.text_regions.to(device)
            allow = None if self.allow is None else self.allow.to(device)
            # Inside a compiled graph the tile flags cannot be read here (a graph break): the op
            # reads them per call instead. prepare() keeps compiled steps off this path.
            sort = self.sort_tokens and ("q" if text_tokens is not None else True)  # text keys stay in order
            self._layouts[key] = prepare_regions(memberships, text, allow, sort=sort,
                                                 read_info=not torch.compiler.is_compiling())
        return self._layouts[key]

    def joint_layout_at(self, image_tokens: int, text_tokens: int, text_first: bool, device) -> SMALayout:
        """The prepared regions of a diffusion transformer's joint attention: one sequence of
        ``text_tokens`` text and ``image_tokens`` image tokens (text first in FLUX, last in SD3).

        Image tokens carry their row's memberships at their grid. Text tokens carry
        ``text_regions`` when the context has them; otherwise they form one more region, R,
        with zero bias and every pair allowed (see :meth:`joint_bias_for`), so that they
        modulate nothing, as text does in an unmodulated UNet cross-attention."""
        key = ("joint", image_tokens, text_tokens, text_first, str(device))
        if key not in self._layouts:
            image = self.memberships_at(image_tokens).to(device)  # (B, N, R)
            rows, R = image.shape[0], self.num_regions
            allow = None if self.allow is None else self.allow.to(device).expand(rows, R, R)
            if self.text_regions is None:
                image = torch.nn.functional.pad(image, (0, 1))
                text = torch.zeros(rows, text_tokens, R + 1, device=device)
                text[..., R] = 1
                if allow is not None:
                    allow = torch.nn.functional.pad(allow, (0, 1, 0, 1), value=True)
            else:  # SD3.5's image-only attention has no text tokens
                labels = self.text_regions.to(device).long()
                if text_tokens and labels.shape[-1] != text_tokens:
                    raise ValueError(f"region_context: text_regions label {labels.shape[-1]} text tokens, but the "
                                     f"joint attention has {text_tokens}")
                labels = labels[..., :text_tokens].expand(rows, text_tokens)
                text = torch.nn.functional.one_hot(labels, R).to(image.dtype)
            memberships = torch.cat([text, image] if text_first else [image, text], 1)
            self._layouts[key] = prepare_regions(memberships, None, allow, sort=self.sort_tokens,
                                                 read_info=not torch.compiler.is_compiling())
        return self._layouts[key]

    def joint_bias_for(self, heads: int, modulation: "SMAModulation | None" = None) -> torch.Tensor:
        """(B, H, R', R') bias tables of joint attention: :meth:`bias_for`'s, with a zero row and
        column for the text region when text tokens have no regions of their own (R' = R + 1)."""
        table = self.bias_for(heads, modulation)
        if self.text_regions is not None:
            return table
        key = ("joint", heads, None if modulation is None or self.bias is not None else id(modulation))
        if key not in self._biases:
            padded = torch.nn.functional.pad(table, (0, 1, 0, 1))
            if padded.requires_grad:
                return padded
            self._biases[key] = padded
        return self._biases[key]

    def bias_for(self, heads: int, modulation: "SMAModulation | None" = None) -> torch.Tensor:
        """(B, H, R, R) bias tables: the context's tables, or its default modulation scaled by
        a module's learned per-head gains. Cached per head count and module unless they are
        being learned (a table that requires grad is rebuilt per call, so gradients reach it)."""
        key = (heads, None if modulation is None or self.bias is not None else id(modulation))
        if key in self._biases:
            return self._biases[key]
        device = self.instance_masks.device
        if self.bias is not None:
            table = self.bias.to(device)
        else:
            rows = len(self.row_image)
            alpha = torch.as_tensor(self.alpha, dtype=torch.float32, device=device).expand(rows)[:, None]
            beta = torch.as_tensor(self.beta, dtype=torch.float32, device=device).expand(rows)[:, None]
            if modulation is not None:
                alpha = alpha * modulation.alpha.to(device, torch.float32)
                beta = beta * modulation.beta.to(device, torch.float32)
            table = default_modulation(alpha.expand(rows, heads), beta.expand(rows, heads), self.num_regions)
        table = table[:, None].expand(-1, heads, -1, -1) if table.dim() == 3 else table
        if not table.requires_grad:
            self._biases[key] = table
        return table

    def domain_rows(self, device) -> torch.Tensor:
        """(B, R) indicator of each row's domain, built once per device."""
        if str(device) not in self._domain_rows:
            self._domain_rows[str(device)] = domain_indicator(self.domains, self.num_regions).to(device)
        return self._domain_rows[str(device)]

    def record_cag(self, tokens: int, region_mass: torch.Tensor, memberships: torch.Tensor) -> None:
        """Add one attention's CAG per row to the running sums, on the device: no host read
        (each would be a GPU sync per self-attention, and a graph break under torch.compile)."""
        gaps = cross_domain_attention_gap(region_mass.float(), memberships, self.domain_rows(region_mass.device))
        seen = ~gaps.isnan()  # a row whose domain owns no token at this resolution has no gap
        update = torch.stack([torch.where(seen, gaps, torch.zeros_like(gaps)), seen.float()])
        key = self.grid(tokens)
        self._cag[key] = update if key not in self._cag else self._cag[key] + update

    def cag(self) -> dict:
        """{(row, (h, w)): mean CAG over the attention modules and calls seen so far}; one host read."""
        if not self._cag:
            return {}
        grids = list(self._cag)
        sums, counts = torch.stack([self._cag[g] for g in grids], 1).tolist()  # (2, grids, B)
        return {(row, grid): total / count for grid, totals, seen in zip(grids, sums, counts)
                for row, (total, count) in enumerate(zip(totals, seen)) if count > 0}


class SMAAttnProcessor:
    """Spatially-modulated attention for a diffusers ``Attention`` module.

    Self-attention gets the region bias and blocking of the context's rows; cross-attention
    gets them only when the context gives text-token regions. Region mass, when the context
    has domains, feeds the CAG records.
    """

    def __init__(self):
        self.default = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 region_context: RegionContext | None = None, **kwargs):
        cross = encoder_hidden_states is not None
        if (attention_mask is not None and not cross and region_context is not None and region_context.sort_tokens
                and getattr(attn, "sma_presorted", False)):
            raise ValueError("attention_mask: a self-attention mask is given in the caller's token order, but the "
                             "transformer keeps region order; use RegionContext(..., sort_tokens=False) with masks")
        if (region_context is None or attention_mask is not None or attn.spatial_norm is not None
                or (cross and region_context.text_regions is None)):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        ctx = region_context
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if not cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        layout = ctx.layout_at(tokens, key.shape[2] if cross else None, query.device)
        # Inside a transformer whose blocks keep region order (RegionOrder) the tokens arrive
        # sorted: no gather of q, k, v here and none of the output (text keys are never sorted).
        presorted = ctx.sort_tokens and getattr(attn, "sma_presorted", False)
        if not presorted:
            query, key, value = layout.sort(query, "q"), layout.sort(key, "k"), layout.sort(value, "k")
        want_mass = ctx.domains is not None and not cross
        bias = ctx.bias_for(attn.heads, getattr(attn, "sma_modulation", None)).to(query.device)
        result = sma_attention(query, key, value, bias=bias, scale=attn.scale,
                               layout=layout, return_region_mass=want_mass, backend=ctx.backend)
        out = result.out if want_mass else result
        if want_mass:
            ctx.record_cag(tokens, result.region_mass, layout.q_regions.memberships)
        if not presorted:
            out = layout.unsort(out)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SMAModulation(torch.nn.Module):
    """Learned per-head gains of one self-attention's modulation: its bias table is
    ``default_modulation(alpha_ctx * alpha[h], beta_ctx * beta[h])`` (docs/semantics.md)."""

    def __init__(self, heads: int, device=None):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.ones(heads, device=device))
        self.beta = torch.nn.Parameter(torch.ones(heads, device=device))

    def extra_repr(self) -> str:
        return f"heads={self.alpha.numel()}"


class RegionOrder:
    """Region-sorted token order kept across a transformer's blocks.

    Everything in a diffusers transformer block but self-attention acts on each token alone
    (norms, projections, feed-forward, cross-attention's queries), and self-attention with
    its regions sorted alike is permutation-equivariant. So instead of gathering q, k, v into
    region order and the output back in every attention (4 copies of N x C each), the first
    block's input is gathered once and the last block's output scattered back once. A
    transformer of n blocks then makes 2 copies where it made 4n (8n with text regions).

    Installed by ``enable_sma`` as hooks on the first and last block of every diffusers
    ``Transformer2DModel``; it sorts only when the call has a region context with
    ``sort_tokens`` and an SMA processor on one of the blocks' attention modules.
    """

    def __init__(self, blocks):
        self.attentions = [m for block in blocks for m in block.modules() if isinstance(m, Attention)]
        for module in self.attentions:
            module.sma_presorted = True  # its SMA processor then neither sorts nor unsorts
        self.handles = [blocks[0].register_forward_pre_hook(self.sort_input, with_kwargs=True),
                        blocks[-1].register_forward_hook(self.unsort_output, with_kwargs=True)]

    def layout(self, args, kwargs, hidden_states):
        """The self-attention layout whose order the blocks keep, or None when they keep none.

        The rule is the SMA processors' own (a region context with ``sort_tokens``), so a
        processor of these blocks finds its tokens sorted exactly when it expects them to be,
        in a checkpointed block's recomputation too. Other processors here see sorted tokens:
        attention without regions or masks does not depend on token order."""
        named = dict(zip(("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                          "timestep", "cross_attention_kwargs"), args))  # positional under checkpointing
        named.update(kwargs)
        context = (named.get("cross_attention_kwargs") or {}).get("region_context")
        if (context is None or not context.sort_tokens
                or not any(isinstance(a.processor, SMAAttnProcessor) for a in self.attentions)):
            return None
        return context.layout_at(hidden_states.shape[1], None, hidden_states.device)

    def sort_input(self, block, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        layout = self.layout(args, kwargs, hidden_states)
        if layout is None:
            return None
        hidden_states = layout.sort(hidden_states[:, None])[:, 0]  # (B, N, C) seen as (B, 1, N, C)
        if args:
            return (hidden_states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden_states}

    def unsort_output(self, block, args, kwargs, output):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        layout = self.layout(args, kwargs, hidden_states)
        return None if layout is None else layout.unsort(output[:, None])[:, 0]


def keep_region_order(unet) -> None:
    """RegionOrder on every diffusers Transformer2DModel of the UNet (once)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for module in unet.modules():
        if isinstance(module, Transformer2DModel) and len(module.transformer_blocks) and not hasattr(
                module, "sma_region_order"):
            module.sma_region_order = RegionOrder(module.transformer_blocks)


def enable_sma(model) -> None:
    """Install SMA processors on every attention module of a diffusers UNet or diffusion
    transformer, and an SMAModulation (gains 1: the default modulation) on every
    self-attention that lacks one.

    - UNet2DConditionModel (SD 1.5, SD 2, SDXL inpainting): SMAAttnProcessor on self- and
      cross-attention, and RegionOrder on its transformers (region-sorted tokens across
      their blocks, with no copy per attention).
    - FluxTransformer2DModel (FLUX.1, FLUX.1 Fill): SMAFluxAttnProcessor on every
      FluxAttention, dual- and single-stream.
    - SD3Transformer2DModel (SD3, SD3.5): SMAJointAttnProcessor on every attention.

    A model with attention that none of these serves is refused with a ValueError and left
    as it was."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from .transformer_processors import SMAFluxAttnProcessor, SMAJointAttnProcessor

    attentions = {name: module for name, module in model.named_modules() if hasattr(module, "processor")}
    # A transformer's SMA processor is its diffusers default plus regions: any other processor
    # there (IP-Adapter, fused projections) would be silently dropped, so it is refused.
    if isinstance(model, FluxTransformer2DModel):
        processor = SMAFluxAttnProcessor()
        served = (lambda m: isinstance(m, FluxAttention)
                  and type(m.processor) in (type(processor.default), SMAFluxAttnProcessor))
    elif isinstance(model, SD3Transformer2DModel):
        processor = SMAJointAttnProcessor()
        served = (lambda m: isinstance(m, Attention)
                  and type(m.processor) in (type(processor.default), SMAJointAttnProcessor))
    else:  # a UNet: one token sequence per attention, the text as cross-attention's keys
        served = (lambda m: isinstance(m, Attention) and getattr(m, "added_kv_proj_dim", None) is None)
        processor = SMAAttnProcessor()
    foreign = sorted({type(m.processor).__name__ for m in attentions.values() if not served(m)})
    if not hasattr(model, "set_attn_processor") or not attentions or foreign:
        kinds = foreign or ["no attention processors"]
        raise ValueError(f"enable_sma: {type(model).__name__} has attention SMA cannot serve ({', '.join(kinds)}); it "
                         f"supports UNet2DConditionModel (SD 1.5, SD 2, SDXL inpainting), FluxTransformer2DModel and "
                         f"SD3Transformer2DModel. The model is unchanged.")
    model.set_attn_processor(processor)
    for module in attentions.values():
        if not getattr(module, "is_cross_attention", False) and not hasattr(module, "sma_modulation"):
            module.sma_modulation = SMAModulation(module.heads, device=module.to_q.weight.device)
    keep_region_order(model)
