"""The MILD pipeline end to end with the tiny model, layer planning, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_png_header
from mild import MILDPipeline, plan_layers, tiny_components
from mild.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def scene(size=SIZE, seed=0):
    """A random photo and two overlapping person masks (person 2 occludes person 1)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=gen)
    masks = torch.zeros(2, size, size)
    masks[0, size // 8: size * 5 // 8, size // 8: size // 2] = 1
    masks[1, size // 3: size * 15 // 16, size * 3 // 8: size * 13 // 16] = 1
    masks[0][masks[1] > 0] = 0  # instance masks show the visible part of each person
    return image, masks


@pytest.fixture(scope="module")
def tiny_pipe():
    return MILDPipeline.tiny(seed=0, backend="auto")


def test_tiny_pipeline_erases_and_keeps_outside_pixels(tiny_pipe):
    image, masks = scene()
    keypoints = torch.rand(2, 17, 3) * torch.tensor([SIZE, SIZE, 1.0])
    parsing = torch.randint(0, 20, (2, SIZE, SIZE))
    out = tiny_pipe(image, masks, erase=[2], keypoints=keypoints, parsing=parsing, occlusion_order=[0, 1],
                    num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    plan = out.plan
    assert [layer.person for layer in plan.layers] == [0, 1]  # background, and person 1 whom person 2 hid
    assert out.layers.shape == (2, 3, SIZE, SIZE)
    assert out.image.shape == (3, SIZE, SIZE) and out.image.isfinite().all()
    outside = plan.paste_region == 0
    assert outside.any() and (plan.paste_region[masks[1] > 0] == 1).all()
    assert torch.equal(out.image[:, outside], image[:, outside])
    assert not torch.equal(out.image[:, masks[1] > 0], image[:, masks[1] > 0])
    assert set(out.cag) == {0, 1}
    for per_resolution in out.cag.values():
        assert set(per_resolution) == {"8x8", "4x4"}
        assert all(-1 <= v <= 1 for v in per_resolution.values())


def test_guidance_scale_one_runs_the_conditional_rows_alone(tiny_pipe, monkeypatch):
    """Classifier-free guidance at scale 1 is the conditional prediction: the UNet runs the
    L conditional rows only (half the work), and the result is what both halves would give."""
    image, masks = scene()
    rows = []
    forward = type(tiny_pipe.unet).forward
    monkeypatch.setattr(type(tiny_pipe.unet), "forward",
                        lambda self, x, *a, **k: rows.append(x.shape[0]) or forward(self, x, *a, **k))
    outs = {}
    for scale in (1.0, 1.0 + 1e-6):  # the second runs both halves, guidance a hair above 1
        rows.clear()
        outs[scale] = tiny_pipe(image, masks, erase=[2], num_inference_steps=3, guidance_scale=scale,
                                generator=torch.Generator().manual_seed(1))
        layers = len(outs[scale].plan.layers)
        assert rows == [layers * (1 if scale == 1 else 2)] * 3
    one, both = outs.values()
    assert (one.image - both.image).abs().max() < 1e-4 and (one.layers - both.layers).abs().max() < 1e-4
    assert set(one.cag) == set(both.cag) == {0, 1}
    assert all(abs(one.cag[layer][key] - both.cag[layer][key]) < 1e-4 for layer in one.cag for key in one.cag[layer])


@pytest.mark.parametrize("steps", [1, 4, None])
def test_tiny_sampling_starts_from_the_last_trained_timestep(tiny_pipe, monkeypatch, steps):
    """Sampling starts from pure noise, so the UNet's first call must be at the last trained
    timestep (with "leading" spacing one step ran at t = 1, reading noise as a clean latent).
    Without num_inference_steps a call runs the model's own default (the shipped tiny model's: 1)."""
    image, masks = scene()
    timesteps = []
    forward = type(tiny_pipe.unet).forward
    monkeypatch.setattr(type(tiny_pipe.unet), "forward",
                        lambda self, x, t, *a, **k: timesteps.append(int(t.flatten()[0])) or forward(self, x, t, *a, **k))
    tiny_pipe(image, masks, erase=[2], num_inference_steps=steps, generator=torch.Generator().manual_seed(1))
    if steps is None:
        assert tiny_pipe.default_steps == 1
        steps = 1
    last = tiny_pipe.scheduler.config.num_train_timesteps - 1
    assert len(timesteps) == steps and timesteps[0] == last
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[-1] == last // steps


def test_pil_in_pil_out_and_odd_sizes(tiny_pipe):
    image, masks = scene(size=50)
    pil = Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    out = tiny_pipe(pil, [Image.fromarray((m.numpy() * 255).astype(np.uint8)) for m in masks],
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out.image, Image.Image) and out.image.size == (50, 50)
    before, after = np.asarray(pil), np.asarray(out.image)
    outside = (out.plan.paste_region == 0).numpy()
    assert np.array_equal(after[outside], before[outside])
    assert len(out.plan.layers) == 1  # everyone erased: the background pathway alone


def test_a_photo_larger_than_the_working_size_runs_scaled_and_pastes_at_full_size(tiny_pipe):
    image, masks = scene(size=90)
    keypoints = torch.rand(2, 17, 3) * torch.tensor([90, 90, 1.0])
    shipped, tiny_pipe.working_size = tiny_pipe.working_size, 40
    try:
        out = tiny_pipe(image, masks, erase=[2], keypoints=keypoints, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0))
    finally:
        tiny_pipe.working_size = shipped
    assert out.image.shape == (3, 90, 90) and out.layers.shape[-2:] == (40, 40)
    outside = out.plan.paste_region == 0
    assert out.plan.paste_region.shape == (90, 90) and outside.any()
    assert torch.equal(out.image[:, outside], image[:, outside])
    assert not torch.equal(out.image[:, masks[1] > 0], image[:, masks[1] > 0])


def test_pipeline_runs_without_hmg_inputs_and_with_a_non_inpainting_unet():
    pipe = MILDPipeline.tiny(seed=3, inpainting=False, with_hmg=False, weights=None)
    image, masks = scene()
    out = pipe(image, masks, erase=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    outside = out.plan.paste_region == 0
    assert torch.equal(out.image[:, outside], image[:, outside])


def test_from_pretrained_loads_a_local_folder(tmp_path):
    for name, component in tiny_components(seed=5).items():
        component.save_pretrained(tmp_path / name)
    pipe = MILDPipeline.from_pretrained(tmp_path)
    image, masks = scene()
    out = pipe(image, masks, erase=[2], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.image.shape == image.shape
    with pytest.raises(ValueError, match="^path"):
        MILDPipeline.from_pretrained(tmp_path / "missing")


def test_layers_composite_back_to_front_by_their_own_alpha():
    """The result is the float64 "over" of the decoded layers by the alphas the call reports,
    pasted through the feathered erased union; the background's alpha is 1, a person layer's is
    1 on its visible mask, predicted inside its inpaint region and 0 elsewhere."""
    from mild.synth import procedural_sample

    sample = procedural_sample(21, size=SIZE, kind="occluded")
    pipe = MILDPipeline.tiny(seed=1, weights=None, backend="torch")
    with torch.no_grad():  # a head that predicts something other than 0 or 1 everywhere
        pipe.alpha.out.bias.fill_(0.3)
    out = pipe(sample.image, sample.masks, erase=sample.erase, occlusion_order=sample.occlusion_order,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    layers, alphas = out.layers.double(), out.alphas.double()
    assert len(out.plan.layers) >= 2 and alphas.shape == (len(out.plan.layers), 1, SIZE, SIZE)
    assert torch.equal(out.alphas[0], torch.ones(1, SIZE, SIZE))
    over = layers[0]
    for layer, image, alpha in zip(out.plan.layers[1:], layers[1:], alphas[1:]):
        visible = sample.masks[layer.person - 1] > 0.5
        assert torch.equal(alpha[0][visible], torch.ones(int(visible.sum()), dtype=torch.float64))
        assert not alpha[0][~visible & (layer.inpaint == 0)].any()
        predicted = alpha[0][~visible & (layer.inpaint > 0)]
        assert predicted.numel() and ((predicted > 0) & (predicted < 1)).all()
        over = alpha * image + (1 - alpha) * over
    paste = out.plan.paste_region.double()
    expected = paste * over + (1 - paste) * sample.image.double()
    assert (out.image.double() - expected).norm() / expected.norm() < 1e-6


def test_alpha_head_reads_the_layers_as_decoded_as_in_training():
    """Training feeds the head the decoded x0 estimate of every row (mild/train.py); inference
    must feed it the decoded layers too, not the layers with the photo pasted outside their
    inpaint region (which the head never saw). The pasted layers, colour-corrected by the head
    inside their region, are what is composited."""
    from mild.synth import procedural_sample

    sample = procedural_sample(21, size=SIZE, kind="occluded")
    pipe = MILDPipeline.tiny(seed=1, weights=None, backend="torch")
    seen, decoded = [], []
    with torch.no_grad():  # a colour correction to find in the composited layer
        pipe.alpha.out.bias[1:].fill_(0.1)
    head_decode = pipe.alpha.decode
    pipe.alpha.decode = lambda *inputs: seen.append([t.detach().clone() for t in inputs]) or head_decode(*inputs)
    decode = pipe._decode
    pipe._decode = lambda latents: decoded.append(decode(latents)) or decoded[-1]
    out = pipe(sample.image, sample.masks, erase=sample.erase, occlusion_order=sample.occlusion_order,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    (person, background, visible, region), = seen
    layers = decoded[-1].float()
    assert torch.equal(person, layers[1:]) and torch.equal(background, layers[:1].expand_as(person))
    outside = region[0, 0] == 0
    assert outside.any() and not torch.allclose(person[0][:, outside], sample.image[:, outside])
    assert torch.equal(out.layers[1][:, outside], sample.image[:, outside].to(out.layers.dtype))
    # inside its region the composited person layer is the head's colour-corrected one
    with torch.no_grad():
        _, corrected = head_decode(person, background, visible, region)
    inside = region[0, 0] > 0
    assert not torch.equal(corrected, person)
    assert torch.equal(out.layers[1][:, inside], corrected[0][:, inside].to(out.layers.dtype))


def test_plan_layers():
    _, masks = scene()
    plan = plan_layers(masks, erase=[2], dilation=2)
    assert [l.person for l in plan.layers] == [0, 1]
    background, person = plan.layers
    assert background.adapter_id == 0 and person.adapter_id == 1 and person.domain == [1]
    assert (background.inpaint >= plan.erased_union).all()
    assert not (person.inpaint.bool() & (masks[0] > 0)).any()  # completes what is hidden, not what is seen
    assert (person.inpaint <= background.inpaint).all()
    assert not background.allow[0, 1:].any() and person.allow[1, 1] and not person.allow[1, 2]
    far = torch.zeros_like(masks)
    far[0, :8, :8] = 1
    far[1, -8:, -8:] = 1
    assert [l.person for l in plan_layers(far, erase=[2]).layers] == [0]  # person 1 is untouched
    with pytest.raises(ValueError, match="^erase"):
        plan_layers(masks, erase=[3])
    with pytest.raises(ValueError, match="^instance_masks"):
        plan_layers(torch.cat([masks, torch.zeros(1, SIZE, SIZE)]))


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (1, 9)])
def test_smooth_fill_keeps_the_known_pixels_and_fills_within_their_range(size):
    """push-pull fill: known pixels exact, every filled value a convex mix of known ones (within
    their range per channel), a constant border fills constant, no known pixel gives mid-grey."""
    from mild.erasing import smooth_fill

    H, W = size
    gen = torch.Generator().manual_seed(H * W)
    pixels = torch.rand(3, 3, H, W, generator=gen, dtype=torch.float64)
    hole = (torch.rand(3, 1, H, W, generator=gen) < torch.tensor([0.3, 0.9, 1.0])[:, None, None, None]).double()
    hole[0].view(-1)[0] = 0  # every image but the last keeps a known pixel
    hole[1].view(-1)[-1] = 0
    filled = smooth_fill(torch.where(hole > 0, 7.0, pixels), hole)  # what lies in the hole is never read
    known = hole.expand_as(pixels) == 0
    assert filled.dtype == torch.float64 and torch.isfinite(filled).all()
    assert torch.equal(filled[known], pixels[known])
    for n in range(2):
        for c in range(3):
            seen = pixels[n, c][known[n, c]]
            assert seen.min() - 1e-12 <= filled[n, c].min() and filled[n, c].max() <= seen.max() + 1e-12
    assert torch.allclose(filled[2], torch.full((3, H, W), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)
    flat = smooth_fill(torch.full((1, 3, H, W), 0.25) * (1 - hole[:1]), hole[:1])
    assert torch.allclose(flat, torch.full_like(flat, 0.25), atol=1e-6)


def test_correlate_matches_a_direct_sum_over_every_translation():
    from mild.erasing import _correlate

    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(7, 5, generator=gen, dtype=torch.float64), torch.rand(7, 5, generator=gen, dtype=torch.float64)
    got = _correlate(a, b)
    assert got.shape == (13, 9)
    for dy in range(-6, 7):
        for dx in range(-4, 5):
            direct = sum(a[y, x] * b[y + dy, x + dx] for y in range(7) for x in range(5)
                         if 0 <= y + dy < 7 and 0 <= x + dx < 5)
            assert float(got[dy + 6, dx + 4]) == pytest.approx(float(direct), abs=1e-9)


@pytest.mark.parametrize("size", [(61, 47), (64, 64)])
def test_copy_fill_continues_a_repeating_texture_and_reads_only_its_source(size):
    """A checkerboard (period 10 px) over a vertical gradient repeats exactly under translations
    by (0, 10): copy_fill restores the hole exactly, where a smooth fill blurs it to its mean.
    Pixels outside the source are never read; no usable source falls back to smooth_fill."""
    from mild.erasing import copy_fill, smooth_fill

    H, W = size
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    checks = ((ys // 5 + xs // 5) % 2).double()
    image = torch.stack([0.2 + 0.5 * checks, 0.1 + 0.6 * ys / H, 0.8 - 0.4 * checks])[None]
    hole = torch.zeros(1, 1, H, W, dtype=torch.bool)
    hole[..., H // 3:H // 3 + 17, W // 2 - 6:W // 2 + 7] = True
    source = torch.ones_like(hole)
    source[..., :, :3] = False  # a strip of the image the fill may not read
    poisoned = torch.where(hole | ~source, torch.tensor(9.0, dtype=torch.float64), image)
    filled = copy_fill(poisoned, hole, source)
    assert torch.allclose(filled[hole.expand_as(image)], image[hole.expand_as(image)], atol=1e-12)
    assert torch.equal(filled[~hole.expand_as(image)], poisoned[~hole.expand_as(image)])
    smooth = smooth_fill(image, hole.double())
    assert (smooth - image)[hole.expand_as(image)].abs().max() > 0.1  # the smooth fill cannot do it
    lonely = torch.zeros_like(hole)
    lonely[..., 0, 0] = True  # one source pixel, no translation reaches the ring: smooth from it
    assert torch.allclose(copy_fill(image, hole, lonely), torch.where(hole, image[..., :1, :1], image))


@pytest.mark.parametrize("seed", [3, 11])
def test_layered_condition_fill_pulls_each_row_from_its_own_layer(seed):
    """condition_fill "layered": the background row's region is copied from the known pixels no
    kept person covers (copy_fill), person i's row's is pulled in from person i's visible pixels
    only (smooth_fill); no other pixel is read (poisoned, they change nothing) and outside its
    region every row is the photo."""
    from mild.erasing import copy_fill, smooth_fill
    from mild.synth import procedural_sample

    sample = procedural_sample(seed, size=SIZE + 3, kind="occluded")  # 67 px: padded to the latent grid
    pipe = MILDPipeline.tiny(seed=0, weights=None, backend="torch")
    rows = pipe.prepare_layers(sample.image, sample.masks, sample.erase)
    assert [layer.person for layer in rows.plan.layers][0] == 0 and len(rows.plan.layers) > 1  # a person row too
    filled = rows.masked_pixels("layered")
    H, W = sample.image.shape[1:]
    kept = torch.zeros(rows.padded.shape[1:], dtype=torch.bool)[None].repeat(len(sample.masks), 1, 1)
    kept[:, :H, :W] = rows.plan.layers[0].region_masks > 0.5  # the kept people's visible masks
    image = torch.zeros_like(kept[0])
    image[:H, :W] = True  # the padding is nobody's colour
    for index, layer in enumerate(rows.plan.layers):
        hole = rows.inpaint[index, 0] > 0
        source = kept[layer.person - 1] if layer.person else ~hole & ~kept.any(0) & image
        poisoned = torch.where(source, rows.padded, torch.tensor(9.0))[None].double()  # read only where the source is
        expected = (smooth_fill(poisoned, (~source).double()[None, None]) if layer.person
                    else copy_fill(poisoned, hole[None, None], source[None, None]))[0]
        got = filled[index].double()
        assert torch.allclose(got[:, hole], expected[:, hole], atol=1e-5)
        assert torch.equal(got[:, ~hole], rows.padded.double()[:, ~hole])
        colours = rows.padded[:, source]
        inside = got[:, hole]  # within the range of the layer's own colours
        assert (inside >= colours.amin(1, keepdim=True) - 1e-6).all() and (inside <= colours.amax(1, keepdim=True) + 1e-6).all()
    assert not torch.allclose(filled, rows.masked_pixels("smooth"))
    assert torch.equal(rows.masked_pixels("copy"), copy_fill(rows.padded[None].expand_as(filled), rows.inpaint))


def test_condition_fill_reaches_the_unet_and_round_trips_through_the_weights_file(tmp_path):
    """pipe.condition_fill decides the condition channels the UNet reads (grey: SD's mid-grey hole;
    smooth: smooth_fill; copy: copy_fill; layered: each row from its own layer), and the weights file keeps it
    (a file without it reads grey)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mild.erasing import smooth_fill
    from mild.tiny import save_tiny_weights

    image, masks = scene()
    pipe = MILDPipeline.tiny(seed=0, weights=None, backend="torch")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, -192:].clone()))
    for fill in ("grey", "smooth", "copy", "layered"):
        pipe.condition_fill = fill
        out = pipe(image, masks, erase=[2], num_inference_steps=1, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
        rows = pipe.prepare_layers(image, masks, [2])
        expected = {"grey": rows.padded[None] * (1 - rows.inpaint) + 0.5 * rows.inpaint,
                    "smooth": smooth_fill(rows.padded[None].expand(len(rows.inpaint), -1, -1, -1), rows.inpaint),
                    "copy": rows.masked_pixels("copy"), "layered": rows.masked_pixels("layered")}[fill]
        assert torch.allclose(seen[-1], pipe._encode_image(expected).to(seen[-1].dtype), atol=1e-6)
        assert len(out.plan.layers) == len(rows.inpaint)
    assert all(not torch.allclose(seen[a], seen[b]) for a in range(4) for b in range(a))
    save_tiny_weights(pipe, tmp_path / "layered.safetensors")
    assert MILDPipeline.tiny(weights=tmp_path / "layered.safetensors").condition_fill == "layered"
    pipe.condition_fill = "smooth"
    save_tiny_weights(pipe, tmp_path / "smooth.safetensors")
    with safe_open(str(tmp_path / "smooth.safetensors"), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "condition_fill"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    assert MILDPipeline.tiny(weights=tmp_path / "old.safetensors").condition_fill == "grey"
    with pytest.raises(ValueError, match="^fill"):
        rows.masked_pixels("zeros")


def test_tiny_schedule_leaves_no_signal_where_sampling_starts_and_the_weights_file_keeps_it(tmp_path):
    """The tiny model trains on a zero-terminal-SNR schedule: at the timestep one-step sampling starts
    from, the training input is the noise alone, as sampling's start is (the old schedule leaked
    0.068 of the clean latent there, which the model learned to read). The weights file records the
    schedule; a file without the record was trained on the old one and loads it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mild.tiny import save_tiny_weights, tiny_scheduler

    pipe = MILDPipeline.tiny(seed=0, weights=None, backend="torch")
    pipe.scheduler.set_timesteps(1)
    start = pipe.scheduler.timesteps[:1]
    assert int(start) == pipe.scheduler.config.num_train_timesteps - 1
    x0 = 3 * torch.randn(2, 192, 5, 3) + 1
    noise = torch.randn_like(x0)
    assert torch.equal(pipe.scheduler.add_noise(x0, noise, start), noise)
    leaky = tiny_scheduler(zero_terminal_snr=False).add_noise(x0, noise, start) - noise
    assert 0.05 < float(leaky.norm() / x0.norm()) < 0.1
    assert pipe.scheduler.alphas_cumprod[:-1].gt(0).all()  # every earlier timestep keeps some signal
    save_tiny_weights(pipe, tmp_path / "zero.safetensors")
    assert MILDPipeline.tiny(weights=tmp_path / "zero.safetensors").scheduler.alphas_cumprod[-1] == 0
    with safe_open(str(tmp_path / "zero.safetensors"), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "zero_terminal_snr"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    old = MILDPipeline.tiny(weights=tmp_path / "old.safetensors").scheduler
    assert torch.allclose(old.alphas_cumprod, tiny_scheduler(zero_terminal_snr=False).alphas_cumprod)
    assert old.alphas_cumprod[-1] > 0


def test_residual_to_condition_adds_the_filled_condition_to_the_unets_x0():
    """With residual_to_condition the x0 the scheduler gets is the UNet's output plus the condition's
    latents: for a UNet whose output is zero, the final latents are diffusers' DDIM step from the
    initial noise with the condition's latents as x0 (float64), the layer is then the smooth-filled
    photo to within DDIM's last step (it keeps sqrt(1 - abar_0) ~ 3% of the noise estimate); without
    it, the x0 is 0 (mid-grey)."""
    import copy

    from mild.erasing import smooth_fill
    from mild.synth import procedural_sample

    sample = procedural_sample(5, size=SIZE, kind="textured")
    pipe = MILDPipeline.tiny(seed=0, weights=None, backend="torch")
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    pipe.condition_fill = "smooth"
    rows = pipe.prepare_layers(sample.image, sample.masks, sample.erase)
    condition = pipe._encode_image(rows.masked_pixels("smooth")).double()
    noise = torch.randn(condition.shape, generator=torch.Generator().manual_seed(0)).double()
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(1)
    region = rows.inpaint[0, 0] > 0
    fill = smooth_fill(rows.padded[None], rows.inpaint[:1])[0][:, region]
    decoded, errors = [], {}
    decode = pipe._decode
    pipe._decode = lambda latents: decoded.append(latents.double()) or decode(latents)
    for residual in (True, False):
        pipe.residual_to_condition = residual
        out = pipe(sample.image, sample.masks, erase=sample.erase, num_inference_steps=1, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
        x0 = condition if residual else torch.zeros_like(condition)
        expected = scheduler.step(x0, scheduler.timesteps[0], noise).prev_sample
        assert (decoded[-1] - expected).norm() / expected.norm() < 1e-5
        errors[residual] = float((out.layers[0][:, region] - fill).norm() / fill.norm())
    assert errors[True] < 0.05 < 0.3 < errors[False], errors
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    pipe.residual_to_condition = True
    with pytest.raises(ValueError, match="^residual_to_condition"):
        pipe(sample.image, sample.masks, erase=sample.erase, num_inference_steps=1)


# ---------------------------------------------------------------- CLI
def write_sample(folder: Path, seed=0, size=48):
    folder.mkdir(parents=True, exist_ok=True)
    image, masks = scene(size, seed)
    Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(folder / "image.png")
    paths = []
    for i, mask in enumerate(masks, start=1):
        paths.append(folder / f"mask_{i}.png")
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(paths[-1])
    return folder / "image.png", paths


def test_cli_erase_single_image(tmp_path):
    image, masks = write_sample(tmp_path)
    out = tmp_path / "out.png"
    assert cli_main(["erase", str(image), "--masks", *map(str, masks), "--erase", "1", "-o", str(out), "--tiny",
                     "--steps", "2"]) == 0
    assert Image.open(out).size == Image.open(image).size


def test_cli_erase_compile_gives_the_eager_image(tmp_path, monkeypatch):
    """``mild erase --compile [MODE]`` runs the UNet compiled (aot_eager here, for the CPU's
    time) and writes what the eager command writes."""
    compile_ = torch.compile
    modes = []

    def recording_compile(model, mode=None, **options):
        modes.append(mode)
        return compile_(model, backend="aot_eager", **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    image, masks = write_sample(tmp_path)
    outputs = {}
    for flags in ([], ["--compile"], ["--compile", "max-autotune"]):
        outputs[len(flags)] = tmp_path / f"out{len(flags)}.png"
        assert cli_main(["erase", str(image), "--masks", *map(str, masks), "-o", str(outputs[len(flags)]), "--tiny",
                         "--steps", "2", "--backend", "torch", *flags]) == 0
    assert modes == [None, "max-autotune"]
    pixels = [np.asarray(Image.open(path)).astype(int) for path in outputs.values()]
    assert all(np.abs(p - pixels[0]).max() <= 1 for p in pixels[1:])


@pytest.mark.parametrize("problem", ["size", "empty", "erase-id", "unreadable", "bomb", "steps-0", "steps-negative",
                                     "guidance-nan", "guidance-inf", "output-folder", "output-suffix"])
def test_cli_errors_write_nothing(tmp_path, capsys, problem):
    image, masks = write_sample(tmp_path)
    flags = {"steps-0": ["--steps", "0"], "steps-negative": ["--steps", "-3"], "guidance-nan": ["--guidance", "nan"],
             "guidance-inf": ["--guidance", "inf"]}.get(problem, [])
    out = tmp_path / "out.png"
    if problem == "output-folder":
        out.mkdir()
    elif problem == "output-suffix":
        out = tmp_path / "out.txt"
    if problem == "size":
        Image.new("L", (10, 10), 255).save(masks[0])
    elif problem == "empty":
        Image.new("L", (48, 48), 0).save(masks[1])
    elif problem == "unreadable":
        image.write_bytes(b"not an image")
    elif problem == "bomb":  # a valid PNG header that claims 20000 x 20000 pixels: PIL's decompression-bomb guard
        write_png_header(image, 20000, 20000)
    erase = ["--erase", "3"] if problem == "erase-id" else []
    code = cli_main(["erase", str(image), "--masks", *map(str, masks), *erase, "-o", str(out), "--tiny", *flags])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mild: error:"), err
    assert out.is_dir() if problem == "output-folder" else not out.exists()
    assert not list(tmp_path.glob(".out.*.tmp*"))


@pytest.mark.parametrize("source", ["missing-model", "empty-model", "cuda"])
def test_cli_model_and_device_errors_are_one_line(tmp_path, capsys, source):
    image, masks = write_sample(tmp_path)
    (tmp_path / "empty").mkdir()
    flags = {"missing-model": ["--model", str(tmp_path / "nowhere")], "empty-model": ["--model", str(tmp_path / "empty")],
             "cuda": ["--tiny", "--device", "cuda"]}[source]
    if source == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    out = tmp_path / "out.png"
    assert cli_main(["erase", str(image), "--masks", *map(str, masks), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mild: error: --"), err
    assert not out.exists()


@pytest.mark.slow  # a subprocess of ~10 s: CI's `pytest -m slow` runs it
def test_dataset_mode_under_torchrun_with_two_ranks(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_sample(inputs / f"sample{i}", seed=i)
    (inputs / "sample2" / "erase.json").write_text(json.dumps([1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "mild.cli", "erase", "--input-dir", str(inputs), "--output-dir", str(outputs), "--tiny",
               "--steps", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in outputs.iterdir()) == ["sample0.png", "sample1.png", "sample2.png"]
    assert "rank 0: 2 written" in first.stdout and "rank 1: 1 written" in first.stdout
    stamps = {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 written" in second.stdout
    assert stamps == {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}


def test_dataset_mode_reports_and_skips_malformed_samples(tmp_path, capsys):
    """Each bad sample costs itself, is named on its own stderr line, and the good ones are written."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for name in ("good", "bad-json", "bad-erase", "bad-mask-name", "mask-gap", "no-image", "bomb", "erase-id"):
        write_sample(inputs / name, seed=len(name))
    (inputs / "bad-json" / "erase.json").write_text("[1,")
    (inputs / "bad-erase" / "erase.json").write_text('{"erase": 1}')
    (inputs / "bad-mask-name" / "mask_2.png").rename(inputs / "bad-mask-name" / "mask_two.png")
    (inputs / "mask-gap" / "mask_2.png").rename(inputs / "mask-gap" / "mask_3.png")
    (inputs / "no-image" / "image.png").unlink()
    write_png_header(inputs / "bomb" / "image.png", 20000, 20000)
    (inputs / "erase-id" / "erase.json").write_text("[5]")
    (inputs / ".cache").mkdir()  # hidden folders are not samples
    code = cli_main(["erase", "--input-dir", str(inputs), "--output-dir", str(outputs), "--tiny", "--steps", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in outputs.iterdir()) == ["good.png"]
    assert "rank 0: 1 written, 0 already done, 7 failed" in captured.out
    reports = [line for line in captured.err.splitlines() if line.startswith("mild: ")]
    assert sorted(line.split(":")[1].strip() for line in reports) == sorted(
        ["bad-json", "bad-erase", "bad-mask-name", "mask-gap", "no-image", "bomb", "erase-id"]), captured.err
    assert any("mask_two.png" in line for line in reports) and any("erase.json" in line for line in reports)


def test_help_starts_without_torch():
    """`mild --help` imports neither torch nor diffusers (the package loads its names lazily)."""
    code = ("import sys; from mild.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: mild" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def test_hmg_adapter_round_trips_through_safetensors(tmp_path):
    from mild import HumanMorphologyGuidance, guidance_image

    unet = tiny_components()["unet"]
    hmg = HumanMorphologyGuidance.for_unet(unet)
    keypoints = torch.rand(17, 3) * torch.tensor([SIZE, SIZE, 1.0])
    guide = guidance_image((SIZE, SIZE), keypoints, torch.randint(0, 20, (SIZE, SIZE)), torch.rand(SIZE, SIZE))
    residuals = hmg(guide[None].repeat(2, 1, 1, 1), torch.tensor([1.0, 0.0]))
    assert [r.shape[1] for r in residuals] == list(unet.config.block_out_channels)
    assert residuals[0][0].abs().sum() > 0 and (residuals[0][1] == 0).all()  # weight 0 turns a row off
    hmg.save(tmp_path / "hmg.safetensors")
    loaded = HumanMorphologyGuidance.for_unet(unet).load(tmp_path / "hmg.safetensors")
    for a, b in zip(residuals, loaded(guide[None].repeat(2, 1, 1, 1), torch.tensor([1.0, 0.0]))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="^keypoints"):
        guidance_image((SIZE, SIZE), torch.rand(5, 3))


def test_compiled_pipeline_matches_eager_and_compiles_once_per_layer_count(monkeypatch):
    """MILDPipeline(compile=...): the UNet traced whole (fullgraph=True), one graph for every
    step of every call with the same resolution and layer count, and eager's result. (aot_eager
    here for the CPU's time; the slow test below runs inductor.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = MILDPipeline.tiny(seed=0, backend="torch")
    image, masks = scene()
    calls = {"two layers": dict(erase=[2]), "one layer": dict(erase=[1, 2])}
    eager = {name: pipe(image, masks, num_inference_steps=3, generator=torch.Generator().manual_seed(1), **call)
             for name, call in calls.items()}
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_(model, backend="aot_eager", **options))
    pipe.compile = True
    graphs = []
    for name in ("two layers", "two layers", "one layer", "one layer", "two layers"):
        out = pipe(image, masks, num_inference_steps=3, generator=torch.Generator().manual_seed(1), **calls[name])
        assert torch.allclose(out.image, eager[name].image, atol=1e-5), name
        assert out.cag.keys() == eager[name].cag.keys()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 2, 2, 2], graphs  # a new layer count compiles once


@pytest.mark.slow
def test_compiled_pipeline_with_inductor_matches_eager():
    """The default torch.compile backend (inductor: C++ on the CPU) on the tiny pipeline, ~60 s."""
    torch._dynamo.reset()
    pipe = MILDPipeline.tiny(seed=0, backend="torch")
    image, masks = scene()
    eager = pipe(image, masks, erase=[2], num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    pipe.compile = "max-autotune-no-cudagraphs"
    out = pipe(image, masks, erase=[2], num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out.image, eager.image, atol=1e-4)


def test_demo_writes_the_layers_their_alphas_and_the_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--steps", "2", "--figure", str(tmp_path / "fig" / "demo.png")]) == 0
    for name in ("input.png", "truth.png", "erased.png", "layer_0.png", "layer_1.png", "alpha_0.png", "alpha_1.png"):
        assert (out / name).is_file(), name
    alpha = np.asarray(Image.open(out / "alpha_1.png"))
    assert alpha.min() == 0 and alpha.max() == 255  # the person layer covers some pixels and not others
    assert Image.open(tmp_path / "fig" / "demo.png").size[0] > 500
    assert "pixels outside the erased region unchanged: True" in capsys.readouterr().out


def test_regenerate_replaces_only_the_marked_table():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from regenerate import END, START, replace_between_markers
    finally:
        sys.path.pop(0)
    text = f"intro\n{START}\nold table\n{END}\nafter\n"
    assert replace_between_markers(text, "| new |\n") == f"intro\n{START}\n| new |\n{END}\nafter\n"
    with pytest.raises(SystemExit):
        replace_between_markers("no markers", "x")
    readme = (ROOT / "README.md").read_text()
    assert readme.count(START) == 1 and readme.count(END) == 1


def test_tiny_tokenizer_leaves_no_temporary_files(tmp_path, monkeypatch):
    """Every tiny pipeline builds its tokenizer from files written for the purpose; none may outlive it."""
    import tempfile

    from mild.tiny import tiny_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tokenizer = tiny_tokenizer()
    assert list(tmp_path.iterdir()) == []
    assert tokenizer("a person").input_ids[0] == tokenizer.bos_token_id
