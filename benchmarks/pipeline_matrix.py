"""Issue 27's matrix: every pipeline beyond text-to-image, every preset, through an artifact on torch and onnxruntime,
against optimize(pipe) on the same diffusers pipeline (which equals diffusers itself at `none`: the tests).

    python benchmarks/pipeline_matrix.py [--kinds controlnet,img2img,...] [--presets none,quality,balanced,fast]
                                         [--steps 20] [--name pipeline_matrix]

The tiny random models of the test suite (tests/tiny_models.py, the pipelines of test_controlnet.py,
test_inpaint.py and test_sdxl_refiner.py). One artifact (.pt2 and ONNX) per kind and preset; each of the kind's runs
(a strength, a denoising window) on both backends, the same embeddings, images, masks and seed as optimize(pipe),
whose scheduler is the manifest's. Pass: relative L2 <= 1e-5 on torch, 1e-4 on onnxruntime (the tests'
tolerances). A run that optimize(pipe) refuses must be refused by the runner too, with the same reason ("refused"
rows). The test suite runs a subset of this matrix (CI's 45 minutes); this script runs all of it (about an hour on
2 cores). Writes benchmarks/results/NAME.{json,md}; exit status 1 if any row fails.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the suite's tiny models and pipelines
from common import cpu_name, provenance, write_results  # noqa: E402

PRESETS = ("none", "quality", "balanced", "fast")
TOLERANCE = {"torch": 1e-5, "onnxruntime": 1e-4}


@dataclass
class Run:
    """One way to call a kind's artifact: the pipeline call and the runner call that must agree."""
    label: str
    pipe_call: Callable[[object], torch.Tensor]       # pipe -> latents
    runner_call: Callable[[object], torch.Tensor]     # runner -> latents


@dataclass
class Kind:
    name: str
    pipe: object
    size: int
    runs: list[Run]
    controlnets: list = field(default_factory=list)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sd_text():
    from tiny_models import text_embeddings

    return text_embeddings(1)


def controlnet_kinds(steps: int) -> list[Kind]:
    from test_controlnet import SIZE, _images, make_pipes
    from test_controlnet_artifact import MULTI_SCALES, SCALES

    kinds, (single, multi), (cond, uncond) = [], make_pipes(), _sd_text()
    for name, pipe, scales in (("controlnet", single, SCALES), ("controlnet x2", multi, MULTI_SCALES)):
        count = len(getattr(pipe.controlnet, "nets", [0]))
        run = Run("scales and guidance window",
                  lambda p, c=count, s=scales: p(image=_images(c), prompt_embeds=cond, negative_prompt_embeds=uncond,
                                                 num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                                                 generator=_gen(0), **s).images,
                  lambda r, c=count, s=scales: r(cond, uncond, seed=0, guidance_scale=7.5, control_image=_images(c),
                                                 **s))
        kinds.append(Kind(name, pipe, SIZE, [run], list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))))
    return kinds


def sdxl_controlnet_kind(steps: int) -> Kind:
    from test_controlnet import SIZE, _images, make_sdxl_pipe
    from tiny_models import pipeline_embeds

    pipe = make_sdxl_pipe()
    e = pipeline_embeds("sdxl")
    run = Run("scale 0.7",
              lambda p: p(image=_images(1), **e, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                          controlnet_conditioning_scale=0.7, generator=_gen(0)).images,
              lambda r: r(e["prompt_embeds"], e["negative_prompt_embeds"], seed=0, guidance_scale=5.0,
                          added_cond={"text_embeds": e["pooled_prompt_embeds"]},
                          negative_added_cond={"text_embeds": e["negative_pooled_prompt_embeds"]},
                          control_image=_images(1), controlnet_conditioning_scale=0.7))
    return Kind("sdxl controlnet", pipe, SIZE, [run], [pipe.controlnet])


def img2img_kind(steps: int) -> Kind:
    from diffusers import StableDiffusionImg2ImgPipeline
    from tiny_models import tiny_sd_pipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline("sd15", "ddim").components)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _sd_text()
    image = torch.randn(1, 4, 16, 16, generator=_gen(9))
    runs = [Run(f"strength {s}",
                lambda p, s=s: p(image=image, strength=s, prompt_embeds=cond, negative_prompt_embeds=uncond,
                                 num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                                 generator=_gen(3)).images,
                lambda r, s=s: r(cond, uncond, seed=3, guidance_scale=7.5, image_latents=image, strength=s))
            for s in (0.3, 0.8)]
    return Kind("img2img", pipe, 128, runs)


def inpaint_kind(steps: int, channels: int) -> Kind:
    from test_inpaint import SIZE, _pipe

    pipe = _pipe(channels)
    cond, uncond = _sd_text()
    g = _gen(4)
    image, masked = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g), torch.randn(1, 4, SIZE // 8, SIZE // 8,
                                                                                      generator=g)
    if channels == 4:
        masked = image   # not read by a 4-channel U-Net; diffusers needs it given latents for `image`
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 1.0
    small = torch.nn.functional.interpolate(mask, size=(SIZE // 8, SIZE // 8))
    runner_extra = {"masked_image_latents": masked} if channels == 9 else {}
    # a plain U-Net cannot start at low resolution (the blend): 0.5 of 20 steps starts at the presets' switch
    strengths = (1.0, 0.9) if channels == 9 else (0.5,)
    runs = [Run(f"strength {s}",
                lambda p, s=s: p(image=image, mask_image=mask, masked_image_latents=masked, strength=s,
                                 prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                                 guidance_scale=7.5, height=SIZE, width=SIZE, output_type="latent",
                                 generator=_gen(3)).images,
                lambda r, s=s: r(cond, uncond, seed=3, guidance_scale=7.5, image_latents=image, strength=s,
                                 mask=small, **runner_extra))
            for s in strengths]
    return Kind(f"inpaint {channels}-channel", pipe, SIZE, runs)


def sdxl_refiner_kinds(steps: int) -> list[Kind]:
    from test_sdxl_refiner import SIZE, SPLIT, make_pipes
    from tiny_models import pipeline_embeds

    base, refiner = make_pipes()
    e = pipeline_embeds("sdxl")
    added = dict(added_cond={"text_embeds": e["pooled_prompt_embeds"]},
                 negative_added_cond={"text_embeds": e["negative_pooled_prompt_embeds"]})

    def args(seed, **kw):
        return dict(e, num_inference_steps=steps, guidance_scale=5.0, output_type="latent", generator=_gen(seed), **kw)

    base_run = Run(f"denoising_end {SPLIT}",
                   lambda p: p(height=SIZE, width=SIZE, **args(0, denoising_end=SPLIT)).images,
                   lambda r: r(e["prompt_embeds"], e["negative_prompt_embeds"], seed=0, guidance_scale=5.0,
                               denoising_end=SPLIT, **added))
    latents = base(height=SIZE, width=SIZE, **args(0, denoising_end=SPLIT)).images   # plain diffusers' base share
    refiner_runs = [
        Run(f"denoising_start {SPLIT}", lambda p: p(image=latents, **args(0, denoising_start=SPLIT)).images,
            lambda r: r(e["prompt_embeds"], e["negative_prompt_embeds"], seed=0, guidance_scale=5.0,
                        image_latents=latents, denoising_start=SPLIT, **added)),
        Run("img2img strength 0.5", lambda p: p(image=latents, **args(4, strength=0.5)).images,
            lambda r: r(e["prompt_embeds"], e["negative_prompt_embeds"], seed=4, guidance_scale=5.0,
                        image_latents=latents, strength=0.5, **added))]
    return [Kind("sdxl base", base, SIZE, [base_run]), Kind("sdxl refiner", refiner, SIZE, refiner_runs)]


KINDS = {"controlnet": controlnet_kinds, "sdxl-controlnet": lambda s: [sdxl_controlnet_kind(s)],
         "img2img": lambda s: [img2img_kind(s)], "inpaint": lambda s: [inpaint_kind(s, 9), inpaint_kind(s, 4)],
         "sdxl-refiner": sdxl_refiner_kinds}


def _attempt(fn):
    from postdiff_compile.errors import PostDiffError

    try:
        return fn(), None
    except PostDiffError as err:
        return None, str(err)


def expected_by_pipe(kind: Kind, preset: str, manifest: dict, run: Run):
    from postdiff_compile import optimize, restore
    from postdiff_compile.schedulers import make_scheduler

    pipe = kind.pipe
    scheduler, pipe.scheduler = pipe.scheduler, make_scheduler(manifest["scheduler"])
    try:
        optimize(pipe, preset)
        return _attempt(lambda: run.pipe_call(pipe))
    finally:
        restore(pipe)
        pipe.scheduler = scheduler


def rows_of(kind: Kind, preset: str, steps: int, work: Path) -> list[dict]:
    import postdiff_compile
    from postdiff_compile.compile import compile_artifact
    from postdiff_compile.config import ConfigRequest
    from postdiff_compile.exporters.manifest import read_manifest
    from postdiff_compile.verification import rel_l2

    start = time.perf_counter()
    folder = compile_artifact(kind.pipe.unet, ConfigRequest(preset), work / f"{kind.name}-{preset}".replace(" ", "_"),
                              resolution=(kind.size, kind.size), steps=steps, formats="pt2,onnx",
                              controlnets=kind.controlnets).out
    compile_s = time.perf_counter() - start
    manifest = read_manifest(folder)
    rows = []
    for run in kind.runs:
        expected, refused = expected_by_pipe(kind, preset, manifest, run)
        for backend in TOLERANCE:
            got, runner_refused = _attempt(lambda: run.runner_call(postdiff_compile.load(folder, backend)))
            row = {"kind": kind.name, "run": run.label, "preset": preset, "backend": backend,
                   "compile_s": round(compile_s, 1), "tolerance": TOLERANCE[backend]}
            if refused or runner_refused:
                row.update(rel_l2=None, refused=runner_refused or refused,
                           ok=bool(refused and runner_refused) and _same_reason(refused, runner_refused))
            else:
                row.update(rel_l2=rel_l2(got, expected), refused=None,
                           ok=got.shape == expected.shape and rel_l2(got, expected) <= TOLERANCE[backend])
            rows.append(row)
            value = "refused" if row["refused"] else format(row["rel_l2"], ".1e")
            print(f"{kind.name:18} {run.label:24} {preset:9} {backend:12} {value:>8}  {'ok' if row['ok'] else 'FAIL'}",
                  flush=True)
    return rows


def _same_reason(a: str, b: str) -> bool:
    """Both refusals name the same cause: their first clause (the file or step may differ)."""
    return a.split(":")[0].split("(")[0].strip() == b.split(":")[0].split("(")[0].strip()


def markdown(rows: list[dict], record: dict) -> list[str]:
    failed = sum(not r["ok"] for r in rows)
    lines = [f"# Issue 27's pipelines x presets x backends, artifacts against optimize(pipe) ({record['steps']} steps)",
             "", f"`{record['provenance']['command']}` at {record['provenance']['commit']}, "
             f"{record['provenance']['created']}; {record['machine']}, torch {record['torch']}.",
             "", f"**{len(rows) - failed} of {len(rows)} rows pass** (relative L2 <= 1e-5 torch, 1e-4 onnxruntime; "
             "a refusal passes when optimize(pipe) refuses the same run for the same reason).", "",
             "| pipeline | run | preset | backend | rel L2 | result | compile s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"refused: {r['refused'][:90]}" if r["refused"] else f"{r['rel_l2']:.1e}"
        lines.append(f"| {r['kind']} | {r['run']} | {r['preset']} | {r['backend']} | {value} | "
                     f"{'ok' if r['ok'] else '**FAIL**'} | {r['compile_s']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    import platform

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--name", default="pipeline_matrix")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    record = {"provenance": provenance(), "machine": f"{cpu_name()} ({platform.machine()})",
              "torch": torch.__version__, "steps": args.steps, "rows": rows}
    with TemporaryDirectory() as tmp:
        for kind_name in args.kinds.split(","):
            for kind in KINDS[kind_name](args.steps):
                for preset in args.presets.split(","):
                    rows.extend(rows_of(kind, preset, args.steps, Path(tmp)))
                    # after every artifact: an interrupted run keeps what it measured
                    path = write_results(HERE / "results", args.name, record, markdown(rows, record))
    print(path)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
