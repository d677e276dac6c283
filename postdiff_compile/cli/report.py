"""What the CLI shows: rich progress for long stages on stderr, a summary table on stdout."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..compile import CompileResult
from ..compile import Progress as ProgressCallbacks


class RichProgress(ProgressCallbacks):
    def __init__(self) -> None:
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> "RichProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._bar.live.transient = True  # on failure the error line alone should remain
        self._bar.__exit__(exc_type, exc, tb)

    def stage(self, name, total=None):
        task = self._bar.add_task(name, total=total)
        self._tasks[name] = task
        return lambda advance: self._bar.advance(task, advance)

    def done(self, name):
        task = self._tasks[name]
        total = self._bar.tasks[task].total
        self._bar.update(task, total=total or 1, completed=total or 1)


def print_summary(result: CompileResult) -> None:
    m = result.manifest
    console = Console()
    res = m["resolution"]
    console.print(f"[bold]{result.out}[/bold]: {m['source']['family']} ({m['source']['layout']} layout, "
                  f"{m['source']['prediction_type']}), {res['height']}x{res['width']} "
                  f"(latent {res['latent_height']}x{res['latent_width']}), {m['steps']} steps, "
                  f"{m['denoiser']['dtype']}")
    formats = [f for f in m["formats"] if f != "pt2"]
    table = Table("variant", "GFLOPs", "MB", "err torch", *(f"err {f}" for f in formats), title="relative L2 errors")
    for v in m["variants"]:
        size = sum(f["bytes"] for f in v["files"].values()) / 1e6
        table.add_row(v["id"], f"{v['flops']['paper'] / 1e9:.2f}", f"{size:.1f}", f"{v['verification']['rel_l2_error']:.2e}",
                      *(f"{v['files'][f]['verification']['rel_l2_error']:.2e}" for f in formats))
    console.print(table)
    if m["weights"]:
        console.print(f"shared ONNX weights: {m['weights']['file']}, {m['weights']['tensors']} tensors, "
                      f"{m['weights']['bytes'] / 1e6:.1f} MB")
    cfg = {k: v for k, v in m["config"].items() if k != "config_version"}
    console.print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    console.print(f"done in {result.seconds:.1f} s")
