"""Regions of a captured graph: which nodes a module computed, found from `nn_module_stack`.

torch.export records on every node the stack of modules it was traced under. Paths here are relative to
the denoiser (the export wrapper's `denoiser.` prefix is stripped), so a pass asks for
"up_blocks.3.attentions.1" or "every attn2" in the names diffusers uses.
"""
from __future__ import annotations

import re

import torch.fx

from ..errors import PostDiffError

_PREFIX = "denoiser"


def module_path(node: torch.fx.Node) -> str | None:
    """The innermost module that produced `node` ("" for the denoiser itself, None outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = next(reversed(stack.values()))[0]
    if path == _PREFIX:
        return ""
    return path.removeprefix(_PREFIX + ".") if path.startswith(_PREFIX + ".") else path


def module_paths(node: torch.fx.Node) -> list[str]:
    """Every module on the node's stack, outermost first, as denoiser-relative paths."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for path, _ in stack.values():
        if path.startswith(_PREFIX + "."):
            paths.append(path[len(_PREFIX) + 1:])
    return paths


def stack_outside(node: torch.fx.Node, path: str) -> dict:
    """`node`'s nn_module_stack without module `path` and the modules inside it: the stack of a node that the
    module's caller computes in the module's place (a pass's stand-in for the module's output)."""
    stack = {}
    for key, entry in (node.meta.get("nn_module_stack") or {}).items():
        inner = _relative(entry[0])
        if inner is not None and (path == "" or inner == path or inner.startswith(path + ".")):
            break
        stack[key] = entry
    return stack


def _relative(path: str) -> str | None:
    """A stack entry's path relative to the denoiser (None for the export wrapper around it)."""
    if path == _PREFIX:
        return ""
    return path[len(_PREFIX) + 1:] if path.startswith(_PREFIX + ".") else None


def in_module(node: torch.fx.Node, path: str) -> bool:
    inner = module_path(node)
    return inner is not None and (inner == path or inner.startswith(path + "."))


def has_module(graph: torch.fx.Graph, path: str) -> bool:
    """Whether any node of `graph` was computed inside the denoiser's module `path`."""
    return any(in_module(node, path) for node in graph.nodes)


def nodes_of(graph: torch.fx.Graph, path: str) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if in_module(n, path)]


def outputs_of(graph: torch.fx.Graph, path: str) -> list[torch.fx.Node]:
    """Every node of module `path` used outside it, in graph order: its outputs (two for a block that returns
    a text and an image state)."""
    region = nodes_of(graph, path)
    if not region:
        raise PostDiffError(f"the graph has no module {path!r}")
    inside = set(region)
    return [n for n in region if any(user not in inside for user in n.users)]


def output_of(graph: torch.fx.Graph, path: str) -> torch.fx.Node:
    """The one node of module `path` that is used outside it: the module's output."""
    leaving = outputs_of(graph, path)
    if len(leaving) != 1:
        names = ", ".join(n.name for n in leaving) or "none"
        raise PostDiffError(f"module {path!r} does not have exactly one output in the graph (found: {names})")
    return leaving[0]


def find_modules(graph: torch.fx.Graph, pattern: str) -> list[str]:
    """Paths of every module whose path fully matches the regular expression, in graph order."""
    regex = re.compile(pattern)
    found: dict[str, None] = {}
    for node in graph.nodes:
        for path in module_paths(node):
            if regex.fullmatch(path):
                found.setdefault(path)
    return list(found)


def children(graph: torch.fx.Graph, path: str) -> list[str]:
    """Direct sub-modules of `path` that computed something, in graph order (e.g. up_blocks.0, up_blocks.1)."""
    return find_modules(graph, re.escape(path) + r"\.[^.]+" if path else r"[^.]+")
