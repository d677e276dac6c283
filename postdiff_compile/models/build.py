"""Instantiate a diffusers denoiser from a config without paying for random initialisation."""
from __future__ import annotations

import contextlib

import torch

from ..errors import PostDiffError


@contextlib.contextmanager
def _parameters_on_meta():
    # Parameters go to the meta device as they are registered, so their random init is free; buffers stay
    # real because some (PixArt's positional table) are computed in __init__ and not in the state dict.
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def denoiser_class(class_name: str) -> type[torch.nn.Module]:
    import diffusers

    return getattr(diffusers, class_name)


def build_denoiser(class_name: str, config: dict, device: str = "empty") -> torch.nn.Module:
    """A denoiser of `class_name` built from `config`.

    device "meta": everything on the meta device (shapes only, for FLOPs and detection).
    device "empty": parameters on meta, buffers real; load weights with load_state_dict(assign=True).
    """
    cls = denoiser_class(class_name)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        if device == "meta":
            with torch.device("meta"):
                return cls.from_config(config)
        with _parameters_on_meta():
            return cls.from_config(config)
    except Exception as err:   # diffusers and torch refuse impossible configs with many error types
        raise PostDiffError(f"the detected {class_name} architecture cannot be built: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
