"""Reference model 2 (issue 25): the pipeline it assembles, and training that resumes bit-exactly from an
atomically written checkpoint. Tiny batches and a few steps: the default tier."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from postdiff_compile.errors import PostDiffError
from postdiff_compile.lab.reference2 import is_model2_folder, load_pipeline
from postdiff_compile.lab.reference2.checkpoint import load_checkpoint, save_atomic
from postdiff_compile.lab.reference2.model import (FAMILY, IMAGE_SIZE, make_parts, make_pipeline, make_vae,
                                                   save_module)
from postdiff_compile.lab.reference2.train_unet import UnetTrainConfig, train_unet
from postdiff_compile.lab.reference2.train_vae import VaeTrainConfig, VaeTrainer, cosine_lr, train_vae
from postdiff_compile.lab.scenes import SIZE, make_batch

VAE_CFG = VaeTrainConfig(steps=4, batch=2, warmup=1, log_every=1, checkpoint_every=1, scale_images=4,
                         held_out_images=2, whole_steps=2)
UNET_CFG = UnetTrainConfig(steps=4, batch=2, warmup=1, log_every=1, checkpoint_every=1, low_res_fraction=0.5)


def test_scenes_render_at_64_the_same_scene_as_at_32():
    small, captions, scenes = make_batch(11, 16)
    large, captions_64, _ = make_batch(11, 16, 64)
    assert small.shape == (16, 3, SIZE, SIZE) and large.shape == (16, 3, 64, 64) and captions == captions_64
    # Area-downsampled, the 64x64 render is the 32x32 one up to anti-aliasing at object edges; diagonal stripes
    # one unit wide alias at 32 (half their edges fall inside a pixel at 64), so they match in mean only.
    pooled = large.reshape(16, 3, 32, 2, 32, 2).mean(axis=(3, 5))
    striped = np.array([s.pattern == "striped" for s in scenes])
    assert 0 < striped.sum() < 16
    assert np.abs(pooled - small)[~striped].mean() < 0.01
    assert np.abs(pooled.mean((1, 2, 3)) - small.mean((1, 2, 3))).max() < 0.01
    with pytest.raises(ValueError):
        make_batch(11, 1, 60)


def test_the_parts_make_a_stable_diffusion_pipeline_that_samples():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    pipe = make_pipeline(make_parts(seed=0))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.vae_scale_factor == 2
    assert [type(b).__name__ for b in pipe.unet.down_blocks] == \
        ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    config = pipe.scheduler.config
    assert (config.prediction_type, config.beta_schedule, config.rescale_betas_zero_snr) == \
        ("v_prediction", "scaled_linear", True)
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0          # zero terminal SNR
    pipe.set_progress_bar_config(disable=True)
    images = pipe("small red circle top left, on grey", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1


def test_save_atomic_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "unet_checkpoint.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f, *args, **kwargs):       # dies half way through writing, as a killed process would
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet_checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(PostDiffError, match="cannot read the training checkpoint"):
        load_checkpoint(tmp_path / "torn.pt")


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def _final_checkpoint(work, name):
    saved = load_checkpoint(work / f"{name}_checkpoint.pt")
    return saved["state"], [{k: v for k, v in h.items() if k != "seconds"} for h in saved["history"]]


def test_vae_training_resumes_bit_exactly(tmp_path):
    whole = train_vae(VAE_CFG, tmp_path / "whole", minutes=None, threads=1)
    first = train_vae(VAE_CFG, tmp_path / "split", stop_at=2, threads=1)
    assert (first["step"], first["done"]) == (2, False) and not (tmp_path / "split" / "vae").exists()
    second = train_vae(VAE_CFG, tmp_path / "split", threads=1)
    assert whole["done"] and second["done"]
    assert _same_state(_final_checkpoint(tmp_path / "whole", "vae"), _final_checkpoint(tmp_path / "split", "vae"))
    log = (tmp_path / "split" / "vae_log.txt").read_text()
    assert "stopping at step 2" in log and "resuming at step 2/4" in log and "vae written to" in log
    summary = json.loads((tmp_path / "split" / "vae_summary.json").read_text())
    assert summary["scaling_factor"] > 0
    assert summary == json.loads((tmp_path / "whole" / "vae_summary.json").read_text())
    assert (tmp_path / "split" / "vae_loss.png").is_file()


def test_a_checkpoint_of_another_config_is_refused_but_a_run_can_be_extended(tmp_path):
    train_vae(VAE_CFG, tmp_path, stop_at=2, threads=1)
    with pytest.raises(PostDiffError, match="another config"):
        train_vae(dataclasses.replace(VAE_CFG, lr=1e-4), tmp_path, threads=1)
    with pytest.raises(PostDiffError, match="past --steps"):
        train_vae(dataclasses.replace(VAE_CFG, steps=1), tmp_path, threads=1)
    # The whole-image phase may move only where it changes steps not yet run (the checkpoint is at step 2).
    with pytest.raises(PostDiffError, match="would change steps already run"):
        train_vae(dataclasses.replace(VAE_CFG, whole_steps=3), tmp_path, threads=1)
    trainer = VaeTrainer(dataclasses.replace(VAE_CFG, steps=6, whole_steps=4))
    assert trainer.batch(1).shape[-1] == 32 and trainer.batch(2).shape[-1] == 64     # crops, then whole images
    longer = train_vae(dataclasses.replace(VAE_CFG, steps=6, whole_steps=4), tmp_path, stop_at=3, threads=1)
    assert longer["step"] == 3 and "run changed from 4 to 6 steps" in (tmp_path / "vae_log.txt").read_text()


@pytest.fixture(scope="module")
def unet_runs(tmp_path_factory):
    """A U-Net run whole and one split at step 3, with a snapshot (snapshot.py) of the split run's checkpoint there."""
    from postdiff_compile.lab.reference2.snapshot import save_snapshot

    tmp_path = tmp_path_factory.mktemp("unet")
    for run in ("whole", "split", "restored"):
        save_module(make_vae(0), tmp_path / run / "vae", "diffusion_pytorch_model.safetensors")
    train_unet(UNET_CFG, tmp_path / "whole", threads=1)
    assert train_unet(UNET_CFG, tmp_path / "split", stop_at=3, threads=1)["step"] == 3
    at_3 = load_checkpoint(tmp_path / "split" / "unet_checkpoint.pt")
    save_snapshot(tmp_path / "split", tmp_path / "snap.safetensors")
    train_unet(UNET_CFG, tmp_path / "split", threads=1)
    return tmp_path, at_3


def test_unet_training_resumes_bit_exactly_and_exports_a_pipeline(unet_runs):
    tmp_path, _ = unet_runs
    assert _same_state(_final_checkpoint(tmp_path / "whole", "unet"), _final_checkpoint(tmp_path / "split", "unet"))
    folder = tmp_path / "split" / "model"
    assert is_model2_folder(folder)
    assert json.loads((folder / "model_index.json").read_text())["postdiff_family"] == FAMILY
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["large blue square center, on teal"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(PostDiffError, match="not a reference-model-2 folder"):
        load_pipeline(tmp_path)
    # study, tune and samples take this folder as their MODEL: family scenes64, this pipeline.
    from postdiff_compile.lab.reference_models import lab_family, load_lab_pipeline

    assert (lab_family(folder), lab_family(None), lab_family(tmp_path)) == ("scenes64", "scenes64", "scenes32")
    assert load_lab_pipeline(folder).unet.config.in_channels == 4


def test_unet_training_without_a_vae_says_what_to_run(tmp_path):
    with pytest.raises(PostDiffError, match="train_vae"):
        train_unet(UNET_CFG, tmp_path, threads=1)


def test_a_snapshot_restores_the_run_in_float16_and_warms_the_learning_rate_again(unet_runs):
    """The committed snapshot (snapshot.py): weights and EMA rounded to float16, AdamW's moments reset, the learning
    rate warmed up again from the snapshot's step; a full checkpoint is never overwritten by it."""
    from postdiff_compile.lab.reference2.snapshot import restore_snapshot
    from postdiff_compile.lab.reference2.train_unet import REWARM, UnetTrainer

    tmp_path, full = unet_runs
    snap, work = tmp_path / "snap.safetensors", tmp_path / "restored"
    assert snap.stat().st_size < (tmp_path / "split" / "unet_checkpoint.pt").stat().st_size / 3
    assert restore_snapshot(work, snap) == 3
    restored = load_checkpoint(work / "unet_checkpoint.pt")
    assert restored["history"] == full["history"] and restored["step"] == 3
    for part in ("modules", "ema"):
        for name, value in full["state"][part].items():
            assert torch.equal(restored["state"][part][name], value.half().float()), (part, name)
    assert restored["state"]["optimizer"]["state"] == {} and restored["state"]["rewarm_from"] == 3
    assert torch.equal(restored["state"]["generator"], full["state"]["generator"])
    trainer = UnetTrainer(UNET_CFG, work / "vae")
    trainer.load(restored["state"])
    trainer.train_step(3)
    cfg = UNET_CFG
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        cosine_lr(cfg.lr, cfg.warmup, cfg.min_lr_fraction, cfg.steps, 3) / REWARM)   # step 3 is the first of REWARM
    assert "restored from the snapshot snap.safetensors at step 3" in (work / "unet_log.txt").read_text()
    with pytest.raises(PostDiffError, match="a full checkpoint is already here"):
        restore_snapshot(work, snap)


def test_ship_copies_a_trained_model_in_whole_and_refuses_another_vae_or_too_many_bytes(unet_runs, tmp_path,
                                                                                       monkeypatch):
    from postdiff_compile.lab.reference2 import ship as ship_module
    from postdiff_compile.lab.reference2.ship import ship

    runs, _ = unet_runs
    model = runs / "split" / "model"
    to = ship(model, tmp_path / "weights")                       # a first model: nothing to compare its VAE with
    assert is_model2_folder(to) and load_pipeline(to).unet.config.in_channels == 4
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json"):
        assert (to / part).read_bytes() == (model / part).read_bytes(), part
    assert ship(runs / "whole" / "model", to) == to              # the same VAE: replaced
    other = tmp_path / "other"
    import shutil
    shutil.copytree(model, other)
    save_module(make_vae(1), other / "vae", "diffusion_pytorch_model.safetensors")
    before = (to / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(PostDiffError, match="not the shipped one"):
        ship(other, to)
    monkeypatch.setattr(ship_module, "LIMIT_BYTES", 1000)
    with pytest.raises(PostDiffError, match="over the"):
        ship(model, tmp_path / "small")
    with pytest.raises(PostDiffError, match="not a reference-model-2 folder"):
        ship(runs, tmp_path / "none")
    assert (to / "unet/diffusion_pytorch_model.safetensors").read_bytes() == before   # a refusal changes nothing
    assert not (tmp_path / "small").exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.slow   # two points of the study on the 64 px pipeline: about 20 s here
def test_the_probe_scores_the_baseline_and_dpm_10_against_the_targets(unet_runs, tmp_path):
    from postdiff_compile.lab.target_probe import format_probe, main, probe

    runs, _ = unet_runs
    folder = runs / "split" / "model"
    found = probe(folder, prompts=4, seed_sets=2, real=16)
    assert found["step"] == UNET_CFG.steps
    assert [row["name"] for row in found["rows"]] == ["ddim-20 (baseline)", "dpmsolver++-10"]
    baseline = found["rows"][0]
    for metric, bound in (("caption_match", 0.5), ("acc_colour", 0.9)):
        assert found["targets"][metric] == {"value": baseline[metric], "target": f">= {bound:g}",
                                            "met": baseline[metric] >= bound}
    floor = found["real_vs_real_frechet"]
    assert floor > 0 and found["targets"]["frechet"]["met"] == (baseline["frechet"] <= 2 * floor)
    assert "frechet" in found["rows"][1]["vs_baseline"] and f"step {UNET_CFG.steps}" in format_probe(found)
    # Model 1's folder is refused by name: one error line, exit status 2.
    from postdiff_compile.lab.reference import reference_folder

    assert main([str(reference_folder()), "--prompts", "2"]) == 2
