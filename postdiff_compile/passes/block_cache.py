"""Block caching for transformer denoisers (PixArt-alpha): DeepCache's analogue for DiTs, as a graph rewrite.

DeepCache relies on the U-Net's skip connections: the shallow down and up layers see the current step
through the skips while the deep feature comes from the cache. A DiT has no skips, only a stack of
blocks with the same [batch, tokens, width] hidden state in and out, so "the deep part" becomes a
contiguous range of middle blocks. On a full step the graph also returns the residual that range adds
to the hidden state; on a cached step the range is not run and its residual is added back instead.
Caching the residual rather than the hidden state leaving the range keeps the current step's
contribution from the front blocks, which is what makes reusing it across steps tolerable.

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
from .regions import children, output_of

_BLOCKS = "transformer_blocks"


def block_cache_graph(graph: torch.fx.Graph, branch: int, mode: str) -> torch.fx.Graph:
    """mode "write": the full computation, also returning the middle blocks' residual (appended to the
    outputs); "read": the graph without the middle blocks, taking the residual as its last input.
    `graph` itself is left as it is."""
    if mode not in ("write", "read"):
        raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
    blocks = children(graph, _BLOCKS)
    if not blocks:
        raise PostDiffError("the block cache needs a transformer with transformer_blocks; this denoiser has none "
                            "(U-Nets such as SD1.5 use DeepCache instead)")
    check_block_branch(len(blocks), branch)
    new, outputs = graph_edit.flat_graph(graph)
    last = blocks[len(blocks) - branch - 1]            # the last cached block
    before = output_of(new, blocks[branch - 1])       # hidden state entering the cached range
    after = output_of(new, last)                      # and leaving it
    if mode == "write":
        with new.inserting_after(after):
            residual = graph_edit.new_node(new, "call_function", torch.ops.aten.sub.Tensor, (after, before),
                                           anchor=after, outside=last)
        graph_edit.set_outputs(new, [*outputs, residual])
    else:
        cached = graph_edit.add_input(new, DEEPCACHE, after)
        with new.inserting_after(before):
            # it stands for the last cached block's output, computed by the transformer in that block's place
            restored = graph_edit.new_node(new, "call_function", torch.ops.aten.add.Tensor, (before, cached),
                                           anchor=after, outside=last)
        after.replace_all_uses_with(restored)
        graph_edit.eliminate_dead_code(new)
    return new


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

