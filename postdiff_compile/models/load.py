"""Load a denoiser, offline, from a checkpoint file, a diffusers folder or an in-memory diffusers object."""
from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import safe_json
from ..errors import PostDiffError
from .build import build_denoiser
from .detect import detect
from .families import DENOISER_KINDS, FAMILIES, FamilySpec, get_family
from .key_maps import original_source
from .safetensors_header import SafetensorsHeader, read_header
from .shape_evidence import Detection

SUPPORTED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
# Where a diffusers pipeline keeps its denoiser, as a folder and as an attribute: "unet", "transformer".
_DENOISER_COMPONENTS = tuple(dict.fromkeys(kind.pipeline_component for kind in DENOISER_KINDS.values()))


@dataclass
class LoadedDenoiser:
    module: torch.nn.Module
    detection: Detection
    source: str                          # what the user gave, for messages and the manifest
    files: list[Path] = field(default_factory=list)  # weight files read (empty for in-memory sources)

    @property
    def family(self) -> FamilySpec:
        """The detected family, with the VAE factor of the pipeline the denoiser came with (never assumed)."""
        spec = get_family(self.detection.family)
        factor = self.detection.vae_scale_factor
        return replace(spec, vae_scale_factor=factor) if factor and factor != spec.vae_scale_factor else spec

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in SUPPORTED_DTYPES.values():
        return dtype
    if dtype not in DTYPE_NAMES:
        raise PostDiffError(f"unsupported dtype {dtype!r}; choose one of float32, float16, bfloat16")
    return DTYPE_NAMES[dtype]


def load_denoiser(source: Any, dtype: str | torch.dtype | None = None,
                  prediction_type: str | None = None, family: str | None = None) -> LoadedDenoiser:
    """The denoiser in `source`: a .safetensors file, a diffusers model or pipeline folder, or a diffusers object.

    Weights keep the checkpoint's dtype unless `dtype` is given. `family` overrides detection (a custom U-Net,
    even in a single file, then takes that family's presets). Nothing is downloaded.
    """
    dtype = parse_dtype(dtype)
    if family is not None and family not in FAMILIES:
        raise PostDiffError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise PostDiffError("file or folder not found", path)
        loaded = _load_folder(path, dtype, family) if path.is_dir() else _load_file(path, dtype, family)
    else:
        loaded = _load_object(source, dtype, family)
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PostDiffError(f"unknown prediction type {prediction_type!r}; use epsilon, v_prediction or sample")
        loaded.detection.prediction_type = prediction_type
        loaded.detection.evidence.append(f"prediction type {prediction_type}: given by the caller")
    return loaded


# --- single files ------------------------------------------------------------------------------------------

class _WeightFiles:
    """One or more safetensors files seen as one {name: tensor} store (sharded diffusers weights)."""

    def __init__(self, headers: list[SafetensorsHeader]):
        self.headers = headers
        self.where = {name: h for h in headers for name in h.tensors}
        self._open: dict[Path, Any] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: h.tensors[name].shape for name, h in self.where.items()}

    @property
    def metadata(self) -> dict[str, str]:
        return {k: v for h in self.headers for k, v in h.metadata.items()}

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        header = self.where[name]
        header.check_data_present()
        try:
            if header.path not in self._open:
                self._open[header.path] = safe_open(str(header.path), framework="pt")
            return self._open[header.path].get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise PostDiffError(f"could not read tensor {name!r} ({err})", header.path) from None


def _load_file(path: Path, dtype: torch.dtype | None, family: str | None) -> LoadedDenoiser:
    files = _WeightFiles([read_header(path)])
    # Without a config a custom width is built from the weights only when the caller named the family.
    detection = detect(files.shapes, str(path), files.metadata, files.read, allow_custom=family is not None)
    _given_family(detection, family, str(path))
    return _assemble(files, detection, dtype, str(path))


def _given_family(detection: Detection, family: str | None, source: str) -> None:
    if family is None or family == detection.family:
        return
    kind, given = get_family(detection.family).denoiser_class, get_family(family).denoiser_class
    if kind != given:
        raise PostDiffError(f"family {family} takes a {given}, but this is a {kind} (detected as "
                            f"{detection.family})", source)
    detection.evidence.append(f"family {family}: given by the caller (detected as {detection.family})")
    detection.family = family


def _assemble(files: _WeightFiles, detection: Detection, dtype: torch.dtype | None, source: str) -> LoadedDenoiser:
    spec = get_family(detection.family)
    for header in files.headers:   # before building: a truncated multi-GB download fails in a millisecond
        header.check_data_present()
    try:
        model = build_denoiser(spec.denoiser_class, detection.config)
    except PostDiffError as err:
        raise PostDiffError(str(err), source) from None
    expected = model.state_dict()
    wanted = {key: original_source(detection.layout, key, detection.config, detection.prefix) for key in expected}
    missing = sorted({src.name for src in wanted.values() if src.name not in files.where})
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise PostDiffError(f"checkpoint detected as {detection.family} ({detection.layout} layout) "
                            f"but {len(missing)} of its tensors are missing: {shown}", source)
    majority = _checkpoint_dtype(files, {src.name for src in wanted.values()}, source)  # also rejects int/fp8
    target = dtype or majority
    state = {}
    for key, src in wanted.items():
        stored = files.read(src.name)
        need = (src.stored_rows(expected[key].shape[0]), *expected[key].shape[1:])  # a fused tensor holds all parts
        if tuple(stored.shape) != need:
            raise PostDiffError(f"tensor {src.name!r} has shape {tuple(stored.shape)}, but the detected "
                                f"{detection.family} architecture needs {need}", source)
        state[key] = src.take(stored).to(target)
    model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False)
    files_read = sorted({files.where[src.name].path for src in wanted.values()})
    return LoadedDenoiser(model, detection, source, files_read)


def _checkpoint_dtype(files: _WeightFiles, names: set[str], source: str) -> torch.dtype:
    """The dtype most denoiser tensors have. Mixed files exist (fp32 norms in an fp16 file); the model gets one
    compute dtype, so the few others are cast to it."""
    dtypes: Counter[str] = Counter()
    for name in names:
        dt = files.where[name].tensors[name].dtype
        if dt not in SUPPORTED_DTYPES:
            raise PostDiffError(f"unsupported dtype {dt} for tensor {name!r} (supported: F32, F16, BF16)", source)
        dtypes[dt] += 1
    return SUPPORTED_DTYPES[dtypes.most_common(1)[0][0]]


# --- folders -----------------------------------------------------------------------------------------------

def _load_folder(path: Path, dtype: torch.dtype | None, family: str | None) -> LoadedDenoiser:
    prediction_type = None
    model_dir = path
    if (path / "model_index.json").is_file():
        model_dir = next((path / sub for sub in _DENOISER_COMPONENTS if (path / sub / "config.json").is_file()), None)
        if model_dir is None:
            raise PostDiffError("pipeline folder has no unet/ or transformer/ subfolder with a config.json", path)
        scheduler = path / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():
            prediction_type = _read_json(scheduler).get("prediction_type")
            if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
                raise PostDiffError(f"unknown prediction_type {str(prediction_type)[:60]!r}", scheduler)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.ckpt")):
            raise PostDiffError("no model found: only pickle weights (.bin/.ckpt) and no config.json; convert "
                                "them to a diffusers folder with safetensors weights first", path)
        raise PostDiffError("no model found: expected model_index.json (a diffusers pipeline) or config.json "
                            "with diffusion_pytorch_model.safetensors (a diffusers model)", path)
    weights = _folder_weights(model_dir)
    files = _WeightFiles([read_header(w) for w in weights])
    detection = detect(files.shapes, str(model_dir), files.metadata, files.read, allow_custom=True)
    vae_config = path / "vae" / "config.json"
    if model_dir != path and vae_config.is_file():
        _set_vae_factor(detection, _vae_factor(_read_json(vae_config).get("block_out_channels"), vae_config))
    config = _read_json(config_path)
    # The folder's config decides the architecture, but the weights decide the sizes: a config that disagrees
    # with them cannot load (and one claiming a million blocks would take forever to build).
    for key in _STRUCTURAL:
        if key in detection.config and key in config and config[key] != detection.config[key]:
            raise PostDiffError(f"{key} is {str(config[key])[:60]} but the weights have "
                                f"{detection.config[key]}", config_path)
    detection.config = {k: v for k, v in config.items() if not k.startswith("_")}
    detection.evidence.append(f"config from {config_path}")
    if prediction_type:
        detection.prediction_type = prediction_type
        detection.evidence.append(f"prediction type {prediction_type} from scheduler/scheduler_config.json")
    _given_family(detection, family, str(path))
    if family is None:
        _warn_custom(detection, str(path))
    return _assemble(files, detection, dtype, str(path))


def _vae_factor(block_out_channels: Any, source: Path) -> int:
    if not isinstance(block_out_channels, list) or not 1 <= len(block_out_channels) <= 8:
        raise PostDiffError("the VAE config's block_out_channels should be a list of 1 to 8 widths", source)
    return 2 ** (len(block_out_channels) - 1)   # one downsampling between levels, as diffusers' pipelines count


def _set_vae_factor(detection: Detection, factor: int) -> None:
    detection.vae_scale_factor = factor
    family_factor = get_family(detection.family).vae_scale_factor
    if factor != family_factor:
        detection.differs.append(f"VAE factor {factor} ({detection.family}: {family_factor})")
        detection.evidence.append(f"VAE factor {factor} from the pipeline's VAE")


def _warn_custom(detection: Detection, source: str) -> None:
    if detection.differs:
        warnings.warn(f"{source}: {'; '.join(detection.differs)} match no released family; {detection.family}'s "
                      f"presets and settings apply", UserWarning, stacklevel=4)


def _folder_weights(model_dir: Path) -> list[Path]:
    for name in _WEIGHT_NAMES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    index = next((model_dir / f"{name}.index.json" for name in _WEIGHT_NAMES
                  if (model_dir / f"{name}.index.json").is_file()), None)
    if index is not None:
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise PostDiffError("sharded weights index lists no files", index)
        return [model_dir / s for s in shards]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.ckpt")):
        raise PostDiffError("only pickle weights (.bin/.ckpt) found; convert them to safetensors first", model_dir)
    raise PostDiffError("no diffusion_pytorch_model.safetensors found", model_dir)


# Config fields a folder's config.json must agree on with what detection read from the weights' shapes.
_STRUCTURAL = ("in_channels", "block_out_channels", "layers_per_block", "num_layers", "num_single_layers",
               "patch_size")


def _read_json(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PostDiffError(f"could not read JSON ({err.strerror})", path) from None
    data = safe_json.loads(raw, path)
    if not isinstance(data, dict):
        raise PostDiffError("expected a JSON object", path)
    return data


# --- in-memory objects -------------------------------------------------------------------------------------

def denoiser_of(obj: Any) -> torch.nn.Module:
    """The denoiser module of a diffusers pipeline, or the object itself if it is one."""
    for attr in _DENOISER_COMPONENTS:
        module = getattr(obj, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    if isinstance(obj, torch.nn.Module):
        return obj
    raise PostDiffError(f"expected a path, a diffusers pipeline or a denoiser module, got {type(obj).__name__}")


def _base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict by the base model's names: a LoRA loaded through diffusers (PEFT layers, unfused) wraps each
    adapted layer, whose weights then read `<layer>.base_layer.weight` beside its `lora_A/B` tensors."""
    state = module.state_dict()
    if not any(".base_layer." in k for k in state):
        return state
    return {k.replace(".base_layer.", "."): v for k, v in state.items()
            if ".lora_" not in k and ".lora_magnitude_vector" not in k}


def _load_object(obj: Any, dtype: torch.dtype | None, family: str | None = None) -> LoadedDenoiser:
    module = denoiser_of(obj)
    state = _base_state(module)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    detection = detect(shapes, f"<{type(module).__name__}>", None, lambda name: state[name],
                       allow_custom=hasattr(module, "config"))
    if module is not obj and getattr(obj, "vae", None) is not None and hasattr(obj, "vae_scale_factor"):
        _set_vae_factor(detection, int(obj.vae_scale_factor))
    if hasattr(module, "config"):
        detection.config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    scheduler = getattr(obj, "scheduler", None)
    if scheduler is not None and "prediction_type" in scheduler.config:
        detection.prediction_type = scheduler.config["prediction_type"]
        detection.evidence.append(f"prediction type {detection.prediction_type} from the pipeline's scheduler")
    name = f"<{getattr(type(obj), '_postdiff_base', type(obj)).__name__}>"   # an optimized pipeline: its class
    _given_family(detection, family, name)
    if family is None:
        _warn_custom(detection, name)
    if dtype is not None and dtype != next(module.parameters()).dtype:
        # A cast copy: the caller's model is theirs and keeps its dtype.
        module = copy.deepcopy(module).to(dtype)
    return LoadedDenoiser(module, detection, f"<in-memory {type(module).__name__}>")
