"""Block caching for transformer denoisers (PixArt-alpha, SD3, FLUX): DeepCache's analogue for DiTs, as a graph
rewrite.

DeepCache relies on the U-Net's skip connections: the shallow down and up layers see the current step
through the skips while the deep feature comes from the cache. A DiT has no skips, only a stack of
blocks with the same [batch, tokens, width] hidden state in and out, so "the deep part" becomes a
contiguous range of middle blocks. On a full step the graph also returns the residual that range adds
to the hidden state; on a cached step the range is not run and its residual is added back instead.
Caching the residual rather than the hidden state leaving the range keeps the current step's
contribution from the front blocks, which is what makes reusing it across steps tolerable.

Two-stream transformers (SD3's joint blocks, both FLUX block kinds) carry a text and an image state from
block to block (each block returns both); the residual is taken of each and the two travel as one cache tensor,
concatenated along the tokens (the order the streams leave the block before the range, in graph order), so the
plan and the runtimes see one cache as for PixArt. FLUX's double-stream and single-stream blocks count as one
list, in the order forward runs them (DenoiserKind.block_stacks): a range may span both kinds.

`branch` = b is how many blocks are recomputed at each end: blocks 0..b-1 and n-b..n-1 always run,
blocks b..n-b-1 are cached (at least one of them), so 1 <= b <= (n - 1) // 2. The cache name is the
one DeepCache uses, so the plan and runtime treat both the same way.

Related methods, and how this differs:
- FORA caches the output of every attention and MLP layer of every block and reuses them for N steps;
  here the whole middle range is one cached tensor and the end blocks always run.
- Delta-DiT caches the residual ("delta") of the front blocks in late steps and of the rear blocks in
  early steps; here the cached range is fixed, in the middle, for every cached step.
- Learning-to-Cache learns per layer which blocks to skip, which needs training; this tool is
  training-free, so the range is a user choice.
"""
from __future__ import annotations

import torch
import torch.fx

from ..caches import DEEPCACHE
from ..errors import PostDiffError
from . import graph_edit
from .regions import children, outputs_of


def block_cache_graph(graph: torch.fx.Graph, branch: int, mode: str,
                      stacks: tuple[str, ...] = ("transformer_blocks",)) -> torch.fx.Graph:
    """mode "write": the full computation, also returning the middle blocks' residual (appended to the
    outputs); "read": the graph without the middle blocks, taking the residual as its last input. `stacks` are
    the block lists, in forward's order. `graph` itself is left as it is."""
    if mode not in ("write", "read"):
        raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
    blocks = [block for stack in stacks for block in children(graph, stack)]
    if not blocks:
        raise PostDiffError(f"the block cache needs a transformer with {' or '.join(stacks)}; this denoiser has none "
                            "(U-Nets such as SD1.5 use DeepCache instead)")
    check_block_branch(len(blocks), branch)
    new, outputs = graph_edit.flat_graph(graph)
    last = blocks[len(blocks) - branch - 1]            # the last cached block
    before, after = _paired_streams(outputs_of(new, blocks[branch - 1]), outputs_of(new, last), last)
    if mode == "write":
        point = max(after, key=_position)
        with new.inserting_after(point):
            residuals = [graph_edit.new_node(new, "call_function", torch.ops.aten.sub.Tensor, (a, b),
                                             anchor=a, outside=last) for a, b in zip(after, before)]
        residual = residuals[0] if len(residuals) == 1 else _concat(new, residuals, last)
        graph_edit.set_outputs(new, [*outputs, residual])
    else:
        point = max(before, key=_position)
        if len(after) == 1:
            cached = graph_edit.add_input(new, DEEPCACHE, after[0])
            parts = [cached]
        else:
            with new.inserting_after(max(after, key=_position)):
                shape_of = _concat(new, after, last)   # only to give the cache input its value; removed below
            cached = graph_edit.add_input(new, DEEPCACHE, shape_of)
            new.erase_node(shape_of)
            with new.inserting_after(point):
                parts, offset = [], 0
                for node in after:
                    tokens = node.meta["val"].shape[1]
                    parts.append(graph_edit.new_node(new, "call_function", torch.ops.aten.slice.Tensor,
                                                     (cached, 1, offset, offset + tokens), anchor=node, outside=last))
                    offset += tokens
        with new.inserting_after(max([point, *parts], key=_position)):
            # each stands for the last cached block's output, computed by the transformer in that block's place
            restored = [graph_edit.new_node(new, "call_function", torch.ops.aten.add.Tensor, (b, part),
                                            anchor=a, outside=last) for a, b, part in zip(after, before, parts)]
        for a, r in zip(after, restored):
            a.replace_all_uses_with(r)
        graph_edit.eliminate_dead_code(new)
    return new


def _position(node: torch.fx.Node) -> int:
    return list(node.graph.nodes).index(node)


def _concat(graph: torch.fx.Graph, nodes: list[torch.fx.Node], last: str) -> torch.fx.Node:
    return graph_edit.new_node(graph, "call_function", torch.ops.aten.cat.default, (list(nodes), 1),
                               anchor=nodes[-1], outside=last)


def _paired_streams(before: list[torch.fx.Node], after: list[torch.fx.Node],
                    last: str) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The states entering and leaving the cached range, paired stream by stream (text with text, image with
    image) by their shapes, in the order the entering ones appear in the graph."""
    if len(before) != len(after) or len(before) not in (1, 2):
        raise PostDiffError(f"the block cache needs blocks that pass the same number of states (1 or 2) from one to "
                            f"the next; {last} returns {len(after)}, the block before the range {len(before)}")
    before = sorted(before, key=_position)
    shapes = [tuple(n.meta["val"].shape) for n in before]
    if len(set(shapes)) != len(shapes):
        raise PostDiffError(f"the block cache cannot tell the text and image states apart: both are {shapes[0]} "
                            "(as many text as image tokens); choose another resolution or turn the cache off")
    by_shape = {tuple(n.meta["val"].shape): n for n in after}
    if set(by_shape) != set(shapes):
        raise PostDiffError(f"the states leaving {last} ({sorted(by_shape)}) do not match those entering the cached "
                            f"range ({shapes})")
    return before, [by_shape[shape] for shape in shapes]


def check_block_branch(num_blocks: int, branch: int) -> None:
    """A clear error for a branch that leaves no middle block to cache, or keeps none at the ends."""
    if branch >= 1 and num_blocks - 2 * branch >= 1:
        return
    if num_blocks < 3:
        raise PostDiffError(f"cache_branch {branch} does not exist for a transformer of {num_blocks} blocks: "
                            "the block cache keeps at least one block at each end and caches at least one "
                            "between them, so it needs 3 or more blocks")
    raise PostDiffError(f"cache_branch {branch} does not exist for a transformer of {num_blocks} blocks: "
                        "it is the number of blocks recomputed at each end, with at least one cached between "
                        f"them, so cache_branch must be in 1..{(num_blocks - 1) // 2}")

