"""Generate images with one sampler setting and score them: the measuring step shared by `study` and `tune`.

A prompt set is `n` scenes drawn from a seed at or above the classifier's held-out seed base, so the
classifier never trained on them; their captions are the prompts and their attributes the answer key.
The starting noise comes from one torch.Generator per chunk of `CHUNK` prompts, seeded from the prompt
set, so two settings with the same latent shape start from the same noise (fidelity is paired).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import PostDiffConfig
from .attributes import score, targets
from .classifier import TEST_SEED_BASE, AttributeClassifier
from ..metrics.quality import frechet_distance, psnr, ssim

CHUNK = 96
SCHEDULERS = ("ddim", "dpmsolver++", "euler")
REAL_SEED = TEST_SEED_BASE + 777       # the real images the Frechet distance compares against
FRESH_REAL_SEED = TEST_SEED_BASE + 31_337   # other real images: the Frechet distance's own floor
MAX_PSNR = 100.0                       # dB, for identical images


@dataclass(frozen=True)
class Sampler:
    """One way of sampling: a scheduler, a step count and a PostDiff config (identity = diffusers' own loop)."""
    name: str
    scheduler: str = "ddim"
    steps: int = 20
    config: PostDiffConfig = field(default_factory=PostDiffConfig)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")


@dataclass
class PromptSet:
    seed: int
    captions: list[str]
    targets: np.ndarray

    @classmethod
    def make(cls, seed: int, n: int) -> "PromptSet":
        from .scenes import make_batch

        _, captions, scenes = make_batch(TEST_SEED_BASE + seed, n)
        return cls(seed, captions, targets(scenes))


def real_features(classifier: AttributeClassifier, n: int, seed: int = REAL_SEED) -> torch.Tensor:
    from .scenes import make_batch

    images, _, _ = make_batch(seed, n, classifier.size)
    with torch.no_grad():
        return classifier.features(torch.from_numpy(images))


def make_scheduler(name: str, base_config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    # DDIM's clip_sample is, for DPM-Solver++, thresholding with a maximum of the clip range.
    clip = dict(thresholding=True, sample_max_value=base_config.get("clip_sample_range", 1.0)) \
        if base_config.get("clip_sample") else {}
    return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2, **clip)


def generate(pipe, sampler: Sampler, prompts: PromptSet, guidance: float,
             on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """Images in [0, 1], float32 [n, 3, H, W]. `pipe` is a plain StableDiffusionPipeline; it is left plain."""
    from ..runtime.pipeline import optimize, restore

    original, progress = pipe.scheduler, dict(getattr(pipe, "_progress_bar_config", {}))
    try:
        pipe.scheduler = make_scheduler(sampler.scheduler, original.config)
        if not sampler.config.is_identity:
            # The graphs captured for earlier settings are reused (optimize keeps the store of the runtime it
            # replaces): a sweep captures each variant once, not once per setting.
            if getattr(pipe, "_postdiff_stash", None) is not None:
                pipe._postdiff = pipe._postdiff_stash
            optimize(pipe, sampler.config)
            pipe._postdiff_stash = pipe._postdiff
        pipe.set_progress_bar_config(disable=True)
        out = []
        for start in range(0, len(prompts.captions), CHUNK):
            chunk = prompts.captions[start:start + CHUNK]
            generator = torch.Generator().manual_seed(prompts.seed * 1_000_003 + start)
            images = pipe(chunk, num_inference_steps=sampler.steps, guidance_scale=guidance, generator=generator,
                          output_type="pt").images
            out.append(images.float().cpu())
            if on_chunk:
                on_chunk(len(chunk))
        return torch.cat(out)
    finally:
        restore(pipe)
        pipe.scheduler = original
        pipe._progress_bar_config = progress


def evaluate(images: torch.Tensor, prompts: PromptSet, classifier: AttributeClassifier, real: torch.Tensor,
             baseline: torch.Tensor | None = None) -> dict:
    """Attribute scores, Frechet distance to `real` features and, given the baseline's images on the same
    prompts and seeds, PSNR and SSIM against them."""
    x = images * 2 - 1
    with torch.no_grad():
        predicted = classifier.predict(x)
        features = classifier.features(x)
    result = {**score(predicted, prompts.targets).to_json(), "frechet": frechet_distance(features, real)}
    if baseline is not None:
        # Identical images have infinite PSNR; capped at MAX_PSNR so that they still count in the mean.
        result.update(psnr=float(psnr(images, baseline).clamp(max=MAX_PSNR).mean()),
                      ssim=float(ssim(images, baseline).mean()))
    return result
