"""benchmarks/latency_flux.py (latency_cpu.py --model flux) without running it: the hook configs it times are the
defaults diffusers documents, and its results page says what the run found (FLOPs, fidelity, failures)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))   # latency_flux imports `common` as the scripts do
spec = importlib.util.spec_from_file_location("latency_flux", ROOT / "benchmarks" / "latency_flux.py")
latency_flux = importlib.util.module_from_spec(spec)
spec.loader.exec_module(latency_flux)


class _Pipe:
    current_timestep = 421


def test_the_hooks_run_at_their_documented_defaults():
    configs = {name: latency_flux.describe(latency_flux.hook_config(name, _Pipe()))
               for name in (*latency_flux.HOOKS, "FasterCache, guidance-distilled")}
    assert configs["FirstBlockCache"] == {"class": "FirstBlockCacheConfig", "threshold": 0.05}
    pab = configs["PyramidAttentionBroadcast"]
    assert pab["spatial_attention_block_skip_range"] == 2 and pab["spatial_attention_timestep_skip_range"] == [100, 800]
    faster, distilled = configs["FasterCache"], configs["FasterCache, guidance-distilled"]
    assert faster["is_guidance_distilled"] is False and distilled["is_guidance_distilled"] is True
    assert {k: v for k, v in faster.items() if k != "is_guidance_distilled"} == \
        {k: v for k, v in distilled.items() if k != "is_guidance_distilled"}
    assert faster["spatial_attention_block_skip_range"] == 2 and faster["unconditional_batch_skip_range"] == 5
    taylor = configs["TaylorSeer"]
    assert (taylor["cache_interval"], taylor["disable_cache_before_step"], taylor["max_order"]) == (5, 3, 1)
    assert latency_flux.hook_config("PyramidAttentionBroadcast", _Pipe()).current_timestep_callback() == 421


def test_the_results_page_reports_flops_fidelity_and_failures():
    rows = [{"row": "diffusers", "median_s": 20.0, "runs_s": [20.0], "first_call_s": 21.0, "speedup": 1.0,
             "rel_l2_vs_diffusers": 0.0, "psnr_db": None, "ssim": 1.0, "flops_true": 2.0e12,
             "flops_by": "FlopCounterMode", "flops_ideal_speedup": 1.0, "speedup_over_ideal": 1.0},
            {"row": "FirstBlockCache", "median_s": 21.0, "runs_s": [21.0], "first_call_s": 22.0, "speedup": 0.952,
             "rel_l2_vs_diffusers": 0.0, "psnr_db": None, "ssim": 1.0, "flops_true": 2.0e12,
             "flops_by": "FlopCounterMode", "flops_ideal_speedup": 1.0, "speedup_over_ideal": 0.952},
            {"row": "balanced/eager", "median_s": 10.0, "runs_s": [10.0], "first_call_s": 30.0, "speedup": 2.0,
             "rel_l2_vs_diffusers": 0.5, "psnr_db": 18.25, "ssim": 0.3, "flops_true": 0.8e12, "flops_by": "explain",
             "flops_ideal_speedup": 2.5, "speedup_over_ideal": 0.8}]
    result = {"model": "FLUX (reduced)", "steps": 20, "guidance": "embedded guidance 3.5, no CFG batch", "rounds": 3,
              "machine": {"cpu": "AMD EPYC", "threads": 2, "torch": "2.13", "load_average_start": [3.0, 3.0, 3.0],
                          "load_average_end": [5.0, 5.0, 5.0]},
              "diffusers": "0.42.1", "command": "python benchmarks/latency_cpu.py --model flux --rounds 3",
              "flops_baseline": {"explain": 2.0e12, "FlopCounterMode": 2.0e12}, "rows": rows,
              "skipped": {"FasterCache": "failed: IndexError: tuple index out of range"},
              "configs": {"FirstBlockCache": {"class": "FirstBlockCacheConfig", "threshold": 0.05}}}
    text = "\n".join(latency_flux.markdown(result))
    assert "| balanced/eager | 10.00 | 2.00x | 0.800 | 2.50x | 0.80 | 18.2 | 0.3000 | 0.5 | 30.0 |" in text
    assert "| diffusers | 20.00 | 1.00x | 2.000 | 1.00x | 1.00 | identical | 1.0000 | 0 | 21.0 |" in text
    assert "explain 2.000 T, FlopCounterMode 2.000 T" in text
    assert "computed every block at every step in this run: FirstBlockCache." in text
    assert "- FasterCache: failed: IndexError" in text
    assert "other processes were running during this run" in text
    assert '- FirstBlockCache: `{"class": "FirstBlockCacheConfig", "threshold": 0.05}`' in text
    # The end of the timing tells: this run's 2 threads alone make about 2 (the start still holds the minute before).
    result["machine"]["load_average_end"] = [2.05, 2.0, 2.0]
    assert "other processes were running" not in "\n".join(latency_flux.markdown(result))
