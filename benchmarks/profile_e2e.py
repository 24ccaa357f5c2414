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

    python benchmarks/profile_e2e.py --cpu-smoke          # tiny model, CPU: checks the harness
    python benchmarks/profile_e2e.py --arch sd15 sdxl     # GPU
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, Results, device_slug, on_gpu, plot_rows  # noqa: E402
from mild import MILDPipeline, RegionContext  # noqa: E402
from mild.architectures import SD15_INPAINT_UNET, SD_VAE, SDXL_INPAINT_UNET  # noqa: E402
from mild.layers import plan_layers  # noqa: E402
from mild.tiny import TEXT_DIM, tiny_components  # noqa: E402

ARCHS = {
    "sd15": dict(resolution=512, unet=SD15_INPAINT_UNET, vae=SD_VAE, text=(77, 768), pooled=None),
    "sdxl": dict(resolution=1024, unet=SDXL_INPAINT_UNET, vae=SD_VAE, text=(77, 2048), pooled=1280),
}
STAGES = {"unet": "mild::unet", "attention": "mild_kernels::sma_forward", "lora": "mild_kernels::multi_lora_forward",
          "step": "mild::step", "vae": ("mild::vae_encode", "mild::vae_decode"), "composite": "mild::composite"}


def build_components(arch: str, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if arch == "tiny":
        parts = tiny_components()
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=None, choices=("tiny", "sd15", "sdxl"))
    parser.add_argument("--layers", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--providers", nargs="+", default=("mild", "mild-plain-attn", "baseline"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 steps, L = 1 and 2: harness check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    gpu = on_gpu() and not args.cpu_smoke
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    archs = args.arch or (["sd15", "sdxl"] if gpu else ["tiny"])
    layer_counts = args.layers or ([1, 2, 4, 8] if gpu else [1, 2])
    steps = args.steps or (30 if gpu else 2)
    out_dir = args.out or (RESULTS / ("quick" if args.cpu_smoke else device_slug()))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = Results("e2e")
    jobs = [(a, L, p) for a in archs for L in layer_counts for p in args.providers]
    components = {}
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
        run(min(steps, 2))  # warm-up: compilation, caches, autotuning
        sync(device)
        reset_peak(device)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
        trace = out_dir / f"trace_{arch}_L{L}_{provider}.json"
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            run(steps)
            sync(device)
            seconds = time.perf_counter() - start
        prof.export_chrome_trace(str(trace))
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
    summarize(results, out_dir)
    return results


def summarize(results: Results, out_dir: Path):
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
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
