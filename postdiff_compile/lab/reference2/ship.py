"""Put a trained model 2 into the package, where the CLI's default and the lab's commands load it from.

    python -m postdiff_compile.lab.reference2.ship WORK/model

The shipped folder is `lab/reference2/weights/`, a diffusers pipeline folder whose `vae/` is the trained VAE that
`train_unet` encodes with (docs/reference2.md). So that the shipped U-Net never sits on a VAE it was not trained
against, the model's VAE must hold the same tensors as the one already there. The issue caps the shipped model at
15 MB; the weights are float16 (loading upcasts). The folder is written beside the old one and swapped in whole.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ...errors import PostDiffError
from . import is_model2_folder, shipped_folder

LIMIT_BYTES = 15 * 1024 * 1024
PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_same_vae(model: Path, shipped: Path) -> None:
    ours, theirs = _tensors(shipped / VAE_WEIGHTS), _tensors(model / VAE_WEIGHTS)
    if ours.keys() != theirs.keys() or any(not ours[k].equal(theirs[k]) for k in ours):
        raise PostDiffError(f"this model's VAE is not the shipped one ({shipped / VAE_WEIGHTS}); its U-Net was trained "
                            "on another latent space", model / VAE_WEIGHTS)


def ship(model: Path, to: Path | None = None) -> Path:
    """Copy the pipeline folder `model` (train_unet's WORK/model) to `to` (default: the package's); the folder."""
    from .model import replace_folder

    model, to = Path(model), Path(to) if to is not None else shipped_folder()
    if not is_model2_folder(model):
        raise PostDiffError("not a reference-model-2 folder (model_index.json without postdiff_family 'scenes64')",
                            model)
    missing = [p for p in PARTS if not (model / p).exists()]
    if missing:
        raise PostDiffError(f"the model folder lacks {', '.join(missing)}", model)
    keep_vae = (to / VAE_WEIGHTS).is_file()
    if keep_vae:   # the same tensors; the shipped copy's config has no training folder's path in it
        check_same_vae(model, to)
    size = sum(folder_bytes(model / p) if (model / p).is_dir() else (model / p).stat().st_size for p in PARTS)
    if size > LIMIT_BYTES:
        raise PostDiffError(f"{size / 2**20:.1f} MB is over the {LIMIT_BYTES / 2**20:.0f} MB the package allows", model)
    tmp = to.with_name(f".{to.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part in PARTS:
        source = to / part if part == "vae" and keep_vae else model / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / part)
    replace_folder(tmp, to)
    return to


def main(argv: list[str] | None = None) -> int:
    from .train_vae import run_cli

    parser = argparse.ArgumentParser(prog="python -m postdiff_compile.lab.reference2.ship", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the pipeline folder train_unet wrote (WORK/model)")
    parser.add_argument("--to", type=Path, help="default: the package's lab/reference2/weights")
    args = parser.parse_args(argv)

    def job():
        to = ship(args.model, args.to)
        print(f"shipped {args.model} to {to} ({folder_bytes(to) / 2**20:.1f} MB)")
    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
