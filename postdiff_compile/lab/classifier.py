"""The attribute classifier: reads a scene's attributes back from an image, and gives the features the
Frechet distance is computed on (the Inception-v3 of this project's FID analogue).

It is trained on fresh scenes from the generator (seeds below `TEST_SEED_BASE`, never the seeds the
metrics draw their prompts and real images from) and shipped inside the package:

    python -m postdiff_compile.lab.classifier --out postdiff_compile/lab/weights/attribute_classifier.safetensors
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attributes import CELL_HEADS, CELLS, IMAGE_HEADS, targets

FEATURES = 128
TEST_SEED_BASE = 10_000_000      # metric prompts and real images use seeds from here up; training below
WEIGHTS = "weights/attribute_classifier.safetensors"


class AttributeClassifier(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64))        # 32 -> 4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        sizes = [n for _ in range(CELLS) for _, n in CELL_HEADS] + [n for _, n in IMAGE_HEADS]
        self.sizes = sizes
        self.heads = nn.Linear(FEATURES, sum(sizes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [n, FEATURES] of images in [-1, 1], [n, 3, 32, 32]."""
        return self.embed(self.body(images))

    def logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.heads(self.features(images)).split(self.sizes, dim=1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Predicted targets in `attributes.targets`' layout."""
        return torch.stack([lg.argmax(1) for lg in self.logits(images)], dim=1).numpy()


@dataclass(frozen=True)
class ClassifierTrainConfig:
    steps: int = 2000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 1
    noise_std: float = 0.03     # a little pixel noise, so generated images' grain is not out of distribution


def check_training_seeds(seed: int, steps: int) -> None:
    """Training draws batch `step` from seed * 1_000_003 + step: all of it must stay below the metrics' seeds."""
    from ..errors import PostDiffError

    if seed < 0:
        raise PostDiffError(f"the training seed must be >= 0, got {seed}")
    if seed * 1_000_003 + steps > TEST_SEED_BASE:
        raise PostDiffError(f"training seed {seed} with {steps} steps would draw scenes from the metrics' held-out "
                            f"seeds (>= {TEST_SEED_BASE}); use a seed below {TEST_SEED_BASE // 1_000_003}")


def train_classifier(cfg: ClassifierTrainConfig, log=print) -> AttributeClassifier:
    from .scenes import make_batch

    check_training_seeds(cfg.seed, cfg.steps)
    torch.manual_seed(cfg.seed)
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps)
    start = time.perf_counter()
    for step in range(cfg.steps):
        images, _, scenes = make_batch(cfg.seed * 1_000_003 + step, cfg.batch)
        x = torch.from_numpy(images)
        x = x + cfg.noise_std * torch.randn_like(x)
        y = torch.from_numpy(targets(scenes))
        loss = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(model.logits(x)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{cfg.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s")
    return model.eval()


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """The shipped classifier (or one at `path`), in eval mode."""
    from safetensors.torch import load_file

    if path is None:
        path = resources.files("postdiff_compile.lab") / WEIGHTS
    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from .scenes import make_batch
    from .attributes import score

    parser = argparse.ArgumentParser(prog="python -m postdiff_compile.lab.classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int)
    for name, value in asdict(ClassifierTrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ClassifierTrainConfig(**{k: getattr(args, k) for k in asdict(ClassifierTrainConfig())})
    model = train_classifier(cfg)
    images, _, scenes = make_batch(TEST_SEED_BASE + 999, 2000)    # held out: metric seeds are never trained on
    scores = score(model.predict(torch.from_numpy(images)), targets(scenes))
    print(f"held-out real images: caption match {scores.caption_match:.4f}, "
          f"attribute accuracy {scores.attribute_accuracy:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"train": json.dumps(asdict(cfg)), "held_out": json.dumps(scores.to_json())})
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
