"""One denoising step of a MILD erase, measured as a step: the UNet call and the scheduler step.

Providers, all on the same UNet (SMA processors, both LoRA adapters) and the same L layers:

- ``mild``: every layer and both CFG halves in one UNet call (SMA, multi-adapter LoRA,
  CAG on), then FusedStep for all rows: what MILDPipeline runs, eager;
- ``mild-compiled``: the same through ``torch.compile(unet, fullgraph=True, dynamic=False)``
  (inductor's default mode); on a GPU also ``mild-cudagraphs`` (mode "reduce-overhead");
- ``sequential``: one UNet call per layer (its two CFG rows, its own region context and
  adapter), each followed by diffusers' own ``scheduler.step``: a loop a user would write;
- ``dense-mask``: all rows in one call, but attention is SDPA with the region bias and
  blocking as a dense (B, H, N, N) float mask (benchmarks/profile_e2e.py's naive processor).

Per step, after warm-up (compilation): milliseconds (median and deciles of the timed
steps), host reads of tensor values (``Tensor.item``/``tolist``/``__bool__``/... counted
over the timed steps; each is a GPU sync), launches (CUDA kernels on a GPU; on the CPU,
operator calls: top-level aten and custom ops), and the peak of memory allocated within the
step (``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the profiler's allocation
events, blind to inductor's C++ kernels: n/a there). On the CPU the torch backends read
their tile lists and adapter ids to skip work (free there: no device to wait for); the
Triton backend reads nothing (tests/test_mild_processors.py). Ratios are against ``mild`` (eager).
Rows go to ``step.json`` in the shared schema.

    python benchmarks/profile_e2e.py --step                     # CPU: tiny (64 px) and SD 1.5 at 256 px, 3 layers
    python benchmarks/profile_e2e.py --step --arch sd15 sdxl    # GPU: 512 and 1024 px (or `mild profile --step`)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Results, _quantiles  # noqa: E402
from benchmarks.profile_e2e import DenseMaskSDPAProcessor, build_components, mild_inputs, scene, sync  # noqa: E402
from mild import MILDPipeline, RegionContext, enable_sma  # noqa: E402
from mild_kernels import FusedStep, set_adapter_ids  # noqa: E402
from mild_kernels._runtime import count_host_reads  # noqa: E402

PROVIDERS = ("mild", "mild-compiled", "sequential", "dense-mask")
GPU_PROVIDERS = PROVIDERS + ("mild-cudagraphs",)


class StepCase:
    """One architecture and layer count: the UNet inputs of every row, prepared once."""

    def __init__(self, arch: str, layers: int, device, dtype, backend: str):
        parts = build_components(arch, device, dtype)
        self.unet, resolution = parts[0], parts[5]
        self.pipe = MILDPipeline(vae=parts[1], text_encoder=None, tokenizer=None, unet=self.unet, scheduler=parts[2],
                                 backend=backend)
        self.scheduler = parts[2]
        self.scheduler.set_timesteps(50, device=device)
        self.timestep = self.scheduler.timesteps[10]
        self.device, self.backend, self.guidance = device, backend, 7.5
        image, masks = scene(resolution, layers)
        self.rows = self.pipe.prepare_layers(image, masks, erase=[1])
        self.layers = L = len(self.rows.plan.layers)
        inputs = mild_inputs(parts, device, dtype)
        cond = torch.stack([inputs["prompt_embeds"][kind] for kind in self.rows.kinds])
        self.text = torch.cat([inputs["negative_prompt_embeds"][None].expand_as(cond), cond])
        added = inputs.get("added_cond_kwargs")
        self.added = None if added is None else {
            name: value[None].expand(2 * L, *value.shape) for name, value in added.items()}
        generator = torch.Generator().manual_seed(0)
        h, w = self.rows.latent_size
        self.latents = torch.randn(L, 4, h, w, generator=generator).to(device, dtype)
        # The inpainting condition: region mask and masked-image latents (random: speed only)
        self.condition = torch.cat([self.rows.inpaint_latent, torch.randn(L, 4, h, w, generator=generator)],
                                   1).to(device, dtype)

    def model_input(self, latents, rows=slice(None)):
        return torch.cat([latents.repeat(2, 1, 1, 1), self.condition[rows].repeat(2, 1, 1, 1)], 1)

    def text_of(self, rows: slice):
        L = self.layers
        return torch.cat([self.text[:L][rows], self.text[L:][rows]])

    def added_of(self, rows: slice):
        if self.added is None:
            return None
        return {name: value[: 2 * (rows.stop - rows.start)] for name, value in self.added.items()}

    def batched_step(self, unet, context):
        """Every layer's rows in one UNet call, then one FusedStep launch."""
        fused = FusedStep(self.scheduler, backend=self.backend)
        set_adapter_ids(self.unet, self.rows.adapter_ids * 2)

        def step():
            kwargs = {"region_context": context} if context is not None else None
            noise = unet(self.model_input(self.latents), self.timestep, self.text, cross_attention_kwargs=kwargs,
                         added_cond_kwargs=self.added).sample
            uncond, cond = noise.chunk(2)
            return fused.step(uncond, cond, self.timestep, self.latents, self.guidance)
        return step

    def layer_contexts(self) -> list[RegionContext]:
        rows, device = self.rows, self.device
        return [RegionContext(instance_masks=rows.region_masks[l:l + 1].to(device), latent_size=rows.latent_size,
                              row_image=torch.zeros(2, dtype=torch.long), alpha=1.0, beta=1.0,
                              allow=rows.allow[l:l + 1].repeat(2, 1, 1).to(device),
                              domains=[rows.plan.layers[l].domain] * 2, backend=self.backend).prepare(
                    self.unet, self.text.shape[1], device) for l in range(self.layers)]

    def sequential_step(self):
        """One UNet call per layer (its two CFG rows) and diffusers' scheduler.step per layer."""
        contexts = self.layer_contexts()

        def step():
            out = []
            for l, context in enumerate(contexts):
                rows = slice(l, l + 1)
                set_adapter_ids(self.unet, [self.rows.adapter_ids[l]] * 2)
                noise = self.unet(self.model_input(self.latents[rows], rows), self.timestep, self.text_of(rows),
                                  cross_attention_kwargs={"region_context": context},
                                  added_cond_kwargs=self.added_of(rows)).sample
                uncond, cond = noise.chunk(2)
                guided = uncond + self.guidance * (cond - uncond)
                out.append(self.scheduler.step(guided, self.timestep, self.latents[rows]).prev_sample)
            return torch.cat(out)
        return step


def provider_step(case: StepCase, provider: str):
    """The provider's step function; the UNet's processors set as it needs them."""
    enable_sma(case.unet)
    if provider == "sequential":
        return case.sequential_step()
    if provider == "dense-mask":
        case.unet.set_attn_processor(DenseMaskSDPAProcessor())
        context = case.rows.context(halves=2, alpha=1.0, beta=1.0, backend=case.backend, device=case.device)
        context.sort_tokens = False  # the dense mask is built in raster order
        return case.batched_step(case.unet, context)
    context = case.rows.context(halves=2, alpha=1.0, beta=1.0, backend=case.backend, device=case.device)
    context.prepare(case.unet, case.text.shape[1], case.device)
    unet = case.unet
    if provider != "mild":
        torch._dynamo.reset()
        mode = "reduce-overhead" if provider == "mild-cudagraphs" else None
        unet = torch.compile(case.unet, fullgraph=True, dynamic=False, mode=mode)
    return case.batched_step(unet, context)


def peak_step_mb(run, device, compiled: bool) -> float:
    """Peak of the memory allocated within one call of ``run`` (MiB above its start); NaN for
    compiled code on the CPU, whose C++ kernels allocate where the profiler does not look."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    if compiled:
        return float("nan")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    current = peak = 0
    for _, size in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                          if e.self_cpu_memory_usage):
        current += size
        peak = max(peak, current)
    return peak / 2**20


def launches_per_step(run, device) -> int:
    """CUDA kernels of one step on a GPU; on the CPU, top-level operator calls (aten, custom ops)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
        sync(device)
    events = prof.events()
    if device == "cuda":
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)

    def is_operator(event):
        return "::" in event.name and not event.name.startswith("mild::")

    def has_operator_parent(event):
        parent = event.cpu_parent
        while parent is not None:
            if is_operator(parent):
                return True
            parent = parent.cpu_parent
        return False
    return sum(is_operator(e) and not has_operator_parent(e) for e in events)


def measure(case: StepCase, provider: str, warmup: int, timed: int) -> dict:
    """ms per step (samples), host reads, launches and peak MiB per step for one provider."""
    step = provider_step(case, provider)
    with torch.no_grad():
        for _ in range(warmup):
            step()
        sync(case.device)
        samples = []
        with count_host_reads() as reads:
            for _ in range(timed):
                start = time.perf_counter()
                step()
                sync(case.device)
                samples.append(1e3 * (time.perf_counter() - start))
        launches = launches_per_step(step, case.device)
        peak = peak_step_mb(step, case.device, compiled=provider.startswith("mild-"))
    return dict(ms=samples, host_reads=len(reads) / timed, launches=launches, peak_mb=peak)


def report_table(rows: list[dict]) -> str:
    """A markdown table: per case and provider, the step's figures and its ratio to mild."""
    by = {(r["x"], r["provider"], r["metric"]): r["q50"] for r in rows}
    lines = ["| case | provider | ms / step | x mild | host reads / step | launches / step | peak MiB / step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for x in dict.fromkeys(r["x"] for r in rows):
        for provider in dict.fromkeys(r["provider"] for r in rows if r["x"] == x):
            ms, base = by[(x, provider, "ms_per_step")], by[(x, "mild", "ms_per_step")]
            peak = by[(x, provider, "peak_mb_per_step")]
            reads, launches = by[(x, provider, "host_reads_per_step")], by[(x, provider, "launches_per_step")]
            lines.append(f"| {x} | {provider} | {ms:.1f} | {ms / base:.2f} | {reads:.0f} | {launches:.0f} | "
                         f"{'n/a' if peak != peak else f'{peak:.1f}'} |")
    return "\n".join(lines)


def step_main(archs, layer_counts, providers, backend, warmup, timed, device, dtype, out_dir: Path) -> Results:
    from tqdm import tqdm

    results = Results("step")
    jobs = [(a, L) for a in archs for L in layer_counts]
    for arch, L in tqdm(jobs, desc="step cases", unit="case"):
        case = StepCase(arch, L, device, dtype, backend)
        x = f"{arch} L{case.layers}"
        for provider in providers:
            measured = measure(case, provider, warmup, timed)
            params = dict(arch=arch, layers=case.layers, dtype=str(dtype).split(".")[-1], backend=backend,
                          timed_steps=timed)
            results.add(kernel="denoising_step", provider=provider, mode="e2e", metric="ms_per_step", x=x,
                        quantiles=_quantiles(measured["ms"]), **params)
            for metric in ("host_reads", "launches", "peak_mb"):
                results.add(kernel="denoising_step", provider=provider, mode="e2e", metric=f"{metric}_per_step", x=x,
                            value=measured[metric], **params)
            tqdm.write(f"{x} {provider}: {statistics.median(measured['ms']):.1f} ms/step, "
                       f"{measured['host_reads']:.0f} host reads, {measured['launches']} launches, "
                       f"{measured['peak_mb']:.1f} MiB")
            results.write(out_dir)  # after every provider: a run cut by its time limit keeps what it measured
        del case
    path = results.write(out_dir)
    table = report_table(results.rows)
    (out_dir / "step.md").write_text(table + "\n")
    print(table)
    print(f"wrote {path} and {out_dir / 'step.md'}")
    return results
