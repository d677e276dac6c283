"""`postdiff-compile run DIR`, `inspect DIR`, `sign DIR`, `keygen`: execute an artifact, describe it, sign it.

    postdiff-compile run DIR [--backend torch|onnxruntime|tensorrt|aoti] [--threads N]
                             [--embeddings FILE.safetensors | --prompt TEXT]
                             [--seed N] [--guidance-scale G] [--out FOLDER] [--source MODEL] [--public-key KEY.pub]
    postdiff-compile inspect DIR [--json] [--public-key KEY.pub]
    postdiff-compile sign DIR --key KEY
    postdiff-compile keygen --out KEY
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from .parser import Parser
from ..errors import PostDiffError

ARTIFACT_COMMANDS = ("run", "inspect", "sign", "keygen")
# What `run` draws on the reference model when no embeddings are given (a caption of its scene grammar).
DEFAULT_PROMPT = "small red circle top left, large blue square center, on striped grey"
EMBEDDING_KEYS = ("prompt_embeds", "negative_prompt_embeds")


DESCRIPTIONS = {
    "keygen": "Write a new Ed25519 key pair for signing artifacts: KEY (private, mode 0600) and KEY.pub (give that "
              "to whoever loads the artifacts).",
    "sign": "Sign a valid artifact: writes DIR/manifest.sig, an Ed25519 signature of manifest.sha256 (which covers "
            "the manifest and through it every file).",
    "inspect": "Validate an artifact like load() does (manifest, every file's size and sha256) and print its plan, "
               "FLOPs, files and verification errors.",
    "run": "Execute an artifact on a backend: text embeddings in, latents out (and an image when the source has a "
           "VAE). With no embeddings, an artifact of the reference model encodes --prompt with the reference "
           "model's own text encoder.",
}


def build_parser(command: str) -> argparse.ArgumentParser:
    from ..exporters.formats import BACKENDS

    key_help = "refuse the artifact unless it carries this Ed25519 public key's signature (postdiff-compile sign)"
    parser = Parser(prog=f"postdiff-compile {command}", description=DESCRIPTIONS[command])
    add = parser.add_argument
    if command == "keygen":
        add("--out", type=Path, required=True, metavar="KEY", help="private key file to write")
    else:
        add("artifact", type=Path, help="artifact folder")
    if command == "sign":
        add("--key", type=Path, required=True, metavar="KEY", help="private key (PEM, keygen)")
    if command == "inspect":
        add("--json", action="store_true", help="print the manifest (after validating it)")
    if command == "run":
        add("--backend", choices=BACKENDS, default="torch", help="default: torch")
        add("--threads", type=int, help="CPU threads of torch and onnxruntime (default: torch's)")
        add("--embeddings", type=Path, metavar="FILE.safetensors",
            help="prompt_embeds and negative_prompt_embeds [1, L, D] (SDXL: also text_embeds, time_ids and "
                 "negative_text_embeds, negative_time_ids)")
        add("--prompt", help=f"reference-model artifacts only (default: {DEFAULT_PROMPT!r})")
        add("--seed", type=int, default=0, help="default: 0")
        add("--guidance-scale", type=float, default=None,
            help="default: 4 for the reference model, 8.5 for LCM, 7.5 otherwise")
        add("--out", type=Path, help="output folder (default: ./postdiff-run/ARTIFACT-seedN)")
        add("--force", action="store_true", help="replace an existing output folder")
        add("--source", type=Path, metavar="MODEL",
            help="the model folder the artifact was compiled from, for its VAE (and, for the reference model, its "
                 "text encoder); checked against the manifest's hashes. Default: the shipped reference model for "
                 "reference-model artifacts (scenes64, scenes32), no decoding otherwise")
    if command in ("inspect", "run"):
        add("--public-key", type=Path, metavar="KEY.pub", help=key_help)
    add("--debug", action="store_true", help="show Python tracebacks")
    return parser


def run(command: str, args: argparse.Namespace) -> int:
    return {"inspect": _inspect, "run": _run, "sign": _sign, "keygen": _keygen}[command](args)


def _keygen(args: argparse.Namespace) -> int:
    from ..exporters.signing import generate_key

    private, public = generate_key(args.out)
    print(f"{private}: private key (keep it secret); {public}: public key (for load(..., public_key=) and "
          "--public-key)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from ..exporters.manifest import sign

    print(f"{sign(args.artifact, args.key)}: signed")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..exporters.manifest import check_files, read_manifest
    from ..runtime.artifact import check_contents

    manifest = read_manifest(args.artifact, args.public_key)
    check_files(args.artifact, manifest)
    check_contents(args.artifact, manifest)
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


def _embeddings(args: argparse.Namespace, runner, source: Path | None) -> tuple[dict, float]:
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
    from ..lab.reference_models import LAB_FAMILIES, family_of

    if family not in LAB_FAMILIES:
        raise PostDiffError(f"a {family} artifact has no text encoder inside; give --embeddings FILE.safetensors with "
                            f"{' and '.join(EMBEDDING_KEYS)} of shape [1, {runner.text['shape'][1]}, "
                            f"{runner.text['shape'][2]}]")
    from ..lab.scenes import vocabulary

    prompt = args.prompt or DEFAULT_PROMPT
    known = set(vocabulary())
    unknown = [w for w in dict.fromkeys(prompt.replace(",", " ").split()) if w not in known]
    if unknown:   # the word-level tokenizer would read them as [UNK] and draw something else, silently
        raise PostDiffError(f"the reference model does not know the word(s) {', '.join(unknown)}; its vocabulary: "
                            f"{' '.join(vocabulary())} (captions like {DEFAULT_PROMPT!r})")
    if source is None or family_of(source) != family:
        raise PostDiffError("--source is not a reference-model folder; give --embeddings instead", source)
    pipe = _reference_pipeline(source)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, "")
    return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}, 4.0


def source_folder(manifest: dict, given: Path | None) -> Path | None:
    """The model folder `run` may load a VAE (and the reference model's text encoder) from, or None.

    Never the manifest's own `source.path`: an artifact must not make the runner read files outside it. The
    folder is the one the caller names, or for a reference-model artifact the shipped model; either way its
    denoiser files must have the sha256 the manifest recorded, so that the decoder belongs to this denoiser.
    """
    from ..exporters.manifest import sha256_file
    from ..lab.reference_models import LAB_FAMILIES, shipped_folder

    if given is None:
        if manifest["source"]["family"] not in LAB_FAMILIES:
            return None
        folder, named = shipped_folder(manifest["source"]["family"]), False
    else:
        folder, named = Path(given), True
        if not folder.is_dir():
            raise PostDiffError("--source must be the model folder the artifact was compiled from", folder)
    recorded = manifest["source"]["files"]
    if not recorded:
        raise PostDiffError("the artifact was compiled from an in-memory model; it records no files to check a "
                            "--source against", folder)
    for entry in recorded:
        # Found by name and content, not by the recorded path (which the artifact could point anywhere).
        name = Path(entry["file"]).name
        candidates = [folder / name, *sorted(folder.glob(f"*/{name}"))]
        if not any(p.is_file() and not p.is_symlink() and p.stat().st_size == entry["bytes"]
                   and sha256_file(p) == entry["sha256"] for p in candidates):
            hint = "" if named else "; give the folder it was compiled from with --source"
            raise PostDiffError(f"no {name} here is the file the artifact was compiled from (size {entry['bytes']}, "
                                f"sha256 {entry['sha256'][:12]}...){hint}", folder)
    return folder


def _reference_pipeline(folder: Path):
    """The reference model in `folder` (checked by source_folder), loaded once for encoding and decoding."""
    return _load_reference(str(folder))


@functools.lru_cache(maxsize=1)
def _load_reference(folder: str):
    from transformers.utils import logging as transformers_logging

    from ..lab.reference_models import load_lab_pipeline

    transformers_logging.disable_progress_bar()
    return load_lab_pipeline(folder)


def _decoder(source: Path | None):
    """A function latents -> PIL images when the source folder has a VAE we can load offline, else None."""
    import torch

    from ..lab.reference_models import family_of

    if source is None:
        return None
    if family_of(source):
        pipe = _reference_pipeline(source)
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

    from ..exporters.atomic_dir import atomic_dir, check_target
    from ..runtime.artifact import load

    out = args.out or Path("postdiff-run") / f"{args.artifact.resolve().name}-seed{args.seed}"
    check_target(out, args.force)
    runner = load(args.artifact, args.backend, public_key=args.public_key, threads=args.threads)
    source = source_folder(runner.manifest, args.source)
    kwargs, guidance = _embeddings(args, runner, source)
    guidance = args.guidance_scale if args.guidance_scale is not None else guidance
    steps = len(runner.plan)
    start = time.perf_counter()

    def on_step(i: int) -> None:
        if sys.stderr.isatty():   # a log file gets the summary line only
            print(f"\rstep {i + 1}/{steps}", end="" if i + 1 < steps else "\n", file=sys.stderr, flush=True)

    try:
        latents = runner(**kwargs, seed=args.seed, guidance_scale=guidance, on_step=on_step)
    except PostDiffError as err:   # a tensor of the wrong shape: name the file it came from
        if err.path is not None or args.embeddings is None:
            raise
        raise PostDiffError(str(err), args.embeddings) from None
    seconds = time.perf_counter() - start
    decode = _decoder(source)
    with atomic_dir(out, args.force) as tmp:
        save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp / "latents.safetensors"),
                  metadata={"artifact": str(args.artifact), "backend": args.backend, "seed": str(args.seed),
                            "guidance_scale": str(guidance)})
        written = ["latents.safetensors"]
        if decode is not None:
            decode(latents.cpu())[0].save(tmp / "image.png")
            written.append("image.png")
    print(f"{out}: {', '.join(written)} ({steps} steps on {args.backend} in {seconds:.2f} s)"
          + ("" if decode else "; no --source folder with a VAE this tool can load offline, so latents only"))
    return 0
