"""Train reference model 2's U-Net and text encoder in the latent space of its trained VAE, resumable.

    python -m postdiff_compile.lab.reference2.train_unet --work DIR [--steps 12000] [--minutes 140] [--threads 1]

DIR/vae/ must hold the VAE (train_vae). v-prediction on scaled-linear betas with zero terminal SNR (the
scheduler of model.py), the loss weighted by min(SNR + 1, gamma) / (SNR + 1): plain v-loss is x0-loss weighted
by SNR + 1 (Salimans & Ho 2022), capped at gamma as Min-SNR does (Hang et al. 2023); unlike Min-SNR's
min(SNR, gamma) it keeps a weight of 1 at the zero-SNR step, where the model must learn the caption's mean
image. 10% of captions dropped for classifier-free guidance; an EMA of the weights is what gets exported. A
quarter of the steps train on the scenes rendered at 32x32 (a 16x16 latent), so that the model can take
mixed resolution's low-resolution steps. Writes DIR/unet_checkpoint.pt (every `--checkpoint-every` steps and
when `--minutes` run out: run the same command again to resume), DIR/unet_log.txt, DIR/unet_loss.png, and,
after every sitting, DIR/model/: the EMA weights so far as a StableDiffusionPipeline folder (load it with
`reference2.load_pipeline`), so that a sitting's progress can be sampled and scored.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...errors import PostDiffError
from .checkpoint import drive
from .model import IMAGE_SIZE, TEXT_LENGTH, load_vae, make_parts, save_pipeline_folder, scheduler_config
from .train_vae import cosine_lr, job_main


REWARM = 100    # steps of linear learning-rate warm-up after a restored snapshot: AdamW's moments start from zero


@dataclass(frozen=True)
class UnetTrainConfig:
    steps: int = 12000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    min_lr_fraction: float = 0.1
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    low_res_fraction: float = 0.25      # share of steps on 32x32 renders (16x16 latents)
    snr_gamma: float = 5.0
    zero_snr: bool = True
    seed: int = 4                       # data seeds seed * 1_000_003 + step: below the metrics' held-out seeds
    log_every: int = 25
    checkpoint_every: int = 100


class UnetTrainer:
    name = "unet"
    export_each_sitting = True      # DIR/model after every sitting: progress can be sampled and scored

    def __init__(self, cfg: UnetTrainConfig, vae_folder: Path):
        from diffusers import DDIMScheduler

        if not (vae_folder / "config.json").is_file():
            raise PostDiffError("no trained VAE here; run python -m postdiff_compile.lab.reference2.train_vae "
                                "with the same --work first", vae_folder)
        self.cfg = cfg
        self.parts = make_parts(load_vae(vae_folder).requires_grad_(False), cfg.seed)
        self.modules = torch.nn.ModuleDict({"unet": self.parts.unet, "text_encoder": self.parts.text_encoder}).train()
        self.ema = copy.deepcopy(self.modules).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.modules.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.scheduler = DDIMScheduler.from_config(scheduler_config(cfg.zero_snr))
        abar = self.scheduler.alphas_cumprod
        snr = abar / (1 - abar)
        self.weight = torch.clamp(snr + 1, max=cfg.snr_gamma) / (snr + 1)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.steps_done = 0
        self.rewarm_from: int | None = None    # set by a restored snapshot (snapshot.py): AdamW's moments were reset

    def state(self) -> dict:
        return {"modules": self.modules.state_dict(), "ema": self.ema.state_dict(), "steps_done": self.steps_done,
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "rewarm_from": self.rewarm_from}

    def load(self, state: dict) -> None:
        self.modules.load_state_dict(state["modules"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.steps_done = state["steps_done"]
        self.rewarm_from = state.get("rewarm_from")

    @torch.no_grad()
    def latents(self, step: int) -> tuple[torch.Tensor, list[str]]:
        from ..scenes import make_batch

        cfg, g = self.cfg, self.generator
        size = IMAGE_SIZE // 2 if torch.rand((), generator=g) < cfg.low_res_fraction else IMAGE_SIZE
        images, captions, _ = make_batch(cfg.seed * 1_000_003 + step, cfg.batch, size)
        vae = self.parts.vae
        z = vae.encode(torch.from_numpy(images)).latent_dist.sample(generator=g) * vae.config.scaling_factor
        drop = torch.rand(cfg.batch, generator=g) < cfg.caption_dropout
        return z, ["" if d else c for c, d in zip(captions, drop.tolist())]

    def train_step(self, step: int) -> dict[str, float]:
        cfg, g = self.cfg, self.generator
        x0, captions = self.latents(step)
        ids = self.parts.tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                                   return_tensors="pt").input_ids
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        lr = cosine_lr(cfg.lr, cfg.warmup, cfg.min_lr_fraction, cfg.steps, step)
        if self.rewarm_from is not None:
            lr *= min(1.0, (step + 1 - self.rewarm_from) / REWARM)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pred = self.modules["unet"](xt, t, self.modules["text_encoder"](ids)[0]).sample
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * self.weight[t]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))     # warm-up: early EMA is not the random init
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.modules.parameters()):
                e.lerp_(p, 1 - decay)
        self.steps_done = step + 1
        return {"loss": loss.item(), "v_mse": per_sample.mean().item()}

    def export(self, work: Path, say) -> dict:
        """DIR/model: the EMA weights as a pipeline folder (replaced atomically at each sitting's end)."""
        parts = copy.copy(self.parts)
        parts.unet, parts.text_encoder = self.ema["unet"], self.ema["text_encoder"]
        meta = {"postdiff.note": "reference model 2, trained by postdiff_compile.lab.reference2.train_unet",
                "postdiff.train": json.dumps(asdict(self.cfg)), "postdiff.step": str(self.steps_done)}
        folder = save_pipeline_folder(parts, work / "model", scheduler_config(self.cfg.zero_snr), meta)
        say(f"pipeline written to {folder} (EMA weights after step {self.steps_done})")
        return {"folder": str(folder), "step": self.steps_done}


def train_unet(cfg: UnetTrainConfig, work: Path, minutes: float | None = None, stop_at: int | None = None,
               threads: int | None = None) -> dict:
    from ..classifier import check_training_seeds

    check_training_seeds(cfg.seed, cfg.steps)
    if threads:
        torch.set_num_threads(threads)
    work = Path(work)
    return drive(UnetTrainer(cfg, work / "vae"), asdict(cfg), cfg.steps, work, log_every=cfg.log_every,
                 checkpoint_every=cfg.checkpoint_every, minutes=minutes, stop_at=stop_at)


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m postdiff_compile.lab.reference2.train_unet", __doc__, UnetTrainConfig(),
                    train_unet)


if __name__ == "__main__":
    raise SystemExit(main())
