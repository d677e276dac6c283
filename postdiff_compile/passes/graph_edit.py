"""Shared graph surgery for the passes: flat-I/O copies, extra outputs, cache inputs, dead-code removal.

Every variant is a GraphModule with flat positional inputs and a tuple of outputs (noise prediction
first, then cache writes). Copies share the parameters of the captured module, so making a variant
costs no weight memory.
"""
from __future__ import annotations

import torch
import torch.fx


def flat_graph(source: torch.fx.Graph) -> tuple[torch.fx.Graph, list[torch.fx.Node]]:
    """A copy of `source` with the default calling convention, and the copied output values.

    The unlifted module of an ExportedProgram carries a pytree calling convention for its original
    inputs; a fresh Graph has plain positional inputs and returns whatever its output node holds.
    Passes never mutate the graph they are given: they copy it with this and edit the copy.
    """
    graph = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    outputs = graph.graph_copy(source, values)
    flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    while len(flat) == 1 and isinstance(flat[0], (tuple, list)):
        flat = list(flat[0])
    graph.output(tuple(flat))
    return graph, flat


def set_outputs(graph: torch.fx.Graph, outputs: list[torch.fx.Node]) -> None:
    for node in graph.nodes:
        if node.op == "output":
            graph.erase_node(node)
    graph.output(tuple(outputs))


def add_input(graph: torch.fx.Graph, name: str, like: torch.fx.Node) -> torch.fx.Node:
    """A new placeholder after the existing ones, with `like`'s tensor metadata."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    if "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    if "tensor_meta" in like.meta:
        node.meta["tensor_meta"] = like.meta["tensor_meta"]
    return node


def replace_with_input(graph: torch.fx.Graph, node: torch.fx.Node, name: str) -> torch.fx.Node:
    """Make `node`'s value a graph input: its users read the new placeholder instead."""
    placeholder = add_input(graph, name, node)
    node.replace_all_uses_with(placeholder)
    return placeholder


def _is_impure(node: torch.fx.Node) -> bool:
    # FX's default keeps _assert_tensor_metadata, dropout and scaled_dot_product_attention (and with them
    # a whole skipped branch). In an inference graph only ops that mutate their inputs have effects.
    if node.op in ("placeholder", "output"):
        return True
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    graph.eliminate_dead_code(is_impure_node=_is_impure)


def outputs_of(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return list(next(n for n in reversed(graph.nodes) if n.op == "output").args[0])


def to_module(root: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule for `graph` that references (does not copy) the parameters it still uses."""
    eliminate_dead_code(graph)
    graph.lint()
    return torch.fx.GraphModule(root, graph)
