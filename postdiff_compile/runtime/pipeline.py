"""`optimize(pipe)`: make a diffusers pipeline run its denoising loop through the postdiff runtime.

The pipeline object keeps its class's behaviour for everything but `__call__`: its class is swapped for
a subclass whose `__call__` encodes prompts, prepares latents and decodes exactly as diffusers does, and
runs the loop in `denoise.py` over captured variants of its own denoiser.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigRequest, PostDiffConfig
from ..errors import PostDiffError
from ..models.families import FamilySpec
from ..models.load import load_denoiser
from ..passes.deepcache import check_branch
from ..plan import build_plan, switch_of
from ..resolution import low_res_latent
from .denoise import DenoiseRequest, denoise
from .transition import Switch, check_scheduler
from ..variants import VariantStore

_SUPPORTED_FAMILIES = ("sd15", "sd2", "scenes32")
# Arguments of StableDiffusionPipeline.__call__ that this runtime does not implement; passing a non-default
# value is an error rather than silently ignored.
_UNSUPPORTED = ("ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs", "callback_on_step_end",
                "callback", "callback_steps")


@dataclass
class PostDiffRuntime:
    config: PostDiffConfig
    family: FamilySpec
    store: VariantStore
    last_plan: list = field(default_factory=list)


def optimize(pipe: Any, preset: str | PostDiffConfig = "none", **overrides: Any) -> Any:
    """Make `pipe` (a diffusers StableDiffusionPipeline) denoise through postdiff-compile; returns `pipe`.

    `preset` is a preset name or a whole PostDiffConfig; `overrides` set PostDiffConfig fields by name
    (unknown names are an error). Example:

        pipe = optimize(pipe, preset="none")
        latents = pipe(prompt_embeds=c, negative_prompt_embeds=u, num_inference_steps=20,
                       guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent").images
    """
    request = ConfigRequest(base=preset, overrides=overrides) if isinstance(preset, PostDiffConfig) \
        else ConfigRequest(preset, overrides=overrides)
    request.resolve(None)  # a bad preset name or override fails before the denoiser is looked at
    loaded = load_denoiser(pipe)
    if loaded.detection.family not in _SUPPORTED_FAMILIES or not hasattr(pipe, "encode_prompt"):
        raise PostDiffError(
            f"optimize() supports Stable Diffusion 1.x/2.x pipelines (and the reference model) in this version; got "
            f"{type(pipe).__name__} with a {loaded.detection.family} denoiser"
        )
    config = request.resolve(loaded.family.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # about a 1-step plan, which is only built to validate the config
        build_plan(config, 1)  # fail now, not at the first call, if a feature is not available
    if config.cache_interval > 1:
        check_branch(len(loaded.module.up_blocks), config.cache_branch)
    if config.mixed_resolution:
        check_scheduler(pipe.scheduler)   # again at each call: the scheduler may be swapped in between
    base = getattr(type(pipe), "_postdiff_base", type(pipe))
    previous = getattr(pipe, "_postdiff", None)
    if previous is not None and previous.store.denoiser is loaded.module:
        store = previous.store   # re-optimizing with another config reuses the captured graphs
    else:
        store = VariantStore(loaded.module, loaded.family)
    pipe.__class__ = _optimized_class(base)
    pipe._postdiff = PostDiffRuntime(config, loaded.family, store)
    return pipe


def restore(pipe: Any) -> Any:
    """Undo `optimize`: the pipeline runs diffusers' own loop again."""
    base = getattr(type(pipe), "_postdiff_base", None)
    if base is not None:
        pipe.__class__ = base
        del pipe._postdiff
    return pipe


_CLASSES: dict[type, type] = {}


def _optimized_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"PostDiff{base.__name__}", (base,),
                              {"__call__": _call, "_postdiff_base": base, "__module__": __name__})
    return _CLASSES[base]


@torch.no_grad()
def _call(self, prompt=None, height=None, width=None, num_inference_steps=50, timesteps=None, sigmas=None,
          guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
          latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
          guidance_rescale=0.0, clip_skip=None, **kwargs):
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    used = sorted(k for k in kwargs if k in _UNSUPPORTED and kwargs[k] is not None)
    unknown = sorted(k for k in kwargs if k not in _UNSUPPORTED)
    if used or unknown:
        raise PostDiffError(f"the postdiff runtime does not support argument(s): {', '.join(used + unknown)}")
    runtime: PostDiffRuntime = self._postdiff
    unet = self.unet
    height = height or unet.config.sample_size * self.vae_scale_factor
    width = width or unet.config.sample_size * self.vae_scale_factor
    runtime.family.check_resolution(height, width)
    do_cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    if prompt is not None:
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
    elif prompt_embeds is not None:
        batch_size = prompt_embeds.shape[0]
    else:
        raise PostDiffError("pass a prompt or prompt_embeds")
    device = self._execution_device
    prompt_embeds, negative_prompt_embeds = self.encode_prompt(
        prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
    requested_timesteps = timesteps
    timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
    if getattr(self.scheduler, "order", 1) > 1 and not runtime.config.is_identity:
        # Second-order schedulers call the denoiser twice per step with repeated timesteps; a plan that
        # counts calls would split a step's two halves between cached and uncached work.
        raise PostDiffError(f"{type(self.scheduler).__name__} is a second-order scheduler (two denoiser calls per "
                            "step); the caches support first-order schedulers (DDIM, Euler, DPM-Solver++, ...)")
    plan = build_plan(runtime.config, len(timesteps), cfg=do_cfg)
    runtime.last_plan = plan
    full_latent = start_latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
    switch, switch_step = None, switch_of(plan)
    if switch_step:
        check_scheduler(self.scheduler)
        start_latent = low_res_latent(runtime.family, full_latent, runtime.config.low_res_scale)

        def restart_scheduler(begin: int) -> None:
            # set_timesteps clears a multistep scheduler's history; the timesteps come out the same.
            again, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, requested_timesteps, sigmas)
            if not torch.equal(again.cpu(), timesteps.cpu()):
                raise PostDiffError("the scheduler gave other timesteps when restarted at the resolution switch")
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(begin)

        switch = Switch(switch_step, full_latent, self.scheduler.config.prediction_type,
                        runtime.config.renoise, runtime.config.clamp_x0, generator, restart_scheduler)
    if latents is not None and tuple(latents.shape[2:]) != start_latent:
        which = "low-resolution " if switch is not None else ""
        raise PostDiffError(f"the initial latents must be {which}{start_latent[0]}x{start_latent[1]}; got "
                            f"{tuple(latents.shape[2:])}")
    # With mixed resolution, drawn exactly as diffusers would draw them for an image of the low-resolution size.
    latents = self.prepare_latents(batch_size * num_images_per_prompt, unet.config.in_channels,
                                   start_latent[0] * self.vae_scale_factor, start_latent[1] * self.vae_scale_factor,
                                   prompt_embeds.dtype, device, generator, latents)
    request = DenoiseRequest(latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale,
                             guidance_rescale, self.prepare_extra_step_kwargs(generator, eta),
                             runtime.config.cache_branch, runtime.config.cross_attn_cache, switch)
    with self.progress_bar(total=len(timesteps)) as bar:
        latents = denoise(runtime.store, self.scheduler, plan, request, on_step=lambda _: bar.update())

    has_nsfw = None
    if output_type == "latent":
        image = latents
    else:
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, has_nsfw = self.run_safety_checker(image, device, prompt_embeds.dtype)
        denormalize = [True] * image.shape[0] if has_nsfw is None else [not x for x in has_nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
    self.maybe_free_model_hooks()
    if not return_dict:
        return image, has_nsfw
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)
