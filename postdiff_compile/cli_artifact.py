"""`postdiff-compile run DIR` and `postdiff-compile inspect DIR`: execute an artifact, or describe it.

    postdiff-compile run DIR [--backend torch|onnxruntime|tensorrt|aoti] [--embeddings FILE.safetensors | --prompt TEXT]
                             [--seed N] [--guidance-scale G] [--out FOLDER]
    postdiff-compile inspect DIR [--json]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from .errors import PostDiffError

ARTIFACT_COMMANDS = ("run", "inspect")
# What `run` draws on the reference model when no embeddings are given (a caption of its scene grammar).
DEFAULT_PROMPT = "small red circle top left, large blue square center, on striped grey"
EMBEDDING_KEYS = ("prompt_embeds", "negative_prompt_embeds")


def build_parser(command: str) -> argparse.ArgumentParser:
    from .runtime.backends import BACKENDS

    if command == "inspect":
        parser = argparse.ArgumentParser(prog="postdiff-compile inspect",
                                         description="Print an artifact's plan, FLOPs, files and verification errors.")
        parser.add_argument("artifact", type=Path, help="artifact folder")
        parser.add_argument("--json", action="store_true", help="print the manifest (after validating it)")
    else:
        parser = argparse.ArgumentParser(
            prog="postdiff-compile run",
            description="Execute an artifact on a backend: text embeddings in, latents out (and an image when the "
                        "source has a VAE). With no embeddings, an artifact of the reference model encodes --prompt "
                        "with the reference model's own text encoder.")
        parser.add_argument("artifact", type=Path, help="artifact folder")
        parser.add_argument("--backend", choices=BACKENDS, default="torch", help="default: torch")
        parser.add_argument("--embeddings", type=Path, metavar="FILE.safetensors",
                            help="prompt_embeds and negative_prompt_embeds [1, L, D] (SDXL: also text_embeds, "
                                 "time_ids and negative_text_embeds, negative_time_ids)")
        parser.add_argument("--prompt", help=f"reference-model artifacts only (default: {DEFAULT_PROMPT!r})")
        parser.add_argument("--seed", type=int, default=0, help="default: 0")
        parser.add_argument("--guidance-scale", type=float, default=None,
                            help="default: 4 for the reference model, 8.5 for LCM, 7.5 otherwise")
        parser.add_argument("--out", type=Path, help="output folder (default: ./postdiff-run/ARTIFACT-seedN)")
        parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser


def run(command: str, args: argparse.Namespace) -> int:
    return _inspect(args) if command == "inspect" else _run(args)


def _inspect(args: argparse.Namespace) -> int:
    from .exporters.manifest import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(format_inspection(args.artifact, manifest))
    return 0


def format_inspection(folder: Path, m: dict) -> str:
    res = m["resolution"]
    variants = {v["id"]: v for v in m["variants"]}
    lines = [f"{folder}: {m['source']['family']} ({m['source']['layout']}, {m['source']['prediction_type']}), "
             f"{res['height']}x{res['width']} (latent {res['latent_height']}x{res['latent_width']}), {m['steps']} steps, "
             f"{m['denoiser']['dtype']}; formats {', '.join(m['formats'])}; built by postdiff-compile "
             f"{m['tool']['version']} with torch {m['toolchain']['torch']}",
             "config: " + ", ".join(f"{k}={v}" for k, v in m["config"].items() if k != "config_version"), "",
             "plan (FLOPs: paper convention, conv+linear MACs x batch; true: 2 x MACs incl. attention)",
             f"{'step':>4}  {'res':4}  {'cfg':3}  {'variant':34}  {'reads':22}  {'writes':22}  {'GFLOPs paper':>12}  "
             f"{'GFLOPs true':>11}"]
    total_paper = total_true = 0
    for step in m["plan"]:
        flops = variants[step["variant_id"]]["flops"]
        total_paper += flops["paper"]
        total_true += flops["true"]
        lines.append(f"{step['index']:>4}  {step['resolution']:4}  {'on' if step['cfg'] else 'off':3}  "
                     f"{step['variant_id']:34}  {','.join(step['reads']) or '-':22}  {','.join(step['writes']) or '-':22}  "
                     f"{flops['paper'] / 1e9:12.3f}  {flops['true'] / 1e9:11.3f}")
    lines.append(f"{'total':>4}  {'':4}  {'':3}  {'':34}  {'':22}  {'':22}  {total_paper / 1e9:12.3f}  {total_true / 1e9:11.3f}")
    if m["transition"]:
        t = m["transition"]
        lines.append(f"transition after step {t['switch_step'] - 1}: {t['low_latent_size']} -> {t['full_latent_size']}, "
                     f"t {t['timestep_t']} -> {t['timestep_next']}, alpha_bar {t['alpha_bar_t']:.5f} -> "
                     f"{t['alpha_bar_next']:.5f}, renoise {t['renoise']}")
    lines += ["", "verification (relative L2 error; reference in the manifest)",
              f"{'variant':34}  {'torch rewrite':>13}  " + "  ".join(f"{fmt:>10}" for fmt in m["formats"] if fmt != "pt2")
              + f"  {'MB':>8}"]
    for v in m["variants"]:
        checks = [v["files"].get(fmt, {}).get("verification") for fmt in m["formats"] if fmt != "pt2"]
        errs = [f"{c['rel_l2_error']:10.2e}" if c else f"{'-':>10}" for c in checks]
        size = sum(f["bytes"] for f in v["files"].values()) / 1e6
        lines.append(f"{v['id']:34}  {v['verification']['rel_l2_error']:13.2e}  " + "  ".join(errs) + f"  {size:8.2f}")
    if m["weights"]:
        lines.append(f"{m['weights']['file']:34}  shared ONNX weights, {m['weights']['tensors']} tensors  "
                     f"{m['weights']['bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)


def _embeddings(args: argparse.Namespace, runner) -> tuple[dict, float]:
    """The runner's keyword arguments and the default guidance scale."""
    import torch

    family = runner.manifest["source"]["family"]
    if args.embeddings is not None:
        if args.prompt is not None:
            raise PostDiffError("give --embeddings or --prompt, not both")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(args.embeddings))
        except (OSError, SafetensorError) as err:
            raise PostDiffError(f"cannot read the embeddings: {err}", args.embeddings) from None
        required = EMBEDDING_KEYS if runner.cfg else EMBEDDING_KEYS[:1]   # LCM artifacts have no negative half
        missing = [k for k in required if k not in tensors]
        if missing:
            raise PostDiffError(f"missing tensor(s) {', '.join(missing)}", args.embeddings)
        added = {k: tensors[k] for k in runner.added_inputs if k in tensors}
        negative_added = {k: tensors[f"negative_{k}"] for k in runner.added_inputs if f"negative_{k}" in tensors}
        kwargs = {"prompt_embeds": tensors["prompt_embeds"], "negative_prompt_embeds": tensors.get("negative_prompt_embeds")}
        if runner.added_inputs:
            kwargs.update(added_cond=added, negative_added_cond=negative_added or None)
        return kwargs, runner.default_guidance_scale
    if family != "scenes32":
        raise PostDiffError(f"a {family} artifact has no text encoder inside; give --embeddings FILE.safetensors with "
                            f"{' and '.join(EMBEDDING_KEYS)} of shape [1, {runner.text['shape'][1]}, "
                            f"{runner.text['shape'][2]}]")
    from .reference.scenes import vocabulary

    prompt = args.prompt or DEFAULT_PROMPT
    known = set(vocabulary())
    unknown = [w for w in dict.fromkeys(prompt.replace(",", " ").split()) if w not in known]
    if unknown:   # the word-level tokenizer would read them as [UNK] and draw something else, silently
        raise PostDiffError(f"the reference model does not know the word(s) {', '.join(unknown)}; its vocabulary: "
                            f"{' '.join(vocabulary())} (captions like {DEFAULT_PROMPT!r})")
    pipe = _reference_pipeline(runner.manifest)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, "")
    return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}, 4.0


def _reference_pipeline(manifest: dict):
    """The reference model an artifact was compiled from (the shipped one if its folder is gone), loaded once for
    both encoding the prompt and decoding."""
    from .reference import is_reference_folder

    source = Path(manifest["source"]["path"])
    return _load_reference(str(source) if is_reference_folder(source) else None)


@functools.lru_cache(maxsize=1)
def _load_reference(folder: str | None):
    from transformers.utils import logging as transformers_logging

    from .reference import load_pipeline

    transformers_logging.disable_progress_bar()
    return load_pipeline(folder)


def _decoder(manifest: dict):
    """A function latents -> PIL images when the source has a VAE we can load offline, else None."""
    import torch

    from .reference import is_reference_folder

    source = Path(manifest["source"]["path"])
    if is_reference_folder(source):
        pipe = _reference_pipeline(manifest)
        vae, processor = pipe.vae, pipe.image_processor
    elif (source / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        vae = AutoencoderKL.from_pretrained(str(source / "vae"), local_files_only=True)
        processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    else:
        return None

    def decode(latents):
        with torch.no_grad():
            dtype = next(vae.parameters(), torch.empty(0)).dtype
            image = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return processor.postprocess(image.float(), output_type="pil")
    return decode


def _run(args: argparse.Namespace) -> int:
    import time

    from safetensors.torch import save_file

    from .exporters.atomic_dir import atomic_dir, check_target
    from .runtime.artifact import load

    out = args.out or Path("postdiff-run") / f"{args.artifact.resolve().name}-seed{args.seed}"
    check_target(out, args.force)
    print(f"validating and opening {args.artifact} on {args.backend} ...", file=sys.stderr)
    runner = load(args.artifact, args.backend)
    kwargs, guidance = _embeddings(args, runner)
    guidance = args.guidance_scale if args.guidance_scale is not None else guidance
    steps = len(runner.plan)
    start = time.perf_counter()

    def on_step(i: int) -> None:
        if sys.stderr.isatty():   # a log file gets the summary line only
            print(f"\rstep {i + 1}/{steps}", end="" if i + 1 < steps else "\n", file=sys.stderr, flush=True)

    latents = runner(**kwargs, seed=args.seed, guidance_scale=guidance, on_step=on_step)
    seconds = time.perf_counter() - start
    decode = _decoder(runner.manifest)
    with atomic_dir(out, args.force) as tmp:
        save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp / "latents.safetensors"),
                  metadata={"artifact": str(args.artifact), "backend": args.backend, "seed": str(args.seed),
                            "guidance_scale": str(guidance)})
        written = ["latents.safetensors"]
        if decode is not None:
            decode(latents.cpu())[0].save(tmp / "image.png")
            written.append("image.png")
    print(f"{out}: {', '.join(written)} ({steps} steps on {args.backend} in {seconds:.2f} s)"
          + ("" if decode else "; the source has no VAE this tool can load offline, so latents only"))
    return 0
