"""Interleaved timing: rounds of one call of every run, the order rotated each round, so that drift on a shared
machine hits every run alike and no run always follows the same other one (what every benchmark here uses)."""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable


def interleaved_rounds(runs: dict[Hashable, Callable[[], object]], rounds: int, *,
                       sync: Callable[[], None] | None = None,
                       go_on: Callable[[dict[Hashable, list[float]]], bool] | None = None,
                       report: Callable[[int], None] | None = None) -> dict[Hashable, list[float]]:
    """Seconds per call of each run over `rounds` rounds.

    `sync()` is called before and after each timed call (a GPU's queue); `go_on(times)`, asked before every
    round after the first, ends the rounds early when false; `report(round_index)` follows each round. Every
    list holds one time per completed round.
    """
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    names = list(runs)
    for round_ in range(rounds if names else 0):
        if round_ and go_on is not None and not go_on(times):
            break
        shift = round_ % len(names)
        for key in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            runs[key]()
            if sync is not None:
                sync()
            times[key].append(time.perf_counter() - start)
        if report is not None:
            report(round_)
    return times
