"""Every preset through optimize(pipe) on each pipeline issue 27 added (img2img, inpainting with an inpainting
U-Net, ControlNet with two nets, SDXL base + refiner): each runs, gives finite latents of the right shape, and
differs from `none` (each preset changes the computation). `none` against diffusers is each pipeline's own test
file's; this is the slow tier's sweep (about 40 captures)."""
import pytest
import torch
from test_controlnet import _run as controlnet_run
from test_controlnet import make_pipes as make_controlnet_pipes
from test_img2img import _run as img2img_run
from test_inpaint import _pipe as inpaint_pipe
from test_inpaint import _run as inpaint_run
from test_sdxl_refiner import _both as sdxl_both
from test_sdxl_refiner import make_pipes as make_sdxl_pipes
from tiny_models import tiny_sd_pipeline

from postdiff_compile import optimize, restore
from postdiff_compile.verification import rel_l2

pytestmark = pytest.mark.slow
PRESETS = ["none", "quality", "balanced", "fast"]
GATE = {"cross_attn_cache_step": 6}   # fast gates CFG at step 10 of 20; these runs have 8-10 steps


def _with(pipes, preset, call):
    for pipe in pipes:
        optimize(pipe, preset, **(GATE if preset == "fast" else {}))
    try:
        return call()
    finally:
        for pipe in pipes:
            restore(pipe)


@pytest.fixture(scope="module")
def img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline("sd15", "ddim").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint():
    return inpaint_pipe(9)


def _check(results: dict) -> None:
    reference = results["none"]
    for preset, out in results.items():
        assert out.shape == reference.shape and torch.isfinite(out).all(), preset
        if preset != "none":
            assert rel_l2(out, reference) > 1e-4, preset


def test_img2img_every_preset(img2img):
    _check({p: _with([img2img], p, lambda: img2img_run(img2img, 0.8)) for p in PRESETS})


def test_inpainting_every_preset(inpaint):
    _check({p: _with([inpaint], p, lambda: inpaint_run(inpaint, 0.9)) for p in PRESETS})


def test_controlnet_every_preset():
    multi = make_controlnet_pipes()[1]
    _check({p: _with([multi], p, lambda: controlnet_run(multi)) for p in PRESETS})


def test_sdxl_base_and_refiner_every_preset():
    base, refiner = make_sdxl_pipes()
    _check({p: _with([base, refiner], p, lambda: sdxl_both(base, refiner)[1]) for p in PRESETS})
