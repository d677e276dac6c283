"""The attribute classifier: reads a scene's attributes back from an image, and gives the features the
Frechet distance is computed on (the Inception-v3 of this project's FID analogue).

It is trained on fresh scenes from the generator (seeds below `TEST_SEED_BASE`, never the seeds the
metrics draw their prompts and real images from) and shipped inside the package, one per image size the
reference models work at (32 px: model 1, 64 px: model 2):

    python -m postdiff_compile.lab.classifier --out postdiff_compile/lab/weights/attribute_classifier.safetensors
    python -m postdiff_compile.lab.classifier --size 64 --out postdiff_compile/lab/weights/attribute_classifier_64.safetensors

At 64 px one more convolution block comes first (64 -> 32), so the features keep their meaning and width.
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
WEIGHTS = {32: "weights/attribute_classifier.safetensors", 64: "weights/attribute_classifier_64.safetensors"}


class AttributeClassifier(nn.Module):
    def __init__(self, size: int = 32):
        super().__init__()
        if size not in WEIGHTS:
            raise ValueError(f"the attribute classifier reads {sorted(WEIGHTS)} px images, not {size}")
        self.size = size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        first = [block(3, 16)] if size == 32 else [block(3, 8), block(8, 16)]     # -> 16
        self.body = nn.Sequential(*first, block(16, 32), block(32, 64))               # -> 4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        sizes = [n for _ in range(CELLS) for _, n in CELL_HEADS] + [n for _, n in IMAGE_HEADS]
        self.sizes = sizes
        self.heads = nn.Linear(FEATURES, sum(sizes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [n, FEATURES] of images in [-1, 1], [n, 3, size, size]."""
        if images.shape[-2:] != (self.size, self.size):
            raise ValueError(f"this attribute classifier reads {self.size}x{self.size} images, "
                             f"got {tuple(images.shape[-2:])}")
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
    size: int = 32              # image side: 32 (model 1) or 64 (model 2)
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
    model = AttributeClassifier(cfg.size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps)
    start = time.perf_counter()
    for step in range(cfg.steps):
        images, _, scenes = make_batch(cfg.seed * 1_000_003 + step, cfg.batch, cfg.size)
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


def load_classifier(path: str | Path | None = None, size: int = 32) -> AttributeClassifier:
    """The shipped classifier for `size` px images (or the one at `path`, whose file says its size), in eval
    mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        if size not in WEIGHTS:
            raise ValueError(f"no attribute classifier ships for {size} px images (sizes: {sorted(WEIGHTS)})")
        path = resources.files("postdiff_compile.lab") / WEIGHTS[size]
    with safe_open(str(path), "pt") as f:
        size = json.loads((f.metadata() or {}).get("train", "{}")).get("size", 32)
    model = AttributeClassifier(size)
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
    images, _, scenes = make_batch(TEST_SEED_BASE + 999, 2000, cfg.size)    # held out: metric seeds are never trained on
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
