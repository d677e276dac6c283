"""`refit`: an artifact with new weights (a fine-tuned checkpoint of the same denoiser, or a LoRA merged into
its own) without recompiling.

Every graph of a format-2 artifact reads its weights from the one weights file by name (weights_file.py), so new
weights are a new weights file with the same names, shapes, dtypes and layout; every graph file is copied as it is.
Each variant is then verified as compile verifies it, on the new weights: the rewrite against eager (one eager
reference and oracle per bucket), and every format's file, opened from the new folder, against the rewrite. The
new artifact is written beside its target and moved into place only when complete; the old one is only read.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compile import VERIFY_TOLERANCE, Progress, timer
from .errors import PostDiffError
from .exporters.atomic_dir import atomic_dir
from .exporters.formats import FORMATS, Build
from .exporters.manifest import MANIFEST, check_files, file_entry, listed_files, read_manifest, sha256_file, \
    write_manifest
from .exporters.weights_file import FILE, NAMES, PAD_PREFIX, ArtifactWeights, WeightsIndex, denoiser_tensors, load_weights, \
    same_layout, write_weights
from .models.build import build_denoiser
from .models.families import get_family
from .variant_build import VariantBuilder, reference_of


@dataclass
class RefitResult:
    out: Path
    manifest: dict
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def refit_artifact(artifact: str | Path, out: str | Path, *, weights: str | Path | None = None,
                   lora: str | Path | None = None, lora_scale: float = 1.0, force: bool = False,
                   progress: Progress | None = None) -> RefitResult:
    """Write `out`: the artifact `artifact` with the denoiser weights in `weights` (a .safetensors file with the
    artifact's tensor names) or with the LoRA in `lora` merged into its own weights at `lora_scale`."""
    if (weights is None) == (lora is None):
        raise PostDiffError("refit needs new weights or a LoRA file (exactly one of them)")
    start = time.perf_counter()
    folder = Path(artifact)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    if manifest["format_version"] < 2:
        raise PostDiffError("a format-1 artifact keeps a copy of the weights in every graph; recompile it with this "
                            "version to refit it", folder / MANIFEST)
    if "tensorrt" in manifest["formats"]:
        raise PostDiffError("TensorRT engines hold their own weights, built in; refit an artifact compiled without "
                            "--format tensorrt, or recompile", folder / MANIFEST)
    if manifest.get("controlnets"):   # its weights file also holds the ControlNets', which refit would have to keep
        raise PostDiffError("refit does not take artifacts compiled with ControlNets yet; recompile with the new "
                            "weights", folder / MANIFEST)
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise PostDiffError("refit writes a new artifact: give --out another folder than the artifact", out)
    stages: dict[str, float] = {}
    timed = timer(progress or Progress(), stages)
    family = get_family(manifest["source"]["family"])
    old = folder / manifest["weights"]["file"]
    with timed("load weights"):
        module = _denoiser(manifest, old)
    source = Path(weights if weights is not None else lora)
    with timed("new weights" if weights is not None else "merge LoRA"):
        if weights is not None:
            _load_new_weights(module, source, old)
        else:
            from .models.lora import merge_lora

            merge_lora(module, family, source, lora_scale)
    with atomic_dir(out, force) as tmp:
        for _, entry in listed_files(manifest):
            if entry["file"] != FILE:
                shutil.copy2(folder / entry["file"], tmp / entry["file"])
        with timed("write weights"):
            write_weights(tmp / FILE, denoiser_tensors(module))
            same_layout(tmp / FILE, old)
        new = _verified(manifest, module, tmp, family, timed, stages, str(source))
        new["weights"] = {**file_entry(tmp / FILE), "tensors": len(WeightsIndex(tmp / FILE)), "names": NAMES}
        new["refit"] = {"artifact_manifest_sha256": sha256_file(folder / MANIFEST),
                        "source_weights_sha256": manifest["weights"]["sha256"],
                        **({"weights": {"file": str(source), "sha256": sha256_file(source)}} if weights is not None
                           else {"lora": {"file": str(source), "sha256": sha256_file(source), "scale": lora_scale}})}
        new["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_manifest(tmp, new)
    return RefitResult(out, new, time.perf_counter() - start, stages)


def _denoiser(manifest: dict, weights: Path) -> torch.nn.Module:
    """The artifact's denoiser, built from its manifest and its weights file."""
    denoiser = manifest["denoiser"]
    module = build_denoiser(denoiser["class"], denoiser["config"])
    tensors = load_weights(weights)
    state = set(module.state_dict())
    module.load_state_dict({k: v for k, v in tensors.items() if k in state}, strict=True, assign=True)
    return module.eval()


def _load_new_weights(module: torch.nn.Module, path: Path, old: Path) -> None:
    """The tensors of `path`, which must be the artifact's weights by name, shape and dtype."""
    from .models.safetensors_header import read_header

    if not path.is_file():
        raise PostDiffError("no such weights file", path)
    header = read_header(path)
    header.check_data_present()
    ours = WeightsIndex(old).tensors
    wanted = set(module.state_dict())
    for name, info in header.tensors.items():
        if name.startswith(PAD_PREFIX):
            continue   # an artifact's own weights file given back
        if name not in ours:
            raise PostDiffError(f"tensor {name!r} is not a weight of the artifact's denoiser (names must be its "
                                "diffusers state-dict keys)", path)
        if (info.dtype, tuple(info.shape)) != (ours[name].dtype, tuple(ours[name].shape)):
            raise PostDiffError(f"tensor {name!r} is {info.dtype} {list(info.shape)}, the artifact's is "
                                f"{ours[name].dtype} {list(ours[name].shape)}", path)
    missing = sorted(wanted - set(header.tensors))
    if missing:
        raise PostDiffError(f"the weights have no tensor {missing[0]!r} (and {len(missing) - 1} more missing)"
                            if len(missing) > 1 else f"the weights have no tensor {missing[0]!r}", path)
    tensors = load_weights(path)
    module.load_state_dict({k: v for k, v in tensors.items() if k in wanted}, strict=True, assign=True)


def _verified(manifest: dict, module: torch.nn.Module, tmp: Path, family, timed, stages, source: str) -> dict:
    """The manifest with every variant verified again on the new weights, each of its files opened from `tmp`."""
    dtype_name = manifest["denoiser"]["dtype"]
    # Verified where the files run: AOTInductor packages compiled for a GPU run only there.
    on_gpu = any(v["files"].get("aoti", {}).get("device") == "cuda" for v in manifest["variants"])
    dtype, device = getattr(torch, dtype_name), torch.device("cuda" if on_gpu else "cpu")
    module.to(device)
    build = Build(folder=tmp, formats=tuple(manifest["formats"]), device=device, dtype_name=dtype_name,
                  tolerance=VERIFY_TOLERANCE[dtype_name], reference=reference_of(dtype, device), source=source,
                  timed=timed, stages=stages)
    build.weights = ArtifactWeights(tmp / FILE)
    builder = VariantBuilder(module, family, build, manifest["config"].get("cache_branch", 0))
    variants = []
    for entry in manifest["variants"]:
        job, _, check = builder.job((entry["name"], entry["batch"], tuple(entry["latent_size"])), entry["id"])
        files = {}
        for fmt, file in entry["files"].items():
            with timed(f"verify {fmt} {entry['id']}"):
                run = FORMATS[fmt].impl().open_file(tmp / file["file"], device, file["sha256"], build.weights)
                got = run(*[t.to(device).contiguous() for t in job.feed])
                files[fmt] = {**file, "verification": job.verify(list(got), f"{fmt} file", " on the new weights")}
        variants.append({**entry, "verification": builder.verification(check), "files": files})
    return {k: v for k, v in manifest.items() if k not in ("format", "format_version")} | {"variants": variants}
