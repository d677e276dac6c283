"""Train the reference model from scratch on procedural scenes, seeded and on CPU.

    python -m postdiff_compile.lab.reference.train --out DIR [--steps 1600] [--batch 32] [--seed 0]

The text encoder and the UNet train together on the epsilon objective with Min-SNR-5 weighting
(Hang et al. 2023: much faster convergence, which matters on a 2-core budget), 10% of captions dropped
for classifier-free guidance, and an EMA of the weights, which is what gets saved. The EMA decay warms up
as min(0.999, (1 + n) / (10 + n)): at 1600 steps it is 0.994, an average over the last ~180 steps. A quarter of the
steps train on the same scenes area-downsampled to 16x16: Stable Diffusion saw several resolutions in
training, and a model that has never denoised below 32x32 could not take mixed resolution's early
low-resolution steps at all. The log (one line per `--log-every` steps) goes to stdout and DIR/train_log.txt.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...models.families import get_family
from .model import FAMILY, TEXT_LENGTH, make_parts, save_folder
from ..scenes import make_batch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1600
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 100
    min_lr_fraction: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    low_res_fraction: float = 0.25     # share of steps at 16x16
    min_snr_gamma: float = 5.0
    seed: int = 0
    log_every: int = 25


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out: Path, threads: int | None = None) -> dict:
    from diffusers import DDPMScheduler

    from ..classifier import check_training_seeds

    check_training_seeds(cfg.seed, cfg.steps)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    parts = make_parts(cfg.seed)
    modules = torch.nn.ModuleDict({"unet": parts.unet, "text_encoder": parts.text_encoder}).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=0.01)
    scheduler = DDPMScheduler.from_config(get_family(FAMILY).scheduler())
    abar = scheduler.alphas_cumprod
    snr = abar / (1 - abar)
    weight_of_t = torch.clamp(snr, max=cfg.min_snr_gamma) / snr      # Min-SNR-gamma for epsilon prediction
    rng = torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.txt"
    history, start, window = [], time.perf_counter(), []
    with open(log_path, "w") as log:
        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        say(f"config {json.dumps(asdict(cfg))}; threads {torch.get_num_threads()}; "
            f"unet {sum(p.numel() for p in parts.unet.parameters()):,} params, "
            f"text encoder {sum(p.numel() for p in parts.text_encoder.parameters()):,}")
        for step in range(cfg.steps):
            images, captions, _ = make_batch(cfg.seed * 1_000_003 + step, cfg.batch)
            x0 = torch.from_numpy(images)
            if torch.rand((), generator=rng) < cfg.low_res_fraction:
                x0 = F.avg_pool2d(x0, 2)
            drop = torch.rand(cfg.batch, generator=rng) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            ids = parts.tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                                  return_tensors="pt").input_ids
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=rng)
            noise = torch.randn(x0.shape, generator=rng)
            xt = scheduler.add_noise(x0, noise, t)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            context = modules["text_encoder"](ids)[0]
            pred = modules["unet"](xt, t, context).sample
            per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (per_sample * weight_of_t[t]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), modules.parameters()):
                    e.lerp_(p, 1 - decay)
            window.append(per_sample.mean().item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                elapsed = time.perf_counter() - start
                mse = sum(window) / len(window)
                window = []
                history.append({"step": step + 1, "mse": mse, "seconds": elapsed})
                say(f"step {step + 1:5d}/{cfg.steps}  eps-mse {mse:.4f}  lr {lr_at(cfg, step):.2e}  "
                    f"{elapsed / 60:6.1f} min  ({elapsed / (step + 1):.2f} s/step)")
        seconds = time.perf_counter() - start
        final = sum(h["mse"] for h in history[-4:]) / len(history[-4:])
        say(f"done: {cfg.steps} steps in {seconds / 60:.1f} min; final eps-mse (mean of the last "
            f"{4 * cfg.log_every} steps) {final:.4f}")
    parts.unet.load_state_dict(ema["unet"].state_dict())
    parts.text_encoder.load_state_dict(ema["text_encoder"].state_dict())
    summary = {"config": asdict(cfg), "seconds": seconds, "final_mse": final, "history": history,
               "threads": torch.get_num_threads()}
    save_folder(parts, out, metadata={"postdiff.note": "reference model trained by postdiff_compile.lab.reference.train",
                                      "postdiff.train": json.dumps(asdict(cfg))})
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m postdiff_compile.lab.reference.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    train(cfg, args.out, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
