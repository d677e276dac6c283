"""ControlNets on an artifact: their graphs (controlnet_build.py) run at every step, as optimize(pipe) runs the
ControlNet modules on StableDiffusionControlNetPipeline (pipeline_controlnet.py), and their residuals feed the
variants.

The conditioning image is prepared as the pipeline's `prepare_image` does (diffusers' VaeImageProcessor without
normalisation, at the step's pixel size: the artifact's resolution, or the low resolution's on mixed resolution's
early steps), doubled on CFG steps. The residuals are multiplied by the step's scale (the conditioning scale times
the guidance window's keep factor) and summed over the ControlNets in order, as ControlNetModel and
MultiControlNetModel do. Guess mode is refused: its CFG steps run the ControlNet on the conditional half only, a
batch the artifact has no graph for.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..capture import CONTROLNET_COND
from ..errors import PostDiffError
from ..exporters.manifest import MANIFEST
from .backends import BackendVariant, open_variant
from .pipeline_controlnet import guidance_keep



class ArtifactControlNets:
    """The artifact's ControlNet graphs by (net, batch, latent height, latent width)."""

    def __init__(self, folder: Path, manifest: dict, backend: str, device: torch.device, weights):
        self.folder, self.entries = Path(folder), manifest.get("controlnets") or []
        self.graphs: dict[tuple[int, int, int, int], BackendVariant] = {}
        for net in self.entries:
            for graph in net["graphs"]:
                key = (net["index"], graph["batch"], *graph["latent_size"])
                self.graphs[key] = open_variant(backend, folder, graph, device, weights)
        resolution = manifest["resolution"]
        self.full = (resolution["height"], resolution["width"])
        self.factor = resolution["height"] // resolution["latent_height"]

    def __len__(self) -> int:
        return len(self.entries)

    def residuals(self, images: Any, scales: Any = 1.0, starts: Any = 0.0, ends: Any = 1.0, *, from_image: bool,
                  device: torch.device, dtype: torch.dtype) -> Callable[..., dict[str, torch.Tensor]]:
        """DenoiseRequest.residuals for one call: one image, scale, guidance start and end per ControlNet (a single
        value for one ControlNet). `from_image`: the call starts from an image or a mask (refused)."""
        count = len(self)
        if not count:
            raise PostDiffError("control_image given, but the artifact was compiled without a ControlNet",
                                self.folder / MANIFEST)
        if images is None:
            raise PostDiffError(f"the artifact was compiled with {count} ControlNet(s): pass control_image",
                                self.folder / MANIFEST)
        if from_image:   # as optimize(pipe), which refuses StableDiffusionControlNetImg2Img/InpaintPipeline
            raise PostDiffError("a ControlNet artifact runs text-to-image only: image_latents and mask are not "
                                "supported with control_image yet")
        images, scales, starts, ends = (_per_net(v, count, name) for v, name in (
            (images, "control_image"), (scales, "controlnet_conditioning_scale"),
            (starts, "control_guidance_start"), (ends, "control_guidance_end")))
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise PostDiffError(f"control_guidance_start {s} must be below control_guidance_end {e}, both in "
                                    "[0, 1]")
        prepared: dict[tuple[tuple[int, int], bool], list[torch.Tensor]] = {}

        def images_at(size: tuple[int, int], cfg: bool) -> list[torch.Tensor]:
            if (size, False) not in prepared:
                pixels = self.full if size == (self.full[0] // self.factor, self.full[1] // self.factor) else \
                    (size[0] * self.factor, size[1] * self.factor)
                prepared[size, False] = [_prepare(image, pixels, self.factor, device, dtype) for image in images]
                prepared[size, True] = [torch.cat([image] * 2) for image in prepared[size, False]]
            return prepared[size, cfg]

        def residuals(index: int, steps: int, cfg: bool, model_input: torch.Tensor, t: Any, context: torch.Tensor,
                      added: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            keep = guidance_keep(index, steps, starts, ends)
            batch, size = model_input.shape[0], (model_input.shape[2], model_input.shape[3])
            timestep = torch.as_tensor(t).to(model_input.device, torch.float32).reshape(1).expand(batch)
            total, names = None, None
            for net, image in enumerate(images_at(size, cfg)):
                graph = self._graph(net, batch, size)
                values = {"sample": model_input, "timestep": timestep, "encoder_hidden_states": context,
                          CONTROLNET_COND: image, **added}
                scale = scales[net] * keep[net]
                outputs = [o * scale for o in graph(*(values[name] for name in graph.inputs))]
                total = outputs if total is None else [a + b for a, b in zip(total, outputs)]
                names = graph.outputs
            return dict(zip(names, total))
        return residuals

    def _graph(self, net: int, batch: int, size: tuple[int, int]) -> BackendVariant:
        key = (net, batch, *size)
        if key not in self.graphs:
            raise PostDiffError(f"the artifact has no graph of ControlNet {net} for batch {batch} at latent "
                                f"{size[0]}x{size[1]}", self.folder / MANIFEST)
        return self.graphs[key]


def _per_net(value: Any, count: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != count:
        raise PostDiffError(f"{name}: one per ControlNet of the artifact ({count}), got {len(values)}")
    return values


def _prepare(image: Any, pixels: tuple[int, int], factor: int, device: torch.device, dtype: torch.dtype):
    """StableDiffusionControlNetPipeline.prepare_image for one image and one image per call, without CFG."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=factor, do_convert_rgb=True, do_normalize=False)
    try:
        prepared = processor.preprocess(image, height=pixels[0], width=pixels[1]).to(dtype=torch.float32)
    except Exception as err:  # the image processor raises several types for what it cannot read
        raise PostDiffError(f"control_image: {type(err).__name__}: {str(err)[:200]} (give a PIL image or a "
                            "[1, 3, H, W] tensor in [0, 1])") from None
    if prepared.shape[0] != 1:
        raise PostDiffError(f"control_image: one image per call, got {prepared.shape[0]}")
    return prepared.to(device=device, dtype=dtype)
