"""Export a variant to ONNX with the dynamo exporter, its weights in the artifact's shared weights file.

Why each step:
- `optimize=False`, then onnxscript's optimizer with folding forbidden on any node that reads a weight: the
  default optimizer constant-folds Transpose/Reshape of weights into new initializers named `val_123`,
  which breaks name-based TensorRT refit (prior-art-compilers.md 1.6). With the guard, every weight
  initializer keeps its diffusers state-dict key and the graph is still cleaned up (561 nodes instead of
  1388 for the tiny SD1.5 U-Net).
- Weights go to `weights.bin` (weights_file.py) as external data: one copy across all variants, and no
  variant runs into protobuf's 2 GB limit. Small non-weight constants (shape arguments) stay inline,
  where shape inference needs them.
- Squeezes of dimensions larger than 1 (no-ops in torch, errors in ONNX) are dropped first
  (passes/noop_squeeze.py).
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

from ..capture import Verification, compare_outputs, example_inputs
from ..errors import PostDiffError
from ..passes.noop_squeeze import drop_noop_squeezes
from ..variants import Variant, variant_input_specs
from .manifest import sha256_file
from .weights_file import LARGE, WeightsFile

OPSET = 18
PARAM_PREFIX = "denoiser."           # DenoiserCall holds the denoiser under this attribute
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


def export_onnx(variant: Variant, path: Path, weights: WeightsFile, opset: int = OPSET) -> dict:
    """Write `path` (graph only; weights into `weights`) and return its manifest entry."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize_ir

    # Same computation, so the variant (also used by the other formats) is edited in place.
    if drop_noop_squeezes(variant.module.graph):
        variant.module.recompile()
    params = dict(variant.module.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    args = tuple(a.to(device) for a in example_inputs(variant_input_specs(variant)))
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(variant.module, args, dynamo=True, input_names=list(variant.inputs),
                                        output_names=list(variant.outputs), opset_version=opset, optimize=False,
                                        verbose=False)
    except Exception as err:  # the exporter raises many error types
        raise PostDiffError(f"ONNX export failed for variant {variant.spec.name}: {type(err).__name__}: {err}")
    model = program.model
    weight_names = set(params) | {name for name, _ in variant.module.named_buffers()}

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
        is_weight = old in weight_names
        if tensor is None or (not is_weight and tensor.nbytes < LARGE):
            continue
        name = old.removeprefix(PARAM_PREFIX) if is_weight else old
        offset, length = weights.add(name, tensor.tobytes())
        del model.graph.initializers[old]
        value.name = name
        value.const_value = ir.ExternalTensor(weights.path.name, offset, length, tensor.dtype, shape=tensor.shape,
                                              name=name, base_dir=str(weights.path.parent))
        model.graph.register_initializer(value)
        external += 1
    weights.flush()   # the graph is verified right after, by a reader of the same file
    ir.save(model, str(path))
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "opset": opset,
            "external_initializers": external}


def onnx_session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise PostDiffError(f"onnxruntime cannot load the graph: {err}", path) from None


def run_session(session, names: list[str], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


def verify_onnx(path: Path, names: list[str], inputs: tuple[torch.Tensor, ...],
                expected: tuple[torch.Tensor, ...], seed: int) -> Verification:
    """onnxruntime's outputs against the torch variant's on the same inputs; the worst output counts."""
    got = run_session(onnx_session(path), names, inputs)
    if len(got) != len(expected):
        raise PostDiffError(f"the ONNX graph has {len(got)} outputs, the torch variant {len(expected)}", path)
    return compare_outputs(got, expected, seed)
