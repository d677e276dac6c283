"""Variant calls replayed from CUDA graphs: every kernel of a step launched by one replay instead of one Python
dispatch each, which is what a batch-1 or low-resolution step cannot otherwise shrink on a GPU.

Each variant is captured at its first call: its inputs are copied into static buffers, it runs twice on a side
stream (lazy initialisation, cuDNN's algorithm choice), then once under capture into a memory pool that every graph
of the runner shares. Later calls copy the inputs in and replay; the outputs are the graph's static tensors, valid
until the same variant is called again (the contract of runtime/denoise.py's VariantSource). The graph API is a
parameter so that the capture-and-replay bookkeeping is tested on a CPU with a stand-in (tests/test_cuda_graphs.py);
on a GPU it is torch.cuda's.
"""
from __future__ import annotations

from typing import Any

import torch

from ..capture import Bucket


class TorchCudaGraphs:
    """torch.cuda's graph API, as GraphedVariant uses it."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()   # one pool for every graph of a runner

    def warm(self, fn) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn) -> tuple[Any, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            result = fn()
        return graph, result


class GraphedVariant:
    def __init__(self, variant, api):
        self.variant, self.api = variant, api
        self.inputs, self.outputs = variant.inputs, variant.outputs
        self.graph = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph is None:
            # Contiguous copies the graph reads from: later inputs are copied into them, whatever their strides.
            self.static_inputs = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in inputs)
            run = lambda: tuple(self.variant(*self.static_inputs))   # noqa: E731
            self.api.warm(run)
            self.graph, self.static_outputs = self.api.capture(run)
        else:
            if len(inputs) != len(self.static_inputs):
                raise ValueError(f"a captured variant takes {len(self.static_inputs)} inputs, got {len(inputs)}")
            for buffer, value in zip(self.static_inputs, inputs):
                buffer.copy_(value)
        self.graph.replay()
        return self.static_outputs


class GraphedSource:
    """A VariantSource whose variants are replayed from CUDA graphs, one per variant, sharing one memory pool."""

    def __init__(self, source, api=None):
        self.source, self.api = source, api if api is not None else TorchCudaGraphs()
        self._graphed: dict[tuple[str, Bucket, int], GraphedVariant] = {}

    def get(self, name: str, bucket: Bucket, cache_branch: int = 0) -> GraphedVariant:
        key = (name, bucket, cache_branch)
        if key not in self._graphed:
            self._graphed[key] = GraphedVariant(self.source.get(name, bucket, cache_branch), self.api)
        return self._graphed[key]
