"""The embedded default model: a tiny SD1.5-architecture checkpoint with RANDOM weights.

It exists so that `postdiff-compile` with no SOURCE runs the whole job in seconds on a new machine, with
no download. Its outputs are noise-like: it shows the tool working, not image quality. It is generated
deterministically on first use in the SD1.5 single-file (LDM) layout, so it takes the same loading path
as a real checkpoint, and cached under $POSTDIFF_CACHE (default ~/.cache/postdiff-compile).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .build import denoiser_class
from .families import get_family
from .key_maps import LDM_PREFIX, original_source

NAME = "tiny-sd15-random-v1.safetensors"
# SD1.5 block types and text width (768) at toy channel counts: 2 levels, 1 resnet each.
TINY_OVERRIDES = dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=32,
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])


def cache_dir() -> Path:
    root = os.environ.get("POSTDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "postdiff-compile")
    return Path(root)


def embedded_default_path() -> Path:
    path = cache_dir() / NAME
    if not path.is_file():
        _write(path)
    return path


def _write(path: Path) -> None:
    from safetensors.torch import save_file

    config = {**get_family("sd15").config(), **TINY_OVERRIDES}
    config.pop("_class_name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = denoiser_class("UNet2DConditionModel").from_config(config)
    state = {original_source("ldm", k, config, LDM_PREFIX).name: v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"postdiff.note": "random weights: a demo model, not a trained one"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
