"""LoRA files merged into a denoiser with diffusers' own loading and fusing, for `refit`.

A LoRA file as people download it (diffusers/PEFT or kohya/A1111 names) is read by the family's diffusers pipeline
class (`FamilySpec.lora_loader`: its `lora_state_dict` converts kohya names, SDXL's original block names included),
loaded as a PEFT adapter (`load_lora_adapter`), fused into the base weights (`fuse_lora`) and unloaded, which leaves
the denoiser's own state-dict names with merged values.

diffusers warns and goes on where a file does not fit (a tensor for a module the model lacks, a LoRA for another
model that loads nothing); here each such file is one error naming it and the tensor, checked before anything is
loaded (`_check_targets`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PostDiffError
from .families import FamilySpec

ADAPTER = "postdiff_refit"


def merge_lora(denoiser: torch.nn.Module, family: FamilySpec, path: str | Path, scale: float = 1.0) -> None:
    """Fuse the LoRA in `path` into `denoiser` in place, at `scale`."""
    import diffusers

    from .safetensors_header import read_header

    import importlib.util

    path = Path(path)
    if importlib.util.find_spec("peft") is None:
        raise PostDiffError("merging a LoRA needs the peft package (pip install 'postdiff-compile[lora]')", path)
    if not family.lora_loader:
        raise PostDiffError(f"LoRA files for {family.name} denoisers are not supported (U-Net families only)", path)
    if not path.is_file():
        raise PostDiffError("no such LoRA file", path)
    read_header(path).check_data_present()   # a truncated download: one error here, not diffusers' pickle fallback
    loader = getattr(diffusers, family.lora_loader)
    try:
        state, alphas, metadata = loader.lora_state_dict(str(path), use_safetensors=True, unet_config=denoiser.config,
                                                         return_lora_metadata=True)
    except Exception as err:  # diffusers raises ValueError, KeyError, SafetensorError... for files it cannot map
        raise PostDiffError(f"not a LoRA file diffusers can read for {family.name}: {type(err).__name__}: "
                            f"{str(err)[:300]}", path) from None
    _check_targets(denoiser, state, family, path)
    try:
        denoiser.load_lora_adapter(state, prefix="unet", adapter_name=ADAPTER, network_alphas=alphas,
                                   metadata=metadata)
        denoiser.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
        denoiser.unload_lora()
    except Exception as err:  # PEFT and diffusers raise several types
        raise PostDiffError(f"diffusers cannot apply the LoRA: {type(err).__name__}: {str(err)[:300]}", path) from None


def _check_targets(denoiser: torch.nn.Module, state: dict[str, torch.Tensor], family: FamilySpec, path: Path) -> None:
    """Every tensor of the LoRA targets a layer of this denoiser with the layer's own width."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    ours = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not ours:
        first = next(iter(state), "(none)")
        raise PostDiffError(f"no tensor of this LoRA is for a {family.name} U-Net (its first tensor is "
                            f"{first[:100]!r}); a LoRA for another model?", path)
    if not any(".lora_A." in k or ".lora_B." in k for k in ours):
        ours = convert_unet_state_dict_to_peft(ours)
    modules = dict(denoiser.named_modules())
    for key, tensor in ours.items():
        name, _, kind = key.rpartition(".lora_")
        if not kind.startswith(("A.", "B.")):
            continue   # alphas, DoRA magnitudes: diffusers checks those itself
        layer = modules.get(name)
        if layer is None:
            raise PostDiffError(f"LoRA tensor {key!r} targets {name!r}, which this {family.name} denoiser does not "
                                "have: a LoRA for another model?", path)
        width = _widths(layer)
        if width is None:
            raise PostDiffError(f"LoRA tensor {key!r} targets {name!r}, a {type(layer).__name__}, not a linear or "
                                "convolution layer", path)
        dim = 1 if kind.startswith("A.") else 0
        want = width[0] if kind.startswith("A.") else width[1]
        if tensor.dim() < 2 or tensor.shape[dim] != want:
            raise PostDiffError(f"LoRA tensor {key!r} has shape {list(tensor.shape)}; the layer {name!r} takes "
                                f"{'inputs' if dim else 'outputs'} of width {want}: a LoRA for another model?", path)


def _widths(layer: torch.nn.Module) -> tuple[int, int] | None:
    """(input width, output width) of a layer a LoRA can target."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, torch.nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return None
