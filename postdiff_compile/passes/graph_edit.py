"""Shared graph surgery for the passes: flat-I/O copies, new nodes, extra outputs, cache inputs, dead-code removal.

Every variant is a GraphModule with flat positional inputs and a tuple of outputs (noise prediction
first, then cache writes). Copies share the parameters of the captured module, so making a variant
costs no weight memory. Every node a pass creates is made by `new_node` (README.md, "One way to make a node").
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .regions import stack_outside

_NO_MODULE = ("placeholder", "output")   # computed by no module: their nn_module_stack is empty


def new_node(graph: torch.fx.Graph, op: str, target: Any, args: tuple = (), kwargs: dict | None = None, *,
             anchor: torch.fx.Node, outside: str | None = None, name: str | None = None) -> torch.fx.Node:
    """Create a node at `graph`'s insertion point, with the metadata later passes and the exporters read.

    `anchor` is the node the new one stands for or was derived from (a cache input: the value it replaces;
    an operator node: the node whose value it computes or rewrites; an output node: the output it replaces).
    - `val` (and `tensor_meta` for a tensor): a placeholder's is its anchor's, the value it stands for; an
      operator node's is its target run on its operands' fake tensors, which dispatch through the capture's
      fake mode, so shape, dtype and strides are what the real op gives; an output node's is the tuple of
      its operands'.
    - `nn_module_stack`: a copy of the anchor's, so regions.py finds the node in the module it belongs to;
      with `outside` (a module path), the anchor's cut above that module, for a node computed in the
      module's place by its caller; empty for placeholders and the output node, which no module computes.
      A stand-in carrying the stack of the module it replaces would make that module still "present"
      (regions.has_module, output_of) in a graph that no longer runs it.
    - `stack_trace`: the anchor's (None where the anchor has none, as the captured output node).
    """
    if op == "placeholder":
        val = _val(anchor)
    elif op == "output":
        val = map_arg(args[0], _val)
    else:
        call_args, call_kwargs = map_arg((args, kwargs or {}), _val)
        val = target(*call_args, **call_kwargs)
    node = graph.create_node(op, target, args, kwargs, name=name)
    node.meta["val"] = val
    if isinstance(val, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)
    if op in _NO_MODULE:
        node.meta["nn_module_stack"] = {}
    elif outside is not None:
        node.meta["nn_module_stack"] = stack_outside(anchor, outside)
    else:
        node.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})
    node.meta["stack_trace"] = anchor.meta.get("stack_trace")
    return node


def _val(node: torch.fx.Node) -> Any:
    if "val" not in node.meta:
        raise AssertionError(f"node {node.name} has no meta['val']: every node of a captured graph, and every "
                             "node a pass makes with new_node, has one")
    return node.meta["val"]


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
    new_node(graph, "output", "output", (tuple(flat),), anchor=_output_node(source))
    return graph, flat


def copy_graph(source: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of `source` with its own calling convention (a pass on a finished module uses this, not
    flat_graph, so the copy is called as the original is). Nodes keep their names; each meta dict is copied,
    the values in it (fake tensors) are shared."""
    graph = torch.fx.Graph()
    graph.set_codegen(source._codegen)
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in source.nodes:
        values[node] = graph.node_copy(node, values.__getitem__)
    return graph


def set_outputs(graph: torch.fx.Graph, outputs: list[torch.fx.Node]) -> None:
    old = _output_node(graph)
    graph.erase_node(old)
    new_node(graph, "output", "output", (tuple(outputs),), anchor=old)


def add_input(graph: torch.fx.Graph, name: str, like: torch.fx.Node) -> torch.fx.Node:
    """A new placeholder after the existing ones, standing for `like`'s value (its val, its stack trace)."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        return new_node(graph, "placeholder", name, anchor=like, name=name)


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
    return list(_output_node(graph).args[0])


def _output_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def to_module(root: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule for `graph` that references (does not copy) the parameters it still uses."""
    eliminate_dead_code(graph)
    graph.lint()
    return torch.fx.GraphModule(root, graph)
