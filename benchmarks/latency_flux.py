"""FLUX latency on this CPU, one process: plain diffusers, our presets, and diffusers' own cache hooks.

    python benchmarks/latency_cpu.py --model flux [--rounds 3] [--steps 20] [--resolution 512]
                                     [--presets none,quality,balanced,fast] [--hooks FirstBlockCache,...]

The model is FLUX.1-dev's transformer architecture (FluxTransformer2DModel: in_channels 64, head width 128, rotary
axes (16, 56, 56), joint_attention_dim 4096, pooled 768, guidance embedding) with seeded random weights, reduced
to what two CPU cores run in reasonable time: REDUCED below, 4 heads (width 512 instead of 3072) and 4 double-stream
+ 8 single-stream blocks (instead of 19 + 38), 73.5 M parameters. Measured on the 2-core machine it was chosen on:
one step at 512x512 (latent 64x64, 1024 image tokens + 512 text tokens) takes about 1.3 s, so a 20-step generation
about 25 s (width 256 ran at half the arithmetic rate, overhead-bound; the full depth would take ~5x longer). The
text length is FLUX-dev's 512 T5 tokens. Inputs: random, fixed prompt_embeds [1, 512, 4096] and
pooled_prompt_embeds [1, 768]; the pipeline is diffusers' FluxPipeline without text encoders, FLUX-dev's
scheduler (FlowMatchEulerDiscreteScheduler, dynamic shift) and guidance 3.5 (embedded: FLUX-dev has no CFG batch).

Only the denoising loop is timed (output_type="latent"). The VAE (a small random AutoencoderKL with FLUX's 16 latent
channels, scale and shift) decodes each row's latents once, outside the timing, for the fidelity columns: PSNR and
SSIM of the decoded image against plain diffusers' (same seed, same inputs).

Rows:
  diffusers            the plain FluxPipeline (the baseline)
  <preset>/eager       optimize(pipe, preset) for each preset available for the flux family
  FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer
                       diffusers' hooks through pipe.transformer.enable_cache(config), at the defaults their
                       config classes document (hook_config; the results record each config as run); each hook
                       has its own pipeline and its own copy of the transformer, so no row sees another's hooks
  FasterCache, guidance-distilled
                       FasterCache's defaults fail on FLUX-dev (they split a CFG batch it does not have); this
                       row is those defaults with is_guidance_distilled=True
A row that fails is recorded with its error, not dropped silently.
FLOPs: the hook rows and diffusers are counted on their actual run (torch.utils.flop_counter.FlopCounterMode, with
CPU flash attention added to its table); our presets by `explain` on the reduced architecture. Both are true FLOPs
(2 x MACs of the matmuls, convolutions and attention); the results record explain's count of the baseline beside
the counter's, so the two conventions can be compared.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from common import cpu_name, interleaved_rounds, provenance, write_results   # benchmarks/ on sys.path

# FLUX.1-dev's bundled config (postdiff_compile/models/configs/flux_dev_transformer.json) with these overrides.
REDUCED = dict(num_attention_heads=4, num_layers=4, num_single_layers=8)
TEXT_LENGTH = 512    # FLUX-dev's pipeline pads T5 to 512 tokens
GUIDANCE = 3.5       # FluxPipeline's default guidance_scale, fed to the guidance embedding
HOOKS = ("FirstBlockCache", "PyramidAttentionBroadcast", "FasterCache", "TaylorSeer")


def flux_config() -> dict:
    from postdiff_compile.models.families import get_family

    config = get_family("flux").config()
    config.update(REDUCED)
    return config


def flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = {k: v for k, v in flux_config().items() if not k.startswith("_")}
    return FluxTransformer2DModel.from_config(config).eval().requires_grad_(False)


def flux_vae(seed: int = 0):
    """A small random VAE with FLUX's latent layout: 16 channels, factor 8, FLUX.1's scaling and shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                         use_post_quant_conv=False).eval().requires_grad_(False)


def pipeline_factory(transformer, vae):
    """make(own_transformer=None): a FluxPipeline without text encoders, with its own scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from postdiff_compile.models.families import get_family

    scheduler = get_family("flux").scheduler()

    def make(own_transformer=None):
        pipe = FluxPipeline(transformer=own_transformer if own_transformer is not None else transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler), vae=vae,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def hook_config(name: str, pipe):
    """The config `name` runs with: its config class's documented defaults, plus what 0.42.1 requires of the caller
    (PAB and FasterCache read the timestep through current_timestep_callback, which has no default)."""
    from diffusers import hooks   # the same classes as diffusers' top level exports

    timestep = dict(current_timestep_callback=lambda: pipe.current_timestep)
    if name == "FirstBlockCache":
        return hooks.FirstBlockCacheConfig()
    if name == "PyramidAttentionBroadcast":   # skip range None for all three: the hook then uses spatial 2 (with a
        # warning); set here as the docs' example sets it, which is the same configuration
        return hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, **timestep)
    if name == "FasterCache":
        return hooks.FasterCacheConfig(**timestep)
    if name == "FasterCache, guidance-distilled":   # the one change FLUX-dev needs: it has no unconditional batch
        return hooks.FasterCacheConfig(is_guidance_distilled=True, **timestep)
    if name == "TaylorSeer":
        return hooks.TaylorSeerCacheConfig()
    raise ValueError(name)


def describe(config) -> dict:
    """A hook config as JSON: its fields, callables by name."""
    out = {"class": type(config).__name__}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = (f"<callable {getattr(value, '__qualname__', type(value).__name__)}>" if callable(value)
                           else str(value) if isinstance(value, torch.dtype) else
                           list(value) if isinstance(value, tuple) else value)
    return out


def flop_counter():
    """FlopCounterMode that also counts CPU flash attention (its table has the CUDA kernels only)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash})


def decode(pipe, latents: torch.Tensor, res: int) -> torch.Tensor:
    """FluxPipeline's own decode of packed latents, as its non-latent output types run it: images in [0, 1]."""
    unpacked = pipe._unpack_latents(latents, res, res, pipe.vae_scale_factor)
    unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.image_processor.postprocess(pipe.vae.decode(unpacked, return_dict=False)[0], output_type="pt")


def run(args, parser) -> int:
    from postdiff_compile import optimize
    from postdiff_compile.config import PRESETS, resolve_config
    from postdiff_compile.errors import PostDiffError
    from postdiff_compile.explain import explain
    from postdiff_compile.metrics.quality import psnr, ssim
    from postdiff_compile.models.families import get_family
    from postdiff_compile.verification import rel_l2

    torch.set_grad_enabled(False)
    res = args.resolution or 512
    hooks = [h for h in args.hooks.split(",") if h]
    unknown = [h for h in hooks if h not in HOOKS] + [p for p in args.presets.split(",") if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset or hook: {', '.join(unknown)}")
    if "FasterCache" in hooks:   # its defaults assume a CFG batch; the row that FLUX-dev can run follows it
        hooks.insert(hooks.index("FasterCache") + 1, "FasterCache, guidance-distilled")
    load_start = os.getloadavg()
    family = get_family("flux")
    config_dict = flux_config()
    transformer, vae = flux_transformer(), flux_vae()
    parameters = sum(p.numel() for p in transformer.parameters())
    make = pipeline_factory(transformer, vae)
    gen = torch.Generator().manual_seed(0)
    call = dict(prompt_embeds=torch.randn(1, TEXT_LENGTH, config_dict["joint_attention_dim"], generator=gen),
                pooled_prompt_embeds=torch.randn(1, config_dict["pooled_projection_dim"], generator=gen),
                guidance_scale=GUIDANCE, height=res, width=res, num_inference_steps=args.steps, output_type="latent")

    def seeded():
        return torch.Generator().manual_seed(0)

    runs, notes, configs_run, counted, explained = {}, {}, {}, {}, {}
    plain = make()
    runs["diffusers"] = lambda: plain(**call, generator=seeded()).images
    counted["diffusers"] = None
    # Our presets: one pipeline (its own transformer) optimized for each in turn, so they share one variant store;
    # each call swaps in its preset's runtime state (optimize() itself is not timed).
    ours, states = make(copy.deepcopy(transformer)), {}
    for preset in args.presets.split(","):
        try:
            config = resolve_config(preset, family="flux")
        except PostDiffError as err:   # e.g. `fast`, where it is not built for flux
            notes[f"{preset}/eager"] = f"not available: {err}"
            continue
        states[preset] = optimize(ours, config)._postdiff
        configs_run[f"{preset}/eager"] = config.to_dict()
        explained[f"{preset}/eager"] = config

        def ours_run(preset=preset):
            ours._postdiff = states[preset]
            return ours(**call, generator=seeded()).images
        runs[f"{preset}/eager"] = ours_run
    for name in hooks:
        pipe = make(copy.deepcopy(transformer))
        try:
            config = hook_config(name, pipe)
            configs_run[name] = describe(config)
            pipe.transformer.enable_cache(config)
        except Exception as err:
            notes[name] = f"failed to enable: {type(err).__name__}: {err}"
            traceback.print_exc()
            continue
        runs[name] = lambda pipe=pipe: pipe(**call, generator=seeded()).images
        counted[name] = None

    flops = {row: explain(family, config, steps=args.steps, resolution=(res, res), denoiser_config=config_dict).total
             for row, config in explained.items()}
    explain_baseline = explain(family, resolve_config("none", family="flux"), steps=args.steps, resolution=(res, res),
                               denoiser_config=config_dict).total

    outputs, first = {}, {}
    for row, fn in list(runs.items()):   # first calls (captures for ours; FLOPs counted for the others), untimed
        start = time.perf_counter()
        try:
            if row in counted:
                with flop_counter() as counter:
                    outputs[row] = fn()
                counted[row] = counter.get_total_flops()
            else:
                outputs[row] = fn()
        except Exception as err:   # a hook that cannot run this model must not lose the other rows
            frame = traceback.extract_tb(err.__traceback__)[-1]
            notes[row] = (f"failed: {type(err).__name__}: {err} (raised at {Path(frame.filename).name}:{frame.lineno}, "
                          f"`{frame.line}`)")
            traceback.print_exc()
            del runs[row]
            continue
        first[row] = time.perf_counter() - start
        print(f"first call {row}: {first[row]:.1f} s", file=sys.stderr, flush=True)
    names = list(runs)
    times = interleaved_rounds(runs, args.rounds, report=lambda round_: print(
        f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True))
    load_end = os.getloadavg()

    images = {row: decode(plain, latents, res) for row, latents in outputs.items()}
    base = statistics.median(times["diffusers"])
    rows = []
    for row in names:
        median = statistics.median(times[row])
        entry = {"row": row, "median_s": round(median, 3), "runs_s": [round(t, 3) for t in times[row]],
                 "first_call_s": round(first[row], 1), "speedup": round(base / median, 3),
                 "rel_l2_vs_diffusers": rel_l2(outputs[row], outputs["diffusers"]),
                 "psnr_db": _finite(float(psnr(images[row], images["diffusers"]))),
                 "ssim": round(float(ssim(images[row], images["diffusers"])), 4)}
        if row in flops:
            entry.update(flops_true=flops[row].true, flops_by="explain",
                         flops_ideal_speedup=round(explain_baseline.true / flops[row].true, 3))
        elif counted.get(row):
            entry.update(flops_true=counted[row], flops_by="FlopCounterMode",
                         flops_ideal_speedup=round(counted["diffusers"] / counted[row], 3))
        if "flops_ideal_speedup" in entry:
            entry["speedup_over_ideal"] = round(base / median / entry["flops_ideal_speedup"], 3)
        if row in notes:
            entry["note"] = notes[row]
        rows.append(entry)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "load_average_start": [round(x, 2) for x in load_start],
               "load_average_end": [round(x, 2) for x in load_end]}
    import diffusers

    model = (f"FLUX.1-dev-architecture transformer reduced to {REDUCED['num_attention_heads']} heads (width "
             f"{REDUCED['num_attention_heads'] * config_dict['attention_head_dim']}), {REDUCED['num_layers']} double + "
             f"{REDUCED['num_single_layers']} single blocks ({parameters / 1e6:.1f} M parameters, random weights), "
             f"{res}x{res} (latent {res // 8}x{res // 8}, {(res // 16) ** 2} image tokens + {TEXT_LENGTH} text tokens)")
    result = {"benchmark": "latency_cpu", "model": model, "family": "flux", "resolution": res,
              "steps": args.steps, "scheduler": type(plain.scheduler).__name__, "guidance_scale": GUIDANCE,
              "guidance": f"embedded guidance {GUIDANCE}, no CFG batch",
              "architecture": {"base": "flux_dev_transformer.json", "overrides": REDUCED, "parameters": parameters,
                               "text_length": TEXT_LENGTH},
              "rounds": args.rounds, "machine": machine, "diffusers": diffusers.__version__, **provenance(),
              "configs": configs_run,
              "flops_baseline": {"explain": explain_baseline.true, "FlopCounterMode": counted.get("diffusers")},
              "skipped": {k: v for k, v in notes.items() if k not in runs}, "rows": rows}
    name = args.name or "latency_cpu_flux"
    write_results(args.out, name, result, markdown(result))
    from latency_cpu import plot

    plot(rows, args.out / f"{name}.png", f"FLUX-architecture (reduced), {res}px, {args.steps} steps, {machine['cpu']}")
    print("\n".join(markdown(result)))
    return 0


def busy(machine: dict) -> bool:
    """Whether other processes ran beside the timing: the one-minute load average at its end above what this run's
    threads make. (At its start the average still holds the minute before, so it says little.)"""
    return machine["load_average_end"][0] > machine["threads"] + 0.5


def _finite(db: float) -> float | None:
    """PSNR for JSON: identical images (+inf) as None."""
    return None if math.isinf(db) else round(db, 2)


def _db(db: float | None) -> str:
    return "identical" if db is None else f"{db:.1f}"


def markdown(result: dict) -> list[str]:
    m = result["machine"]
    fb = result["flops_baseline"]
    counter = f"{fb['FlopCounterMode'] / 1e12:.3f} T" if fb["FlopCounterMode"] else "not counted"
    lines = [f"# Latency, {result['model']}, {result['steps']} steps, {result['guidance']}", "",
             f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, diffusers {result['diffusers']}; "
             f"`{result['command']}`; median of {result['rounds']} interleaved rounds (order rotated), denoising loop "
             "only; speedup against plain diffusers. FLOPs are true FLOPs of the whole generation: `explain` for our "
             "presets, FlopCounterMode on the actual run for diffusers and its hooks; FLOPs ideal = the baseline's "
             f"over the row's, each by its own counter (the baseline: explain {fb['explain'] / 1e12:.3f} T, "
             f"FlopCounterMode {counter}). PSNR and SSIM: the row's VAE-decoded image against plain diffusers' "
             "(same seed and inputs; random weights, so these measure agreement, not image quality).", "",
             f"Load average (1 min): {m['load_average_start'][0]:.2f} when the run began, "
             f"{m['load_average_end'][0]:.2f} when its timing ended (this run alone adds about {m['threads']})"
             + (": other processes were running during this run, so its times are noisy and slower than this "
                "machine's; rerun it on a quiet machine with the command above." if busy(m)
                else ": nothing else ran."), "",
             "| row | median s | speedup | FLOPs (T) | FLOPs ideal | speedup / ideal | PSNR dB | SSIM | rel. L2 latents | "
             "first call s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fl = f"{r['flops_true'] / 1e12:.3f}" if "flops_true" in r else "not counted"
        ideal = f"{r['flops_ideal_speedup']:.2f}x" if "flops_ideal_speedup" in r else "-"
        ratio = f"{r['speedup_over_ideal']:.2f}" if "speedup_over_ideal" in r else "-"
        lines.append(f"| {r['row']} | {r['median_s']:.2f} | {r['speedup']:.2f}x | {fl} | {ideal} | {ratio} | "
                     f"{_db(r['psnr_db'])} | {r['ssim']:.4f} | {r['rel_l2_vs_diffusers']:.3g} | {r['first_call_s']:.1f} |")
    if result["skipped"]:
        lines += ["", "Not run:", *[f"- {k}: {v}" for k, v in result["skipped"].items()]]
    lines += ["", "Reading the table:", "",
              "- Hook rows whose counted FLOPs equal the baseline's computed every block at every step in this run: "
              + (", ".join(r["row"] for r in result["rows"] if r.get("flops_by") == "FlopCounterMode"
                           and r["row"] != "diffusers" and r["flops_ideal_speedup"] <= 1.001) or "none") + ". "
              "FirstBlockCache decides per step from the first block's residual change (threshold 0.05), so what it "
              "skips depends on the weights; random weights change more from step to step than trained ones.",
              "- Our presets other than none (all mixed resolution) re-noise the model's x0 estimate at the switch; with "
              "random weights that estimate carries no image structure, so their PSNR/SSIM here do not predict their "
              "agreement on trained FLUX weights. The hooks reuse features along the baseline's own trajectory and "
              "stay close to it whatever the weights.",
              "- FasterCache's defaults (is_guidance_distilled False) split each batch into an unconditional and a "
              "conditional half; FLUX-dev's pipeline runs one batch without CFG, hence the failure. "
              "`FasterCache, guidance-distilled` is its defaults with is_guidance_distilled=True, the one change "
              "FLUX-dev needs.",
              "- PyramidAttentionBroadcast and FasterCache read the timestep through current_timestep_callback, "
              "which has no default in this diffusers version; both get `lambda: pipe.current_timestep`, as PAB's "
              "docstring example passes it (FasterCache without it fails at its first step: TypeError, 'NoneType' "
              "object is not callable). TaylorSeer runs its config class's defaults (disable_cache_before_step 3); "
              "the docs guide's FLUX example uses 10.",
              "- The diffusers row's FLOPs come from FlopCounterMode, our presets' from `explain` on the same "
              "architecture; the baseline's two counts are given above (they agree where the conventions do)."]
    lines += ["", "Configurations as run:", ""]
    for row, config in result["configs"].items():
        lines.append(f"- {row}: `{json.dumps(config)}`")
    return lines
