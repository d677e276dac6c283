"""A roofline estimate of a variant's time, from its graph and a device's measured ceilings.

FLOPs alone say a batch-1 step at a quarter of the pixels costs an eighth of a CFG step; on a real device every
op also reads its weights and pays a fixed dispatch or launch cost, whatever the batch and spatial size. Here each
op costs the larger of its FLOPs over the device's matmul rate and its bytes (inputs, weights, output) over the
copy rate, plus one tiny op's cost; a graph costs the sum. Views move nothing and cost nothing. What the probe
cannot see (a backend's fusion, cache reuse) is what a measured cost table corrects (predict.py).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from ..costs import DevicePeak
from .flops import node_macs

aten = torch.ops.aten
# Ops that only re-describe memory (or pass a value through): no bytes move, and a compiler removes them.
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
          aten.expand.default, aten.t.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
          aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
          aten.chunk.default, aten.alias.default, aten.detach.default, aten.unbind.int, aten.flatten.using_ints}


@dataclass(frozen=True)
class Traffic:
    """Per data-moving op of a graph: (FLOPs, elements read and written). Elements, not bytes, so that one
    meta-device capture serves every dtype."""
    nodes: tuple[tuple[int, int], ...]
    weight_elements: int

    @property
    def flops(self) -> int:
        return sum(f for f, _ in self.nodes)

    @property
    def elements(self) -> int:
        return sum(e for _, e in self.nodes)

    def estimate_ms(self, peak: DevicePeak, itemsize: int) -> float:
        flop_s, byte_s = peak.matmul_gflops * 1e9, peak.copy_gbs * 1e9
        seconds = sum(max(f / flop_s, e * itemsize / byte_s) for f, e in self.nodes)
        return 1e3 * seconds + len(self.nodes) * peak.op_us / 1e3


def _elements(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_elements(v) for v in value)
    return 0


def traffic(module: torch.fx.GraphModule) -> Traffic:
    weights: dict[str, int] = {}

    def size(arg) -> int:
        if not isinstance(arg, torch.fx.Node):
            return sum(size(a) for a in arg) if isinstance(arg, (list, tuple)) else 0
        if arg.op == "get_attr":
            if arg.target not in weights:
                weights[arg.target] = _elements(operator.attrgetter(arg.target)(module))
            return weights[arg.target]
        return _elements(arg.meta.get("val"))

    nodes = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target in _VIEWS or node.target is operator.getitem:
            continue
        layer, other = node_macs(node)
        moved = sum(size(a) for a in node.args) + _elements(node.meta.get("val"))
        nodes.append((2 * (layer + other), moved))
    return Traffic(tuple(nodes), sum(weights.values()))

