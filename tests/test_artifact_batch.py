"""Batched artifacts (compile --max-batch): every variant built per bucket of images per call, and the runner's
run_batch, whose image i equals a one-image call with image i's seed and guidance scale."""
import json

import pytest
import torch
from tiny_models import text_embeddings, tiny_sd_pipeline

import postdiff_compile
from postdiff_compile.compile import compile_artifact
from postdiff_compile.config import ConfigRequest
from postdiff_compile.errors import PostDiffError
from postdiff_compile.exporters.manifest_rules import check_consistency
from postdiff_compile.variant_build import batch_buckets
from postdiff_compile.verification import rel_l2

STEPS = 6


def compile_batched(folder, preset: str, max_batch: int, **overrides):
    return compile_artifact(tiny_sd_pipeline("sd15").unet, ConfigRequest(preset, overrides=overrides), folder,
                            resolution=(128, 128), steps=STEPS, max_batch=max_batch).out


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """The tiny SD1.5 U-Net's `none` artifact (CFG at every step) for calls of up to 2 images. The slow tier's test
    below runs `fast` for up to 4 (buckets 1, 2 and 4: 3 images padded to 4), with the transition's fresh noise
    drawn per image (quality's two resolutions here cost 26 s of the default tier's setup)."""
    return compile_batched(tmp_path_factory.mktemp("batched") / "a", "none", 2)


@pytest.fixture(scope="module")
def runner(batched):
    return postdiff_compile.load(batched, "torch")


def test_buckets_are_powers_of_two_and_the_maximum():
    assert batch_buckets(1) == (1,) and batch_buckets(4) == (1, 2, 4) and batch_buckets(6) == (1, 2, 4, 6)
    for bad in (0, 65):
        with pytest.raises(PostDiffError, match="--max-batch must be between 1 and 64"):
            batch_buckets(bad)


def test_each_image_of_a_batch_equals_its_own_call(batched, runner):
    manifest = json.loads((batched / "manifest.json").read_text())
    assert sorted(manifest["batches"]) == ["2"]
    assert {v["batch"] for v in manifest["variants"]} == {2, 4}             # every step CFG: twice the images
    assert runner.batches == [1, 2]
    check_rows(runner, 2)


@pytest.mark.slow   # 40-80 s of compiling; the default tier runs none (above)
def test_fast_batches_equal_their_own_calls(tmp_path):
    """`fast`: the block cache, and after step 4 steps without CFG that read the cross-attention cache."""
    out = compile_batched(tmp_path / "fast", "fast", 4, cross_attn_cache_step=4)
    assert {v["batch"] for v in json.loads((out / "manifest.json").read_text())["variants"]} == {1, 2, 4, 8}
    check_rows(postdiff_compile.load(out, "torch"), 3)


def check_rows(runner, n: int):
    """n images in one call (3: padded to the 4 bucket) against their one-image calls, then 2 and 1."""
    cond, uncond = text_embeddings(3, 77, 768, seed=5)
    seeds, scales = [11, 12, 13], [7.5, 3.0, 5.0]
    alone = torch.cat([runner(cond[i:i + 1], uncond[i:i + 1], seed=s, guidance_scale=g)
                       for i, (s, g) in enumerate(zip(seeds, scales))])
    together = runner.run_batch(cond[:n], uncond[:n], seeds=seeds[:n], guidance_scales=scales[:n])
    assert together.shape == alone[:n].shape == (n, 4, 16, 16)
    for i in range(n):
        assert rel_l2(together[i], alone[i]) <= 1e-5, i
    assert rel_l2(alone[0], alone[1]) > 0.1                # the seeds and scales made different images
    # Two images run on the 2-image bucket; one image through run_batch is the one-image call.
    pair = runner.run_batch(cond[1:], uncond[1:], seeds=seeds[1:], guidance_scales=scales[1:])
    assert rel_l2(pair, alone[1:]) <= 1e-5
    one = runner.run_batch(cond[:1], uncond[:1], seeds=seeds[:1], guidance_scales=scales[:1])
    assert torch.equal(one, alone[:1])


def test_batched_calls_refuse_what_they_cannot_run(runner):
    cond, uncond = text_embeddings(3, 77, 768, seed=5)
    with pytest.raises(PostDiffError, match="3 images in one call, but the artifact was compiled for at most 2"):
        runner.run_batch(cond, uncond, seeds=[1, 2, 3])
    with pytest.raises(PostDiffError, match="1 guidance scales for 2 images"):
        runner.run_batch(cond[:2], uncond[:2], seeds=[1, 2], guidance_scales=[1.0])
    with pytest.raises(PostDiffError, match=r"prompt_embeds must have shape \[1, 77, 768\]"):
        runner.run_batch(cond[:2], uncond[:2], seeds=[1])


def test_a_bucket_that_names_the_wrong_variant_is_refused(batched):
    manifest = json.loads((batched / "manifest.json").read_text())
    single = [step["variant_id"] for step in manifest["plan"]]
    for ids, message in ((single, "does not run step 0"), (manifest["batches"]["2"][:-1], f"for {STEPS} steps"),
                         (["nope"] * STEPS, "names no variant")):
        edited = {**manifest, "batches": {**manifest["batches"], "2": ids}}
        with pytest.raises(PostDiffError, match=message):
            check_consistency(edited, batched / "manifest.json")
