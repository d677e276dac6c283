"""A training checkpoint small enough to commit: the U-Net job's weights and EMA in float16, safetensors, no pickle.

    python -m postdiff_compile.lab.reference2.snapshot save --work DIR [--file FILE]
    python -m postdiff_compile.lab.reference2.snapshot restore --work DIR [--file FILE]

Why: the work folder and the home directory are not kept between sittings on every machine (on 7 Dec both were
gone, and with them 8375 of 12000 steps, about 7 hours). The full checkpoint (weights, EMA and AdamW's two moments
in float32: 72 MB) is too big to commit at every sitting; the snapshot is 18 MB. Restoring it writes a full checkpoint
in DIR with the weights and EMA rounded to float16 (relative error 5e-4, below one AdamW step's change at the
learning rates used) and AdamW's moments empty, so the learning rate warms up again over `REWARM` steps from the
snapshot's step (`UnetTrainer` reads `rewarm_from` from the state). A run resumed from a snapshot is therefore not
bit-identical to an uninterrupted one, as a run resumed from the full checkpoint is; the log says which it was.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ...errors import PostDiffError
from .checkpoint import load_checkpoint, save_atomic
from .train_unet import REWARM, UnetTrainConfig, UnetTrainer

DEFAULT = Path(__file__).resolve().parents[3] / "training" / "reference2_unet_snapshot.safetensors"


def save_snapshot(work: Path, to: Path = DEFAULT) -> Path:
    from safetensors.torch import save_file

    saved = load_checkpoint(Path(work) / "unet_checkpoint.pt")
    state = saved["state"]
    tensors = {f"modules.{k}": v.half().contiguous() for k, v in state["modules"].items()}
    tensors.update({f"ema.{k}": v.half().contiguous() for k, v in state["ema"].items()})
    tensors["generator"], tensors["torch_rng"] = state["generator"], saved["torch_rng"]
    meta = {"config": saved["config"], "step": str(saved["step"]), "history": json.dumps(saved["history"])}
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(to)
    return to


def restore_snapshot(work: Path, source: Path = DEFAULT) -> int:
    """DIR/unet_checkpoint.pt from the snapshot (refused if DIR has one: it is at least as good); its step."""
    from safetensors import safe_open

    work, source = Path(work), Path(source)
    target = work / "unet_checkpoint.pt"
    if target.exists():
        raise PostDiffError("a full checkpoint is already here; delete it to restore the snapshot instead", target)
    if not source.is_file():
        raise PostDiffError("no snapshot here", source)
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    step = int(meta["step"])
    trainer = UnetTrainer(UnetTrainConfig(**json.loads(meta["config"])), work / "vae")
    for part in ("modules", "ema"):
        getattr(trainer, part).load_state_dict({k[len(part) + 1:]: v.float() for k, v in tensors.items()
                                                if k.startswith(part + ".")})
    trainer.generator.set_state(tensors["generator"])
    trainer.steps_done, trainer.rewarm_from = step, step
    save_atomic({"config": meta["config"], "step": step, "history": json.loads(meta["history"]),
                 "state": trainer.state(), "torch_rng": tensors["torch_rng"]}, target)
    with open(work / "unet_log.txt", "a") as log:
        log.write(f"restored from the snapshot {source.name} at step {step} (float16 weights, AdamW moments reset, "
                  f"learning rate warmed up again over {REWARM} steps)\n")
    return step


def main(argv: list[str] | None = None) -> int:
    from .train_vae import run_cli

    parser = argparse.ArgumentParser(prog="python -m postdiff_compile.lab.reference2.snapshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--file", type=Path, default=DEFAULT, help=f"the snapshot (default: {DEFAULT})")
    args = parser.parse_args(argv)

    def job():
        if args.action == "save":
            print(f"snapshot written to {save_snapshot(args.work, args.file)}")
        else:
            print(f"{args.work / 'unet_checkpoint.pt'} restored from {args.file} at step "
                  f"{restore_snapshot(args.work, args.file)} (learning rate warms up again over {REWARM} steps)")
    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
