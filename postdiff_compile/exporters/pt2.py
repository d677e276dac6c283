"""Save a captured variant as a torch.export program file (.pt2)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import Captured


def save_pt2(captured: Captured, path: Path) -> Path:
    torch.export.save(captured.program, str(path))
    return path
