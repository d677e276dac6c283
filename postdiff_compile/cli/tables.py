"""The plain-text tables `postdiff-compile explain` prints: one config step by step, or every preset side by side."""
from __future__ import annotations

from ..explain import Explanation
from ..plan import switch_step_of


def format_explanation(ex: Explanation) -> str:
    def tera(value: int) -> str:
        return f"{value / 1e12:.3f}"

    switch = switch_step_of([s.step for s in ex.steps])
    mixed = (f"; steps 0-{switch - 1} at low resolution, latent {ex.low_res_latent[0]}x{ex.low_res_latent[1]}, "
             f"then the transition" if ex.low_res_latent else "")
    lines = [f"{ex.family} {ex.resolution[0]}x{ex.resolution[1]} (latent {ex.latent[0]}x{ex.latent[1]}), "
             f"{len(ex.steps)} steps{mixed}",
             "config: " + ", ".join(f"{k}={v}" for k, v in ex.config.to_dict().items() if k != "config_version"),
             "",
             f"{'step':>4}  {'variant':<24} {'res':<5}{'cfg':<4} {'reads':<22} {'writes':<22} "
             f"{'paper T':>8} {'true T':>8}" + (f" {'pred. ms':>9}" if ex.latency else "")]
    for i, s in enumerate(ex.steps):
        ms = ""
        if ex.latency:   # * marks a roofline estimate: the table has not measured that variant
            ms = f" {ex.latency.step_ms[i] + ex.latency.overhead_ms:>8.2f}{' ' if ex.latency.measured[i] else '*'}"
        lines.append(f"{s.step.index:>4}  {s.step.variant:<24} {'low' if s.step.low_res else 'full':<5}"
                     f"{'on' if s.step.cfg else 'off':<4} "
                     f"{','.join(s.step.reads) or '-':<22} {','.join(s.step.writes) or '-':<22} "
                     f"{tera(s.flops.paper):>8} {tera(s.flops.true):>8}{ms}")
    total = ex.total
    lines += ["",
              f"total, paper convention (conv+linear MACs x batch, no attention): {tera(total.paper)} T "
              f"= {total.paper / ex.baseline.paper:.1%} of the baseline's {tera(ex.baseline.paper)} T",
              f"total, true FLOPs (2 x MACs, attention included):                {tera(total.true)} T "
              f"= {total.true / ex.baseline.true:.1%} of the baseline's {tera(ex.baseline.true)} T"]
    if ex.latency:
        lat, base = ex.latency, ex.baseline_latency
        estimated = sum(not m for m in lat.measured)
        lines += [f"predicted latency on {lat.device}, {lat.backend}: {lat.total_ms:.1f} ms "
                  f"(runner {lat.overhead_ms:.3f} ms per step included) = {lat.total_ms / base.total_ms:.1%} of the "
                  f"baseline's {base.total_ms:.1f} ms: {base.total_ms / lat.total_ms:.2f}x, against "
                  f"{ex.baseline.true / total.true:.2f}x by FLOPs"]
        if estimated:
            lines.append(f"* {estimated} step(s) run variants the table has not measured: their roofline estimate, "
                         f"scaled by {lat.calibration:.2f} (measured / roofline of the measured variants)")
    return "\n".join(lines)


def format_preset_table(family: str, steps: int, results: dict[str, Explanation | str]) -> str:
    """One line per preset: FLOPs in both conventions and the fraction of the baseline (str: unavailable)."""
    any_result = next((r for r in results.values() if not isinstance(r, str)), None)
    head = f"{family}, {steps} steps" + (f", {any_result.resolution[0]}x{any_result.resolution[1]}" if any_result else "")
    timed = any_result is not None and any_result.latency is not None
    lines = [head, "", f"{'preset':<10} {'paper T':>9} {'fraction':>9} {'true T':>9} {'fraction':>9}"
             + (f" {'pred. ms':>9} {'fraction':>9}" if timed else "")]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"{name:<10} unavailable: {r}")
            continue
        total = r.total
        ms = f" {r.latency.total_ms:>9.1f} {r.latency.total_ms / r.baseline_latency.total_ms:>9.1%}" if timed else ""
        lines.append(f"{name:<10} {total.paper / 1e12:>9.3f} {total.paper / r.baseline.paper:>9.1%} "
                     f"{total.true / 1e12:>9.3f} {total.true / r.baseline.true:>9.1%}{ms}")
    return "\n".join(lines)
