"""ControlNet graphs beside the denoiser variants: one graph per ControlNet and (batch, latent size) the plan runs.

A ControlNet runs once per step on the step's scaled latent input, timestep, text embeddings (and SDXL's added
conditioning), with the conditioning image prepared at the step's size; its residuals feed the U-Net variants,
whose inputs they are (capture.residual_specs). The graph is exported with conditioning scale 1: the runner
multiplies the residuals by the step's scale, as diffusers' ControlNetModel does after computing them (`x * 1.0`
is `x`, so the product is diffusers' to the bit). Its weights go into the artifact's one weights file under
`controlnet<i>.` (the graphs hold the ControlNet under capture's PARAM_PREFIX attribute as `controlnet<i>`), next
to the denoiser's, whose names never start so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .capture import CONTROLNET_COND, CONTROLNET_DOWN, CONTROLNET_MID, Bucket, TensorSpec, example_inputs, input_specs
from .errors import PostDiffError
from .exporters.formats import Build, VariantJob, write_variant
from .plan import Plan
from .variants import Variant, variant_input_specs, variant_output_specs
from .verification import compare_outputs


def net_name(index: int) -> str:
    return f"controlnet{index}"


def pixel_factor(controlnet: torch.nn.Module) -> int:
    """Conditioning image pixels per latent pixel: the conditioning embedding halves the size at each block after
    its first (8 for the released SD and SDXL ControlNets)."""
    return 2 ** (len(controlnet.config["conditioning_embedding_out_channels"]) - 1)


class ControlNetCall(torch.nn.Module):
    """A ControlNet with positional tensor inputs (capture.DenoiserCall's convention) returning its residuals."""

    def __init__(self, controlnet: torch.nn.Module, index: int, input_names: tuple[str, ...]):
        super().__init__()
        self.denoiser = torch.nn.ModuleDict({net_name(index): controlnet})   # weights named "controlnet<i>.*"
        self.key, self.input_names = net_name(index), input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names, inputs))
        added = {k: named.pop(k) for k in ("text_embeds", "time_ids") if k in named}
        down, mid = self.denoiser[self.key](named.pop("sample"), named.pop("timestep"), controlnet_cond=named.pop(
            CONTROLNET_COND), conditioning_scale=1.0, added_cond_kwargs=added or None, return_dict=False, **named)
        return (*down, mid)


def controlnet_specs(controlnet: torch.nn.Module, family, bucket: Bucket) -> list[TensorSpec]:
    """The graph's inputs: the denoiser inputs a ControlNet reads, then the conditioning image."""
    if controlnet.config.get("global_pool_conditions"):
        raise PostDiffError("ControlNets with global_pool_conditions (they average their residuals after scaling) are "
                            "not supported in artifacts; use optimize(pipe)")
    specs = [s for s in input_specs(controlnet, family, bucket)
             if s.name in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")]
    factor = pixel_factor(controlnet)
    image = (bucket.batch, controlnet.config["conditioning_channels"], bucket.latent_height * factor,
             bucket.latent_width * factor)
    return specs + [TensorSpec(CONTROLNET_COND, image, bucket.dtype)]


def controlnet_buckets(plan: Plan, full_latent: tuple[int, int]) -> list[tuple[int, tuple[int, int]]]:
    """(batch, latent size) of every step: CFG steps run the doubled batch, low-resolution steps the low latent."""
    low = plan.transition.low_latent if plan.transition else full_latent
    wanted = {(2 if step.cfg else 1, low if step.low_res else full_latent) for step in plan}
    return sorted(wanted, key=lambda b: (-b[0], -b[1][0] * b[1][1]))


@dataclass
class _Captured:
    variant: Variant
    feed: tuple[torch.Tensor, ...]
    expected: tuple[torch.Tensor, ...]
    seconds: float


def _capture(controlnet: torch.nn.Module, index: int, family, bucket: Bucket, seed: int = 1) -> _Captured:
    specs = controlnet_specs(controlnet, family, bucket)
    wrapper = ControlNetCall(controlnet, index, tuple(s.name for s in specs)).eval()
    device = next(controlnet.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(specs, seed))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, args, strict=False)
            expected = tuple(wrapper(*args))
    except Exception as err:  # torch.export reports many error types
        raise PostDiffError(f"torch.export failed for ControlNet {index} at {bucket.tag}: {type(err).__name__}: "
                            f"{err}") from None
    count = len(expected) - 1
    outputs = [f"{CONTROLNET_DOWN}{i}" for i in range(count)] + [CONTROLNET_MID]
    variant = Variant(SimpleNamespace(name=net_name(index)), program.module(), [s.name for s in specs], outputs)
    return _Captured(variant, args, expected, time.perf_counter() - start)


def controlnet_tensors(controlnets: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every ControlNet's parameters and buffers under the names its graphs give them."""
    return {f"{net_name(i)}.{name}": t for i, net in enumerate(controlnets) if isinstance(net, torch.nn.Module)
            for name, t in [*net.named_parameters(), *net.named_buffers()]}   # (what is not, build_controlnets refuses)


def _check(net: torch.nn.Module, index: int, denoiser, dtype: torch.dtype, batches: tuple[int, ...], source) -> None:
    if not isinstance(net, torch.nn.Module) or not hasattr(net, "controlnet_cond_embedding"):
        raise PostDiffError(f"controlnets[{index}] is a {type(net).__name__}, not a diffusers ControlNetModel (pass "
                            "a MultiControlNetModel's nets one by one)", source)
    if len(batches) > 1:
        raise PostDiffError("an artifact with ControlNets runs one image per call: compile it without --max-batch",
                            source)
    if next(net.parameters()).dtype != dtype:
        raise PostDiffError(f"ControlNet {index} is {next(net.parameters()).dtype}, the denoiser {dtype}: load both "
                            "in one dtype", source)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        if list(_as_list(net.config[key])) != list(_as_list(denoiser.config[key])):
            raise PostDiffError(f"ControlNet {index}'s {key} is {net.config[key]}, the U-Net's "
                                f"{denoiser.config[key]}: its residuals would not fit this U-Net", source)


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def build_controlnets(controlnets: list[torch.nn.Module], plan: Plan, full_latent: tuple[int, int], family,
                      build: Build, dtype: torch.dtype, batches: tuple[int, ...],
                      denoiser: torch.nn.Module) -> list[dict]:
    """The manifest's `controlnets`: per ControlNet its class, config and one graph per bucket, each verified against
    eager (the graph itself, then every format's file on the same inputs)."""
    entries = []
    for index, net in enumerate(controlnets):
        _check(net, index, denoiser, dtype, batches, build.source)
        graphs = []
        for batch, size in controlnet_buckets(plan, full_latent):
            bucket = Bucket(batch, *size, family.text_length, dtype)
            tag = f"{net_name(index)}@{bucket.tag}"
            with build.timed(f"capture {tag}"):
                captured = _capture(net, index, family, bucket)
            variant = captured.variant
            with torch.no_grad():
                check = compare_outputs(tuple(variant.module(*captured.feed)), captured.expected, 1)
            if not check.rel_l2_error <= build.tolerance:
                raise PostDiffError(f"ControlNet graph {tag} differs from eager: relative L2 error "
                                    f"{check.rel_l2_error:.3g} > {build.tolerance:g}", build.source)
            job = VariantJob(build=build, tag=tag, variant=variant, feed=captured.feed, expected=captured.expected,
                             seed=1)
            graphs.append({
                "id": tag, "batch": batch, "latent_size": list(size), "dtype": build.dtype_name,
                "inputs": [s.to_json() for s in variant_input_specs(variant)],
                "outputs": [s.to_json() for s in variant_output_specs(variant)],
                "verification": {**check.to_json(), "reference": build.reference, "tolerance": build.tolerance},
                "files": write_variant(job), "capture_seconds": round(captured.seconds, 3)})
        entries.append({"index": index, "class": type(net).__name__, "config": dict(net.config),
                        "pixel_factor": pixel_factor(net), "graphs": graphs})
    return entries
