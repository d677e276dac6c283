"""The cross-attention cache as a graph rewrite: every attn2 output becomes an extra output (the step
that writes the cache) or an input (the steps that read it).

The cached value is what T-GATE caches (peers.md 2.3): the attention module's output after `to_out`,
before the transformer block's residual add. On a read, the attention itself, its q/k/v/out projections
and the text-side K/V work are dead code and disappear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from ..caches import CROSS_ATTN
from . import graph_edit
from .regions import find_modules, output_of

CROSS_ATTENTION = r".*\.attn2"  # diffusers names every cross-attention `attn2`


@dataclass
class CrossAttnGraph:
    graph: torch.fx.Graph
    modules: list[str]   # the attn2 paths whose outputs were added (write) or became inputs (read), in order


def cross_attn_graph(graph: torch.fx.Graph, mode: str) -> CrossAttnGraph:
    """mode "write": the same computation plus every attn2 output; "read": every attn2 output is an input.

    `graph` is left as it is. Only the attn2 modules still present in `graph` are touched, so applied
    to a DeepCache shallow graph this reads just the shallow branch's cross-attentions.
    """
    if mode not in ("write", "read"):
        raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
    modules = find_modules(graph, CROSS_ATTENTION)
    new, outputs = graph_edit.flat_graph(graph)
    if mode == "write":
        graph_edit.set_outputs(new, [*outputs, *(output_of(new, path) for path in modules)])
    else:
        # Find every output before replacing any: a replaced node would otherwise still count as used.
        nodes = [output_of(new, path) for path in modules]
        for i, node in enumerate(nodes):
            graph_edit.replace_with_input(new, node, f"{CROSS_ATTN}_{i}")
        graph_edit.eliminate_dead_code(new)
    return CrossAttnGraph(new, modules)
