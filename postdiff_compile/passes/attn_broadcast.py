"""A static attention broadcast as a graph rewrite: every self-attention module's output becomes an extra output
(the step that computes it for later steps) or an input (the steps that reuse it).

This is Pyramid Attention Broadcast's spatial part (arXiv 2408.12588; diffusers' `apply_pyramid_attention_broadcast`
with `spatial_attention_block_skip_range`): its hook replaces an attention module's forward by the output of the
module's last computed call. That hook decides at run time from a call counter and the pipeline's current
timestep; here the same decision is made ahead of time by the plan (plan.py, `broadcast_roles`) from the step
index and the scheduler's timesteps, so a runtime only walks the plan.

The cached value is what the hook caches: the attention module's whole output, after its output projection and
before the block's gate and residual add. FLUX's double-stream and SD3's joint attentions return two tensors
(image and text), both cached; FLUX's single-stream attention returns one. On a read the module's projections,
rotary embedding and attention are dead code and disappear; the block's norms and feed-forwards still run.

The modules are diffusers' self-attentions: `attn` (SD3, FLUX, and other transformers' joint or only attention) and
`attn1` (U-Nets, PixArt). `attn2`, the cross-attention, is the cross-attention cache's (passes/cross_attn.py), so
both can run in one variant. Applied to a block-cache shallow graph it touches only the blocks that graph runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from ..caches import ATTN_BROADCAST
from . import graph_edit
from .regions import find_modules, outputs_of

SELF_ATTENTION = r".*\.attn1?"   # diffusers names the self- or joint attention `attn` or `attn1`


@dataclass
class AttnBroadcastGraph:
    graph: torch.fx.Graph
    entries: list[str]   # cache entry per value added (write) or made an input (read): "<path>" or "<path>:<i>"


def attn_broadcast_graph(graph: torch.fx.Graph, mode: str) -> AttnBroadcastGraph:
    """mode "write": the same computation plus every self-attention output; "read": every one is an input.

    `graph` is left as it is. Only the modules still computed in `graph` are touched.
    """
    if mode not in ("write", "read"):
        raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
    new, outputs = graph_edit.flat_graph(graph)
    # Find every output before replacing any: a replaced node would otherwise still count as used.
    values: list[torch.fx.Node] = []
    entries: list[str] = []
    for path in find_modules(new, SELF_ATTENTION):
        leaving = outputs_of(new, path)
        values.extend(leaving)
        entries.extend([path] if len(leaving) == 1 else [f"{path}:{i}" for i in range(len(leaving))])
    if mode == "write":
        graph_edit.set_outputs(new, [*outputs, *values])
    else:
        for i, node in enumerate(values):
            graph_edit.replace_with_input(new, node, f"{ATTN_BROADCAST}_{i}")
        graph_edit.eliminate_dead_code(new)
    return AttnBroadcastGraph(new, entries)
