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
