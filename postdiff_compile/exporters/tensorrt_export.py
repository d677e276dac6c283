"""The tensorrt format: a TensorRT engine built from a variant's ONNX graph: static shapes, strongly typed, a timing cache per GPU.

An engine only runs on the TensorRT version and GPU architecture that built it, so both are in its file
name and in the manifest, and the artifact loader refuses a mismatch instead of deserialising a stale
engine (the TensorRT diffusion demo names engines by TensorRT version only and silently reuses one built
for another resolution: prior-art-compilers.md 1.5). Resolution is part of the variant id, so it is in the
name too.

Strongly typed networks take each layer's precision from the ONNX tensor types: a float16 artifact gives a
float16 engine, with no builder precision flags to get wrong.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import PostDiffError
from .formats import Build, VariantJob
from .manifest import file_entry, graph_entries

NEEDS = ("TensorRT engines need the `tensorrt` Python package (pip install tensorrt) and an NVIDIA GPU with "
         "CUDA; use --format pt2,onnx on this machine")


def unavailable_reason() -> str | None:
    """Why TensorRT cannot build or run here, or None if it can."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def check_tensorrt() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise PostDiffError(f"{NEEDS} ({reason})")


def device_key() -> dict:
    """What an engine is tied to: TensorRT version, compute capability, GPU name."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "compute_capability": f"{major}.{minor}",
            "gpu": torch.cuda.get_device_name()}


def engine_file_name(variant_id: str, precision: str, key: dict) -> str:
    sm = key["compute_capability"].replace(".", "")
    return f"{variant_id.replace('+', '-')}.{precision}.trt{key['tensorrt']}.sm{sm}.engine"


def timing_cache_path(key: dict) -> Path:
    """Shared between builds on the same GPU model and TensorRT version; never between others."""
    root = Path(os.environ.get("POSTDIFF_CACHE_DIR") or Path.home() / ".cache" / "postdiff-compile")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", key["gpu"]).strip("-").lower()
    return root / "tensorrt" / f"timing-{gpu}-sm{key['compute_capability'].replace('.', '')}-trt{key['tensorrt']}.cache"


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, engine_path: Path, key: dict) -> dict:
    """Parse the ONNX (external weights are read from beside it), build, serialise; update the timing cache."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise PostDiffError(f"TensorRT cannot parse the ONNX graph: {errors}", onnx_path)
    config = builder.create_builder_config()
    cache_path = timing_cache_path(key)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PostDiffError("TensorRT failed to build an engine (see its log above)", onnx_path)
    engine_path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp.replace(cache_path)
    return {"file": engine_path.name, **key}


class EngineRunner:
    """One deserialised engine; call it with CUDA tensors in the engine's input order and dtypes."""

    def __init__(self, path: Path):
        import tensorrt as trt

        runtime = trt.Runtime(_logger())
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise PostDiffError("TensorRT cannot deserialise the engine (built by another TensorRT version or GPU?)",
                                path)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, *inputs):
        import tensorrt as trt
        import torch

        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        keep = []
        for name, tensor in zip(self.inputs, inputs):
            want = dtypes[self.engine.get_tensor_dtype(name)]
            tensor = tensor.to(device="cuda", dtype=want).contiguous()
            keep.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.engine.get_tensor_shape(name)),
                              dtype=dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
            outputs.append(out)
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return tuple(outputs)


check_available = check_tensorrt


def begin(build: Build) -> None:
    key = build.state["tensorrt"] = device_key()
    build.toolchain["tensorrt"] = key["tensorrt"]


def write(job: VariantJob) -> dict:
    build = job.build
    key = build.state["tensorrt"]
    engine = build.folder / engine_file_name(job.tag, build.dtype_name, key)
    with build.timed(f"build tensorrt {job.tag}"):
        entry = build_engine(build.folder / f"{job.stem}.onnx", engine, key)
    with build.timed(f"verify tensorrt {job.tag}"):
        verification = job.verify(EngineRunner(engine)(*job.feed), "TensorRT engine")
    return {**entry, **file_entry(engine), "precision": build.dtype_name, "verification": verification}


def check_toolchain(folder: Path, manifest: dict, device) -> None:
    check_tensorrt()
    here = device_key()
    for variant in graph_entries(manifest):
        engine = variant["files"]["tensorrt"]
        for key in ("tensorrt", "compute_capability"):
            if engine[key] != here[key]:
                raise PostDiffError(
                    f"engine built with {key.replace('_', ' ')} {engine[key]}, this machine has {here[key]}: a "
                    "TensorRT engine runs only where it was built; rebuild with --format tensorrt here",
                    Path(folder) / engine["file"])


def open_file(path: Path, device, sha256: str | None = None, weights=None):
    # An engine holds its own weights (built from the ONNX graph and the weights file).
    engine = EngineRunner(path)
    return lambda *inputs: engine(*inputs)
