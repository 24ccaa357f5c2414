"""End-to-end throughput of a MILD erase, against the baseline a user would write.

Workload: one image, one erased person in the middle and L-1 kept people around it that
it occludes, so the pipeline runs L layers. Architectures (random weights: speed does not
depend on them): the SD 1.5 inpainting UNet at 512, the SDXL inpainting UNet at 1024, and
a tiny model for the CPU smoke mode. Text encoders are skipped (random prompt embeddings).

Providers:
- ``mild``: MILDPipeline: all layers and both CFG halves in one UNet call per step (SMA,
  multi-adapter LoRA), FusedStep, composite;
- ``mild-plain-attn``: the same pipeline with diffusers' SDPA processors (no SMA): its UNet
  time is the yardstick for SMA's overhead;
- ``baseline``: L sequential runs of diffusers' own inpainting pipeline whose attention
  processors apply the region bias as a dense float mask through SDPA.

Reports images/s, time per stage (UNet, attention, LoRA, step, VAE, composite), peak
memory, and a torch.profiler trace; plots throughput against layers and the stage
breakdown. Rows go to benchmarks/results/<device>/e2e.json in the shared schema.

``--train`` profiles one training step per sample instead (what ``mild train`` runs), on
the same scene as a training pair (two people by default: one erased, one kept that it
occludes, so two layer rows):

- ``mild-train``: mild.train.sample_loss through the MILD UNet (SMA forward and backward,
  fused multi-adapter LoRA), AdamW over the adapters and the SMA modulation;
- ``naive-train``: the same loss through a fresh copy of the UNet (same random init) with
  peft-style LoRA (one A, B pair per adapter, looped over the rows that use it) and the
  dense-mask SDPA attention, AdamW over its LoRA.

It reports samples/s, time per stage (forward, backward, optimizer; attention and LoRA
kernels inside them from one profiled step), the first step's VAE encode (later steps
read a latent cache), peak memory and the speedup, into e2e_train.json.

    python benchmarks/profile_e2e.py --cpu-smoke          # tiny model, CPU: checks the harness
    python benchmarks/profile_e2e.py --arch sd15 sdxl     # GPU
    python benchmarks/profile_e2e.py --train --cpu-smoke  # the training harness, tiny model, CPU
    python benchmarks/profile_e2e.py --train --arch sdxl  # GPU: the 2x samples/s target at 1024²
    python benchmarks/profile_e2e.py --model-kind flux    # FLUX.1 Fill (sd3: SD3), benchmarks/profile_transformer.py
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import gc
import math
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, Results, _quantiles, device_slug, on_gpu, plot_rows  # noqa: E402
from mild import MILDPipeline, RegionContext  # noqa: E402
from mild.architectures import SD15_INPAINT_UNET, SD_VAE, SDXL_INPAINT_UNET  # noqa: E402
from mild.data import PairedSample  # noqa: E402
from mild.layers import plan_layers  # noqa: E402
from mild.pipeline import NUM_ADAPTERS  # noqa: E402
from mild.tiny import TEXT_DIM, tiny_sd_components  # noqa: E402
from mild.checkpoints import ADAPTER_KEYS, architecture  # noqa: E402
from mild.train import TrainingModel, sample_loss  # noqa: E402

ARCHS = {
    "sd15": dict(resolution=512, unet=SD15_INPAINT_UNET, vae=SD_VAE, text=(77, 768), pooled=None),
    "sd15-256": dict(resolution=256, unet=SD15_INPAINT_UNET, vae=SD_VAE, text=(77, 768), pooled=None),
    "sdxl": dict(resolution=1024, unet=SDXL_INPAINT_UNET, vae=SD_VAE, text=(77, 2048), pooled=1280),
}
INFERENCE_PROVIDERS = ("mild", "mild-plain-attn", "baseline")
STAGES = {"unet": ("mild::unet", "mild::transformer"),  # the denoiser: a UNet or a diffusion transformer
          "attention": "mild_kernels::sma_forward", "lora": "mild_kernels::multi_lora_forward",
          "step": "mild::step", "vae": ("mild::vae_encode", "mild::vae_decode"), "composite": "mild::composite"}


def build_components(arch: str, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if arch == "tiny":
        parts = tiny_sd_components()  # SD's latent layout: the sequential baseline is diffusers' pipeline
        unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
        text, pooled, resolution = (16, TEXT_DIM), None, 64
    else:
        spec = ARCHS[arch]
        with torch.device(device):  # random init straight on the device
            unet = UNet2DConditionModel(**spec["unet"]).eval()
            vae = AutoencoderKL(**spec["vae"]).eval()
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        text, pooled, resolution = spec["text"], spec["pooled"], spec["resolution"]
    return unet.to(device, dtype), vae.to(device, dtype), scheduler, text, pooled, resolution


def scene(resolution: int, layers: int):
    """An image and masks whose plan has exactly ``layers`` layers: one erased person that
    occludes ``layers - 1`` kept people placed around it."""
    gen = torch.Generator().manual_seed(layers)
    image = torch.rand(3, resolution, resolution, generator=gen)
    r = resolution
    erased = torch.zeros(r, r, dtype=torch.bool)
    erased[r * 3 // 8: r * 5 // 8, r * 3 // 8: r * 5 // 8] = True
    masks, occupied = [erased], erased.clone()
    for i in range(layers - 1):
        angle = torch.tensor(2 * torch.pi * i / max(1, layers - 1))
        cy, cx = int(r / 2 + 0.17 * r * torch.sin(angle)), int(r / 2 + 0.17 * r * torch.cos(angle))
        person = torch.zeros(r, r, dtype=torch.bool)
        person[cy - r // 10: cy + r // 10, cx - r // 10: cx + r // 10] = True
        masks.append(person & ~occupied)  # the visible part: the erased person is in front
        occupied |= person
    masks = torch.stack(masks).float()
    assert len(plan_layers(masks, erase=[1]).layers) == layers, "scene layout gives the wrong layer count"
    return image, masks


class PlainSDPAProcessor:
    """diffusers' SDPA processor that takes (and ignores) the region context: no SMA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 region_context=None, **kwargs):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class DenseMaskSDPAProcessor:
    """The naive baseline: the region bias and blocking as a dense (B, H, N, N) float mask for SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 region_context: RegionContext | None = None, **kwargs):
        from diffusers.models.attention_processor import AttnProcessor2_0

        if region_context is None or encoder_hidden_states is not None:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, tokens, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        with torch.profiler.record_function("naive::dense_mask"):  # the training profile's attention stage
            memberships = region_context.memberships_at(tokens).to(query)  # (B, N, R), raster order like query
            bias = region_context.bias_for(attn.heads).to(query)  # (B, H, R, R)
            dense = memberships[:, None] @ bias @ memberships[:, None].transpose(-1, -2)
            if region_context.allow is not None:
                labels = memberships.argmax(-1)
                rows = torch.arange(batch, device=labels.device)[:, None, None]
                allowed = region_context.allow.to(labels.device)[rows, labels[:, :, None], labels[:, None, :]]
                dense = dense.masked_fill(~allowed[:, None], float("-inf"))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)))
        return out / attn.rescale_output_factor


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def profiled_run(run, steps: int, device, trace: Path):
    """``run(steps)`` once warm (a short run first: compilation, caches, autotuning), under
    torch.profiler, its chrome trace written to ``trace``: (seconds, profile)."""
    run(min(steps, 2))
    sync(device)
    reset_peak(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        run(steps)
        sync(device)
        seconds = time.perf_counter() - start
    prof.export_chrome_trace(str(trace))
    return seconds, prof


def stage_times_ms(prof, device) -> dict:
    events = {e.key: e for e in prof.key_averages()}

    def total(name):
        e = events.get(name)
        if e is None:
            return 0.0
        device_total = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        return (device_total if device == "cuda" and device_total else e.cpu_time_total) / 1e3

    return {stage: sum(total(n) for n in (names if isinstance(names, tuple) else (names,)))
            for stage, names in STAGES.items()}


def mild_pipeline(components, backend, plain_attention=False):
    unet, vae, scheduler = components[:3]
    pipe = MILDPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, backend=backend)
    if plain_attention:
        pipe.unet.set_attn_processor(PlainSDPAProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mild_inputs(components, device, dtype):
    text, pooled = components[3], components[4]
    embeds = dict(prompt_embeds={k: torch.randn(*text, device=device, dtype=dtype) for k in ("background", "person")},
                  negative_prompt_embeds=torch.randn(*text, device=device, dtype=dtype))
    if pooled:
        embeds["added_cond_kwargs"] = {"text_embeds": torch.randn(pooled, device=device, dtype=dtype),
                                       "time_ids": torch.tensor([1024.0, 1024, 0, 0, 1024, 1024], device=device)}
    return embeds


def baseline_pipeline(arch, components):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    unet, vae, scheduler = components[:3]
    unet.set_attn_processor(DenseMaskSDPAProcessor())
    if arch == "sdxl":
        pipe = StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                tokenizer_2=None, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_baseline(pipe, arch, components, image, masks, steps, device, dtype):
    """L sequential diffusers inpainting runs, one per MILD layer, each with its region mask."""
    plan = plan_layers(masks, erase=[1])
    text, pooled = components[3], components[4]
    H, W = image.shape[1:]
    for layer in plan.layers:
        context = RegionContext(layer.region_masks[None].to(device), (H // 8, W // 8), torch.zeros(2, dtype=torch.long),
                                allow=layer.allow[None].repeat(2, 1, 1).to(device), sort_tokens=False)
        kwargs = dict(prompt_embeds=torch.randn(1, *text, device=device, dtype=dtype),
                      negative_prompt_embeds=torch.randn(1, *text, device=device, dtype=dtype))
        if pooled:
            kwargs.update(pooled_prompt_embeds=torch.randn(1, pooled, device=device, dtype=dtype),
                          negative_pooled_prompt_embeds=torch.randn(1, pooled, device=device, dtype=dtype))
        pipe(image=image[None].to(device, dtype), mask_image=layer.inpaint[None, None].to(device, dtype),
             num_inference_steps=steps, height=H, width=W, output_type="pt",
             cross_attention_kwargs={"region_context": context}, **kwargs)


# ------------------------------------------------------------------ training mode (--train)
TRAIN_PROVIDERS = ("mild-train", "naive-train")
WARMUP_STEPS = 2  # step 0 encodes the sample's latents and compiles the kernels; step 1 runs warm
OUTSIDE_WEIGHT, UNCOND_PROB = 0.1, 0.1  # mild train's defaults
SDXL_TRAIN_TARGET = 2.0  # the target: mild-train >= 2x naive-train samples/s at SDXL 1024², two people
# Weight dtypes of a training case. "fp32" is what mild train runs: fp32 weights, the forward
# under bf16 autocast on a GPU. "bf16" runs bf16 weights without autocast: autocast computes
# layer norms in fp32, and mild_kernels' LoRA refuses an fp32 input with bf16 weights.
TRAIN_WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Kernel time inside the forward and backward passes, read from one profiled step: profiler
# event names as fnmatch patterns (an event nested in a matching one is not counted again).
# Cross-attention runs through SDPA in both providers (the SMA processor hands it to
# diffusers when the context has no text regions, as in training), so both count it.
KERNEL_STAGES = {
    "mild-train": {
        "attention_fwd": ("mild_kernels::sma_prepare", "mild_kernels::sma_forward",
                          "aten::scaled_dot_product_attention"),
        "attention_bwd": ("mild_kernels::sma_backward", "aten::_scaled_dot_product*_backward"),
        "lora_fwd": ("mild_kernels::multi_lora_forward",),
        "lora_bwd": ("mild_kernels::multi_lora_backward",),
    },
    "naive-train": {  # no lora_bwd: the adapter loop's backward is many small autograd nodes without a name
        "attention_fwd": ("naive::dense_mask", "aten::scaled_dot_product_attention"),
        "attention_bwd": ("aten::_scaled_dot_product*_backward",),
        "lora_fwd": ("naive::lora",),
    },
}


class LoopedLoRALinear(torch.nn.Module):
    """The naive multi-adapter LoRA, as peft runs a batch whose rows use different adapters:
    one (A, B) pair per adapter, and a loop over the adapters that takes out the rows using
    each one (index_select), computes their LoRA delta and adds it back (index_add)."""

    def __init__(self, base: torch.nn.Linear, num_adapters: int, rank: int, rows_by_adapter: dict):
        super().__init__()
        self.base = base.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        # As peft: A keeps nn.Linear's Kaiming-uniform init and B starts at zero, so the layer
        # starts equal to its base; scaling 1, as MILDPipeline's adapters.
        self.down = torch.nn.ModuleList(torch.nn.Linear(base.in_features, rank, bias=False, **factory)
                                        for _ in range(num_adapters))
        self.up = torch.nn.ModuleList(torch.nn.Linear(rank, base.out_features, bias=False, **factory)
                                      for _ in range(num_adapters))
        for layer in self.up:
            torch.nn.init.zeros_(layer.weight)
        self.rows_by_adapter = rows_by_adapter

    def forward(self, x):
        with torch.profiler.record_function("naive::lora"):
            y = self.base(x)
            for adapter, rows in self.rows_by_adapter.items():
                delta = self.up[adapter](self.down[adapter](x.index_select(0, rows)))
                y = y.index_add(0, rows, delta.to(y.dtype))
            return y


def naive_training_unet(arch: str, device, dtype, adapter_ids: list, rank: int):
    """A fresh UNet with the MILD one's random init (build_components seeds it; its VAE is
    dropped), LoopedLoRALinear on the projections MILD's adapters wrap (to_q, to_k, to_v,
    to_out[0] of every attention) and dense-mask SDPA attention. Only the LoRA trains."""
    from diffusers.models.attention_processor import Attention

    unet = build_components(arch, device, dtype)[0].requires_grad_(False)
    ids = torch.as_tensor(adapter_ids)
    # peft rebuilds these row lists on every call; built once here, in the naive step's favour
    rows_by_adapter = {a: torch.nonzero(ids == a).flatten().to(device) for a in ids.unique().tolist() if a >= 0}
    for module in list(unet.modules()):
        if isinstance(module, Attention):
            for name in ("to_q", "to_k", "to_v"):
                setattr(module, name, LoopedLoRALinear(getattr(module, name), NUM_ADAPTERS, rank, rows_by_adapter))
            module.to_out[0] = LoopedLoRALinear(module.to_out[0], NUM_ADAPTERS, rank, rows_by_adapter)
    unet.set_attn_processor(DenseMaskSDPAProcessor())
    return unet


def train_sample(resolution: int, layers: int) -> PairedSample:
    """The scene as a training pair. Its target is the photo shifted by 1/16 of its side:
    fixed, and different inside the erased region (speed does not depend on what it shows)."""
    image, masks = scene(resolution, layers)
    shift = resolution // 16
    return PairedSample("scene", image, masks, erase=[1], target=image.roll((shift, shift), dims=(1, 2)))


def train_conditioning(components, device):
    """Random embeddings of sample_loss's three prompts at the architecture's text shape, and
    SDXL's added conditioning (None for the others)."""
    text, pooled, resolution = components[3], components[4], float(components[5])
    embeds = {kind: torch.randn(*text, device=device) for kind in ("background", "person", "")}
    if not pooled:
        return embeds, None
    return embeds, {"text_embeds": torch.randn(pooled, device=device),
                    "time_ids": torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device)}


class StageClock:
    """The stages of one training step: CUDA events on the GPU (no sync between stages),
    perf_counter on the CPU."""

    def __init__(self, device):
        self.on_gpu = device == "cuda"
        self.marks = [("start", self._now())]

    def _now(self):
        if not self.on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, stage: str):
        self.marks.append((stage, self._now()))

    def stages_ms(self) -> dict:
        """Milliseconds from each mark's predecessor to it; waits for the GPU to finish them."""
        if self.on_gpu:
            torch.cuda.synchronize()
        return {stage: start.elapsed_time(end) if self.on_gpu else 1e3 * (end - start)
                for (_, start), (stage, end) in zip(self.marks, self.marks[1:])}


@contextlib.contextmanager
def timed_vae_encodes(pipe, device):
    """Time the pipeline's VAE encodes inside the block (sample_loss encodes only on a latent
    cache miss: the first step); yields an object whose ``ms`` is their total."""
    spent = types.SimpleNamespace(ms=0.0)
    encode = pipe._encode_image

    def timed(pixels):
        sync(device)
        start = time.perf_counter()
        latents = encode(pixels)
        sync(device)
        spent.ms += 1e3 * (time.perf_counter() - start)
        return latents

    pipe._encode_image = timed
    try:
        yield spent
    finally:
        del pipe._encode_image  # the class's method again


def kept_mb(model, optimizer) -> float:
    """What a provider keeps between steps: its UNet's weights and buffers, and the optimizer state."""
    state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state]) / 2**20


def kernel_stage_ms(prof, stages: dict, device) -> dict:
    """Milliseconds per stage in a profiled step: device time (CPU time on the CPU) of the events
    that match the stage's patterns, an event nested in a matching one counted once."""
    def matches(event, patterns):
        return any(fnmatch.fnmatchcase(event.name, pattern) for pattern in patterns)

    def inside_match(event, patterns):
        parent = event.cpu_parent
        while parent is not None and not matches(parent, patterns):
            parent = parent.cpu_parent
        return parent is not None

    def ms(event):
        if device == "cuda":
            return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1e3
        return event.cpu_time_total / 1e3

    events = prof.events()
    return {stage: sum(ms(e) for e in events if matches(e, patterns) and not inside_match(e, patterns))
            for stage, patterns in stages.items()}


@contextlib.contextmanager
def garbage_collector_paused():
    """Python's cycle collector off inside the block, as timeit does: a full collection can
    stall one call by a few hundred ms and land in whichever stage it interrupts."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def release(device):
    """Hand back what a finished provider or case held, before the next one builds its UNet."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def profile_train_provider(provider, unet, pipe, sample, embeds, added, device, autocast, timed_steps) -> dict:
    """Warm-up, timed and profiled training steps of one provider: what they measured."""
    model = TrainingModel(unet, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    latent_cache = {}

    def step(index: int):
        clock = StageClock(device)
        with autocast():
            # sample_loss takes the layer plan, latents and scheduler from pipe, the prediction from model
            loss = sample_loss(model, pipe, sample, embeds, torch.Generator().manual_seed(index), OUTSIDE_WEIGHT,
                               UNCOND_PROB, latent_cache=latent_cache, added_cond_kwargs=added)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        return loss.detach(), clock

    with timed_vae_encodes(pipe, device) as vae:
        first_loss = step(0)[0].item()
    if not math.isfinite(first_loss):
        raise RuntimeError(f"{provider}: the step-0 loss is {first_loss}")
    for index in range(1, WARMUP_STEPS):
        step(index)
    sync(device)
    reset_peak(device)
    resident_mb = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0
    seconds, stages = [], []
    with garbage_collector_paused():
        for index in range(WARMUP_STEPS, WARMUP_STEPS + timed_steps):
            start = time.perf_counter()
            clock = step(index)[1]
            stages.append(clock.stages_ms())  # waits for the GPU: the step is done
            seconds.append(time.perf_counter() - start)
    if device == "cuda":  # its own footprint: the VAE and the other provider's UNet stay resident too
        peak_mb = kept_mb(model, optimizer) + peak_memory_mb(device) - resident_mb
    else:
        peak_mb = peak_memory_mb(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda"
                                                          else [])
    with garbage_collector_paused(), torch.profiler.profile(activities=activities) as prof:
        step(WARMUP_STEPS + timed_steps)
        sync(device)
    stage_ms = {stage: statistics.median(s[stage] for s in stages) for stage in stages[0]}
    stage_ms.update(kernel_stage_ms(prof, KERNEL_STAGES[provider], device))
    return {"first_loss": first_loss, "vae_encode_ms": vae.ms, "seconds": seconds, "stage_ms": stage_ms,
            "peak_mb": peak_mb}


def profile_train_case(arch, layers, providers, weights, device, backend, timed_steps) -> dict:
    """Every provider's training steps for one architecture, scene and weight dtype: {provider: measurements}."""
    dtype = TRAIN_WEIGHTS[weights]
    components = build_components(arch, device, dtype)
    sample = train_sample(components[5], layers)
    embeds, added = train_conditioning(components, device)
    # MILD's pipeline: its UNet is mild-train's model; its layer planning, VAE and scheduler serve both providers
    pipe = mild_pipeline(components, backend)
    pipe.vae.requires_grad_(False)
    for name, param in pipe.unet.named_parameters():  # as mild train: only the adapters and the SMA modulation learn
        param.requires_grad_(name.endswith(ADAPTER_KEYS))
    # mild train's mixed precision; bf16 weights run without it (see TRAIN_WEIGHTS)
    mixed = device == "cuda" and weights == "fp32"
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if mixed else contextlib.nullcontext
    measured = {}
    for provider in providers:
        if provider == "mild-train":
            unet = pipe.unet
        else:
            adapter_ids = pipe.prepare_layers(sample.image, sample.masks, sample.erase).adapter_ids
            unet = naive_training_unet(arch, device, dtype, adapter_ids, architecture(pipe)["lora_rank"])
        measured[provider] = profile_train_provider(provider, unet.train(), pipe, sample, embeds, added, device,
                                                    autocast, timed_steps)
        del unet
        release(device)
    return measured


def train_case_or_none(arch, layers, providers, weights, device, backend, timed_steps) -> dict | None:
    """profile_train_case, or None when it runs out of device memory."""
    try:
        return profile_train_case(arch, layers, providers, weights, device, backend, timed_steps)
    except torch.OutOfMemoryError as error:
        reason = str(error).splitlines()[0]
    release(device)  # only now: the traceback, and the tensors its frames held, are gone
    print(f"{arch} L{layers}, {weights} weights: out of memory ({reason})")
    return None


def samples_per_s(measured: dict) -> float:
    return statistics.median(1 / s for s in measured["seconds"])


def add_train_rows(results: Results, arch, layers, weights, precision, measured: dict, timed_steps) -> str:
    """One case's rows in the shared schema; returns their x."""
    x = f"{arch} L{layers} {weights}-weights"
    params = dict(arch=arch, layers=layers, weights=weights, precision=precision, samples_per_step=1,
                  warmup_steps=WARMUP_STEPS, timed_steps=timed_steps)

    def add(provider, metric, **value):
        results.add(kernel="mild_train_step", provider=provider, mode="train", metric=metric, x=x, **value, **params)

    for provider, m in measured.items():
        add(provider, "samples_per_s", quantiles=_quantiles([1 / s for s in m["seconds"]]))
        add(provider, "peak_memory_mb", value=m["peak_mb"])
        add(provider, "loss_step0", value=m["first_loss"])
        add(provider, "vae_encode_first_step_ms", value=m["vae_encode_ms"])
        for stage, ms in m["stage_ms"].items():
            add(provider, f"stage_ms:{stage}", value=ms)
    if set(TRAIN_PROVIDERS) <= set(measured):
        add("mild-train", "speedup_vs_naive-train",
            value=samples_per_s(measured["mild-train"]) / samples_per_s(measured["naive-train"]))
    return x


def report_train_case(x, arch, layers, precision, measured: dict):
    rates = ", ".join(f"{p} {samples_per_s(m):.3g} samples/s" for p, m in measured.items())
    losses = ", ".join(f"{p} {m['first_loss']:.4f}" for p, m in measured.items())
    print(f"{x} ({precision}): {rates}; step-0 loss {losses}")
    if set(TRAIN_PROVIDERS) <= set(measured):
        ratio = samples_per_s(measured["mild-train"]) / samples_per_s(measured["naive-train"])
        line = f"{x}: mild-train {ratio:.2f}x the naive-train samples/s"
        if arch == "sdxl" and layers == 2:
            line += f" (target >= {SDXL_TRAIN_TARGET:g}x: {'met' if ratio >= SDXL_TRAIN_TARGET else 'missed'})"
        print(line, flush=True)


def write_train_results(results: Results, out_dir: Path) -> Path:
    path = results.write(out_dir)
    rows = results.rows
    plot_rows(rows, "samples_per_s", out_dir / "e2e_train_throughput.png",
              title="Training samples/s: the MILD step against the naive step")
    stage_rows = [dict(r, x=f"{r['x']} {r['metric'].split(':')[1]}", metric="stage_ms")
                  for r in rows if r["metric"].startswith("stage_ms:")]
    plot_rows(stage_rows, "stage_ms", out_dir / "e2e_train_stages.png", title="Training step time per stage (ms)",
              log=True)
    return path


def train_main(args, gpu: bool, device: str, out_dir: Path) -> Results:
    providers = args.providers or TRAIN_PROVIDERS
    archs = args.arch or (["sdxl", "sd15"] if gpu else ["tiny"])
    timed_steps = args.steps or (4 if gpu else 2)
    weight_choices = args.train_weights or ["fp32"]
    cases = [(arch, layers, weights) for arch in archs for layers in args.layers or [2] for weights in weight_choices]
    results = Results("e2e_train")
    for arch, layers, weights in cases:
        measured = train_case_or_none(arch, layers, providers, weights, device, args.backend, timed_steps)
        if measured is None and weights == "fp32" and "bf16" not in weight_choices:
            print(f"{arch} L{layers}: falling back to bf16 weights")
            weights = "bf16"
            measured = train_case_or_none(arch, layers, providers, weights, device, args.backend, timed_steps)
        if measured is None:
            continue
        precision = "fp32 weights, bf16 autocast" if gpu and weights == "fp32" else f"{weights} weights"
        x = add_train_rows(results, arch, layers, weights, precision, measured, timed_steps)
        report_train_case(x, arch, layers, precision, measured)
        path = write_train_results(results, out_dir)  # after every case: a run cut short keeps those it finished
        written = [path, out_dir / "e2e_train_throughput.png", out_dir / "e2e_train_stages.png"]
        print(describe_outputs(out_dir, written, []), flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=None, choices=("tiny", "sd15-256", "sd15", "sdxl"))
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help="layer counts (default: inference 1 2 4 8 on a GPU, 1 2 on the CPU; --train 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="inference: denoising steps (GPU 30, CPU 2); --train: timed training steps (GPU 4, CPU 2)")
    parser.add_argument("--providers", nargs="+", default=None,
                        help=f"default: {' '.join(INFERENCE_PROVIDERS)}; with --train {' '.join(TRAIN_PROVIDERS)}")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--train", action="store_true", help="profile the training step instead of inference")
    parser.add_argument("--step", action="store_true",
                        help="profile one denoising step per provider (benchmarks/profile_step.py: mild eager and "
                             "compiled, a sequential per-layer loop, dense-mask attention); default: tiny and "
                             "sd15-256 with 3 layers on the CPU, sd15 and sdxl on a GPU")
    parser.add_argument("--train-weights", nargs="+", choices=tuple(TRAIN_WEIGHTS), default=None,
                        help="--train: weight dtypes, one case each (default fp32, as mild train; bf16 when fp32 "
                             "runs out of memory)")
    parser.add_argument("--model-kind", nargs="+", choices=("flux", "sd3", "sd15", "sdxl"), default=None,
                        help="the model family to profile at its real shapes on a GPU (random weights): flux (FLUX.1 "
                             "Fill) and sd3 through MILDTransformerPipeline (benchmarks/profile_transformer.py), sd15 "
                             "and sdxl as --arch; on the CPU their toy versions")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model on the CPU, a harness check (inference: 2 steps, L = 1 and 2; --train: L = 2)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    step_providers = ("mild", "mild-compiled", "mild-cudagraphs", "sequential", "dense-mask")
    known = TRAIN_PROVIDERS if args.train else step_providers if args.step else INFERENCE_PROVIDERS
    if args.providers and not set(args.providers) <= set(known):
        parser.error(f"--providers: choose from {', '.join(known)}")

    from tqdm import tqdm

    gpu = on_gpu() and not args.cpu_smoke
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    out_dir = args.out or (RESULTS / ("quick" if args.cpu_smoke else device_slug()))
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = args.model_kind or []
    transformer_kinds = [k for k in kinds if k in ("flux", "sd3")]
    if transformer_kinds:
        if len(transformer_kinds) != len(kinds) or args.train or args.step or args.arch:
            parser.error("--model-kind flux/sd3: inference only, and not mixed with UNet kinds or --arch")
        from benchmarks.profile_transformer import PROVIDERS as TRANSFORMER_PROVIDERS, transformer_main

        if args.providers and not set(args.providers) <= set(TRANSFORMER_PROVIDERS):
            parser.error(f"--providers: choose from {', '.join(TRANSFORMER_PROVIDERS)} for a transformer")
        return transformer_main(transformer_kinds, args.layers or ([1, 2, 4] if gpu else [1, 2]),
                                args.providers or TRANSFORMER_PROVIDERS, args.backend,
                                args.steps or (28 if gpu else 2), gpu, device,
                                torch.bfloat16 if gpu else torch.float32, out_dir)
    if kinds:  # UNet families: the --arch names, or the tiny model on the CPU
        args.arch = (args.arch or []) + (kinds if gpu else ["tiny"])
    if args.train:
        return train_main(args, gpu, device, out_dir)
    if args.step:
        from benchmarks.profile_step import GPU_PROVIDERS, PROVIDERS, step_main

        archs = args.arch or (["sd15", "sdxl"] if gpu else ["tiny", "sd15-256"])
        providers = args.providers or (GPU_PROVIDERS if gpu else PROVIDERS)
        return step_main(archs, args.layers or [3], providers, args.backend, warmup=2,
                         timed=args.steps or (10 if gpu else 3), device=device, dtype=dtype, out_dir=out_dir)
    archs = args.arch or (["sd15", "sdxl"] if gpu else ["tiny"])
    layer_counts = args.layers or ([1, 2, 4, 8] if gpu else [1, 2])
    steps = args.steps or (30 if gpu else 2)
    results = Results("e2e")
    jobs = [(a, L, p) for a in archs for L in layer_counts for p in args.providers or INFERENCE_PROVIDERS]
    components, traces = {}, []
    for arch, L, provider in tqdm(jobs, desc="e2e", unit="run"):
        if arch not in components:
            components.clear()
            if gpu:
                torch.cuda.empty_cache()
            components[arch] = build_components(arch, device, dtype)
        parts = components[arch]
        image, masks = scene(parts[5], L)
        if provider == "baseline":
            pipe = baseline_pipeline(arch, parts)

            def run(steps):
                run_baseline(pipe, arch, parts, image, masks, steps, device, dtype)
        else:
            pipe = mild_pipeline(parts, args.backend, plain_attention=provider == "mild-plain-attn")
            inputs = mild_inputs(parts, device, dtype)

            def run(steps):
                pipe(image, masks, erase=[1], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     **inputs)
        trace = out_dir / f"trace_{arch}_L{L}_{provider}.json"
        seconds, prof = profiled_run(run, steps, device, trace)
        traces.append(trace)
        x = f"{arch} L{L}"
        params = dict(arch=arch, layers=L, steps=steps, dtype=str(dtype).split(".")[-1], trace=trace.name)
        results.add(kernel="mild_erase", provider=provider, mode="e2e", metric="images_per_s", x=x, value=1 / seconds,
                    **params)
        results.add(kernel="mild_erase", provider=provider, mode="e2e", metric="peak_memory_mb", x=x,
                    value=peak_memory_mb(device), **params)
        if provider != "baseline":
            for stage, ms in stage_times_ms(prof, device).items():
                results.add(kernel="mild_erase", provider=provider, mode="e2e", metric=f"stage_ms:{stage}", x=x,
                            value=ms, **params)
        tqdm.write(f"{x} {provider}: {1 / seconds:.3f} images/s ({seconds:.2f} s)")
        if provider == "baseline":  # give the UNet its SMA processors back for the next runs
            from mild import enable_sma

            enable_sma(parts[0])
    summarize(results, out_dir, traces)
    return results


def describe_outputs(out_dir: Path, files: list[Path], traces: list[Path]) -> str:
    """One line naming everything a run wrote, traces with their size."""
    names = ", ".join(f.name for f in files if f.exists())
    line = f"wrote {out_dir}/: {names}"
    if traces:
        megabytes = sum(t.stat().st_size for t in traces if t.exists()) / 2**20
        line += (f" and {len(traces)} torch.profiler traces trace_*.json ({megabytes:.1f} MB; open one in "
                 "https://ui.perfetto.dev or chrome://tracing)")
    return line


def summarize(results: Results, out_dir: Path, traces: list[Path]):
    path = results.write(out_dir)
    rows = results.rows
    plot_rows(rows, "images_per_s", out_dir / "e2e_throughput.png", title="MILD erase throughput against layers")
    stage_rows = [dict(r, provider=r["metric"].split(":")[1], metric="stage_ms")
                  for r in rows if r["metric"].startswith("stage_ms:") and r["provider"] == "mild"]
    plot_rows(stage_rows, "stage_ms", out_dir / "e2e_stages.png", title="MILD time per stage (ms)", log=True)
    by = {(r["x"], r["provider"], r["metric"]): r["q50"] for r in rows}
    for x in dict.fromkeys(r["x"] for r in rows):
        mild, base = by.get((x, "mild", "images_per_s")), by.get((x, "baseline", "images_per_s"))
        unet_sma, unet_plain = by.get((x, "mild", "stage_ms:unet")), by.get((x, "mild-plain-attn", "stage_ms:unet"))
        line = f"{x}:"
        if mild and base:
            line += f" {mild / base:.2f}x the baseline's images/s;"
        if unet_sma and unet_plain:
            line += f" SMA overhead {100 * (unet_sma - unet_plain) / unet_sma:.1f}% of UNet time"
        print(line)
    print(describe_outputs(out_dir, [path, out_dir / "e2e_throughput.png", out_dir / "e2e_stages.png"], traces))


if __name__ == "__main__":
    main()
