"""Train reference model 2's autoencoder on procedural scenes at 64x64, seeded, resumable across sittings.

    python -m postdiff_compile.lab.reference2.train_vae --work DIR [--steps 3600] [--minutes 140] [--threads 1]

L1 reconstruction plus a KL term weighted 1e-6 (SD's VAE; without its LPIPS and GAN terms, which flat shapes
do not need), first on random 32x32 crops of the 64x64 renders (a quarter of the cost per image), then for the
last `--whole-steps` on whole images: the convolutions see the same thing in a crop, but GroupNorm's statistics
are the whole input's, and a VAE that met only crops reconstructs whole images 10 dB worse. Writes DIR/vae_checkpoint.pt every `--checkpoint-every` steps and
when `--minutes` run out (run the same command again to resume), DIR/vae_log.txt, DIR/vae_loss.png and, when
all steps are done, DIR/vae/ (diffusers AutoencoderKL folder, float16) with its scaling factor set to
1 / std of the latents, and DIR/vae_summary.json with the held-out reconstruction PSNR.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import drive
from .model import IMAGE_SIZE, make_vae, replace_folder, save_module


@dataclass(frozen=True)
class VaeTrainConfig:
    steps: int = 3600
    batch: int = 16
    crop: int = 32               # side of the random crops trained on (IMAGE_SIZE: whole images)
    # The last `whole_steps` steps train on whole images: GroupNorm normalises over the whole input, so a VAE
    # trained on crops only meets other statistics on whole images (32.3 dB on 32x32 crops, 21.8 dB on the same
    # scenes whole after 3000 crop steps, measured on held-out scenes).
    whole_steps: int = 600
    lr: float = 2e-3            # 19.7 dB after 230 steps against 16.2 after 130 (17.3 at 150) with 1e-3
    warmup: int = 100
    min_lr_fraction: float = 0.05
    kl_weight: float = 1e-6
    scale_images: int = 256      # scenes the latents' std (the scaling factor) is measured on, after training
    held_out_images: int = 128   # held-out scenes the final reconstruction PSNR is measured on
    seed: int = 3                # data seeds seed * 1_000_003 + step: below the metrics' held-out seeds
    log_every: int = 25
    checkpoint_every: int = 100


def cosine_lr(lr: float, warmup: int, min_fraction: float, steps: int, step: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b).pow(2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-12))


class VaeTrainer:
    name = "vae"
    export_each_sitting = False     # U-Net training reads DIR/vae: it must appear only when finished
    changeable = ("whole_steps",)   # a finished crop run can be extended with whole-image steps

    def check_resume(self, before: dict, step: int, path: Path) -> None:
        from ...errors import PostDiffError

        def whole_from(cfg: dict) -> int:
            return cfg["steps"] - cfg.get("whole_steps", 0)

        now = asdict(self.cfg)
        if whole_from(now) != whole_from(before) and min(whole_from(now), whole_from(before)) < step:
            raise PostDiffError(f"--whole-steps and --steps would change steps already run (whole images from step "
                                f"{whole_from(before)} before, {whole_from(now)} now; the checkpoint is at step "
                                f"{step}): only steps after the checkpoint may change", path)

    def __init__(self, cfg: VaeTrainConfig):
        self.cfg = cfg
        self.vae = make_vae(cfg.seed).train()
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=cfg.lr, weight_decay=1e-4)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def state(self) -> dict:
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def batch(self, step: int) -> torch.Tensor:
        from ..scenes import make_batch

        images = torch.from_numpy(make_batch(self.cfg.seed * 1_000_003 + step, self.cfg.batch, IMAGE_SIZE)[0])
        if self.cfg.crop >= IMAGE_SIZE or step >= self.cfg.steps - self.cfg.whole_steps:
            return images
        # Even offsets keep each crop on the latent grid of the whole image (factor 2).
        top, left = (2 * torch.randint(0, (IMAGE_SIZE - self.cfg.crop) // 2 + 1, (2, len(images)),
                                       generator=self.generator)).tolist()
        return torch.stack([im[:, y:y + self.cfg.crop, x:x + self.cfg.crop] for im, y, x in zip(images, top, left)])

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        x = self.batch(step)
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=self.generator)).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()      # per pixel value, so kl_weight does not depend on the crop
        loss = l1 + cfg.kl_weight * kl
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, cfg.warmup, cfg.min_lr_fraction, cfg.steps, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.optimizer.step()
        return {"l1": l1.item(), "kl": kl.item(), "psnr": psnr_db(recon.detach(), x)}

    @torch.no_grad()
    def export(self, work: Path, say) -> dict:
        """The VAE folder, with the scaling factor that gives its latents unit std, and held-out PSNR."""
        from ..classifier import TEST_SEED_BASE
        from ..scenes import make_batch

        vae = self.vae.eval()
        scale_images = torch.from_numpy(make_batch(self.cfg.seed * 1_000_003 + self.cfg.steps, self.cfg.scale_images,
                                                IMAGE_SIZE)[0])
        latents = torch.cat([vae.encode(c).latent_dist.sample(generator=self.generator)
                             for c in scale_images.split(64)])
        scaling = float(1 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        held_out = torch.from_numpy(make_batch(TEST_SEED_BASE + 4242, self.cfg.held_out_images, IMAGE_SIZE)[0])
        recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in held_out.split(64)])
        summary = {"config": asdict(self.cfg), "scaling_factor": scaling, "held_out_psnr_db": psnr_db(recon, held_out),
                   "latent_mean": float(latents.mean()), "latent_std": float(latents.std())}
        tmp = work / ".vae.partial"
        save_module(vae, tmp, "diffusion_pytorch_model.safetensors",
                    {"postdiff.note": "reference model 2's VAE, trained by postdiff_compile.lab.reference2.train_vae",
                     "postdiff.train": json.dumps(asdict(self.cfg))})
        replace_folder(tmp, work / "vae")
        (work / "vae_summary.json").write_text(json.dumps(summary, indent=1))
        say(f"vae written to {work / 'vae'}: scaling factor {scaling:.4f}, held-out reconstruction PSNR "
            f"{summary['held_out_psnr_db']:.2f} dB ({self.cfg.held_out_images} held-out scenes, latent mode)")
        return summary


def train_vae(cfg: VaeTrainConfig, work: Path, minutes: float | None = None, stop_at: int | None = None,
              threads: int | None = None) -> dict:
    from ..classifier import check_training_seeds

    check_training_seeds(cfg.seed, cfg.steps + 1)      # + 1: the batch the scaling factor is measured on
    if threads:
        torch.set_num_threads(threads)
    return drive(VaeTrainer(cfg), asdict(cfg), cfg.steps, work, log_every=cfg.log_every,
                 checkpoint_every=cfg.checkpoint_every, minutes=minutes, stop_at=stop_at)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, required=True, help="work folder: checkpoints, logs, curves, outputs")
    parser.add_argument("--minutes", type=float, default=140.0,
                        help="stop (checkpointed) after this many minutes of this sitting (default: 140)")
    parser.add_argument("--stop-at", type=int, help="stop (checkpointed) after this step")
    # One thread by default: with other processes on the 2 cores, two threads measured 3-8x slower per step than one
    # (U-Net, batch 32: 10.8-31.6 s against 3.5-4.3 s); use 2 only on a quiet machine.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")


def add_config_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """One --flag per field of a training config dataclass, typed like its default."""
    def boolean(text: str) -> bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")

    for name, value in asdict(defaults).items():
        kind = boolean if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help=f"(default: {value})")


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m postdiff_compile.lab.reference2.train_vae", __doc__, VaeTrainConfig(), train_vae)


def job_main(argv: list[str] | None, prog: str, doc: str, defaults, train) -> int:
    """A training job's command line: the common arguments, one flag per field of its config dataclass `defaults`,
    then `train(config, work, minutes, stop_at, threads)` through run_cli."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    add_config_arguments(parser, defaults)
    args = parser.parse_args(argv)
    cfg = type(defaults)(**{k: getattr(args, k) for k in asdict(defaults)})
    return run_cli(lambda: train(cfg, args.work, args.minutes, args.stop_at, args.threads))


def run_cli(job) -> int:
    """0 when the job ran (finished or checkpointed to resume); `error: ...` on one line and 2 for bad input."""
    import sys

    from ...errors import PostDiffError

    try:
        job()
    except PostDiffError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
