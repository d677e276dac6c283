"""ControlNet latency on this CPU, one process: plain diffusers' StableDiffusionControlNetPipeline against
optimize(pipe, preset) on the same pipeline, interleaved.

    python benchmarks/latency_controlnet.py [--rounds 2] [--steps 20] [--resolution 256] [--presets none,quality,...]

The SD1.5-architecture U-Net (bundled config, random weights) with a ControlNet made from it
(ControlNetModel.from_unet, its zero convolutions given random weights so that its residuals are not zero), at
--resolution (default 256x256, latent 32x32), DDIM, CFG 7.5, a random conditioning image. Only the denoising loop
is timed (embeddings given, latents out). Every row is called once before timing (captures); then --rounds rounds
run one call of each row, order rotated each round; the median is reported, with the relative L2 of the latents
against diffusers' (each preset's approximation; `none` must be ~0).

Writes benchmarks/results/controlnet_cpu.{json,md} (--name to change; not latency_cpu_*: readme_perf.py reads those
as latency_cpu.py writes them).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from common import cpu_name, interleaved_rounds, provenance, write_results   # benchmarks/ on sys.path
from sd15_pipeline import random_sd15_unet

ROOT = Path(__file__).parent


def controlnet_pipeline(unet, seed: int = 1):
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    from postdiff_compile.models.families import get_family

    controlnet = ControlNetModel.from_unet(unet).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # a trained ControlNet's zero convolutions are not zero
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.02)
    vae = AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32).eval()
    scheduler = {k: v for k, v in get_family("sd15").scheduler().items() if not k.startswith("_")}
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             controlnet=controlnet, scheduler=DDIMScheduler.from_config(scheduler),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--presets", default="none,quality,balanced,fast")
    parser.add_argument("--name", default="controlnet_cpu")
    args = parser.parse_args(argv)
    from postdiff_compile import optimize, restore
    from postdiff_compile.verification import rel_l2

    torch.set_num_threads(2)
    unet = random_sd15_unet()
    pipe = controlnet_pipeline(unet)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    image = torch.rand(1, 3, args.resolution, args.resolution, generator=g)
    call = dict(image=image, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                guidance_scale=7.5, output_type="latent")

    def row(preset):
        def run():
            if preset is None:
                restore(pipe)
            else:
                optimize(pipe, preset)   # a new config on the same store: the captured graphs are kept
            return pipe(**call, generator=torch.Generator().manual_seed(0)).images
        return run

    runs = {"diffusers": row(None), **{f"{p}/eager": row(p) for p in args.presets.split(",")}}
    first, outputs = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        outputs[name] = run()
        first[name] = time.perf_counter() - start
        print(f"{name}: first call {first[name]:.1f} s", flush=True)
    times = interleaved_rounds(runs, args.rounds, report=lambda r: print(f"round {r + 1} done", flush=True))
    base = statistics.median(times["diffusers"])
    rows = [{"row": name, "median_s": statistics.median(t), "times_s": t, "speedup": base / statistics.median(t),
             "first_call_s": first[name], "rel_l2_vs_diffusers": rel_l2(outputs[name], outputs["diffusers"])}
            for name, t in times.items()]
    header = (f"# Latency, ControlNet on the SD1.5-architecture U-Net (bundled config, random weights; ControlNet "
              f"from_unet), {args.resolution}x{args.resolution}, {args.steps} steps, CFG 7.5")
    lines = [header, "", f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"`{provenance()['command']}`; median of {args.rounds} interleaved rounds (order rotated); speedup "
             "against plain diffusers' StableDiffusionControlNetPipeline. The ControlNet runs at every step in every "
             "row (docs/optimize.md, \"ControlNet\").", "",
             "| row | median s | speedup | first call s | rel. L2 vs diffusers |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['median_s']:.3f} | {r['speedup']:.2f}x | {r['first_call_s']:.1f} | "
              f"{r['rel_l2_vs_diffusers']:.3g} |" for r in rows]
    record = {**provenance(), "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                          "torch": torch.__version__, "python": platform.python_version()},
              "steps": args.steps, "resolution": args.resolution, "rounds": args.rounds, "rows": rows}
    print("\n".join(lines))
    print(write_results(ROOT / "results", args.name, record, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
