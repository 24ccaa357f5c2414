"""The person layers' alpha head (mild/alpha.py): its shapes, its composition rule, and files
written with the dilated head it replaced."""

import pytest
import torch

from mild import MILDPipeline
from mild.alpha import LayerAlpha, combine


def inputs(n, h, w, seed):
    generator = torch.Generator().manual_seed(seed)
    person, background = (torch.rand(n, 3, h, w, generator=generator) for _ in range(2))
    visible = (torch.rand(n, 1, h, w, generator=generator) > 0.7).float()
    region = (torch.rand(n, 1, h, w, generator=generator) > 0.4).float()
    return person, background, visible, region


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (9, 130)])
def test_unet_head_keeps_any_size_and_is_one_on_visible_zero_outside_the_region(size):
    """Odd sizes go down and up again to the input's own size; the alpha is exactly 1 on the
    visible mask, 0 where neither visible nor in the region, the head's sigmoid in between."""
    torch.manual_seed(0)
    head = LayerAlpha().eval()
    person, background, visible, region = inputs(2, *size, seed=1)
    with torch.no_grad():
        logits = head.logits(person, background, visible, region)
        alpha = head(person, background, visible, region)
    assert logits.shape == alpha.shape == (2, 1, *size) and torch.isfinite(logits).all()
    assert torch.equal(alpha[visible > 0], torch.ones(int(visible.sum())))
    assert not alpha[(visible == 0) & (region == 0)].any()
    inside = (visible == 0) & (region > 0)
    assert torch.allclose(alpha[inside].double(), torch.sigmoid(logits.double())[inside], atol=1e-6)
    expected = torch.maximum(visible.double(), region.double() * (1 - visible.double()) * torch.sigmoid(logits.double()))
    assert (combine(visible, region, torch.sigmoid(logits)).double() - expected).abs().max() < 1e-6


def test_unet_head_sees_further_than_the_dilated_head():
    """A change 36 px up and left of a pixel moves the U-Net's logit there and not the dilated
    head's (receptive fields 73 px, from 40 px up-left to 32 down-right, and 65 px); one 60 px
    away moves neither."""
    torch.manual_seed(0)
    person, background, visible, region = inputs(1, 160, 160, seed=2)
    for distance, reaches in ((36, {"unet": True, "dilated": False}), (60, {"unet": False, "dilated": False})):
        moved = person.clone()
        moved[..., 80 - distance, 80 - distance] = 1 - moved[..., 80 - distance, 80 - distance]
        for head in (LayerAlpha(), LayerAlpha(kind="dilated")):
            with torch.no_grad():
                before = head.logits(person, background, visible, region)[0, 0, 80, 80]
                after = head.logits(moved, background, visible, region)[0, 0, 80, 80]
            assert bool(before != after) == reaches[head.kind], (head.kind, distance)


def test_files_with_either_head_load_as_the_head_they_hold(tmp_path):
    """A head file rebuilds its own shape (width, depth, or the older dilated head) with the same
    outputs; loading in place into another shape is a clear error; a tiny weights file written
    with the dilated head still loads into a tiny pipeline."""
    from mild.tiny import save_tiny_weights

    person, background, visible, region = inputs(1, 40, 24, seed=3)
    for head in (LayerAlpha(width=8, depth=2), LayerAlpha(kind="dilated")):
        head.save(tmp_path / "alpha.safetensors")
        again = LayerAlpha.from_file(tmp_path / "alpha.safetensors")
        assert again.kind == head.kind and len(list(again.parameters())) == len(list(head.parameters()))
        with torch.no_grad():
            assert torch.equal(again.logits(person, background, visible, region),
                               head.logits(person, background, visible, region))
    with pytest.raises(ValueError, match="holds another shape of alpha head"):
        LayerAlpha().load(tmp_path / "alpha.safetensors")
    with pytest.raises(ValueError, match="kind: 'conv'"):
        LayerAlpha(kind="conv")

    pipe = MILDPipeline.tiny(seed=0, weights=None, backend="torch")
    pipe.alpha = LayerAlpha(kind="dilated")
    save_tiny_weights(pipe, tmp_path / "dilated.safetensors")
    loaded = MILDPipeline.tiny(weights=tmp_path / "dilated.safetensors", backend="torch").alpha
    assert loaded.kind == "dilated"
    assert all(torch.equal(v.half().float(), loaded.state_dict()[k]) for k, v in pipe.alpha.state_dict().items())


def test_colour_head_decodes_the_alpha_and_the_corrected_layer_in_one_pass(tmp_path):
    """A colour head's ``decode`` gives ``forward``'s alpha and the person layer plus its colour
    correction, clamped to [0, 1] (float64 formula); a fresh head corrects nothing, so a head
    fitted for its alpha alone leaves the layer as decoded. Files keep the colour channels; the
    dilated head has none."""
    torch.manual_seed(0)
    person, background, visible, region = inputs(2, 37, 53, seed=4)
    head = LayerAlpha().eval()
    assert head.colour and not LayerAlpha(kind="dilated").colour and not LayerAlpha(colour=False).colour
    with torch.no_grad():
        alpha, corrected = head.decode(person, background, visible, region)
        assert torch.equal(corrected, person)
        head.out.weight.normal_(0, 0.05)
        head.out.bias.normal_(0, 0.3)
        outputs = head.outputs(person, background, visible, region)
        alpha, corrected = head.decode(person, background, visible, region)
        assert torch.equal(alpha, head(person, background, visible, region))
    assert outputs.shape == (2, 4, 37, 53) and outputs[:, 1:].abs().min() > 0
    expected = (person.double() + outputs[:, 1:].double()).clamp(0, 1)
    assert (corrected.double() - expected).abs().max() < 1e-6 and (corrected != person).float().mean() > 0.9
    assert ((corrected == 0) | (corrected == 1)).any()  # the clamp is reached
    head.save(tmp_path / "colour.safetensors")
    again = LayerAlpha.from_file(tmp_path / "colour.safetensors")
    with torch.no_grad():
        assert again.colour and all(torch.equal(x, y) for x, y in zip(again.decode(person, background, visible, region),
                                                                         (alpha, corrected)))
    with pytest.raises(ValueError, match="another shape"):
        LayerAlpha(colour=False).load(tmp_path / "colour.safetensors")
    with pytest.raises(ValueError, match="^colour: only the U-Net"):
        LayerAlpha(kind="dilated", colour=True)


def test_colour_loss_is_the_squared_error_over_the_persons_pixels_in_the_region():
    """Per row: the mean over the person's amodal pixels inside the inpaint region of the squared
    error averaged over channels; then the mean over rows (float64 formula). Pixels outside
    either mask do not count; a row with no such pixel counts 0."""
    from mild.alpha import colour_loss

    person, target, _, region = inputs(3, 19, 23, seed=5)
    amodal = (torch.rand(3, 1, 19, 23, generator=torch.Generator().manual_seed(6)) > 0.5).float()
    amodal[2] = 0
    expected = []
    for p, t, a, r in zip(person.double(), target.double(), amodal.double(), region.double()):
        weight = (a * r)[0]
        expected.append(0.0 if weight.sum() == 0 else float((((p - t) ** 2).mean(0) * weight).sum() / weight.sum()))
    loss = colour_loss(person, target, amodal, region)
    assert abs(float(loss) - sum(expected) / 3) < 1e-6 and expected[0] > 0
    moved = target.clone()
    moved[(amodal * region).expand_as(moved) == 0] = 5.0  # outside the counted pixels: no effect
    assert abs(float(colour_loss(person, moved, amodal, region)) - float(loss)) < 1e-6


def test_composite_loss_is_the_over_composite_error_where_the_alpha_decides():
    """Per row: the squared error of alpha * person + (1 - alpha) * background against the target,
    averaged over channels and over the region less the visible mask; then the mean over rows
    (float64 formula). The visible pixels and those outside the region do not count."""
    from mild.alpha import composite_loss

    person, background, visible, region = inputs(2, 21, 17, seed=7)
    target = torch.rand(2, 3, 21, 17, generator=torch.Generator().manual_seed(8))
    alpha = combine(visible, region, torch.rand(2, 1, 21, 17, generator=torch.Generator().manual_seed(9)))
    expected = []
    for a, p, b, t, v, r in zip(*(x.double() for x in (alpha, person, background, target, visible, region))):
        weight = (r * (1 - v))[0]
        expected.append(float((((a * p + (1 - a) * b - t) ** 2).mean(0) * weight).sum() / weight.sum()))
    loss = composite_loss(alpha, person, background, target, visible, region)
    assert abs(float(loss) - sum(expected) / 2) < 1e-6 and min(expected) > 0
    moved = target.clone()
    moved[(region * (1 - visible)).expand_as(moved) == 0] = 5.0
    assert abs(float(composite_loss(alpha, person, background, moved, visible, region)) - float(loss)) < 1e-6
