"""Resumable training: atomic checkpoints, the log, the loss curve, and the loop that ties them together.

A training job (the VAE's, the U-Net's) is a `Trainer`: its state as a dict of tensors and state dicts, one
seeded step, and an export of the finished weights. `drive` runs it from step 0 or from the job's checkpoint
in the work folder, writes the checkpoint every `checkpoint_every` steps and when the sitting's time budget
runs out, so that training can span sittings of a fixed length; the resumed run is bit-identical to an
uninterrupted one (same threads), because all randomness comes from generators whose state is in the
checkpoint and the data of step k depends only on (seed, k).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from ...errors import PostDiffError


class Trainer(Protocol):
    name: str                       # "vae", "unet": names the checkpoint, the log and the curve
    export_each_sitting: bool       # export when a sitting stops early too (the U-Net: samples to look at)

    def state(self) -> dict: ...
    def load(self, state: dict) -> None: ...
    def train_step(self, step: int) -> dict[str, float]: ...
    def export(self, work: Path, say: Callable[[str], None]) -> dict: ...


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save beside `path`, fsync, then rename over it: a crash leaves the previous checkpoint or the new
    one, never a torn file, and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is data (tensors, numbers, strings); unpickling it runs no code from the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # torch raises several types for a file that is not a checkpoint
        raise PostDiffError(f"cannot read the training checkpoint ({type(err).__name__}); delete it to start "
                            "over", path) from None


def plot_curve(history: list[dict], path: Path, title: str) -> bool:
    """The logged losses against the step, as a PNG (False, and nothing written, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("step", "seconds")] if history else []
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([h["step"] for h in history], [h[key] for h in history], color="black", lw=1)
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        if key != "psnr" and all(h[key] > 0 for h in history):
            ax.set_yscale("log")    # losses fall over decades; PSNR is already logarithmic
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def drive(trainer: Trainer, config: dict, steps: int, work: Path, *, log_every: int, checkpoint_every: int,
          minutes: float | None = None, stop_at: int | None = None) -> dict:
    """Train `trainer` to `steps`, resuming from its checkpoint in `work`; export when all steps are done.

    Stops early, checkpointed, once `minutes` have passed (at a log boundary) or after step `stop_at`.
    Returns {"step", "done", "history", "export"}. `config` is what the run was started with: a checkpoint
    of another config is refused rather than silently continued under new settings.
    """
    if checkpoint_every % log_every:
        raise PostDiffError(f"checkpoint_every ({checkpoint_every}) must be a multiple of log_every ({log_every}): "
                            "a resumed run must log the same averages as an uninterrupted one")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / f"{trainer.name}_checkpoint.pt"
    step, history = 0, []
    extended = ""
    if ckpt_path.is_file():
        saved = load_checkpoint(ckpt_path)
        before = json.loads(saved["config"])
        # Only the step count may change between sittings (to extend a run; the cosine schedule is recomputed),
        # and the keys a trainer names in `changeable`, which its `check_resume` allows only where they change
        # steps not yet run.
        changeable = {"steps", *getattr(trainer, "changeable", ())}
        if {k: v for k, v in before.items() if k not in changeable} != \
                {k: v for k, v in config.items() if k not in changeable}:
            raise PostDiffError(f"the checkpoint was written with another config ({saved['config']}); train with "
                                "that config, or delete the checkpoint to start over", ckpt_path)
        if before["steps"] != config["steps"]:
            if saved["step"] > config["steps"]:
                raise PostDiffError(f"the checkpoint is at step {saved['step']}, past --steps {config['steps']}",
                                    ckpt_path)
            extended = f" (run changed from {before['steps']} to {config['steps']} steps; learning rate from here on " \
                       "follows the new schedule)"
        if hasattr(trainer, "check_resume"):
            trainer.check_resume(before, saved["step"], ckpt_path)
        trainer.load(saved["state"])
        torch.set_rng_state(saved["torch_rng"])
        step, history = saved["step"], saved["history"]
    with open(work / f"{trainer.name}_log.txt", "a") as log:
        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        def checkpoint() -> None:
            save_atomic({"config": json.dumps(config, sort_keys=True), "step": step, "history": history,
                         "state": trainer.state(), "torch_rng": torch.get_rng_state()}, ckpt_path)

        say(f"{trainer.name}: {'resuming at' if step else 'starting'} step {step}/{steps}{extended}; config "
            f"{json.dumps(config)}; threads {torch.get_num_threads()}")
        start, first, offset = time.perf_counter(), step, history[-1]["seconds"] if history else 0.0
        window: dict[str, list[float]] = {}
        while step < steps:
            for key, value in trainer.train_step(step).items():
                window.setdefault(key, []).append(value)
            step += 1
            if step % log_every and step != steps:
                continue
            elapsed = time.perf_counter() - start
            history.append({"step": step, **{k: sum(v) / len(v) for k, v in window.items()},
                            "seconds": offset + elapsed})
            window = {}
            say(f"step {step:6d}/{steps}  " + "  ".join(f"{k} {v:.4g}" for k, v in history[-1].items()
                                                        if k not in ("step", "seconds"))
                + f"  {(offset + elapsed) / 60:.1f} min total ({elapsed / (step - first):.2f}"
                  " s/step this sitting)")
            out_of_time = minutes is not None and elapsed >= 60 * minutes
            if step % checkpoint_every == 0 or step == steps or out_of_time or (stop_at and step >= stop_at):
                checkpoint()
            if step < steps and (out_of_time or (stop_at and step >= stop_at)):
                say(f"stopping at step {step} (checkpointed); run the same command again to resume")
                break
        if history:
            plot_curve(history, work / f"{trainer.name}_loss.png", f"{trainer.name} training (log of {work.name})")
        exported = trainer.export(work, say) if step >= steps or trainer.export_each_sitting else None
    return {"step": step, "done": step >= steps, "history": history, "export": exported}
