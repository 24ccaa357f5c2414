"""End-to-end throughput of a MILD erase on a diffusion transformer: FLUX.1 Fill or SD3.

The workload of benchmarks/profile_e2e.py (one image, one erased person occluding L - 1 kept
people, so L layers), through ``MILDTransformerPipeline``. On a GPU the transformer and VAE
take their published shapes (mild/architectures.py: FLUX.1 Fill at 1024 x 1024, 4096 image +
512 text tokens, 24 heads of 128; SD3 Medium, 4096 + 333 tokens, 24 heads of 64) with random
weights; on the CPU the toy ones of ``mild.tiny.tiny_transformer_pipeline`` at 64 x 64. Text
encoders are skipped (random prompt embeddings of the published widths).

Providers:
- ``mild``: every layer (SD3: and both CFG halves) in one transformer call per step, SMA in
  the joint attention, multi-adapter LoRA on attention and feed-forward linears, FusedStep;
- ``mild-plain-attn``: the same with diffusers' own attention processors (no SMA): its
  transformer time is the yardstick for SMA's overhead.

Rows (images/s, peak memory, time per stage) join e2e.json; torch.profiler traces beside it.

    python benchmarks/profile_e2e.py --model-kind flux      # or `mild profile --model-kind flux`
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Results  # noqa: E402
from benchmarks.profile_e2e import peak_memory_mb, profiled_run, scene, stage_times_ms, summarize  # noqa: E402

PROVIDERS = ("mild", "mild-plain-attn")


class PlainJointProcessor:
    """diffusers' own joint-attention processor that takes (and ignores) the region context."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 region_context=None, **kwargs):
        if image_rotary_emb is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def build_pipeline(kind: str, gpu: bool, device, dtype, backend: str):
    """(MILDTransformerPipeline, call inputs, image side): published shapes on a GPU, toy on the CPU."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3InpaintPipeline)

    from mild.architectures import FLUX_FILL_TRANSFORMER, FLUX_VAE, SD3_TRANSFORMER, SD3_VAE, TRANSFORMER_TEXT
    from mild.tiny import tiny_transformer_pipeline
    from mild.transformer_pipeline import MILDTransformerPipeline

    torch.manual_seed(0)
    if gpu:
        with torch.device(device):  # random init straight on the device
            if kind == "flux":
                base = FluxFillPipeline(
                    scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                              base_image_seq_len=256, max_image_seq_len=4096),
                    vae=AutoencoderKL(**FLUX_VAE).eval(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                    tokenizer_2=None, transformer=FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER).eval())
            else:
                base = StableDiffusion3InpaintPipeline(
                    transformer=SD3Transformer2DModel(**SD3_TRANSFORMER).eval(),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**SD3_VAE).eval(),
                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                    tokenizer_3=None)
        (tokens, width), pooled = TRANSFORMER_TEXT[kind]
        side = 1024
    else:
        base = tiny_transformer_pipeline(kind)
        config = base.transformer.config
        tokens, width, pooled, side = 16, config.joint_attention_dim, config.pooled_projection_dim, 64
    base.to(device, dtype)
    base.set_progress_bar_config(disable=True)
    pipe = MILDTransformerPipeline(base, backend=backend)

    def embeds():
        return torch.randn(tokens, width, device=device, dtype=dtype), torch.randn(pooled, device=device, dtype=dtype)

    inputs = dict(prompt_embeds={"background": embeds(), "person": embeds()}, negative_prompt_embeds=embeds())
    return pipe, inputs, side


def transformer_main(kinds, layer_counts, providers, backend, steps, gpu, device, dtype, out_dir: Path) -> Results:
    from tqdm import tqdm

    results, traces = Results("e2e"), []
    for kind in kinds:
        pipe, inputs, side = build_pipeline(kind, gpu, device, dtype, backend)
        sma = dict(pipe.transformer.attn_processors)
        plain = {name: PlainJointProcessor(processor.default) for name, processor in sma.items()}
        for L, provider in tqdm([(L, p) for L in layer_counts for p in providers], desc=kind, unit="run"):
            # a copy: set_attn_processor empties the dict it is given
            pipe.transformer.set_attn_processor(dict(plain if provider == "mild-plain-attn" else sma))
            image, masks = scene(side, L)

            def run(count):
                pipe(image, masks, erase=[1], num_inference_steps=count, generator=torch.Generator().manual_seed(0),
                     **inputs)

            trace = out_dir / f"trace_{kind}_L{L}_{provider}.json"
            seconds, prof = profiled_run(run, steps, device, trace)
            traces.append(trace)
            x = f"{kind}{'' if gpu else '-tiny'} L{L}"
            params = dict(arch=kind, layers=L, steps=steps, dtype=str(dtype).split(".")[-1], trace=trace.name,
                          side=side)
            results.add(kernel="mild_erase", provider=provider, mode="e2e", metric="images_per_s", x=x,
                        value=1 / seconds, **params)
            results.add(kernel="mild_erase", provider=provider, mode="e2e", metric="peak_memory_mb", x=x,
                        value=peak_memory_mb(device), **params)
            for stage, ms in stage_times_ms(prof, device).items():
                results.add(kernel="mild_erase", provider=provider, mode="e2e", metric=f"stage_ms:{stage}", x=x,
                            value=ms, **params)
            tqdm.write(f"{x} {provider}: {1 / seconds:.3f} images/s ({seconds:.2f} s)")
        pipe.transformer.set_attn_processor(dict(sma))
        if gpu:
            torch.cuda.empty_cache()
    summarize(results, out_dir, traces)
    return results
