"""The onnx format: a variant exported to ONNX with the dynamo exporter, its weights in the artifact's shared
weights file, opened by onnxruntime.

Why each step:
- `optimize=False`, then onnxscript's optimizer with folding forbidden on any node that reads a weight: the
  default optimizer constant-folds Transpose/Reshape of weights into new initializers named `val_123`,
  which breaks name-based TensorRT refit (prior-art-compilers.md 1.6). With the guard, every weight
  initializer keeps its diffusers state-dict key and the graph is still cleaned up (561 nodes instead of
  1388 for the tiny SD1.5 U-Net).
- Weights are external data pointing into the artifact's one `weights.safetensors` (weights_file.py), by
  offset: one copy for all variants and formats, and no variant runs into protobuf's 2 GB limit. Non-weight
  constants (shape arguments) stay inline, where shape inference needs them.
- The graph is exported from the variant's torch.export program (pt2.export_variant, which drops squeezes of
  dimensions larger than 1 first: no-ops in torch, errors in ONNX), made once for every format.
- Node metadata keeps only the module path (`name_scopes`): the exporter's stack traces and FX dumps are
  90% of a graph file's size and carry the build machine's paths.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from ..capture import example_inputs
from ..errors import PostDiffError
from ..variants import Variant, variant_input_specs
from .formats import Build, VariantJob
from .onnx_binding import bound_runner
from .manifest import file_entry
from .weights_file import FILE, PARAM_PREFIX, V1_FILE, WrittenWeights

OPSET = 18
KEEP_METADATA = ("pkg.torch.onnx.name_scopes",)


@contextlib.contextmanager
def _quiet():
    """The exporter prints its stages and warns about optional packages (torchvision); the CLI has its own
    progress, and a real failure still raises."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(variant: Variant, path: Path, weights: WrittenWeights, opset: int = OPSET,
                exported: torch.export.ExportedProgram | None = None) -> dict:
    """Write `path` (the graph, pointing into `weights`) and return its manifest entry. From the variant's
    torch.export program when given (pt2.program_of: the tracing is then done once for every format)."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize_ir

    module = variant.module
    params = dict(module.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    args = tuple(a.to(device) for a in example_inputs(variant_input_specs(variant)))
    if exported is None:
        from .pt2 import export_variant

        exported = export_variant(variant)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(exported, args, dynamo=True, input_names=list(variant.inputs),
                                        output_names=list(variant.outputs), opset_version=opset, optimize=False,
                                        verbose=False)
    except Exception as err:  # the exporter raises many error types
        raise PostDiffError(f"ONNX export failed for variant {variant.spec.name}: {type(err).__name__}: {err}")
    model = program.model
    weight_names = set(params) | {name for name, _ in module.named_buffers()}

    def reads_weight(node) -> bool | None:
        if any(v is not None and v.is_initializer() and v.name in weight_names for v in node.inputs):
            return False
        return None   # the optimizer's own rules

    with _quiet():
        optimize_ir(model, should_fold=reads_weight)
    for node in model.graph:
        for key in [k for k in node.metadata_props if k not in KEEP_METADATA]:
            del node.metadata_props[key]

    external = 0
    for old, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or old not in weight_names:
            continue   # shape arguments and other small constants stay in the graph, where shape inference needs them
        name = old.removeprefix(PARAM_PREFIX)
        stored = weights.bytes_of(name)
        if stored is None or stored != tensor.tobytes():
            raise PostDiffError(f"the ONNX initializer {name!r} of variant {variant.spec.name} is not the denoiser's "
                                "tensor of that name in the weights file", path)
        entry = weights.index[name]
        del model.graph.initializers[old]
        value.name = name
        value.const_value = ir.ExternalTensor(FILE, entry.offset, entry.length, tensor.dtype, shape=tensor.shape,
                                              name=name, base_dir=str(weights.index.path.parent))
        model.graph.register_initializer(value)
        external += 1
    ir.save(model, str(path))
    return {**file_entry(path), "opset": opset, "external_initializers": external, "weights": FILE}


def onnx_session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One thread setting for the whole runner: torch's (load(..., threads=N) and --threads set it).
    options.intra_op_num_threads = torch.get_num_threads()
    # A plan runs several sessions, each with its own thread pool; a pool that spins after its run competes for
    # the cores with the next session's (measured below, in docs/performance.md "Cost model").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime's CPU arena keeps the largest activations of every run of every session: one full-size SD1.5
    # session at 96x96 grew to 17.9 GB after two runs with it and stayed at 10.6 GB without, and its runs took 32 s
    # with it against 20-23 s without (docs/performance.md, "One copy of the weights").
    if not providers or providers == ["CPUExecutionProvider"]:
        options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise PostDiffError(f"onnxruntime cannot load the graph: {err}", path) from None


def run_session(session, names: list[str], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


def begin(build: Build) -> None:
    import onnx
    import onnxruntime
    import onnxscript

    build.toolchain.update(onnx=onnx.__version__, onnxscript=onnxscript.__version__, onnxruntime=onnxruntime.__version__)


def write(job: VariantJob) -> dict:
    build = job.build
    path = build.folder / f"{job.stem}.onnx"
    with build.timed(f"export onnx {job.tag}"):
        from .pt2 import program_of

        entry = export_onnx(job.variant, path, build.weights, exported=program_of(job))
    with build.timed(f"verify onnx {job.tag}"):
        got = run_session(onnx_session(path), list(job.variant.inputs), job.feed)
        if len(got) != len(job.expected):
            raise PostDiffError(f"the ONNX graph has {len(got)} outputs, the torch variant {len(job.expected)}", path)
        entry["verification"] = job.verify(got, "ONNX graph", " under onnxruntime")
    return entry


def check_file(path: Path) -> None:
    """Every tensor the graph keeps outside it lives in the artifact's shared weights file: onnxruntime would
    read any path an edited graph names (`../../etc/passwd`) and a hash of the graph does not stop an edit."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf and onnx raise several types for a damaged file
        raise PostDiffError(f"not an ONNX graph: {type(err).__name__}: {str(err)[:200]}", path) from None
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location not in (FILE, V1_FILE):
                raise PostDiffError(f"the ONNX tensor {tensor.name[:80]!r} reads its data from {str(location)[:80]!r}; "
                                    f"an artifact's graphs read only {FILE} beside them", path)


def open_file(path: Path, device: torch.device, sha256: str | None = None, weights=None):
    """The graph as a callable whose onnxruntime session is created at its first call.

    A session folds and prepacks its own copy of the weights (on a CPU, float16 weights also cast to float32):
    opening every session at load made `load` of a full-size SD1.5 `fast` artifact take 93.7 s at 16.5 GB
    (docs/performance.md, "One copy of the weights"). Created on first use, a plan's sessions are paid by its first
    generation, and a variant no request reaches costs nothing."""
    check_file(path)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
    opened: list = []

    def run(*inputs):
        if not opened:
            opened.append(_runner(onnx_session(path, providers), device))
        return opened[0](*inputs)
    return run


def _runner(session, device: torch.device):
    # On a GPU, binding keeps inputs and outputs on the device (session.run would copy both through the host). On
    # a CPU, session.run's numpy views are already zero-copy: measured on the reference model, binding was no
    # faster there (35.6 against 31.2 ms per call, 80 interleaved rounds), so it is not used.
    bound = bound_runner(session, device) if device.type == "cuda" else None
    if bound is not None:
        return bound
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        return [t.to(device) for t in run_session(session, names, inputs)]
    return run
