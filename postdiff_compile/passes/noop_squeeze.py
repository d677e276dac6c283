"""Drop squeezes that squeeze nothing.

`torch.squeeze(x, d)` is a no-op when dimension d is not of size 1, and PixArt's transformer relies on that
(`aten.squeeze.dim` on a [B, 256, C] tensor at dim 1). ONNX's Squeeze rejects such a dimension, and
torch.onnx translates the op literally, so onnxruntime refuses the graph. With static shapes the size of
every squeezed dimension is known: a squeeze whose dimensions are all larger than 1 is replaced by its input,
one with some size-1 dimensions keeps only those.
"""
from __future__ import annotations

import torch
import torch.fx

from . import graph_edit

aten = torch.ops.aten


def drop_noop_squeezes(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule without no-op squeezes; `module` is left as it is.

    The copy keeps `module`'s calling convention and shares its parameters (no weight memory).
    """
    graph = graph_edit.copy_graph(module.graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.squeeze.dim, aten.squeeze.dims):
            continue
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if node.target is aten.squeeze.dims else [node.args[1]]
        dims = [d % len(shape) for d in dims]
        keep = [d for d in dims if shape[d] == 1]
        if len(keep) == len(dims):
            continue
        if keep:
            with graph.inserting_before(node):
                new = graph_edit.new_node(graph, "call_function", aten.squeeze.dims, (node.args[0], keep),
                                          anchor=node)
            node.replace_all_uses_with(new)
        else:
            node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    new_module = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    new_module.meta.update(module.meta)
    return new_module
