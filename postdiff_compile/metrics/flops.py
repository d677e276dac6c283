"""FLOPs of a variant, read off its graph's tensor shapes, in the two conventions we report.

- paper: multiply-accumulates of convolutions and linear layers, for the graph's whole batch (so a CFG
  step counts twice), attention matmuls excluded. This is what PostDiff's tables count: it reproduces
  their SD1.5/SDXL/PixArt baselines to 0.1% (../shared/reference/paper-numbers.md section 4).
- true: 2 FLOPs per multiply-accumulate, attention (QK^T and AV) and any other matmul included.
Element-wise work (norms, activations, adds) is not counted in either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

aten = torch.ops.aten


@dataclass(frozen=True)
class FlopCount:
    paper: int   # conv + linear MACs, batch included, attention excluded
    true: int    # 2 x all MACs, attention included

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.paper + other.paper, self.true + other.true)


def count_flops(graph: torch.fx.Graph) -> FlopCount:
    layer_macs = other_macs = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        layer, other = node_macs(node)
        layer_macs += layer
        other_macs += other
    return FlopCount(layer_macs, 2 * (layer_macs + other_macs))


def _shape(arg) -> tuple[int, ...]:
    return tuple(arg.meta["val"].shape)


def node_macs(node: torch.fx.Node) -> tuple[int, int]:
    """(conv/linear MACs, other matmul MACs) of one node."""
    target = node.target
    if target in (aten.conv2d.default, aten.convolution.default, aten.conv1d.default):
        weight = _shape(node.args[1])   # [out, in / groups, *kernel]
        return math.prod(_shape(node)) * math.prod(weight[1:]), 0
    if target == aten.linear.default:
        return math.prod(_shape(node)) * _shape(node.args[1])[1], 0
    if target in (aten.addmm.default, aten.mm.default):
        a = node.args[-2] if target == aten.addmm.default else node.args[0]
        # A Linear lowered to (add)mm multiplies by a parameter; count it as a layer, like aten.linear.
        weight = node.args[-1]
        if weight.op == "call_function" and isinstance(weight.args[0], torch.fx.Node):
            weight = weight.args[0]   # through the transpose
        is_layer = weight.op == "get_attr"
        macs = math.prod(_shape(node)) * _shape(a)[-1]
        return (macs, 0) if is_layer else (0, macs)
    if target in (aten.bmm.default, aten.matmul.default, aten.baddbmm.default):
        a = node.args[1] if target == aten.baddbmm.default else node.args[0]
        return 0, math.prod(_shape(node)) * _shape(a)[-1]
    if target in (aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default):
        q, k, v = (_shape(a) for a in node.args[:3])
        batch_heads = math.prod(q[:-2])
        return 0, batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])
    return 0, 0
