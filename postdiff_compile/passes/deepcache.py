"""DeepCache as a graph rewrite: a full graph that also returns the cached feature, and a shallow graph
that takes it as an input and keeps only what the shallow branch needs.

`branch` means exactly what DeepCacheSDHelper's `cache_branch_id` means (peers.md 1.2-1.4): block
b // 3 (counted from the outside of the U-Net) and sub-layer b % 3 in it. The cached feature is the
hidden state entering the first up-path sub-layer that the helper recomputes; replacing that node by an
input and removing dead code leaves exactly the modules the helper runs on a retrieve step (conv_in,
the time embedding, the shallow down and up sub-layers, conv_out), and nothing else.
"""
from __future__ import annotations

import torch.fx

from ..caches import DEEPCACHE
from ..errors import PostDiffError
from . import graph_edit
from .regions import children, output_of


def deepcache_graph(graph: torch.fx.Graph, branch: int, mode: str) -> torch.fx.Graph:
    """mode "write": the full computation, also returning the feature (appended to the outputs);
    "read": the shallow graph, taking the feature as its last input. `graph` itself is left as it is."""
    if mode not in ("write", "read"):
        raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
    feature_module = _feature_module(graph, branch)
    new, outputs = graph_edit.flat_graph(graph)
    feature = output_of(new, feature_module)
    if mode == "write":
        graph_edit.set_outputs(new, [*outputs, feature])
    else:
        graph_edit.replace_with_input(new, feature, DEEPCACHE)
        graph_edit.eliminate_dead_code(new)
    return new


def check_branch(num_up_blocks: int, branch: int) -> None:
    """A clear error for a branch the U-Net does not have (3 branches per up block, as the helper counts)."""
    if branch < 0 or branch // 3 >= num_up_blocks:
        raise PostDiffError(f"cache_branch {branch} does not exist: this U-Net has {num_up_blocks} up blocks, "
                            f"so cache_branch must be in 0..{3 * num_up_blocks - 1}")


def _feature_module(graph: torch.fx.Graph, branch: int) -> str:
    ups = children(graph, "up_blocks")
    if not ups:
        raise PostDiffError("DeepCache needs a U-Net with up_blocks; this denoiser has none "
                            "(transformers such as PixArt-alpha have no skip branches to cache)")
    check_branch(len(ups), branch)
    index = len(ups) - 1 - branch // 3          # DeepCache counts blocks from the outside
    block = ups[index]
    resnets = children(graph, f"{block}.resnets")
    attentions = set(children(graph, f"{block}.attentions"))
    # The helper mirrors sub-layer indices in up blocks and recomputes mirrored indices <= branch % 3.
    first = max(0, len(resnets) - 1 - branch % 3)
    if first > 0:
        previous = f"{block}.attentions.{first - 1}"
        return previous if previous in attentions else f"{block}.resnets.{first - 1}"
    return ups[index - 1] if index > 0 else "mid_block"
