"""CUDA-graph replay of variant calls (runtime/cuda_graphs.py): the capture-and-replay bookkeeping, on a CPU with a
stand-in for torch.cuda's graphs that replays by re-running the captured function into the captured outputs; and
the refusals where no CUDA device is. The kernels themselves need a GPU (benchmarks/gpu_suite.py)."""
from __future__ import annotations

import pytest
import torch

from postdiff_compile.capture import Bucket
from postdiff_compile.errors import PostDiffError
from postdiff_compile.runtime.cuda_graphs import GraphedSource


class StandInGraphs:
    """What a CUDA graph does, in plain torch: replay recomputes the captured function and writes the results into
    the tensors capture returned (a graph's outputs live at fixed addresses)."""

    def __init__(self):
        self.warmed = self.captured = 0

    def warm(self, fn):
        self.warmed += 1
        fn()
        fn()

    def capture(self, fn):
        self.captured += 1
        outputs = fn()

        class Graph:
            def replay(self):
                for buffer, value in zip(outputs, fn()):
                    buffer.copy_(value)
        return Graph(), outputs


class Source:
    """Two variants: an affine map of both inputs, and one writing a cache."""

    def __init__(self):
        self.calls = 0

    def get(self, name, bucket, cache_branch=0):
        source = self

        class Variant:
            inputs = ["sample", "timestep"]
            outputs = ["noise_pred"] if name == "full" else ["noise_pred", "deepcache"]

            def __call__(self, x, t):
                source.calls += 1
                y = 2 * x + t.view(-1, 1)
                return (y,) if name == "full" else (y, y.sum(1))
        return Variant()


BUCKET = Bucket(2, 4, 4, 8, torch.float32)


def test_replays_compute_what_the_variant_computes_into_static_outputs():
    api = StandInGraphs()
    graphed = GraphedSource(Source(), api)
    full = graphed.get("full", BUCKET)
    assert graphed.get("full", BUCKET) is full and full.outputs == ["noise_pred"]
    seen = []
    for i in range(4):
        x, t = torch.randn(2, 3), torch.full((2,), float(i))
        (y,) = full(x, t)
        assert torch.equal(y, 2 * x + t.view(-1, 1))
        seen.append(y)
    assert all(y is seen[0] for y in seen)   # one static buffer: valid until the next call of the variant
    assert api.warmed == 1 and api.captured == 1


def test_inputs_are_copied_not_aliased_and_strides_do_not_matter():
    graphed = GraphedSource(Source(), StandInGraphs())
    variant = graphed.get("full+write_dc", BUCKET)
    x = torch.randn(3, 2).t()                      # not contiguous
    t = torch.tensor(1.0).expand(2)                # stride 0, as the loop's timestep
    y, cache = variant(x, t)
    expected = 2 * x + 1
    x.add_(100)                                    # the caller's tensor changes after the call
    assert torch.equal(y, expected) and torch.equal(cache, expected.sum(1))
    assert variant.static_inputs[0].is_contiguous() and variant.static_inputs[1].stride() == (1,)
    with pytest.raises(ValueError, match="takes 2 inputs"):
        variant(x)


def test_each_variant_and_bucket_gets_its_own_graph():
    api = StandInGraphs()
    graphed = GraphedSource(Source(), api)
    a, b = graphed.get("full", BUCKET), graphed.get("full", Bucket(1, 4, 4, 8, torch.float32))
    a(torch.ones(2, 3), torch.zeros(2))
    b(torch.ones(1, 3), torch.zeros(1))
    assert a is not b and api.captured == 2


def test_cuda_graphs_are_refused_without_a_cuda_device(tiny_artifact):
    from postdiff_compile import load

    with pytest.raises(PostDiffError, match="cuda_graphs needs the torch or aoti backend on a CUDA device"):
        load(tiny_artifact("none"), "torch", cuda_graphs=True)
    with pytest.raises(PostDiffError, match="onnxruntime and TensorRT capture graphs of their own"):
        load(tiny_artifact("none"), "onnxruntime", device="cuda", cuda_graphs=True)


def test_optimize_refuses_cuda_graphs_on_a_cpu_pipeline():
    from tiny_models import tiny_sd_pipeline

    from postdiff_compile import optimize

    with pytest.raises(PostDiffError, match="needs the pipeline on a CUDA device"):
        optimize(tiny_sd_pipeline("sd15"), "none", cuda_graphs=True)


def test_onnxruntime_io_binding_matches_session_run_and_reuses_its_outputs(tiny_artifact):
    """The bound runner the CUDA provider uses, checked on the CPU provider against session.run."""
    import json

    from postdiff_compile.exporters.onnx_binding import bound_runner
    from postdiff_compile.exporters.onnx_export import onnx_session, run_session

    folder = tiny_artifact("balanced")
    entry = next(v for v in json.loads((folder / "manifest.json").read_text())["variants"] if "write_dc" in v["id"])
    session = onnx_session(folder / entry["files"]["onnx"]["file"])
    run = bound_runner(session, torch.device("cpu"))
    names = [i.name for i in session.get_inputs()]
    first = None
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(i["shape"], generator=gen) for i in entry["inputs"]]
        inputs[1] = torch.tensor(500.0).expand(inputs[1].shape)    # the loop's stride-0 timestep
        got = run(*inputs)
        expected = run_session(session, names, tuple(inputs))
        assert len(got) == len(expected) == 2
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        first = first or got
        assert all(a is b for a, b in zip(first, got))
