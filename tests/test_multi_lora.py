"""multi_lora_linear (both backends) against a float64 per-row loop; the module and UNet helpers."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compile_gate
from helpers import assert_close, count_host_reads
from mild_kernels import MultiLoRALinear, apply_multi_lora, multi_lora_linear, set_adapter_ids
from mild_kernels._runtime import poison_outputs, record_launches
from mild_kernels.multi_lora import interface, multi_lora_linear_reference, triton_lora

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(rows=3, tokens=37, in_features=45, out_features=51, rank=5, adapters=3, ids=(2, -1, 0),
              dtype=torch.float32, bias=True, per_adapter_scaling=True, flat=False, device="cpu"):
    """Random inputs scaled so that the base and the LoRA terms are of similar size."""
    shape = (rows, in_features) if flat else (rows, tokens, in_features)
    x = torch.randn(shape, device=device)
    weight = torch.randn(out_features, in_features, device=device) / in_features ** 0.5
    lora_a = torch.randn(adapters, rank, in_features, device=device) / in_features ** 0.5
    lora_b = torch.randn(adapters, out_features, rank, device=device) / rank ** 0.5
    case = dict(x=x, weight=weight, bias=torch.randn(out_features, device=device) if bias else None,
                lora_a=lora_a, lora_b=lora_b)
    case = {name: (t.to(dtype) if t is not None else None) for name, t in case.items()}
    case["adapter_ids"] = torch.tensor(ids, device=device)
    case["scaling"] = 0.5 + torch.rand(adapters, device=device) if per_adapter_scaling else 0.75
    return case


def float64(case):
    return {name: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for name, t in case.items()}


TRAINED = ("x", "lora_a", "lora_b")


def check_forward_and_backward(case, backend, dtype, factor=1.0):
    """Output and the gradients of x, lora_a and lora_b against float64 autograd of the reference."""
    leaves = {name: (t.detach().requires_grad_() if name in TRAINED else t) for name, t in case.items()}
    with poison_outputs():
        out = multi_lora_linear(**leaves, backend=backend)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [leaves[n] for n in TRAINED], grad_out)
    ref_leaves = {name: (t.detach().requires_grad_() if name in TRAINED else t) for name, t in float64(case).items()}
    ref = multi_lora_linear_reference(**ref_leaves)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in TRAINED], grad_out.double(), allow_unused=True,
                                    materialize_grads=True)  # with every id -1 the adapters are unused
    assert out.dtype == dtype
    assert_close("out", out, ref, dtype, factor)
    for name, grad, ref_grad in zip(TRAINED, grads, ref_grads):
        assert grad.dtype == dtype
        assert_close(f"d{name}", grad, ref_grad, dtype, factor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(backend, dtype, device):
    """Odd tokens, in, out and rank; mixed ids with -1; row tiles across a change of adapter."""
    check_forward_and_backward(make_case(dtype=dtype, device=device), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_through_forward_and_backward(backend, device):
    """int32 adapter ids, with many tokens per row (the torch backend gathers each row's adapter)."""
    case = make_case(rows=3, tokens=40, device=device)
    case["adapter_ids"] = torch.as_tensor(case["adapter_ids"]).to(torch.int32)
    check_forward_and_backward(case, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_its_dtype_like_nn_linear(backend, device):
    """Under torch.autocast (bf16 training) fp32 inputs run in bf16, as F.linear's would, and the
    fp32 leaves get fp32 gradients; autocast itself never casts for a custom op."""
    case = make_case(dtype=torch.float32, device=device)
    leaves = {name: (t.detach().requires_grad_() if name in TRAINED else t) for name, t in case.items()}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = multi_lora_linear(**leaves, backend=backend)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().square().sum(), [leaves[n] for n in TRAINED])
    assert all(g.dtype == torch.float32 for g in grads)
    assert_close("out", out, multi_lora_linear_reference(**float64(case)), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_input_with_mixed_ids(backend, device):
    """(rows, in): every row its own adapter, so row tiles hold several adapters and -1 rows."""
    ids = torch.randint(-1, 4, (53,)).tolist()
    case = make_case(rows=53, adapters=4, ids=ids, flat=True, per_adapter_scaling=False, device=device)
    check_forward_and_backward(case, backend, torch.float32)


@pytest.mark.parametrize("flat", [True, False], ids=["grouped", "gathered"])
def test_torch_backend_without_host_reads(flat, monkeypatch, device):
    """Off the CPU the torch backend reads no adapter id: every adapter runs over all rows,
    the others' rows weighted 0. Same results as the float64 reference."""
    from mild_kernels import _runtime

    monkeypatch.setattr(_runtime, "host_reads_are_free", lambda device: False)
    ids = torch.randint(-1, 4, (29,)).tolist()
    case = make_case(rows=29, tokens=37, adapters=4, ids=ids, flat=flat, device=device)
    check_forward_and_backward(case, "torch", torch.float32)
    x = case["x"].detach().requires_grad_()
    multi_lora_linear(**{**case, "x": x}, backend="torch")  # the first call reads the id range (a check)
    with count_host_reads() as reads:
        multi_lora_linear(**{**case, "x": x}, backend="torch").sum().backward()
    assert reads == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_id_minus_one_is_the_base_layer(backend, device):
    case = make_case(ids=(-1, -1, -1), device=device)
    leaves = {name: (t.detach().requires_grad_() if name in TRAINED else t) for name, t in case.items()}
    out = multi_lora_linear(**leaves, backend=backend)
    base = torch.nn.functional.linear(case["x"].double(), case["weight"].double(), case["bias"].double())
    assert_close("out", out, base, torch.float32)
    out.backward(torch.randn_like(out))
    assert torch.count_nonzero(leaves["lora_a"].grad) == 0 and torch.count_nonzero(leaves["lora_b"].grad) == 0


@pytest.mark.parametrize("group", [1, 2, 5])
@pytest.mark.parametrize("rows, tokens, in_features, out_features, rank, ids", [
    (2, 64, 64, 130, 16, (1, 0)),     # row tiles that each hold one adapter; an output tail
    (4, 21, 70, 200, 7, (0, 0, 1, -1)),  # tiles across rows: same adapter, two adapters, an adapter and -1
    (1, 150, 33, 64, 3, (1,)),       # one row, a token tail
])
def test_triton_tilings(rows, tokens, in_features, out_features, rank, ids, group, monkeypatch, device):
    """Output-tile groups of every size (a ragged last group included) and tiles across rows."""
    monkeypatch.setattr(triton_lora, "output_group_size", lambda *args: group)
    case = make_case(rows, tokens, in_features, out_features, rank, adapters=2, ids=ids, device=device)
    check_forward_and_backward(case, "triton", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_with_a_float_scaling(backend, device):
    check_forward_and_backward(make_case(bias=False, per_adapter_scaling=False, device=device), backend,
                               torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_base_that_asks_for_gradients_gets_them(backend, device):
    case = make_case(device=device)
    weight, bias = case["weight"].requires_grad_(), case["bias"].requires_grad_()
    out = multi_lora_linear(**case, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x = case["x"].double()
    assert_close("dweight", weight.grad, grad_out.double().flatten(0, 1).T @ x.flatten(0, 1), torch.float32)
    assert_close("dbias", bias.grad, grad_out.double().sum((0, 1)), torch.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 4), tokens=st.integers(1, 40), in_features=st.integers(1, 70),
       out_features=st.integers(1, 70), rank=st.integers(1, 20), adapters=st.integers(1, 3),
       backend=st.sampled_from(BACKENDS), data=st.data())
def test_drawn_shapes(rows, tokens, in_features, out_features, rank, adapters, backend, data, device):
    ids = data.draw(st.lists(st.integers(-1, adapters - 1), min_size=rows, max_size=rows))
    case = make_case(rows, tokens, in_features, out_features, rank, adapters, ids, device=device)
    check_forward_and_backward(case, backend, torch.float32)


# ---------------------------------------------------------------- bad inputs
def broken(**changes):
    def build(device):
        case = make_case(device=device)
        for name, change in changes.items():
            case[name] = change(case) if callable(change) else change.to(device) if isinstance(change, torch.Tensor) \
                else change
        return case

    return build


BAD_INPUTS = {
    "id above the adapters": (broken(adapter_ids=torch.tensor([3, 0, 1])), "adapter_ids"),
    "id below -1": (broken(adapter_ids=torch.tensor([0, -2, 1])), "adapter_ids"),
    "float ids": (broken(adapter_ids=torch.tensor([0.0, 1.0, 2.0])), "adapter_ids"),
    "an id per token": (broken(adapter_ids=torch.zeros(3, 37, dtype=torch.long)), "adapter_ids"),
    "too few ids": (broken(adapter_ids=torch.tensor([0, 1])), "adapter_ids"),
    "rank mismatch": (broken(lora_b=lambda c: c["lora_b"][..., :4]), "lora_b"),
    "adapter count mismatch": (broken(lora_b=lambda c: c["lora_b"][:2]), "lora_b"),
    "lora_b out features": (broken(lora_b=lambda c: c["lora_b"][:, :50]), "lora_b"),
    "lora_a in features": (broken(lora_a=lambda c: c["lora_a"][..., :44]), "lora_a"),
    "weight in features": (broken(weight=lambda c: c["weight"][:, :44]), "weight"),
    "bias length": (broken(bias=lambda c: c["bias"][:50]), "bias"),
    "x with four dims": (broken(x=lambda c: c["x"][None]), "x"),
    "lora_a with two dims": (broken(lora_a=lambda c: c["lora_a"][0]), "lora_a"),
    "mixed dtypes: weight": (broken(weight=lambda c: c["weight"].half()), "weight"),
    "mixed dtypes: lora_a": (broken(lora_a=lambda c: c["lora_a"].bfloat16()), "lora_a"),
    "mixed dtypes: bias": (broken(bias=lambda c: c["bias"].double()), "bias"),
    "integer x": (broken(x=lambda c: c["x"].long()), "x"),
    "scaling per adapter of the wrong length": (broken(scaling=torch.ones(2)), "scaling"),
    "scaling as a string": (broken(scaling="1"), "scaling"),
    "no adapters": (broken(lora_a=lambda c: c["lora_a"][:0], lora_b=lambda c: c["lora_b"][:0]), "lora_a"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_value_errors_that_name_the_argument(name, backend, device):
    build, argument = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=f"^{argument}:"):
        multi_lora_linear(**build(device), backend=backend)


def test_bad_backend_and_rank_beyond_the_triton_kernels(device):
    with pytest.raises(ValueError, match="^backend:"):
        multi_lora_linear(**make_case(device=device), backend="cuda")
    case = make_case(rank=interface.MAX_RANK + 1, device=device)
    with pytest.raises(ValueError, match="^lora_a:"):
        multi_lora_linear(**case, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_as_a_list(backend, device):
    case = make_case(device=device)
    as_list = dict(case, adapter_ids=case["adapter_ids"].tolist())
    torch.testing.assert_close(multi_lora_linear(**as_list, backend=backend), multi_lora_linear(**case, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_changed_in_place_are_checked_again(backend, device):
    case = make_case(device=device)
    multi_lora_linear(**case, backend=backend)
    case["adapter_ids"][0] = 3
    with pytest.raises(ValueError, match="^adapter_ids:"):
        multi_lora_linear(**case, backend=backend)


# ---------------------------------------------------------------- compile gate
def test_compile_gate_cases_drive_every_shipped_config():
    """The gate's cases (tests/compile_gate.py) launch every GEMM and gradient config entry."""
    gemm_seen, grad_seen = set(), set()
    for name, run in compile_gate.multi_lora_cases():
        with record_launches() as launches:
            run()
        kernels = {launch.kernel.__name__ for launch in launches}
        assert kernels == {"_multi_lora_kernel", "_multi_lora_fixup_kernel", "_lora_grad_kernel"}, name
        for launch in launches:
            args = launch.kwargs
            if launch.kernel.__name__ == "_lora_grad_kernel":
                is_fp32 = args["V"].dtype == torch.float32
                config = triton_lora.GradConfig(args["BLOCK_M"], args["BLOCK_Q"], launch.num_warps,
                                                   launch.num_stages)
                key = (is_fp32, args["BLOCK_R"])
                assert triton_lora.GRAD_CONFIGS[key] == config, name
                grad_seen.add(key)
            else:
                is_fp32 = args["X"].dtype == torch.float32
                config = triton_lora.GemmConfig(args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"],
                                                   launch.num_warps, launch.num_stages)
                key = (is_fp32, args["BLOCK_R"], triton_lora.output_tile_class(args["N"]))
                shipped = triton_lora.GEMM_CONFIGS[key]
                if launch.kernel.__name__ == "_multi_lora_fixup_kernel":  # at most two stages (sm_80 spilled)
                    shipped = dataclasses.replace(shipped, num_stages=min(shipped.num_stages, 2))
                assert shipped == config, name
                gemm_seen.add(key)
    assert gemm_seen == set(triton_lora.GEMM_CONFIGS)
    assert grad_seen == set(triton_lora.GRAD_CONFIGS)


# ---------------------------------------------------------------- module and UNet helpers
def randomize_adapters(model):
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.5)


def test_module_matches_the_function_and_trains_only_the_adapters(device):
    base = torch.nn.Linear(24, 40).to(device)
    layer = MultiLoRALinear(base, num_adapters=2, rank=4, scaling=[0.5, 2.0])
    x = torch.randn(3, 11, 24, device=device)
    torch.testing.assert_close(layer(x), base(x))  # no ids set: the base layer
    randomize_adapters(layer)
    layer.set_adapter_ids([1, -1, 0])
    expected = multi_lora_linear_reference(x, base.weight, base.bias, layer.lora_a, layer.lora_b,
                                           torch.tensor([1, -1, 0]), torch.tensor([0.5, 2.0]))
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_a.grad is not None and layer.lora_b.grad.abs().sum() > 0
    image_like = torch.randn(3, 5, 7, 24, device=device)  # more than one token dim
    torch.testing.assert_close(layer(image_like), layer(image_like.flatten(1, 2)).view(3, 5, 7, 40))


def test_set_adapter_ids_checks_once_and_resets():
    model = torch.nn.Sequential(MultiLoRALinear(torch.nn.Linear(8, 8), 2, 2), MultiLoRALinear(torch.nn.Linear(8, 8), 3, 2))
    with pytest.raises(ValueError, match="^adapter_ids:"):
        set_adapter_ids(model, [2, 0])  # the first layer holds only two adapters
    with pytest.raises(ValueError, match="^adapter_ids:"):
        set_adapter_ids(model, [[0, 1]])
    set_adapter_ids(model, [1, 0])
    assert model[0].adapter_ids is model[1].adapter_ids
    set_adapter_ids(model, None)
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), model[1].base(model[0].base(x)))
    with pytest.raises(ValueError, match="^model:"):
        set_adapter_ids(torch.nn.Linear(2, 2), [0])


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=8, sample_size=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def unet_inputs(batch):
    return torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,)), torch.randn(batch, 7, 32)


@torch.no_grad()
def test_unet_with_every_id_minus_one_matches_the_plain_unet():
    unet = tiny_unet()
    inputs = unet_inputs(2)
    plain = unet(*inputs).sample
    wrapped = apply_multi_lora(unet, num_adapters=2, rank=4)
    attentions = [m for m in unet.modules() if hasattr(m, "to_q") and hasattr(m, "to_out")]
    assert len(wrapped) == 4 * len(attentions) > 0
    assert all(isinstance(m.to_q, MultiLoRALinear) and isinstance(m.to_out[0], MultiLoRALinear) for m in attentions)
    randomize_adapters(unet)
    set_adapter_ids(unet, [-1, -1])
    torch.testing.assert_close(unet(*inputs).sample, plain)
    set_adapter_ids(unet, [0, 1])
    assert not torch.allclose(unet(*inputs).sample, plain, atol=1e-3)
    with pytest.raises(ValueError, match="^model:"):
        apply_multi_lora(unet, num_adapters=2, rank=4)  # already wrapped


@torch.no_grad()
def test_unet_rows_use_their_own_adapters():
    """A batch with ids [0, 1] gives, row by row, what each row gives alone with its id."""
    unet = tiny_unet()
    apply_multi_lora(unet, num_adapters=2, rank=4)
    randomize_adapters(unet)
    sample, timesteps, text = unet_inputs(2)
    set_adapter_ids(unet, [0, 1])
    together = unet(sample, timesteps, text).sample
    for row, adapter in enumerate([0, 1]):
        set_adapter_ids(unet, [adapter])
        alone = unet(sample[row:row + 1], timesteps[row:row + 1], text[row:row + 1]).sample
        torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-4, atol=1e-5)


class TinyAdaptedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = MultiLoRALinear(torch.nn.Linear(16, 32), num_adapters=2, rank=4, backend="torch")
        self.proj_out = MultiLoRALinear(torch.nn.Linear(32, 16), num_adapters=2, rank=4, backend="torch")

    def forward(self, x):
        return self.proj_out(torch.nn.functional.gelu(self.proj_in(x)))


def test_torch_compile_fullgraph_has_no_graph_breaks():
    torch._dynamo.reset()
    model = TinyAdaptedBlock()
    randomize_adapters(model)
    set_adapter_ids(model, [1, -1, 0])
    x = torch.randn(3, 9, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, model(x))
    got.sum().backward()
    assert model.proj_in.lora_a.grad is not None and model.proj_in.lora_a.grad.abs().sum() > 0
