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
from ..plan import build_plan, make_plan
from ..schedulers import check_scheduler, prediction_type, set_begin
from ..variants import VariantStore, check_cache_branch
from .adapters import adapter_state
from .denoise import DenoiseRequest, denoise
from .pipeline_inputs import KINDS, pipeline_kind
from .step_callbacks import start_call, step_callback

# Arguments of StableDiffusionPipeline.__call__ that this runtime does not implement; passing a non-default
# value is an error rather than silently ignored.
_UNSUPPORTED = ("ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs", "callback", "callback_steps")


@dataclass
class PostDiffRuntime:
    config: PostDiffConfig
    family: FamilySpec
    store: VariantStore
    last_plan: list = field(default_factory=list)
    cuda_graphs: bool = False
    adapters: tuple = ()      # the denoiser's LoRA state the store's graphs were captured with (adapters.py)

    def __post_init__(self):
        from .cuda_graphs import GraphedSource

        # What the loop calls: the store's variants, or their CUDA-graph replays (captured at first use)
        self.source = GraphedSource(self.store) if self.cuda_graphs else self.store
        self.adapters = adapter_state(self.store.denoiser)

    def follow_adapters(self) -> None:
        """Capture again if the denoiser's LoRA adapters changed since the graphs were captured."""
        if adapter_state(self.store.denoiser) != self.adapters:
            self.store = VariantStore(self.store.denoiser, self.family, compile=self.store.compile)
            self.__post_init__()


def optimize(pipe: Any, preset: str | PostDiffConfig = "none", *, compile: bool | str = False, cuda_graphs: bool = False,
             **overrides: Any) -> Any:
    """Make `pipe` denoise through postdiff-compile; returns `pipe`.

    `pipe` is a diffusers StableDiffusionPipeline (SD1.x, SD2.x, LCM U-Nets), StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline, StableDiffusionControlNetPipeline (one or several ControlNets),
    LatentConsistencyModelPipeline,
    StableDiffusionXLPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline or FluxPipeline, or a subclass of one.

    `preset` is a preset name or a whole PostDiffConfig; `overrides` set PostDiffConfig fields by name
    (unknown names are an error). `compile=True` runs each captured variant through `torch.compile` (compiled
    at its first call, so the first generation is slow); a string is torch.compile's mode ("reduce-overhead": CUDA
    graphs of the compiled code). `cuda_graphs=True` (a CUDA pipeline) replays each eager variant from a CUDA graph
    captured at its first call (runtime/cuda_graphs.py). Example:

        pipe = optimize(pipe, preset="none")
        latents = pipe(prompt_embeds=c, negative_prompt_embeds=u, num_inference_steps=20,
                       guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent").images
    """
    request = ConfigRequest(base=preset, overrides=overrides) if isinstance(preset, PostDiffConfig) \
        else ConfigRequest(preset, overrides=overrides)
    request.resolve(None)  # a bad preset name or override fails before the denoiser is looked at
    if pipeline_kind(pipe) is None:
        raise PostDiffError(f"optimize() supports the diffusers pipelines {', '.join(KINDS)} (and subclasses); got "
                            f"{type(pipe).__name__}")
    loaded = load_denoiser(pipe)
    config = request.resolve(loaded.family.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # about a 1-step plan, which is only built to validate the config
        build_plan(config, 1)  # fail now, not at the first call, if a feature is not available
    check_cache_branch(loaded.module, config)
    if config.mixed_resolution:
        check_scheduler(pipe.scheduler)   # again at each call: the scheduler may be swapped in between
    base = getattr(type(pipe), "_postdiff_base", type(pipe))
    previous = getattr(pipe, "_postdiff", None)
    controlnet = getattr(pipe, "controlnet", None) is not None
    if previous is not None and previous.store.denoiser is loaded.module and previous.store.compile == compile \
            and previous.adapters == adapter_state(loaded.module) and previous.store.controlnet == controlnet:
        store = previous.store   # re-optimizing with another config reuses the captured graphs
    else:
        store = VariantStore(loaded.module, loaded.family, compile=compile, controlnet=controlnet)
    pipe.__class__ = _optimized_class(base)
    if cuda_graphs and next(loaded.module.parameters()).device.type != "cuda":
        raise PostDiffError("cuda_graphs=True needs the pipeline on a CUDA device")
    pipe._postdiff = PostDiffRuntime(config, loaded.family, store, cuda_graphs=cuda_graphs)
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


@dataclass
class _Schedule:
    """The steps one call runs: the scheduler's timesteps in its window, the plan over them and the first step."""
    timesteps: torch.Tensor
    plan: Any
    start: int
    start_latent: tuple[int, int]
    restart_scheduler: Any = None


def _schedule(pipe, runtime: PostDiffRuntime, cond, a) -> _Schedule:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    device = pipe._execution_device
    timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, a.num_inference_steps, device, a.timesteps,
                                                        a.sigmas, **cond.timestep_kwargs)
    if getattr(pipe.scheduler, "order", 1) > 1 and not runtime.config.is_identity:
        # Second-order schedulers call the denoiser twice per step with repeated timesteps; a plan that
        # counts calls would split a step's two halves between cached and uncached work.
        raise PostDiffError(f"{type(pipe.scheduler).__name__} is a second-order scheduler (two denoiser calls per "
                            "step); the caches support first-order schedulers (DDIM, Euler, DPM-Solver++, ...)")
    window = cond.window(timesteps) if cond.window is not None else None
    window = None if window == (0, len(timesteps)) else window
    if window is not None and window[0] >= window[1]:
        raise PostDiffError(f"these arguments run no step of the {len(timesteps)}-step schedule (strength "
                            f"{getattr(a, 'strength', None)}, denoising_start {getattr(a, 'denoising_start', None)}, "
                            f"denoising_end {getattr(a, 'denoising_end', None)}): raise strength or "
                            "num_inference_steps")
    start, stop = window or (0, len(timesteps))
    scale = pipe.vae_scale_factor
    full_latent = (cond.height // scale, cond.width // scale)
    plan = make_plan(runtime.config, len(timesteps), family=runtime.family, full_latent=full_latent,
                     prediction_type=prediction_type(pipe.scheduler), cfg=cond.cfg, timesteps=timesteps.tolist(),
                     window=window)
    schedule = _Schedule(timesteps[start:stop], plan, start,
                         plan.transition.low_latent if plan.transition else full_latent)
    if plan.transition:
        check_scheduler(pipe.scheduler)
        requested_timesteps = a.timesteps

        def restart_scheduler(begin: int) -> None:
            # set_timesteps clears a multistep scheduler's history; the timesteps come out the same.
            again, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, requested_timesteps, a.sigmas,
                                          **cond.timestep_kwargs)
            if not torch.equal(again.cpu(), timesteps.cpu()):
                raise PostDiffError("the scheduler gave other timesteps when restarted at the resolution switch")
            set_begin(pipe.scheduler, start + begin)
        schedule.restart_scheduler = restart_scheduler
    return schedule


@torch.no_grad()
def _call(self, *args, **kwargs):
    from types import SimpleNamespace

    kind = pipeline_kind(self)
    if len(args) > 1:
        raise PostDiffError("pass the prompt positionally and every other argument by name")
    kwargs = {**dict(zip(["prompt"], args)), **kwargs}
    used = sorted(k for k in kwargs if k in _UNSUPPORTED and kwargs[k] is not None)
    unknown = sorted(k for k in kwargs if k not in _UNSUPPORTED and k not in kind.defaults)
    if used or unknown:
        raise PostDiffError(f"the postdiff runtime does not support argument(s): {', '.join(used + unknown)}")
    a = SimpleNamespace(**{**kind.defaults, **{k: v for k, v in kwargs.items() if k in kind.defaults}})
    runtime: PostDiffRuntime = self._postdiff
    runtime.follow_adapters()   # set_adapters / fuse_lora since the last call take effect
    cond = kind.prepare(self, a)
    runtime.family.check_resolution(cond.height, cond.width)
    s = _schedule(self, runtime, cond, a)
    runtime.last_plan = list(s.plan)
    given = getattr(a, "latents", None)
    if given is not None and cond.prepare_latents is None and tuple(given.shape[2:]) != s.start_latent:
        which = "low-resolution " if s.plan.transition else ""
        raise PostDiffError(f"the initial latents must be {which}{s.start_latent[0]}x{s.start_latent[1]}; got "
                            f"{tuple(given.shape[2:])}")
    denoiser = runtime.store.denoiser
    # With mixed resolution, drawn exactly as diffusers would draw them for an image of the low-resolution size.
    if cond.prepare_latents is not None:
        latents = cond.prepare_latents(s.start_latent, s.timesteps)
    else:
        scale = self.vae_scale_factor
        latents = self.prepare_latents(cond.batch, denoiser.config.in_channels, s.start_latent[0] * scale,
                                       s.start_latent[1] * scale, cond.prompt_embeds.dtype, self._execution_device,
                                       a.generator, given)
    set_begin(self.scheduler, s.start)   # as the SDXL, PixArt and img2img pipelines do
    interrupted = start_call(self, a.guidance_scale, len(s.timesteps))
    after_step = None
    if getattr(a, "callback_on_step_end", None) is not None:
        after_step = step_callback(self, a.callback_on_step_end, a.callback_on_step_end_tensor_inputs, cond.cfg,
                                   cond.prompt_embeds, cond.negative_prompt_embeds)
    if cond.after_step is not None:
        after_step = _then(cond.after_step, after_step)
    request = DenoiseRequest(latents=latents, timesteps=s.timesteps, prompt_embeds=cond.prompt_embeds,
                             negative_prompt_embeds=cond.negative_prompt_embeds, guidance_scale=a.guidance_scale,
                             guidance_rescale=a.guidance_rescale,
                             extra_step_kwargs=self.prepare_extra_step_kwargs(a.generator, a.eta)
                             if cond.step_kwargs is None else cond.step_kwargs,
                             added_cond=cond.added, negative_added_cond=cond.negative_added,
                             latent_input=runtime.store.latent_input, generator=a.generator,
                             restart_scheduler=s.restart_scheduler, shared_inputs=cond.shared_inputs,
                             after_step=after_step, interrupted=interrupted, extra_channels=cond.extra_channels,
                             residuals=cond.residuals)
    with self.progress_bar(total=len(s.timesteps)) as bar:
        latents = denoise(runtime.source, self.scheduler, s.plan, request, on_step=lambda _: bar.update())
    return cond.finish(latents)


def _then(first, callback):
    """The pipeline's own per-step work, then the user's step callback (as the diffusers loops order them)."""
    def after_step(index: int, t: Any, latents: torch.Tensor) -> torch.Tensor:
        latents = first(index, latents)
        return latents if callback is None else callback(index, t, latents)
    return after_step
