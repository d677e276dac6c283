"""A custom-trained U-Net (context width 32, a 2x VAE): optimize(pipe) and compile take it as its closest family,
warn what differs, use the pipeline's VAE factor, and reproduce diffusers with `none`."""
import warnings

import pytest
import torch
from tiny_models import TINY_CONFIGS, _scheduler

from postdiff_compile import PostDiffError, optimize, restore
from postdiff_compile.models.load import load_denoiser
from postdiff_compile.verification import rel_l2

SIZE = 48   # a 24x24 latent with a 2x VAE (the family's 8x would make it 6x6)


def custom_pipeline(scheduler: str = "ddim"):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(TINY_CONFIGS["sd15"], cross_attention_dim=32, sample_size=24)).eval()
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=_scheduler("sd15", scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    return pipe


def _run(pipe, **kw):
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=10, guidance_scale=6.0,
                height=SIZE, width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


def test_detected_as_the_closest_family_with_a_warning_naming_the_differences():
    pipe = custom_pipeline()
    with pytest.warns(UserWarning, match=r"context width 32 \(sd15: 768\); VAE factor 2 \(sd15: 8\)"):
        loaded = load_denoiser(pipe)
    assert loaded.family.name == "sd15" and loaded.family.vae_scale_factor == 2
    assert loaded.family.check_resolution(SIZE, SIZE) == (24, 24)
    # A bare module has no pipeline: its VAE factor is the family's.
    with pytest.warns(UserWarning, match="context width 32"):
        assert load_denoiser(pipe.unet).family.vae_scale_factor == 8


def test_none_reproduces_the_pipeline_and_presets_run():
    pipe = custom_pipeline()
    reference = _run(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize(pipe, preset="none")
    ours = _run(pipe)
    assert ours.shape == reference.shape == (1, 4, 24, 24)
    assert rel_l2(ours, reference) <= 1e-5
    optimize(pipe, preset="fast")
    fast = _run(pipe)
    low = [step for step in pipe._postdiff.last_plan if step.low_res]
    assert fast.shape == (1, 4, 24, 24) and low and torch.isfinite(fast).all()
    assert rel_l2(fast, reference) > 1e-3
    restore(pipe)


def test_released_families_are_still_matched_exactly_and_files_are_not_guessed(tmp_path):
    from tiny_models import tiny_sd_pipeline, write_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a released family's pipeline warns nothing
        assert load_denoiser(tiny_sd_pipeline("sd15")).detection.differs == []
    # A single checkpoint file has no config to build a custom width from: still refused, as before.
    path = write_checkpoint(custom_pipeline().unet, tmp_path / "custom.safetensors", "diffusers")
    with pytest.raises(PostDiffError, match="match no known family"):
        load_denoiser(str(path))


def test_family_flag_takes_a_custom_single_file(tmp_path, capsys):
    """compile --family: the file the loader refuses on its own compiles as the named family."""
    from tiny_models import write_checkpoint

    from postdiff_compile.cli import main

    path = write_checkpoint(custom_pipeline().unet, tmp_path / "custom.safetensors", "diffusers")
    out = tmp_path / "art"
    assert main([str(path), "--family", "sd15", "--resolution", "128x128", "--steps", "4", "--out", str(out)]) == 0
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["family"] == "sd15"
    assert main([str(path), "--family", "pixart_alpha", "--out", str(tmp_path / "no")]) == 2
    assert "takes a PixArtTransformer2DModel, but this is a UNet2DConditionModel" in capsys.readouterr().err
