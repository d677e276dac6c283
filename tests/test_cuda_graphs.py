"""CUDA-graph replay of variant calls (runtime/cuda_graphs.py): the capture-and-replay bookkeeping, on a CPU with a
stand-in for torch.cuda's graphs that replays by re-running the captured function into the captured outputs; and
the refusal of a CPU pipeline (a CPU artifact's: test_artifact.py). The kernels themselves need a GPU (gpu_suite.py)."""
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


def test_optimize_refuses_cuda_graphs_on_a_cpu_pipeline():
    from tiny_models import tiny_sd_pipeline

    from postdiff_compile import optimize

    with pytest.raises(PostDiffError, match="needs the pipeline on a CUDA device"):
        optimize(tiny_sd_pipeline("sd15"), "none", cuda_graphs=True)
