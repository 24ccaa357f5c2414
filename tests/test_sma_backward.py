"""Gradients of sma_attention against float64 autograd of the reference; compile; training."""

import pytest
import torch

from helpers import rel_err
from mild_kernels import sma_attention, sma_attention_reference
from test_sma_attention import make_case

GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}


def with_grads(case, dtype=None):
    """A copy of the case whose q, k, v and bias are leaves that require grad."""
    leaves = {}
    for name, t in case.items():
        if name in ("q", "k", "v", "bias") and t is not None:
            t = t.detach().to(dtype or t.dtype).requires_grad_()
        leaves[name] = t
    return leaves


def cotangents(case, R, lse=True, mass=True):
    B, H, Nq, D = case["q"].shape
    return dict(out=torch.randn(B, H, Nq, D), lse=torch.randn(B, H, Nq) if lse else None,
                mass=torch.randn(B, H, Nq, R) if mass else None)


def loss_of(result, cot):
    out, lse, mass = result
    loss = (out.double() * cot["out"].double()).sum()
    if cot["lse"] is not None:
        loss = loss + (lse.double().masked_fill(lse.isinf(), 0) * cot["lse"].double()).sum()
    if cot["mass"] is not None:
        loss = loss + (mass.double() * cot["mass"].double()).sum()
    return loss


def grads(case, result, cot):
    leaves = [case[n] for n in ("q", "k", "v", "bias") if case[n] is not None]
    return dict(zip(("q", "k", "v", "bias"), torch.autograd.grad(loss_of(result, cot), leaves)))


def check_grads(case, backend, dtype, R, lse=True, mass=True):
    cot = cotangents(case, R, lse, mass)
    ours = with_grads(case)
    result = sma_attention(**ours, return_lse=True, return_region_mass=True, backend=backend)
    got = grads(ours, result, cot)
    ref_case = with_grads(case, torch.float64)
    for name in ("q_regions", "k_regions"):
        if ref_case[name].is_floating_point():
            ref_case[name] = ref_case[name].double()
    expected = grads(ref_case, sma_attention_reference(**ref_case, return_lse=True, return_region_mass=True), cot)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape and got[name].dtype == case[name].dtype
        err = rel_err(got[name], ref)
        assert err <= GRAD_TOLERANCE[dtype], f"d{name}: relative error {err:.3e} ({dtype}, {backend})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_gradients_match_float64_reference(backend, dtype, soft, device):
    case = make_case(B=2, H=2, Nq=67, Nk=45, D=40, R=4, dtype=dtype, soft=soft, bias_kind="BHRR", device=device)
    check_grads(case, backend, dtype, R=4)


@pytest.mark.parametrize("bias_kind", ["RR", "HRR", "BHRR"])
@pytest.mark.parametrize("head_dim", [16, 80])
def test_bias_gradient_is_reduced_to_the_given_shape(backend, bias_kind, head_dim, device):
    case = make_case(B=2, H=3, Nq=50, Nk=61, D=head_dim, R=3, bias_kind=bias_kind, batched_labels=False,
                     device=device)
    check_grads(case, backend, torch.float32, R=3, lse=False, mass=False)


@pytest.mark.parametrize("head_dim", [24, 64, 160])
def test_gradients_with_heavy_blocking(backend, head_dim, device):
    case = make_case(B=1, H=2, Nq=90, Nk=70, D=head_dim, R=5, blocked=0.7, device=device)
    case["allow"][0, 1, :] = False  # some rows see nothing: their gradients are 0
    check_grads(case, backend, torch.float32, R=5)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_gradients_with_wide_regions_at_sd15_head_dim(backend, soft, device):
    """R > 16 at D=40: the dK/dV launch runs one 64-column block there (two spill), its tail masked."""
    case = make_case(B=1, H=2, Nq=70, Nk=83, D=40, R=20, dtype=torch.float16, soft=soft, device=device)
    check_grads(case, backend, torch.float16, R=20)


@pytest.mark.parametrize("regions", ["sorted-hard", "sorted-one-hot", "wide-soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dkdv_queries_first(regions, dtype, monkeypatch):
    """A dK/dV query block wider than its key block computes the scores queries-first (the
    kernel's QUERY_MAJOR: the D=128 tables). Forced here at D=40 (two head-dim
    blocks, one masked), which no shipped config runs that way: pure key tiles (region-sorted
    labels) and mixed ones, blocked pairs, the lse's and region mass's gradients, and wide regions
    (R > 16: the key operand read per block)."""
    import dataclasses

    from mild_kernels.sma import configs, triton_backward
    from mild_kernels.sma.configs import KernelConfig

    R = 20 if regions == "wide-soft" else 3
    case = make_case(B=1, H=2, Nq=150, Nk=173, D=40, R=R, dtype=dtype, soft=regions == "wide-soft", blocked=0.3)
    if regions != "wide-soft":  # key tiles: [0, 64) region 0, [64, 128) region 1, [128, 173) mixed with a tail
        labels = torch.cat([torch.full((n,), r) for r, n in enumerate((64, 74, 35))])
        q_labels = labels[torch.linspace(0, 172, 150).round().long()]
        one_hot = regions == "sorted-one-hot"
        case["k_regions"], case["q_regions"] = ((torch.nn.functional.one_hot(x, R).float() if one_hot else x)[None]
                                                for x in (labels, q_labels))
    shipped = configs.backward_config
    monkeypatch.setattr(configs, "backward_config", lambda *args: dataclasses.replace(
        shipped(*args), dkdv=KernelConfig(128, 64, 8, 2)))
    frames = []
    launch = triton_backward.launch

    def spy(kernel, grid, **kwargs):
        if "QUERY_MAJOR" in kwargs:
            frames.append(kwargs["QUERY_MAJOR"])
        return launch(kernel, grid, **kwargs)

    monkeypatch.setattr(triton_backward, "launch", spy)
    check_grads(case, "triton", dtype, R=R)
    assert frames == [True]


def test_blocked_rows_get_zero_gradient(backend, device):
    case = make_case(B=1, H=2, Nq=40, Nk=30, D=16, R=3, allow_kind="RR", blocked=0.0, batched_labels=False,
                     device=device)
    case["allow"][2, :] = False
    leaves = with_grads(case)
    out = sma_attention(**leaves, backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), [leaves["q"]])
    blocked = case["q_regions"] == 2
    assert blocked.any()
    assert (dq[:, :, blocked] == 0).all() and dq.isfinite().all()


def test_gradcheck_torch_backend():
    case = make_case(B=1, H=2, Nq=7, Nk=9, D=16, R=3, soft=False, bias_kind="HRR", allow_kind="RR", blocked=0.3,
                     batched_labels=False)
    leaves = with_grads(case, torch.float64)

    def fn(q, k, v, bias):
        res = sma_attention(q, k, v, case["q_regions"], case["k_regions"], bias, case["allow"],
                            return_region_mass=True, backend="torch")
        return res.out, res.region_mass

    assert torch.autograd.gradcheck(fn, (leaves["q"], leaves["k"], leaves["v"], leaves["bias"]), eps=1e-6,
                                    atol=1e-6)


def test_backward_is_bitwise_repeatable(device):
    """No atomics: two backward passes of the same call give the same bits."""
    case = make_case(B=2, H=2, Nq=70, Nk=80, D=32, R=4, device=device)
    runs = []
    for _ in range(2):
        leaves = with_grads(case)
        out = sma_attention(**leaves, backend="triton")
        runs.append(torch.autograd.grad((out * out).sum(), [leaves[n] for n in ("q", "k", "v", "bias")]))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


class TinyRegionAttention(torch.nn.Module):
    """One attention layer whose region modulation (alpha, beta per head) is learned."""

    def __init__(self, dim=32, heads=2, regions=3, backend="torch"):
        super().__init__()
        self.heads, self.regions, self.backend = heads, regions, backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.alpha = torch.nn.Parameter(torch.zeros(heads))
        self.beta = torch.nn.Parameter(torch.zeros(heads))

    def forward(self, x, labels):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        eye = torch.eye(self.regions, device=x.device)
        bias = self.alpha[:, None, None] * eye - self.beta[:, None, None] * (1 - eye)
        out = sma_attention(q, k, v, labels, labels, bias, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def test_torch_compile_fullgraph_has_no_graph_breaks():
    torch._dynamo.reset()
    model = TinyRegionAttention()
    x, labels = torch.randn(2, 24, 32), torch.randint(0, 3, (24,))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, labels)
    torch.testing.assert_close(got, model(x, labels))
    got.sum().backward()
    assert model.alpha.grad is not None and model.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("backend_name", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_a_small_module_trains(backend_name):
    """The modulation must learn to keep two regions apart: the loss falls over 50 steps."""
    torch.manual_seed(0)
    model = TinyRegionAttention(backend=backend_name)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    labels = torch.arange(3).repeat_interleave(8)
    x = torch.randn(4, 24, 32)
    # Target: each token's mean over its own region.
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    target = (onehot / onehot.sum(0)) @ (onehot.T @ x)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, labels), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert model.alpha.grad is not None
