"""MILD on diffusion transformers (FLUX.1, SD3, SD3.5), on tiny random models: SMA in their joint
attention, multi-adapter LoRA on their linears.

SMA's reference is diffusers' own processors run in float64, with PyTorch's
scaled_dot_product_attention replaced by SPEC section 2 materialised on the joint sequence:
regions derived here from the masks (area averages, argmax labels), not by the code under test.
LoRA's reference is a copy of the model with each row's adapter merged into its weights.
"""

import pytest
import torch

from mild import RegionContext, enable_sma

GRID = (6, 5)  # image tokens 30: no tile divides it
CELL = 4  # pixels per token side of the region masks
TEXT = 7


def tiny_model(kind):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if kind == "flux":
        model = FluxTransformer2DModel(patch_size=1, in_channels=8, out_channels=4, num_layers=2, num_single_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    else:  # sd3; sd35 adds the image-only second attention and qk norms of SD3.5
        model = SD3Transformer2DModel(sample_size=12, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                      pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                      **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if kind == "sd35"
                                         else {}))
    for parameter in model.parameters():  # random weights of a trained model's scale, not the zero-init gates
        parameter.data.normal_(0, 0.3)
    return model.eval()


def model_inputs(kind, dtype=torch.float32, batch=2):
    """The same random inputs in any dtype (drawn in float32, then cast)."""
    gen = torch.Generator().manual_seed(1)
    h, w = GRID
    inputs = dict(encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=gen),
                  pooled_projections=torch.randn(batch, 32, generator=gen))
    if kind == "flux":
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), -1)
        inputs.update(hidden_states=torch.randn(batch, h * w, 8, generator=gen), timestep=torch.full((batch,), 0.5),
                      img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))
    else:
        inputs.update(hidden_states=torch.randn(batch, 4, 2 * h, 2 * w, generator=gen),
                      timestep=torch.full((batch,), 500.0))
    return {name: value.to(dtype) for name, value in inputs.items()}


def run(model, inputs, context=None):
    kwargs = None if context is None else {"region_context": context}
    with torch.no_grad():
        return model(**inputs, joint_attention_kwargs=kwargs).sample


def person_masks(persons=2):
    """(1, P, H, W) disjoint binary blobs that cut through token cells (soft memberships)."""
    gen = torch.Generator().manual_seed(2)
    height, width = GRID[0] * CELL, GRID[1] * CELL
    labels = torch.zeros(height, width, dtype=torch.long)
    for person in range(1, persons + 1):
        top, left = (int(torch.randint(0, n - 9, (1,), generator=gen)) for n in (height, width))
        labels[top:top + 9 + person, left:left + 7 + 2 * person] = person
    return torch.stack([(labels == p).float() for p in range(1, persons + 1)])[None]


def region_context(masks, *, heads=2, text_regions=None, backend="torch", seed=3):
    gen = torch.Generator().manual_seed(seed)
    rows, R = 2, masks.shape[1] + 1
    allow = torch.rand(rows, R, R, generator=gen) < 0.6
    allow |= torch.eye(R, dtype=torch.bool)
    return RegionContext(instance_masks=masks, latent_size=GRID, row_image=torch.zeros(rows, dtype=torch.long),
                         bias=2 * torch.randn(rows, heads, R, R, generator=gen), allow=allow,
                         text_regions=text_regions, backend=backend)


class DenseSPEC2:
    """F.scaled_dot_product_attention replaced by SPEC section 2 on the joint sequence, float64."""

    def __init__(self, kind, context):
        self.text_first = kind == "flux"
        masks = context.instance_masks[0].double()
        P = masks.shape[0]
        cells = masks.reshape(P, GRID[0], CELL, GRID[1], CELL).mean((2, 4)).reshape(P, -1).T  # (N, P) area averages
        self.image = torch.cat([1 - cells.sum(1, keepdim=True), cells], 1)  # (N, R)
        self.context = context

    def memberships(self, tokens):
        R, N = self.image.shape[1], self.image.shape[0]
        text = tokens - N
        if self.context.text_regions is None:  # text: a region of its own, unmodulated
            image = torch.nn.functional.pad(self.image, (0, 1))
            text_rows = torch.zeros(text, R + 1, dtype=torch.float64)
            text_rows[:, R] = 1
        else:
            image = self.image
            text_rows = torch.nn.functional.one_hot(self.context.text_regions.long().reshape(-1)[:text], R).double()
        return torch.cat([text_rows, image] if self.text_first else [image, text_rows])

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert attn_mask is None and not is_causal
        members = self.memberships(query.shape[2])  # (S, R')
        R = self.image.shape[1]
        extra = members.shape[1] - R
        bias = torch.nn.functional.pad(self.context.bias.double(), (0, extra, 0, extra))  # (B, H, R', R')
        allow = torch.nn.functional.pad(self.context.allow, (0, extra, 0, extra), value=True)  # (B, R', R')
        labels = members.argmax(1)  # ties to the lowest region
        scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
        scores = scores + members @ bias @ members.T
        blocked = ~allow[:, labels][:, :, labels]  # (B, S, S)
        scores = scores.masked_fill(blocked[:, None], float("-inf"))
        return scores.softmax(-1) @ value


def dense_reference(kind, context, monkeypatch):
    model = tiny_model(kind).double()
    reference = DenseSPEC2(kind, context)
    outputs = capture_attention_outputs(model)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", reference)
        sample = run(model, model_inputs(kind, torch.float64))
    return sample, outputs


def capture_attention_outputs(model):
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output if isinstance(output, tuple) else (output,)
        return hook

    for name, module in model.named_modules():
        if hasattr(module, "processor"):
            module.register_forward_hook(keep(name))
    return outputs


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


KINDS = ["flux", "sd3", "sd35"]


@pytest.mark.parametrize("kind", KINDS)
def test_enable_sma_serves_the_transformer_and_changes_nothing_without_regions(kind):
    """No region context: diffusers' own processor runs (bitwise). A neutral one (zero bias,
    every pair allowed): SMA is plain joint attention."""
    from mild.transformer_processors import SMAFluxAttnProcessor, SMAJointAttnProcessor

    model = tiny_model(kind)
    inputs = model_inputs(kind)
    expected = run(model, inputs)
    enable_sma(model)
    expected_type = SMAFluxAttnProcessor if kind == "flux" else SMAJointAttnProcessor
    assert model.attn_processors and all(isinstance(p, expected_type) for p in model.attn_processors.values())
    attentions = [m for m in model.modules() if hasattr(m, "processor")]
    assert all(m.sma_modulation.alpha.numel() == m.heads for m in attentions)
    assert torch.equal(run(model, inputs), expected)
    neutral = RegionContext(instance_masks=person_masks(), latent_size=GRID, row_image=torch.zeros(2, dtype=torch.long),
                            alpha=0.0, beta=0.0)
    assert relative_error(run(model, inputs, neutral), expected.double()) < 1e-5


@pytest.mark.parametrize("kind,text,backend", [("flux", "none", "torch"), ("flux", "labels", "triton"),
                                               ("sd3", "none", "triton"), ("sd3", "labels", "torch"),
                                               ("sd35", "none", "torch"), ("sd35", "labels", "torch")])
def test_every_joint_attention_matches_a_float64_materialised_spec(kind, text, backend, monkeypatch):
    masks = person_masks()
    text_regions = None if text == "none" else torch.tensor([[0, 1, 2, 0, 1, 2, 2]])  # (1, T): shared by the rows
    context = region_context(masks, text_regions=text_regions, backend=backend)
    ref_sample, ref_attention = dense_reference(kind, context, monkeypatch)

    model = tiny_model(kind)
    enable_sma(model)
    outputs = capture_attention_outputs(model)
    sample = run(model, model_inputs(kind), context)
    assert set(outputs) == set(ref_attention) and len(outputs) >= 2
    for name, parts in outputs.items():
        for part, ref in zip(parts, ref_attention[name]):
            assert relative_error(part, ref) < 1e-4, name
    assert relative_error(sample, ref_sample) < 1e-4
    # the regions matter: without them the output is far from the reference
    assert relative_error(run(model, model_inputs(kind)), ref_sample) > 1e-2


def test_flux_single_stream_blocks_find_the_text_from_the_token_grid():
    """FLUX's single-stream attention gets [text, image] as one sequence: the text length is
    what the token grid leaves; a sequence shorter than the grid is refused."""
    from mild.transformer_processors import SMAFluxAttnProcessor

    model = tiny_model("flux")
    attn = model.single_transformer_blocks[0].attn
    short = torch.randn(2, GRID[0] * GRID[1] - 1, attn.query_dim)
    with pytest.raises(ValueError, match=r"latent_size \(6, 5\) has more tokens than this attention's 29"):
        SMAFluxAttnProcessor()(attn, short, region_context=region_context(person_masks()))


def test_joint_attention_refuses_a_mask_with_regions():
    from mild.transformer_processors import SMAJointAttnProcessor

    model = tiny_model("sd3")
    enable_sma(model)
    attn = model.transformer_blocks[0].attn
    hidden, text = torch.randn(2, 30, attn.query_dim), torch.randn(2, TEXT, attn.query_dim)
    with pytest.raises(ValueError, match="attention_mask"):
        SMAJointAttnProcessor()(attn, hidden, text, attention_mask=torch.zeros(2, 1, 37),
                                region_context=region_context(person_masks()))


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_joint_attention_records_cag_of_image_queries(kind):
    model = tiny_model(kind)
    enable_sma(model)
    context = region_context(person_masks())
    context.domains = [[0], [1]]
    context.prepare(model, text_tokens=TEXT)
    run(model, model_inputs(kind), context)
    gaps = context.cag()
    assert set(gaps) == {(0, GRID), (1, GRID)}
    assert all(-1 <= g <= 1 for g in gaps.values())


def test_prepare_builds_every_joint_layout_before_the_call():
    """After prepare(), a transformer call fills no cache: nothing is built inside a step."""
    model = tiny_model("sd35")
    enable_sma(model)
    context = region_context(person_masks()).prepare(model, text_tokens=TEXT)
    layouts, biases = dict(context._layouts), dict(context._biases)
    run(model, model_inputs("sd35"), context)
    assert context._layouts.keys() == layouts.keys() and context._biases.keys() == biases.keys()


TRANSFORMER_LINEARS = {
    "flux": {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_out.0",
             "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
             "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.1.attn.to_v",
             "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out"},
    "sd3": {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.ff.net.2"},
}


def merged_copy(model, adapter):
    """A plain copy of a LoRA-wrapped model with adapter ``adapter`` merged into every base weight."""
    import copy

    from mild_kernels import MultiLoRALinear

    plain = copy.deepcopy(model)
    for name, layer in list(plain.named_modules()):
        if isinstance(layer, MultiLoRALinear):
            base = layer.base
            scale = layer.scaling[adapter] if isinstance(layer.scaling, torch.Tensor) else layer.scaling
            base.weight.data += scale * layer.lora_b[adapter].double().mm(
                layer.lora_a[adapter].double()).to(base.weight.dtype)
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent), attr, base)
    return plain


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_multi_lora_on_transformer_attention_and_mlp_linears_one_adapter_per_row(kind):
    from mild_kernels import MultiLoRALinear, apply_multi_lora, set_adapter_ids

    model = tiny_model(kind).double()
    inputs = model_inputs(kind, torch.float64)
    plain = run(model, inputs)
    attention_only = len(apply_multi_lora(tiny_model(kind), 2, 4))
    names = apply_multi_lora(model, 2, 4, scaling=[0.5, 2.0], backend="torch", mlp=True)
    assert TRANSFORMER_LINEARS[kind] <= set(names) and len(names) > attention_only
    assert len(names) == len({n for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)})
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith(".base")
                and any(part in n for part in ("attn.", ".ff.", "ff_context", "proj_mlp"))]
    set_adapter_ids(model, [-1, -1])
    assert relative_error(run(model, inputs), plain) < 1e-12
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.3)
    set_adapter_ids(model, [1, 0])
    together = run(model, inputs)
    for row, adapter in enumerate([1, 0]):
        reference = run(merged_copy(model, adapter), inputs)
        assert relative_error(together[row], reference[row]) < 1e-10
        assert relative_error(reference[row], plain[row]) > 1e-2  # the adapter matters
    with pytest.raises(ValueError, match="^model: found no unwrapped"):
        apply_multi_lora(model, 2, 4, mlp=True)


def erase_scene():
    """A 48 x 40 photo (padded to the transformers' 16-pixel multiple inside) with two people,
    the second (erased) overlapping the first."""
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(3, 48, 40, generator=gen)
    masks = torch.zeros(2, 48, 40)
    masks[0, 8:34, 4:20] = 1
    masks[1, 14:44, 14:34] = 1
    masks[0][masks[1] > 0] = 0
    return image, masks


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_pipeline_from_a_local_folder_runs_every_layer_in_one_transformer_call_per_step(kind, tmp_path):
    from mild import MILDPipeline
    from mild.tiny import tiny_transformer_pipeline
    from mild.transformer_pipeline import MILDTransformerPipeline
    from mild_kernels import MultiLoRALinear

    tiny_transformer_pipeline(kind).save_pretrained(tmp_path)
    pipe = MILDPipeline.from_pretrained(tmp_path, backend="torch")
    assert isinstance(pipe, MILDTransformerPipeline) and pipe.kind == kind
    calls = []
    probe = next(m for m in pipe.transformer.modules() if isinstance(m, MultiLoRALinear))

    def record(module, args, kwargs):
        context = kwargs["joint_attention_kwargs"]["region_context"]
        calls.append((kwargs["hidden_states"].shape[0], probe.adapter_ids.tolist(), len(context.row_image),
                      context.latent_size))

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    image, masks = erase_scene()
    out = pipe(image, masks, erase=[2], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    layers = len(out.plan.layers)
    halves = 1 if kind == "flux" else 2  # FLUX Fill: guidance-distilled, one row per layer
    assert layers == 2 and len(calls) == 3
    assert all(call == (layers * halves, [0, 1] * halves, layers * halves, (3, 3)) for call in calls), calls
    assert out.image.shape == image.shape and bool(torch.isfinite(out.image).all())
    outside = out.plan.paste_region == 0
    assert torch.equal(out.image[:, outside], image[:, outside])  # outside the erased region: the photo
    assert not torch.allclose(out.image, image)
    assert out.layers.shape == (layers, 3, 48, 40) and set(out.cag) == {0, 1}
    assert probe.adapter_ids is None  # the ids are cleared after the call


def test_transformer_pipeline_refuses_hmg_inputs():
    from mild.tiny import tiny_transformer_pipeline
    from mild.transformer_pipeline import MILDTransformerPipeline

    pipe = MILDTransformerPipeline(tiny_transformer_pipeline("flux"), backend="torch")
    image, masks = erase_scene()
    with pytest.raises(ValueError, match="keypoints.*Human Morphology Guidance needs a UNet"):
        pipe(image, masks, keypoints=[torch.zeros(17, 3)] * 2, num_inference_steps=1)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_mild_train_on_a_local_transformer_folder(kind, tmp_path):
    """`mild train --model DIR` on a tiny FLUX Fill / SD3 folder: two steps of the flow-matching
    recipe train the adapters, the SMA modulation and the alpha head, and the checkpoint loads
    back into a fresh pipeline of the same folder (and is refused by the other kind)."""
    from safetensors.torch import load_file

    from mild import MILDPipeline
    from mild.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint
    from mild.cli import main as cli_main
    from mild.tiny import tiny_transformer_pipeline

    model = tmp_path / "model"
    tiny_transformer_pipeline(kind).save_pretrained(model)
    out = tmp_path / "ckpt"
    assert cli_main(["train", "--data", "procedural", "--model", str(model), "--out", str(out), "--steps", "2",
                     "--no-progress", "--val-samples", "1", "--backend", "torch", "--lr", "1e-2"]) == 0
    folder = resolve_checkpoint(out)
    tensors = load_file(str(folder / "lora.safetensors"))
    assert any(name.endswith("lora_b") and tensor.abs().max() > 0 for name, tensor in tensors.items())
    assert any("ff" in name for name in tensors) and any("sma_modulation" in name for name in tensors)
    assert any(name.endswith("sma_modulation.alpha") and not torch.allclose(t, torch.ones_like(t))
               for name, t in tensors.items())
    assert (folder / "alpha.safetensors").is_file()
    losses = [line.split(",")[1] for line in (out / "log.csv").read_text().splitlines()[2:]]
    assert len(losses) == 2 and all(float(loss) > 0 for loss in losses)

    fresh = MILDPipeline.from_pretrained(model, backend="torch")
    load_checkpoint(fresh, out)
    loaded = {n: t for n, t in fresh.transformer.state_dict().items() if n in tensors}
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    other = tmp_path / "other"
    tiny_transformer_pipeline("sd3" if kind == "flux" else "flux").save_pretrained(other)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(MILDPipeline.from_pretrained(other, backend="torch"), out)


def adapted_model_with_regions(kind, backend):
    """A tiny SMA-enabled transformer with both LoRA adapters (random B) on its attention and
    feed-forward linears, and a region context with CAG domains, prepared."""
    from mild_kernels import MultiLoRALinear, apply_multi_lora, set_adapter_ids

    model = tiny_model(kind)
    enable_sma(model)
    apply_multi_lora(model, 2, 4, backend=backend, mlp=True)
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.1)
    set_adapter_ids(model, [0, 1])
    context = region_context(person_masks(), backend=backend)
    context.domains = [[0], [1]]
    return model, context.prepare(model, text_tokens=TEXT)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("backend", ["triton", "torch-as-on-a-gpu"])
def test_a_prepared_transformer_call_reads_no_tensor_value(kind, backend, monkeypatch):
    """After RegionContext.prepare, a transformer call with SMA, multi-adapter LoRA and CAG reads
    no tensor value on the host: no GPU sync in a denoising step."""
    from helpers import count_host_reads
    from mild_kernels._runtime import record_launches

    if backend == "torch-as-on-a-gpu":
        from mild_kernels import _runtime

        monkeypatch.setattr(_runtime, "host_reads_are_free", lambda device: False)
        backend = "torch"
    model, context = adapted_model_with_regions(kind, backend)
    inputs = model_inputs(kind)
    with record_launches(), count_host_reads() as reads:
        run(model, inputs, context)
    assert reads == [], f"host reads in a prepared transformer call: {reads}"
    # CAG accumulates on the device, a (sums, counts) row per layer. Recorded Triton launches leave
    # their outputs unwritten, so only the torch backend's values can be read back here.
    assert set(context._cag) == {GRID} and context._cag[GRID].shape == (2, 2)
    if backend == "torch":
        assert set(context.cag()) == {(0, GRID), (1, GRID)}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_the_transformer_traces_as_one_graph_with_regions_lora_and_cag(kind):
    """torch.compile(fullgraph=True) material: with a prepared context a transformer call is one
    graph with no break, and the compiled call matches eager."""
    import dataclasses

    torch._dynamo.reset()
    model, context = adapted_model_with_regions(kind, "torch")
    inputs = model_inputs(kind)
    kwargs = {"region_context": context}
    explained = torch._dynamo.explain(model)(**inputs, joint_attention_kwargs=kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    expected = run(model, inputs, dataclasses.replace(context).prepare(model, text_tokens=TEXT))
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs, joint_attention_kwargs=kwargs).sample
    assert relative_error(got, expected.double()) < 1e-6


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_cli_erase_with_a_transformer_folder_compiled_and_eager(kind, tmp_path, monkeypatch):
    """`mild erase --model DIR` takes a FLUX Fill / SD3 folder; with `--compile` the transformer
    runs through torch.compile(fullgraph=True) (aot_eager here, for the CPU's time) and the
    written image is the eager one."""
    import numpy as np
    from PIL import Image

    from mild.cli import main as cli_main
    from mild.tiny import tiny_transformer_pipeline

    compile_ = torch.compile
    compiled = []

    def recording_compile(model, **options):
        compiled.append((type(model).__name__, options.get("fullgraph")))
        return compile_(model, backend="aot_eager", **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    model = tmp_path / "model"
    tiny_transformer_pipeline(kind).save_pretrained(model)
    image, masks = erase_scene()
    Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(tmp_path / "image.png")
    mask_paths = []
    for i, mask in enumerate(masks, start=1):
        mask_paths.append(str(tmp_path / f"mask_{i}.png"))
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(mask_paths[-1])
    written = []
    for flags in ([], ["--compile"]):
        written.append(tmp_path / f"out{len(flags)}.png")
        assert cli_main(["erase", str(tmp_path / "image.png"), "--masks", *mask_paths, "--erase", "2", "-o",
                         str(written[-1]), "--model", str(model), "--steps", "2", "--backend", "torch",
                         "--device", "cpu", *flags]) == 0
    model_class = "FluxTransformer2DModel" if kind == "flux" else "SD3Transformer2DModel"
    assert compiled == [(model_class, True)]
    eager, fused = (np.asarray(Image.open(path)).astype(int) for path in written)
    assert eager.shape == (48, 40, 3) and np.abs(eager - fused).max() <= 1


def test_sd3_inpainting_transformer_takes_the_mask_and_masked_latents_as_channels(tmp_path):
    """An SD3 transformer with 2 x 16 + 1 input channels (SD3 inpainting checkpoints) gets
    [noisy latents, mask, masked-image latents], as diffusers' StableDiffusion3InpaintPipeline
    feeds it, in inference and in training."""
    from diffusers import SD3Transformer2DModel

    from mild.data import PairedSample
    from mild.tiny import tiny_transformer_pipeline
    from mild.transformer_pipeline import MILDTransformerPipeline
    from mild.transformer_train import TransformerTrainingModel, prompt_embeddings, transformer_sample_loss

    base = tiny_transformer_pipeline("sd3")
    config = dict(base.transformer.config)
    base.transformer = SD3Transformer2DModel.from_config({**config, "in_channels": 33}).eval()
    pipe = MILDTransformerPipeline(base, backend="torch")
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"]), with_kwargs=True)
    image, masks = erase_scene()
    out = pipe(image, masks, erase=[2], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out.image).all()) and len(seen) == 2
    x = seen[0]  # (2 L, 33, h, w): both CFG halves
    layers = len(out.plan.layers)
    assert x.shape[:2] == (2 * layers, 33)
    mask = x[:, 16:17]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.mean() < 1  # the inpaint region, nearest
    sample = PairedSample(name="s", image=image, masks=masks, erase=[2], target=image.clone())
    seen.clear()
    loss = transformer_sample_loss(TransformerTrainingModel(pipe.transformer), pipe, sample, prompt_embeddings(pipe),
                                   torch.Generator().manual_seed(0), 0.1, 0.0)
    assert bool(torch.isfinite(loss)) and seen[0].shape[1] == 33


def test_flux_condition_is_what_diffusers_fill_pipeline_packs():
    """FLUX Fill's condition tokens (masked latents, then the 8 x 8 mask cells) as diffusers'
    FluxFillPipeline.prepare_mask_latents builds them from the same latents and mask."""
    from mild.tiny import tiny_transformer_pipeline
    from mild.transformer_pipeline import MILDTransformerPipeline

    pipe = MILDTransformerPipeline(tiny_transformer_pipeline("flux"), backend="torch")
    gen = torch.Generator().manual_seed(3)
    masked = torch.randn(2, 16, 6, 4, generator=gen)  # scaled latents of a 48 x 32 photo
    inpaint = (torch.rand(2, 1, 48, 32, generator=gen) > 0.5).float()
    vae = pipe.base.vae.config
    raw = masked / vae.scaling_factor + vae.shift_factor  # diffusers shifts and scales what it is given
    mask, latents = pipe.base.prepare_mask_latents(inpaint, raw, 2, 16, 1, 48, 32, torch.float32, "cpu", None)
    expected = torch.cat([latents, mask], -1)
    assert torch.allclose(pipe.flux_condition(masked, inpaint), expected, atol=1e-6)


def test_text_regions_must_label_every_text_token():
    model = tiny_model("sd3")
    enable_sma(model)
    context = region_context(person_masks(), text_regions=torch.tensor([[0, 1, 2]]))  # 3 labels, 7 tokens
    with pytest.raises(ValueError, match="text_regions label 3 text tokens, but the joint attention has 7"):
        run(model, model_inputs("sd3"), context)

