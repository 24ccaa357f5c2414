"""docs/errors.md, driven: every row's bad input, given to its function or CLI command,
fails with the error the row names, and every case here has its row.

A row reads ``| api | bad input | error |``: for a function the error is a ValueError
whose message starts with the text shown; for a ``mild`` command it is exit status 2 with
one stderr line ``mild: error: <text>...`` and no output file.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

from helpers import write_png_header
from mild.cli import main as cli_main
from mild_kernels import (FusedStep, KnownRegion, MultiLoRALinear, composite_layers, default_modulation,
                          multi_lora_linear, prepare_regions, region_sort, sma_attention, soft_regions)

TABLE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def table_rows() -> dict:
    """{(api, bad input): error text} from the markdown table rows."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) == 3:
            api, bad, error = (c.strip("`") for c in cells)
            rows[(api, bad)] = error.replace("\\|", "|")
    return rows


# ---------------------------------------------------------------- function cases
def _qkv(B=1, H=2, N=8, D=16):
    return [torch.randn(B, H, N, D) for _ in range(3)]


def _sma(**change):
    q, k, v = _qkv()
    call = dict(q=q, k=k, v=v, q_regions=torch.arange(8) % 3, k_regions=torch.arange(8) % 3)
    call.update(change)
    return lambda: sma_attention(**call)


def _lora(**change):
    call = dict(x=torch.randn(2, 5, 16), weight=torch.randn(8, 16), bias=None, lora_a=torch.randn(3, 4, 16),
                lora_b=torch.randn(3, 8, 4), adapter_ids=torch.tensor([0, 2]), scaling=1.0)
    call.update(change)
    return lambda: multi_lora_linear(**call)


def _composite(**change):
    call = dict(layers=torch.randn(2, 1, 3, 4, 5), alphas=torch.rand(2, 1, 1, 4, 5), original=torch.randn(1, 3, 4, 5),
                region=torch.rand(1, 1, 4, 5))
    call.update(change)
    return lambda: composite_layers(**call)


def _ddim(steps=10):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    return scheduler


def _zero_snr_ddim():
    scheduler = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)  # its first timestep, 999, holds no signal
    return scheduler


def _step(timestep=None, guidance=7.5, eta=None, known=None, scheduler=None, **change):
    x = torch.randn(2, 4, 3, 3)
    call = dict(noise_uncond=torch.randn_like(x), noise_cond=torch.randn_like(x), latents=x)
    call.update(change)
    scheduler = _ddim() if scheduler is None else scheduler

    def run():
        fused = FusedStep(scheduler)
        t = scheduler.timesteps[0] if timestep is None else timestep
        fused.step(call["noise_uncond"], call["noise_cond"], t, call["latents"], guidance, eta=eta, known_region=known)

    return run


def _off_grid_blend():
    x = torch.randn(2, 4, 3, 3)
    scheduler = _ddim()
    known = KnownRegion(torch.randn_like(x), torch.rand(2, 1, 3, 3), torch.randn_like(x))
    return lambda: FusedStep(scheduler).step(x, x, int(scheduler.timesteps[1]) + 3, x, 7.5, known_region=known)


FUNCTION_CASES = {
    ("sma_attention", "q with 3 dims"): _sma(q=torch.randn(2, 8, 16)),
    ("sma_attention", "integer q"): _sma(q=torch.ones(1, 2, 8, 16, dtype=torch.int32)),
    ("sma_attention", "head dim 8"): _sma(q=torch.randn(1, 2, 8, 8), k=torch.randn(1, 2, 8, 8), v=torch.randn(1, 2, 8, 8)),
    ("sma_attention", "k of another dtype"): _sma(k=torch.randn(1, 2, 8, 16).half()),
    ("sma_attention", "NaN in q"): _sma(q=torch.full((1, 2, 8, 16), float("nan"))),
    ("sma_attention", "inf in v"): _sma(v=torch.full((1, 2, 8, 16), float("inf"))),
    ("sma_attention", "no query tokens"): _sma(q=torch.randn(1, 2, 0, 16), q_regions=torch.zeros(0, dtype=torch.long)),
    ("sma_attention", "labels out of range"): _sma(bias=torch.randn(3, 3), q_regions=torch.arange(8) % 4),
    ("sma_attention", "float labels (N,)"): _sma(q_regions=torch.rand(8)),
    ("sma_attention", "memberships not summing to 1"): _sma(q_regions=torch.full((8, 3), 0.5)),
    ("sma_attention", "bias of the wrong shape"): _sma(bias=torch.randn(4, 3, 3)),
    ("sma_attention", "NaN in the bias"): _sma(bias=torch.full((3, 3), float("nan"))),
    ("sma_attention", "bias beyond 1e38"): _sma(bias=torch.full((3, 3), 3e38)),
    ("sma_attention", "float allow table"): _sma(allow=torch.ones(3, 3)),
    ("sma_attention", "NaN scale"): _sma(scale=float("nan")),
    ("sma_attention", "unknown backend"): _sma(backend="jax"),
    ("sma_attention", "a layout for other token counts"): lambda: sma_attention(
        *_qkv(N=9), layout=prepare_regions(torch.arange(8) % 3)),
    ("sma_attention", "a layout whose allow table has another batch"): lambda: sma_attention(
        *_qkv(B=3), layout=prepare_regions(torch.arange(8) % 3, allow=torch.ones(2, 3, 3, dtype=torch.bool))),
    ("sma_attention", "a layout with parts edited to disagree"): lambda: sma_attention(
        *_qkv(), layout=prepare_regions(torch.arange(8) % 3)._replace(
            allow=torch.ones(2, 3, 3, dtype=torch.bool), allow_bits=torch.zeros(3, 3, dtype=torch.int32))),
    ("prepare_regions", "more than 64 regions"): lambda: prepare_regions(torch.tensor([0, 70])),
    ("prepare_regions", "negative labels"): lambda: prepare_regions(torch.tensor([-1, 0, 1])),
    ("prepare_regions", "an unknown sort"): lambda: prepare_regions(torch.tensor([0, 1]), sort="k"),
    ("soft_regions", "size 0"): lambda: soft_regions(torch.rand(2, 8, 8), 0),
    ("soft_regions", "NaN in a mask"): lambda: soft_regions(torch.full((1, 8, 8), float("nan")), 4),
    ("soft_regions", "masks without pixels"): lambda: soft_regions(torch.rand(1, 0, 8), 4),
    ("soft_regions", "integer masks"): lambda: soft_regions(torch.ones(1, 8, 8, dtype=torch.long), 4),
    ("region_sort", "float labels (N,)"): lambda: region_sort(torch.rand(8)),
    ("default_modulation", "0 regions"): lambda: default_modulation(1.0, 0.5, 0),
    ("multi_lora_linear", "x with 4 dims"): _lora(x=torch.randn(2, 5, 1, 16)),
    ("multi_lora_linear", "weight of another width"): _lora(weight=torch.randn(8, 15)),
    ("multi_lora_linear", "lora_b of another rank"): _lora(lora_b=torch.randn(3, 8, 5)),
    ("multi_lora_linear", "one id for two rows"): _lora(adapter_ids=torch.tensor([0])),
    ("multi_lora_linear", "an id past the adapters"): _lora(adapter_ids=torch.tensor([0, 3])),
    ("multi_lora_linear", "an id below -1"): _lora(adapter_ids=torch.tensor([-2, 0])),
    ("multi_lora_linear", "float ids"): _lora(adapter_ids=torch.tensor([0.0, 1.0])),
    ("multi_lora_linear", "NaN scaling"): _lora(scaling=float("nan")),
    ("multi_lora_linear", "scaling of the wrong length"): _lora(scaling=torch.ones(2)),
    ("multi_lora_linear", "rank above 64 on triton"): lambda: multi_lora_linear(
        torch.randn(2, 5, 16), torch.randn(8, 16), None, torch.randn(1, 65, 16), torch.randn(1, 8, 65),
        torch.tensor([0, 0]), backend="triton"),
    ("MultiLoRALinear", "rank 0"): lambda: MultiLoRALinear(torch.nn.Linear(4, 4), 2, 0),
    ("MultiLoRALinear", "not an nn.Linear"): lambda: MultiLoRALinear(torch.nn.Conv1d(4, 4, 1), 2, 4),
    ("composite_layers", "no layers"): _composite(layers=torch.randn(0, 1, 3, 4, 5), alphas=torch.rand(0, 1, 1, 4, 5)),
    ("composite_layers", "alphas with 3 channels"): _composite(alphas=torch.rand(2, 1, 3, 4, 5)),
    ("composite_layers", "original of another dtype"): _composite(original=torch.randn(1, 3, 4, 5).half()),
    ("composite_layers", "region of another size"): _composite(region=torch.rand(1, 1, 4, 4)),
    ("FusedStep", "an unsupported scheduler"): lambda: FusedStep(PNDMScheduler()),
    ("FusedStep", "negative eta"): lambda: FusedStep(_ddim(), eta=-1.0),
    ("FusedStep.step", "NaN guidance"): _step(guidance=float("nan")),
    ("FusedStep.step", "guidance of the wrong length"): _step(guidance=torch.ones(3)),
    ("FusedStep.step", "latents of one dim"): _step(latents=torch.randn(4), noise_uncond=torch.randn(4),
                                                    noise_cond=torch.randn(4)),
    ("FusedStep.step", "empty latents"): _step(latents=torch.randn(0, 4), noise_uncond=torch.randn(0, 4),
                                               noise_cond=torch.randn(0, 4)),
    ("FusedStep.step", "noise of another shape"): _step(noise_cond=torch.randn(2, 4, 3, 2)),
    ("FusedStep.step", "timestep past the schedule"): _step(timestep=5000),
    ("FusedStep.step", "a timestep of two elements"): _step(timestep=torch.tensor([1, 2])),
    ("FusedStep.step", "DDIM eta > 0 without noise"): _step(eta=0.5),
    ("FusedStep.step", "a blend at an off-grid timestep"): _off_grid_blend(),
    ("FusedStep.step", "epsilon at a zero-SNR timestep"): _step(scheduler=_zero_snr_ddim()),
}


_IMAGE, _MASKS = torch.rand(3, 16, 16), torch.zeros(2, 16, 16)
_MASKS[0, 2:8, 2:8] = _MASKS[1, 9:15, 9:15] = 1
PIPELINE_CASES = {  # keyword arguments of one MILDPipeline call
    ("MILDPipeline.__call__", "num_inference_steps 0"): dict(num_inference_steps=0),
    ("MILDPipeline.__call__", "NaN guidance_scale"): dict(guidance_scale=float("nan")),
    ("MILDPipeline.__call__", "NaN eta"): dict(eta=float("nan")),
    ("MILDPipeline.__call__", "negative dilation"): dict(dilation=-1),
    ("MILDPipeline.__call__", "NaN pixels"): dict(image=torch.full((3, 16, 16), float("nan"))),
    ("MILDPipeline.__call__", "a 4-channel image"): dict(image=torch.rand(4, 16, 16)),
    ("MILDPipeline.__call__", "masks of another size"): dict(instance_masks=_MASKS[:, :8]),
    ("MILDPipeline.__call__", "an empty mask"): dict(instance_masks=torch.stack([_MASKS[0], torch.zeros(16, 16)])),
    ("MILDPipeline.__call__", "erase id 3 of two people"): dict(erase=[3]),
}


@pytest.fixture(scope="module")
def tiny_pipe():
    from mild import MILDPipeline

    return MILDPipeline.tiny(seed=0)


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES), ids=" / ".join)
def test_pipeline_row(case, tiny_pipe):
    expected = table_rows()[case]
    call = dict(image=_IMAGE, instance_masks=_MASKS, num_inference_steps=1)
    call.update(PIPELINE_CASES[case])
    with pytest.raises(ValueError) as error:
        tiny_pipe(**call)
    assert str(error.value).startswith(expected), f"{case}: {error.value!s:.200}"


SETTING_CASES = {  # pipeline attributes a call refuses
    ("MILDPipeline.__call__", 'pipe.condition_fill "zeros"'): lambda pipe: setattr(pipe, "condition_fill", "zeros"),
    ("MILDPipeline.__call__", "pipe.residual_to_condition with an epsilon scheduler"): lambda pipe: (
        setattr(pipe, "residual_to_condition", True),
        setattr(pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon"))),
}


@pytest.mark.parametrize("case", sorted(SETTING_CASES), ids=" / ".join)
def test_pipeline_setting_row(case):
    from mild import MILDPipeline

    pipe = MILDPipeline.tiny(seed=0, weights=None)
    SETTING_CASES[case](pipe)
    with pytest.raises(ValueError, match=f"^{re.escape(table_rows()[case])}"):
        pipe(_IMAGE, _MASKS, num_inference_steps=1)


def test_from_pretrained_row(tmp_path):
    from mild import MILDPipeline

    expected = table_rows()[("MILDPipeline.from_pretrained", "a missing folder")]
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        MILDPipeline.from_pretrained(tmp_path / "nowhere")


def test_enable_sma_row():
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from mild import enable_sma

    expected = table_rows()[("enable_sma", "a FLUX transformer with an IP-Adapter processor")]
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6))
    model.transformer_blocks[0].attn.set_processor(FluxIPAdapterAttnProcessor(32, 32))
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        enable_sma(model)


@pytest.mark.parametrize("case", sorted(FUNCTION_CASES), ids=" / ".join)
def test_function_row(case):
    expected = table_rows()[case]
    with pytest.raises(ValueError) as error:
        FUNCTION_CASES[case]()
    assert str(error.value).startswith(expected), f"{case}: {error.value!s:.200}"


# ---------------------------------------------------------------- CLI cases
@pytest.fixture
def files(tmp_path):
    """An image, two masks and the other paths the CLI rows name."""
    Image.fromarray((np.random.rand(32, 32, 3) * 255).astype(np.uint8)).save(tmp_path / "image.png")
    for i, box in enumerate(((2, 2, 14, 14), (16, 16, 30, 30)), start=1):
        mask = np.zeros((32, 32), np.uint8)
        mask[box[1]:box[3], box[0]:box[2]] = 255
        Image.fromarray(mask).save(tmp_path / f"mask_{i}.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_bytes(b"not an image")
    write_png_header(tmp_path / "bomb.png", 20000, 20000)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "empty-model").mkdir()
    return tmp_path


ERASE = ["erase", "{dir}/image.png", "--masks", "{dir}/mask_1.png", "{dir}/mask_2.png", "--tiny"]
OUT = ["-o", "{dir}/out.png"]
CLI_CASES = {
    ("mild erase", "--steps 0"): ERASE + OUT + ["--steps", "0"],
    ("mild erase", "--guidance nan"): ERASE + OUT + ["--guidance", "nan"],
    ("mild erase", "--erase 3 with two masks"): ERASE + OUT + ["--erase", "3"],
    ("mild erase", "a mask of another size"): ["erase", "{dir}/image.png", "--masks", "{dir}/small.png", "--tiny"] + OUT,
    ("mild erase", "an empty mask"): ["erase", "{dir}/image.png", "--masks", "{dir}/empty.png", "--tiny"] + OUT,
    ("mild erase", "an unreadable image"): ["erase", "{dir}/text.png", "--masks", "{dir}/mask_1.png", "--tiny"] + OUT,
    ("mild erase", "a decompression-bomb image"): ["erase", "{dir}/bomb.png", "--masks", "{dir}/mask_1.png",
                                                   "--tiny"] + OUT,
    ("mild erase", "-o naming a folder"): ERASE + ["-o", "{dir}/folder.png"],
    ("mild erase", "-o with a .txt suffix"): ERASE + ["-o", "{dir}/out.txt"],
    ("mild erase", "-o in a missing folder"): ERASE + ["-o", "{dir}/nowhere/out.png"],
    ("mild erase", "no -o"): ERASE,
    ("mild erase", "--model naming a missing folder"): ["erase", "{dir}/image.png", "--masks", "{dir}/mask_1.png",
                                                        "--model", "{dir}/nowhere"] + OUT,
    ("mild erase", "--model naming an empty folder"): ["erase", "{dir}/image.png", "--masks", "{dir}/mask_1.png",
                                                       "--model", "{dir}/empty-model"] + OUT,
    ("mild erase", "neither --model nor --tiny"): ["erase", "{dir}/image.png", "--masks", "{dir}/mask_1.png"] + OUT,
    ("mild erase", "--input-dir without --output-dir"): ["erase", "--input-dir", "{dir}", "--tiny"],
    ("mild erase", "--input-dir naming a file"): ["erase", "--input-dir", "{dir}/image.png", "--output-dir",
                                                  "{dir}/results", "--tiny"],
    ("mild erase", "an unknown flag"): ERASE + OUT + ["--frobnicate"],
}
if not torch.cuda.is_available():
    CLI_CASES[("mild erase", "--device cuda without CUDA")] = ERASE + OUT + ["--device", "cuda"]


@pytest.mark.parametrize("case", sorted(CLI_CASES), ids=" / ".join)
def test_cli_row(case, files, capsys):
    expected = table_rows()[case]
    argv = [arg.replace("{dir}", str(files)) for arg in CLI_CASES[case]]
    before = sorted(p.name for p in files.rglob("*"))
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mild: error: {expected}"), err
    assert sorted(p.name for p in files.rglob("*")) == before, "a refused command left a file behind"


def test_transformer_pipeline_rows():
    from mild.tiny import tiny_transformer_pipeline
    from mild.transformer_pipeline import MILDTransformerPipeline

    pipe = MILDTransformerPipeline(tiny_transformer_pipeline("flux"), backend="torch")
    for case, call in TRANSFORMER_CASES.items():
        with pytest.raises(ValueError) as error:
            pipe(**{**dict(image=_IMAGE, instance_masks=_MASKS, num_inference_steps=1), **call})
        assert str(error.value).startswith(table_rows()[case]), f"{case}: {error.value!s:.200}"


TRANSFORMER_CASES = {  # keyword arguments of one MILDTransformerPipeline call (a FLUX Fill one)
    ("MILDTransformerPipeline.__call__", "keypoints"): dict(keypoints=[torch.zeros(17, 3)] * 2),
    ("MILDTransformerPipeline.__call__", "num_inference_steps 0"): dict(num_inference_steps=0),
}


def test_every_row_has_a_case():
    rows = set(table_rows())
    cases = set(FUNCTION_CASES) | set(PIPELINE_CASES) | set(SETTING_CASES) | set(CLI_CASES) | set(TRANSFORMER_CASES) | {
        ("mild erase", "--device cuda without CUDA"), ("MILDPipeline.from_pretrained", "a missing folder"),
        ("enable_sma", "a FLUX transformer with an IP-Adapter processor")}
    assert rows == cases, f"rows without a case: {sorted(rows - cases)}; cases without a row: {sorted(cases - rows)}"
