"""SMA processors inside real diffusers UNets, and CAG."""

import dataclasses
import functools

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import count_host_reads, rel_err
from mild import RegionContext, cross_domain_attention_gap, enable_sma
from mild.processors import SMAAttnProcessor
from mild.architectures import SD15_INPAINT_UNET
from mild_kernels import apply_multi_lora, set_adapter_ids, sma_attention, sma_attention_reference, soft_regions
from mild_kernels._runtime import record_launches

TINY = dict(sample_size=16, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
# SDXL inpainting's structure (per-block heads with head dim 64, text_time embedding,
# several transformer layers) at reduced width and depth, so it runs on a CPU in CI.
SDXL_LIKE = dict(sample_size=32, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 256),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 2), cross_attention_dim=64,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 64, norm_num_groups=32)


def build_unet(config):
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def unet_inputs(unet, batch, size):
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, size, size)
    text = torch.randn(batch, 7, cfg.cross_attention_dim)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.rand(batch, 6) * 512}
    return x, text, extra


def person_masks(images, size):
    masks = torch.zeros(images, 2, size, size)
    masks[:, 0, size // 8: size // 2, size // 6: size // 2] = 1
    masks[:, 1, size // 3: size - size // 8, size // 3: size - size // 5] = 1
    return masks


def run(unet, inputs, context=None):
    x, text, extra = inputs
    kwargs = {"region_context": context} if context is not None else None
    with torch.no_grad():
        return unet(x, 37, text, cross_attention_kwargs=kwargs, **extra).sample


def trivial_context(batch, size):
    """One region, no bias, nothing blocked: SMA must reduce to plain attention."""
    return RegionContext(torch.zeros(1, 0, size * 8, size * 8), (size, size), torch.zeros(batch, dtype=torch.long),
                         bias=torch.zeros(batch, 1, 1), backend="torch")


@pytest.mark.parametrize("name,config,size", [("tiny", TINY, 16),
                                              pytest.param("sd15-inpainting", SD15_INPAINT_UNET, 16,
                                                           marks=pytest.mark.slow),  # ~20 s: a full-size UNet
                                              ("sdxl-like", SDXL_LIKE, 16)])
def test_sma_processors_match_default_processors(name, config, size):
    unet = build_unet(config)
    inputs = unet_inputs(unet, 2, size)
    expected = run(unet, inputs)
    enable_sma(unet)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"SMAAttnProcessor"}
    assert torch.equal(run(unet, inputs), expected)  # no region context: diffusers' own processor
    got = run(unet, inputs, trivial_context(2, size))
    assert rel_err(got, expected) < 1e-5, f"{name}: {rel_err(got, expected):.2e}"


def test_region_context_modulates_and_records_cag():
    unet = build_unet(TINY)
    enable_sma(unet)
    inputs = unet_inputs(unet, 2, 16)
    plain = run(unet, inputs)
    context = RegionContext(person_masks(1, 128), (16, 16), torch.zeros(2, dtype=torch.long), alpha=2.0, beta=2.0,
                            domains=[[0], [1]], backend="torch")
    modulated = run(unet, inputs, context)
    assert rel_err(modulated, plain) > 1e-3
    cag = context.cag()
    assert {key[1] for key in cag} == {(16, 16), (8, 8)}
    assert all(-1 <= value <= 1 for value in cag.values())


def test_token_sorting_does_not_change_the_output():
    unet = build_unet(TINY)
    enable_sma(unet)
    inputs = unet_inputs(unet, 2, 16)
    outputs = []
    for sort_tokens in (False, True):
        allow = torch.ones(2, 3, 3, dtype=torch.bool)
        allow[:, 1, 2] = allow[:, 2, 1] = False
        context = RegionContext(person_masks(2, 64), (16, 16), torch.arange(2), alpha=1.0, beta=0.5, allow=allow,
                                sort_tokens=sort_tokens, backend="torch")
        outputs.append(run(unet, inputs, context))
    assert rel_err(outputs[1], outputs[0]) < 1e-5


def test_cag_matches_its_definition_on_the_dense_attention():
    B, H, N, R = 2, 3, 50, 4
    q, k, v = (torch.randn(B, H, N, 16, dtype=torch.float64) for _ in range(3))
    masks = (torch.rand(R - 1, 10, 10) > 0.6).double()
    regions = soft_regions(masks, (5, 10)).double()
    bias = torch.randn(H, R, R, dtype=torch.float64)
    res = sma_attention(q, k, v, regions, regions, bias, return_region_mass=True, backend="torch")
    domains = [[0], [2, 3]]
    got = cross_domain_attention_gap(res.region_mass, regions, domains)
    # The definition, from the materialised attention matrix.
    scores = q @ k.transpose(-1, -2) / 4 + regions @ bias @ regions.T
    attn = torch.softmax(scores, -1)
    for row, domain in enumerate(domains):
        inside = torch.zeros(R, dtype=torch.float64)
        inside[domain] = 1
        mass_in = attn[row] @ (regions @ inside)
        mass_out = attn[row] @ (regions @ (1 - inside))
        weight = regions @ inside
        expected = (((mass_in - mass_out) * weight).sum(-1) / weight.sum()).mean()
        assert abs(got[row].item() - expected.item()) < 1e-10
    assert (got.abs() <= 1).all()
    reference_mass = sma_attention_reference(q, k, v, regions, regions, bias, return_region_mass=True)[2]
    assert rel_err(res.region_mass, reference_mass) < 1e-10


def lora_unet_with_regions(backend, sort_tokens=True):
    """The tiny UNet with SMA processors, both LoRA adapters and a region context with domains
    (CAG on): a MILD step's UNet call for 2 rows."""
    unet = build_unet(TINY)
    enable_sma(unet)
    apply_multi_lora(unet, 2, 4, backend=backend)
    set_adapter_ids(unet, torch.tensor([0, 1]))
    allow = torch.ones(2, 3, 3, dtype=torch.bool)
    allow[:, 1, 2] = allow[:, 2, 1] = False
    context = RegionContext(person_masks(1, 128), (16, 16), torch.zeros(2, dtype=torch.long), alpha=2.0, beta=1.0,
                            allow=allow, domains=[[0], [1]], sort_tokens=sort_tokens, backend=backend)
    return unet, context


@pytest.mark.parametrize("backend", ["triton", "torch-as-on-a-gpu"])
def test_a_warm_unet_call_reads_no_tensor_value_with_cag_on(backend, monkeypatch):
    """After a resolution's first call (which prepares its layouts), a UNet call with SMA,
    multi-adapter LoRA and CAG reads no tensor value on the host: no GPU sync in a step.
    CAG accumulates on the device and is read once, by ``context.cag()``. The torch backends
    read tile lists and adapter ids only on the CPU (free there); off it they read nothing."""
    if backend == "torch-as-on-a-gpu":
        from mild_kernels import _runtime

        monkeypatch.setattr(_runtime, "host_reads_are_free", lambda device: False)
        backend = "torch"
    unet, context = lora_unet_with_regions(backend)
    inputs = unet_inputs(unet, 2, 16)
    with record_launches():
        run(unet, inputs, context)  # the first call prepares each resolution's layouts
        with count_host_reads() as reads:
            run(unet, inputs, context)
    assert reads == [], f"host reads in a warm UNet call: {reads}"
    assert len(context._cag) == 2  # recorded at both self-attention resolutions, on the device


def test_the_unet_traces_as_one_graph_with_regions_lora_and_cag():
    """torch.compile(fullgraph=True) material: a prepared context (no eager warm-up call) gives
    one graph and no break, and the compiled UNet matches eager, CAG included."""
    torch._dynamo.reset()
    unet, context = lora_unet_with_regions("torch")  # the custom ops are opaque to dynamo on either backend
    x, text, extra = unet_inputs(unet, 2, 16)
    unprepared = dataclasses.replace(context)  # its layouts are built inside the graph (flags read in the op)
    context.prepare(unet)
    kwargs = {"region_context": context}
    for call_context in (unprepared, context):
        explained = torch._dynamo.explain(unet)(x, torch.tensor(37), text,
                                                cross_attention_kwargs={"region_context": call_context})
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager_context = dataclasses.replace(context)  # fresh caches
    with torch.no_grad():
        expected = unet(x, 37, text, cross_attention_kwargs={"region_context": eager_context}).sample
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        context._cag.clear()
        context.prepare(unet)
        got = compiled(x, torch.tensor(37), text, cross_attention_kwargs=kwargs).sample
    assert rel_err(got, expected) < 1e-6
    eager_cag, compiled_cag = eager_context.cag(), context.cag()
    assert set(compiled_cag) == set(eager_cag) and len(eager_cag) == 4
    assert all(abs(compiled_cag[key] - value) < 1e-6 for key, value in eager_cag.items())


GATHERS = ("aten.gather.default", "aten.index_select.default", "aten.index.Tensor", "aten.take_along_dim.default")


class GatherCount(TorchDispatchMode):
    """Counts the aten gathers and SMA calls run inside it (a custom op is one op, its insides unseen)."""

    def __init__(self):
        super().__init__()
        self.gathers = self.sma_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gathers += str(func) in GATHERS
        self.sma_calls += str(func).startswith("mild_kernels.sma_forward")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", ["tiny", "sdxl-like"])
def test_no_gather_around_an_sma_processor_call(config, monkeypatch):
    """Region order is kept across each transformer's blocks (RegionOrder): the processors gather
    neither q, k, v nor the output; each transformer gathers its input and output once."""
    unet = build_unet({"tiny": TINY, "sdxl-like": SDXL_LIKE}[config])
    enable_sma(unet)
    inputs = unet_inputs(unet, 2, 16)
    allow = torch.ones(2, 3, 3, dtype=torch.bool)
    allow[:, 1, 2] = allow[:, 2, 1] = False
    context = RegionContext(person_masks(2, 64), (16, 16), torch.arange(2), alpha=1.0, beta=0.5, allow=allow,
                            text_regions=torch.randint(0, 3, (2, 7)), backend="torch")
    raster = dataclasses.replace(context, sort_tokens=False)
    context.prepare(unet, 7)
    processor_calls, original = [], SMAAttnProcessor.__call__

    @functools.wraps(original)  # diffusers passes only the keyword arguments the signature names
    def counting_call(self, attn, *args, **kwargs):
        with GatherCount() as counter:
            out = original(self, attn, *args, **kwargs)
        assert counter.sma_calls == 1  # the call ran SMA, with its region context
        processor_calls.append(counter.gathers)
        return out

    monkeypatch.setattr(SMAAttnProcessor, "__call__", counting_call)
    with GatherCount() as whole:
        sorted_out = run(unet, inputs, context)
    transformers = sum(hasattr(m, "sma_region_order") for m in unet.modules())
    assert processor_calls and processor_calls == [0] * len(processor_calls)
    assert whole.gathers == 2 * transformers  # in at the first block, out at the last
    assert len(processor_calls) > transformers  # several attentions share one transformer's two gathers
    assert rel_err(sorted_out, run(unet, inputs, raster)) < 1e-5


def test_region_order_under_gradient_checkpointing_gives_the_raster_order_gradients():
    """Under gradient checkpointing diffusers calls the blocks with positional arguments (and twice):
    the sorted and the raster-order runs give the same output and LoRA/modulation gradients."""
    results = []
    for sort_tokens in (True, False):
        unet = build_unet(SDXL_LIKE)
        enable_sma(unet)
        apply_multi_lora(unet, 2, 4, backend="torch")
        for module in unet.modules():
            if hasattr(module, "lora_b"):
                torch.nn.init.normal_(module.lora_b, std=0.1, generator=torch.Generator().manual_seed(1))
        set_adapter_ids(unet, torch.tensor([0, 1]))
        unet.enable_gradient_checkpointing()
        unet.train()
        torch.manual_seed(3)
        x, text, extra = unet_inputs(unet, 2, 16)
        context = RegionContext(person_masks(2, 64), (16, 16), torch.arange(2), alpha=1.0, beta=0.5,
                                sort_tokens=sort_tokens, backend="torch")
        out = unet(x, 37, text, cross_attention_kwargs={"region_context": context}, **extra).sample
        out.square().mean().backward()
        trained = [p for n, p in unet.named_parameters() if "lora" in n or "sma_modulation" in n]
        results.append((out.detach(), torch.cat([p.grad.flatten() for p in trained])))
    (out_sorted, grad_sorted), (out_raster, grad_raster) = results
    assert rel_err(out_sorted, out_raster) < 1e-5
    assert rel_err(grad_sorted, grad_raster) < 1e-4 and grad_raster.abs().sum() > 0


def test_region_order_refuses_a_self_attention_mask_and_serves_mixed_processors():
    """A self-attention mask comes in raster order, which region-ordered blocks do not keep: a
    clear error, never a silently misaligned mask. A non-SMA processor beside an SMA one in the
    same block sees sorted tokens and, having no regions, gives the same answer."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = build_unet(TINY)
    enable_sma(unet)
    inputs = unet_inputs(unet, 2, 16)
    context = RegionContext(person_masks(2, 64), (16, 16), torch.arange(2), alpha=1.0, beta=0.5,
                            text_regions=torch.randint(0, 3, (2, 7)), backend="torch")
    raster = dataclasses.replace(context, sort_tokens=False)
    block = next(m for m in unet.modules() if hasattr(m, "sma_region_order")).transformer_blocks[0]
    block.attn1.set_processor(AttnProcessor2_0())  # self-attention plain, cross-attention SMA
    assert rel_err(run(unet, inputs, context), run(unet, inputs, raster)) < 1e-5
    processor = SMAAttnProcessor()
    hidden = torch.randn(2, 64, block.attn1.query_dim)
    with pytest.raises(ValueError, match="^attention_mask: a self-attention mask"):
        processor(block.attn1, hidden, attention_mask=torch.zeros(2, 1, 64), region_context=context)


def tiny_transformers():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=8, out_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                pooled_projection_dim=32, out_channels=4)
    return {"flux": flux.eval(), "sd3": sd3.eval()}


def transformer_output(name, model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if name == "flux":
            tokens, text = 16, 5
            return model(hidden_states=torch.randn(1, tokens, 8, generator=gen),
                         encoder_hidden_states=torch.randn(1, text, 32, generator=gen),
                         pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                         img_ids=torch.randint(0, 4, (tokens, 3), generator=gen).float(),
                         txt_ids=torch.zeros(text, 3)).sample
        return model(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                     encoder_hidden_states=torch.randn(1, 5, 32, generator=gen),
                     pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([500])).sample


class ForeignJointProcessor:
    """A processor enable_sma does not know (an IP-Adapter's, a user's): it must not be replaced."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if image_rotary_emb is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_enable_sma_refuses_a_transformer_with_a_foreign_processor_and_leaves_it_unchanged(name):
    """SMA's transformer processors are diffusers' defaults plus regions: serving a model whose
    attention runs another processor would drop it silently."""
    model = tiny_transformers()[name]
    first = next(m for m in model.modules() if hasattr(m, "processor"))
    first.set_processor(ForeignJointProcessor(first.processor))
    before = dict(model.attn_processors)
    expected = transformer_output(name, model)
    with pytest.raises(ValueError, match=r"^enable_sma: .*ForeignJointProcessor.*unchanged"):
        enable_sma(model)
    assert all(model.attn_processors[k] is v for k, v in before.items())
    assert not any(hasattr(m, "sma_modulation") for m in model.modules())
    assert torch.equal(transformer_output(name, model), expected)


def test_enable_sma_refuses_a_unet_with_added_kv_attention():
    """A UNet attention with added K/V projections (SimpleCrossAttn blocks) is joint attention
    that SMAAttnProcessor does not compute."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
                                layers_per_block=1, down_block_types=("SimpleCrossAttnDownBlock2D",),
                                up_block_types=("SimpleCrossAttnUpBlock2D",),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16,
                                attention_head_dim=16, norm_num_groups=8)
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match=r"^enable_sma: UNet2DConditionModel .*AttnAddedKVProcessor.*unchanged"):
        enable_sma(unet)
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_enable_sma_takes_a_unet_whatever_processor_it_had():
    """A UNet's attention with another processor (a peer installed for a benchmark, an older
    diffusers default) is still one token sequence: enable_sma replaces it."""
    from diffusers.models.attention_processor import AttnProcessor

    from mild import SMAAttnProcessor, tiny_components

    unet = tiny_components()["unet"]

    class Peer(AttnProcessor):
        pass

    unet.set_attn_processor(Peer())
    enable_sma(unet)
    assert all(isinstance(p, SMAAttnProcessor) for p in unet.attn_processors.values())
