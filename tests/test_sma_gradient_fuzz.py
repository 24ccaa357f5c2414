"""Hypothesis-driven parity of every SMA gradient (dq, dk, dv, dbias) and forward output
(out, lse, region mass) with autograd through a float64 evaluation of the reference.

The fixed-shape gradient tests in test_sma_backward.py draw raster-order random labels
and a few shapes. They miss a Triton backward whose last key tile, padded past Nk, runs
as a *full* (unmasked) tile pair for hard labels: the padding keys then enter the bias
gradient dW (relative error 6e-3 to 1 and more at Nq = Nk = 67, fp32), blocked pairs
receive gradient and a head's dW no longer sums to zero, while dq, dk, dv stay right.
This file draws the cases that expose such bugs: region-sorted runs (region-pure tiles),
token counts with tails, fully allowed and fully blocked tables, soft and one-hot
memberships, and checks two properties of dW that need no reference at all:

- blocked region pairs get exactly zero gradient (hard labels / one-hot memberships);
- without an lse cotangent a head's dW sums to zero: adding a constant to every entry
  of W[b, h] shifts every score row by that constant (memberships sum to 1), which
  changes neither softmax(S) nor the region mass, so the sum of dW is that derivative: 0.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from mild_kernels import sma_attention, sma_attention_reference
from mild_kernels._runtime import poison_outputs
from test_sma_attention import float64, make_case, random_regions
from test_sma_backward import GRAD_TOLERANCE, cotangents, grads, with_grads

HEAD_DIMS = [16, 24, 40, 64, 80]
# Counts with tails past every block size (16, 32, 64, 128), and exact multiples.
SPECIAL_COUNTS = [1, 2, 15, 17, 31, 33, 47, 48, 63, 64, 65, 67, 96, 97, 127, 129, 161, 200]
# The Triton interpreter's time grows with B * H and the tile pairs (~35 ms per 16 x 16 pair
# through forward and backward at the time of writing): cap B * H * tiles(Nq) * tiles(Nk),
# counting 16-token tiles, to keep an example near a second or two.
TILE_PAIR_BUDGET = 20
# dW is compared with float64 relative to max(||ref||, DBIAS_FLOOR * B), B a bound on
# sum |dS| over the rows the table covers (ds_bound): dW can vanish (a row that sees one
# region contributes nothing to it without an lse cotangent), and its rounding error scales
# with sum |dS|, not with |dW|. The floors leave 5x to 10x over the largest error that
# correct backends showed in a few hundred draws (fp32 ~3e-8 B), and catch padding keys in dW.
DBIAS_FLOOR = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# |sum of a table's dW| / B, without an lse cotangent (0 up to rounding; see the docstring).
SUM_TOLERANCE = {torch.float32: 5e-7, torch.float16: 5e-4, torch.bfloat16: 4e-3}

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            # No shrinking: each example runs Triton kernels in the interpreter, and a failure
            # already prints the drawn case and its seed.
            phases=[Phase.explicit, Phase.reuse, Phase.generate])


# ---------------------------------------------------------------- drawing cases
def tiles(n, block=16):
    return -(-n // block)


def token_count(draw, upper=200):
    specials = [n for n in SPECIAL_COUNTS if n <= upper]
    return draw(st.one_of(st.sampled_from(specials), st.integers(1, upper)))


def draw_sizes(draw):
    """(B, H, Nq, Nk): one count up to 200, the other as large as the tile-pair budget allows;
    B * H = 4 only for the smallest cases (the interpreter's cost grows with B * H programs)."""
    first = token_count(draw)
    second_max = min(200, 16 * max(1, TILE_PAIR_BUDGET // tiles(first)))
    second = token_count(draw, second_max)
    Nq, Nk = (first, second) if draw(st.booleans()) else (second, first)
    pairs = tiles(Nq) * tiles(Nk)
    shapes = [(1, 1), (1, 2), (2, 1)] if 4 * pairs <= TILE_PAIR_BUDGET else [(1, 1)]
    B, H = draw(st.sampled_from(shapes + ([(2, 2)] if pairs <= 4 else [])))
    return B, H, Nq, Nk


def sorted_labels(draw, tokens, R):
    """Nondecreasing labels: region r owns one run; R - 1 cut points anywhere (runs may be empty)."""
    cuts = sorted(draw(st.lists(st.integers(0, tokens), min_size=R - 1, max_size=R - 1)))
    return torch.searchsorted(torch.tensor(cuts, dtype=torch.long), torch.arange(tokens), right=True)


def run_labels(tokens, R):
    """Raster-like blobs: runs of random lengths (up to 80 tokens) with random labels."""
    lengths = torch.randint(1, 81, (tokens,))
    labels = torch.randint(0, R, (tokens,)).repeat_interleave(lengths)
    return labels[:tokens]


def draw_labels(draw, order, batch, tokens, R):
    """(tokens,) or, when batch > 0, (batch, tokens) hard labels in the given token order."""
    rows = []
    for _ in range(max(batch, 1)):
        if order == "sorted":
            rows.append(sorted_labels(draw, tokens, R))
        elif order == "runs":
            rows.append(run_labels(tokens, R))
        else:
            rows.append(random_regions(0, tokens, R, soft=False, device="cpu"))
    labels = torch.stack(rows)
    return labels if batch else labels[0]


def soften(labels, R, kind):
    """Regions of a kind from hard labels: hard, exact one-hot floats, or soft memberships.

    Soft: one-hot tokens, except that tokens at a region boundary mix in the neighbour's
    region (as area averages at mask edges do), and a few take a random mixture
    (random_regions' soft draw).
    """
    if kind == "hard":
        return labels
    onehot = F.one_hot(labels, R).float()
    if kind == "onehot" or R == 1:
        return onehot
    previous = torch.cat([labels[..., :1], labels[..., :-1]], -1)
    boundary = (labels != previous) & (torch.rand(labels.shape) < 0.7)
    weight = torch.empty(labels.shape).uniform_(0.2, 1.0)[..., None]
    mixed = weight * onehot + (1 - weight) * F.one_hot(previous, R).float()
    soft = torch.where(boundary[..., None], mixed, onehot)
    batch = labels.shape[0] if labels.dim() == 2 else 0
    random_soft = random_regions(batch, labels.shape[-1], R, soft=True, device="cpu")
    soft = torch.where((torch.rand(labels.shape) < 0.1)[..., None], random_soft, soft)
    return soft / soft.sum(-1, keepdim=True)


def draw_allow(draw, kind, B, R):
    """None, all allowed, random, or block-diagonal; optionally one query region sees nothing."""
    if kind is None:
        return None
    shape = (R, R) if kind == "RR" else (B, R, R)
    pattern = draw(st.sampled_from(["all", "random", "diagonal"]))
    if pattern == "all":
        allow = torch.ones(shape, dtype=torch.bool)
    elif pattern == "random":
        allow = torch.rand(shape) >= draw(st.sampled_from([0.3, 0.6]))
    else:
        allow = torch.eye(R, dtype=torch.bool).expand(shape) | (torch.rand(shape) < 0.2)
    if draw(st.booleans()):  # a fully blocked query region: its rows see no key
        allow = allow.clone()
        allow[..., draw(st.integers(0, R - 1)), :] = False
    return allow


def draw_case(draw, hard_only=False, orders=("sorted", "runs", "random")):
    torch.manual_seed(draw(st.integers(0, 2**32 - 1)))
    B, H, Nq, Nk = draw_sizes(draw)
    D = draw(st.sampled_from(HEAD_DIMS))
    R = draw(st.integers(1, 6))
    dtype = torch.float32 if hard_only else draw(st.sampled_from([torch.float32] * 4 + [torch.float16, torch.bfloat16]))
    order = draw(st.sampled_from(orders))
    batched = draw(st.booleans())
    q_kind = "hard" if hard_only else draw(st.sampled_from(["hard", "soft", "onehot"]))
    k_kind = "hard" if hard_only else draw(st.sampled_from(["same", "hard", "soft", "onehot"]))
    k_kind = q_kind if k_kind == "same" else k_kind
    bias_kind = draw(st.sampled_from(["RR", "HRR", "BHRR"]))
    allow_kind = draw(st.sampled_from([None, "RR", "BRR"]))
    case = make_case(B=B, H=H, Nq=Nq, Nk=Nk, D=D, R=R, dtype=dtype, bias_kind=bias_kind, allow_kind=None)
    q_labels = draw_labels(draw, order, B if batched else 0, Nq, R)
    k_labels = draw_labels(draw, order, B if batched else 0, Nk, R)
    case["q_regions"], case["k_regions"] = soften(q_labels, R, q_kind), soften(k_labels, R, k_kind)
    magnitude = draw(st.sampled_from([0.5, 2.0, 4.0]))
    case["bias"] = (2 * torch.rand(case["bias"].shape) - 1) * magnitude
    case["allow"] = draw_allow(draw, allow_kind, B, R)
    flags = dict(lse=draw(st.booleans()), mass=draw(st.booleans()))
    description = (f"B={B} H={H} Nq={Nq} Nk={Nk} D={D} R={R} {dtype} order={order} batched={batched} "
                   f"q={q_kind} k={k_kind} bias={bias_kind}x{magnitude} allow={allow_kind} {flags}")
    return case, dtype, R, flags, description


# ---------------------------------------------------------------- evaluation and checks
def one_hot_regions(case):
    """Whether both sides' memberships are exactly one-hot (hard labels or one-hot floats)."""
    return all(not r.is_floating_point() or bool(((r == 0) | (r == 1)).all())
               for r in (case["q_regions"], case["k_regions"]))


def run_both(case, backend, cot):
    """(our SMAOutput, our grads, reference outputs, reference grads), grads by name."""
    leaves = with_grads(case)
    with poison_outputs():
        got = sma_attention(**leaves, return_lse=True, return_region_mass=True, backend=backend)
        got_grads = grads(leaves, got, cot)
    ref_leaves = with_grads(float64(case))
    ref = sma_attention_reference(**ref_leaves, return_lse=True, return_region_mass=True)
    return got, got_grads, ref, grads(ref_leaves, ref, cot)


def device_cotangents(case, R, lse, mass, device):
    return {n: (None if t is None else t.to(device)) for n, t in cotangents(case, R, lse, mass).items()}


def parity_failures(case, cot, got, got_grads, ref, ref_grads, dtype, bias_floor=True):
    """Messages for every output and gradient that misses its float64 reference.

    A gradient passes when ||ours - ref|| <= GRAD_TOLERANCE * ||ref|| + 2 * rounding_floors(...):
    the floor is the error that storing `out` in its dtype alone may cause (negligible in fp32).
    bias_floor: measure dbias against max(||ref||, DBIAS_FLOOR * ds_bound) (for drawn cases,
    where dW may vanish); else against ||ref||, as dq, dk and dv.
    """
    failures = []
    for name, ours, expected in zip(("out", "lse", "region_mass"), got, ref):
        try:
            assert_close(name, ours, expected, dtype)
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    floors = rounding_floors(case, cot, ref[0], dtype)
    tolerance = GRAD_TOLERANCE[dtype]
    for name, expected in ref_grads.items():
        ours = got_grads[name]
        if ours.shape != expected.shape or ours.dtype != case[name].dtype:
            failures.append(f"d{name}: shape {tuple(ours.shape)} dtype {ours.dtype}, expected {tuple(expected.shape)} "
                            f"{case[name].dtype}")
            continue
        if not ours.isfinite().all():
            failures.append(f"d{name}: not finite")
            continue
        diff = (ours.double() - expected).norm().item()
        scale = expected.norm().item()
        if name == "bias" and bias_floor:
            scale = max(scale, DBIAS_FLOOR[dtype] * ds_bound(case, cot).norm().item())
        scale = scale if scale > 0 else 1.0  # as rel_err: an absolute error where the reference is 0
        if not diff <= tolerance * scale + 2 * floors[name]:
            failures.append(f"d{name}: relative error {diff / scale:.3e} > {tolerance:.0e}"
                            + (f" (+ rounding floor {2 * floors[name] / scale:.1e})" if dtype != torch.float32 else ""))
    return failures


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def rounding_floors(case, cot, out64, dtype):
    """Bounds on the gradient error that rounding `out` to its dtype causes by itself.

    Backends take delta = rowsum(dO * O) from the output they return, so in fp16 or bf16
    dS[q] moves by P[q] (dO_q . O_err) with |O_err| <= u |O_q|: a row's |dS| sum moves by
    at most r_q = u |dO_q| |O_q|. Where softmax is near one-hot with few keys, dq and dk are
    small differences and this dominates their relative error: one query, two keys, bf16
    and P = (0.97, 0.03) put dq off by 1.6 relative, on every backend. dv does not use delta.
    """
    u = UNIT_ROUNDOFF[dtype]
    r = u * cot["out"].double().norm(dim=-1) * out64.double().norm(dim=-1)  # (B, H, Nq)
    scale = case["q"].shape[-1] ** -0.5
    k_max = case["k"].double().norm(dim=-1).amax(-1)  # (B, H)
    q_max = case["q"].double().norm(dim=-1).amax(-1)
    return dict(q=scale * (k_max[..., None] * r).norm().item(), k=scale * (q_max * r.sum(-1)).sum().item(),
                v=0.0, bias=r.sum().item())


def blocked_bias_entries(case):
    """Bool mask, in the bias's shape, of the entries that only blocked pairs feed."""
    bias, allow = case["bias"], case["allow"]
    if allow is None:
        return torch.zeros(bias.shape, dtype=torch.bool, device=bias.device)
    B = case["q"].shape[0]
    allowed = allow.expand(B, *allow.shape[-2:])  # (B, R, R)
    if bias.dim() == 4:
        return ~allowed[:, None].expand(bias.shape)
    return ~allowed.any(0).expand(bias.shape)  # the bias gradient sums over the batch


def blocked_pair_failures(case, dbias):
    """Hard labels or one-hot memberships: blocked pairs get exactly zero bias gradient."""
    blocked = blocked_bias_entries(case)
    leaked = dbias[blocked]
    if (leaked == 0).all():
        return []
    return [f"dbias: {int((leaked != 0).sum())} of {int(blocked.sum())} blocked entries are nonzero, "
            f"largest {leaked.abs().max():.3e}"]


def ds_bound(case, cot):
    """Per bias table (the bias's shape less R x R): a bound on sum |dS| over the rows it covers.

    dS[q] = P[q] (dP[q] - delta[q]) with sum_k P[q, k] <= 1, |dP[q, k]| <= |dO_q| max_k |v_k| + max_r |dMass[q, r]|
    and |delta[q]| <= the same + |dlse[q]|.
    """
    v_norm = case["v"].double().norm(dim=-1).amax(-1)  # (B, H)
    row = cot["out"].double().norm(dim=-1) * v_norm[..., None]  # (B, H, Nq)
    if cot["mass"] is not None:
        row = row + cot["mass"].double().abs().amax(-1)
    row = 2 * row
    if cot["lse"] is not None:
        row = row + cot["lse"].double().abs()
    bound = row.sum(-1)  # (B, H)
    return {2: bound.sum((0, 1)), 3: bound.sum(0), 4: bound}[case["bias"].dim()]


def zero_sum_failures(case, dbias, cot, dtype):
    """Without an lse cotangent every table's dW sums to zero up to rounding."""
    assert cot["lse"] is None, "only out and region-mass cotangents leave dW's sum at zero"
    sums = dbias.double().sum((-1, -2))
    bound = ds_bound(case, cot).to(sums.device).clamp_min(1e-30)
    ratio = (sums.abs() / bound).max().item()
    if ratio <= SUM_TOLERANCE[dtype]:
        return []
    return [f"dbias: a table's entries sum to {[round(x, 6) for x in sums.flatten().tolist()]} instead of 0 "
            f"(|sum| / bound {ratio:.2e} > {SUM_TOLERANCE[dtype]:.0e})"]


def report(failures, context):
    assert not failures, "; ".join(failures) + f" [{context}]"


def check_case(case, backend, dtype, R, lse, mass, device, context):
    """Every output and gradient against float64, and dW's two reference-free properties."""
    cot = device_cotangents(case, R, lse, mass, device)
    got, got_grads, ref, ref_grads = run_both(case, backend, cot)
    failures = parity_failures(case, cot, got, got_grads, ref, ref_grads, dtype)
    if one_hot_regions(case):
        failures += blocked_pair_failures(case, got_grads["bias"])
    if not lse:
        failures += zero_sum_failures(case, got_grads["bias"], cot, dtype)
    report(failures, f"{backend} {context}")


def to_device(case, device):
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in case.items()}


# ---------------------------------------------------------------- hypothesis
@settings(max_examples=15, **FUZZ)
@given(data=st.data())
def test_fuzz_outputs_and_all_gradients_match_float64(backend, data, device):
    """Any regions, order, tails, head dim, tables, cotangents, dtype: out, lse, mass, dq, dk, dv, dbias."""
    case, dtype, R, flags, description = draw_case(data.draw)
    check_case(to_device(case, device), backend, dtype, R, flags["lse"], flags["mass"], device, description)


@settings(max_examples=8, **FUZZ)
@given(data=st.data())
def test_fuzz_hard_labels_with_tails(backend, data, device):
    """Hard labels in fp32, mostly region-sorted, Nk with a tail past every tile size."""
    case, dtype, R, flags, description = draw_case(data.draw, hard_only=True,
                                                   orders=("sorted", "sorted", "runs", "random"))
    Nk = case["k"].shape[2]
    if Nk % 16 == 0:  # force a tail: drop keys from the end
        drop = data.draw(st.integers(1, min(15, Nk - 1))) if Nk > 1 else 0
        for name in ("k", "v"):
            case[name] = case[name][:, :, : Nk - drop]
        case["k_regions"] = case["k_regions"][..., : Nk - drop]
        description += f" (Nk cut to {Nk - drop})"
    check_case(to_device(case, device), backend, dtype, R, flags["lse"], flags["mass"], device, description)


# ---------------------------------------------------------------- explicit regressions
def runs(*lengths):
    """Region-sorted hard labels: region r repeated lengths[r] times."""
    return torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))


# Column 2 all True: every query may see the last key tile (all region 2) in full; (0, 1)
# and (1, 0) blocked: padding keys past Nk, if they slipped into dW, would land on (1, 0).
TAIL_ALLOW = [[True, False, True], [False, True, True], [True, True, True]]


def tail_case(order, allow=True, Nq=67, Nk=67, B=1, H=2, D=40, bias_kind="HRR", device="cpu"):
    """R = 3, hard labels, fp32; the keys from 47 on are all region 2 (the tail tile is region-pure)."""
    R = 3
    case = make_case(B=B, H=H, Nq=Nq, Nk=Nk, D=D, R=R, bias_kind=bias_kind, allow_kind=None, device=device)
    q_labels = runs(Nq // 3, Nq // 3, Nq - 2 * (Nq // 3))
    k_labels = runs(25, 22, Nk - 47)
    if order == "raster":  # shuffled, except that the last keys stay region 2
        q_labels = q_labels[torch.randperm(Nq)]
        k_labels = torch.cat([k_labels[:62][torch.randperm(62)], k_labels[62:]])
    case["q_regions"], case["k_regions"] = q_labels.to(device), k_labels.to(device)
    case["allow"] = torch.tensor(TAIL_ALLOW, device=device) if allow else None
    return case, R


@pytest.mark.parametrize("order", ["sorted", "raster"])
def test_bias_gradient_with_67_tokens_matches_float64(backend, order, device):
    """Nq = Nk = 67, hard labels, fp32, R = 3, bias (H, R, R), blocked pairs: dq, dk, dv and
    dbias match float64 (the Triton backward's dbias was off by 0.3 to 4 here)."""
    case, R = tail_case(order, device=device)
    cot = device_cotangents(case, R, lse=True, mass=True, device=device)
    got, got_grads, ref, ref_grads = run_both(case, backend, cot)
    failures = parity_failures(case, cot, got, got_grads, ref, ref_grads, torch.float32, bias_floor=False)
    failures += blocked_pair_failures(case, got_grads["bias"])
    report(failures, f"{backend} {order}")


@pytest.mark.parametrize("bias_kind,allow", [("RR", True), ("HRR", False), ("BHRR", True)])
def test_bias_gradient_sums_to_zero_per_head(backend, bias_kind, allow, device):
    """Only `out` has a cotangent and no row is fully blocked: each head's dW sums to ~0."""
    B, H = (2, 1) if bias_kind == "BHRR" else (1, 2)
    case, R = tail_case("sorted", allow=allow, Nq=40, Nk=67, B=B, H=H, D=24, bias_kind=bias_kind, device=device)
    cot = device_cotangents(case, R, lse=False, mass=False, device=device)
    leaves = with_grads(case)
    result = sma_attention(**leaves, return_lse=True, return_region_mass=True, backend=backend)
    (dbias,) = torch.autograd.grad((result.out.double() * cot["out"].double()).sum(), [leaves["bias"]])
    assert dbias.abs().sum((-1, -2)).min() > 0  # every table does get gradient
    report(zero_sum_failures(case, dbias, cot, torch.float32), f"{backend} bias={bias_kind} allow={allow}")


@pytest.mark.parametrize("regions", ["hard", "onehot"])
def test_blocked_pairs_get_zero_bias_gradient(backend, regions, device):
    """dW[b, h, a, c] == 0 exactly wherever allow[b, a, c] is False, for every head, even with
    lse and region-mass cotangents and a fully blocked query region."""
    case, R = tail_case("sorted", Nq=33, Nk=67, B=2, H=2, D=24, bias_kind="BHRR", device=device)
    allow = case["allow"].expand(2, R, R).clone()
    allow[1, 0, :] = False  # row 1: region-0 queries see nothing
    case["allow"] = allow
    if regions == "onehot":
        case["q_regions"] = F.one_hot(case["q_regions"].long(), R).float()
        case["k_regions"] = F.one_hot(case["k_regions"].long(), R).float()
    cot = device_cotangents(case, R, lse=True, mass=True, device=device)
    got, got_grads, ref, ref_grads = run_both(case, backend, cot)
    blocked = ~allow[:, None].expand(got_grads["bias"].shape)
    assert blocked.any() and (ref_grads["bias"][blocked] == 0).all()
    failures = blocked_pair_failures(case, got_grads["bias"])
    failures += parity_failures(case, cot, got, got_grads, ref, ref_grads, torch.float32, bias_floor=False)
    report(failures, f"{backend} {regions}")
