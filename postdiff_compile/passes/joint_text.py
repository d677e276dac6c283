"""The cross-attention cache for joint text-image attention (SD3's MMDiT) as a graph rewrite.

The paper's Cond mode caches each cross-attention output of the conditional branch at step m - 1 and, from step m
on, runs without CFG and without any cross-attention (cross_attn.py). SD3 has no cross-attention: text enters
through the joint attention of every block, where the text tokens' keys and values sit beside the image tokens'
and the text tokens are a second stream of their own (norms, projections, feed-forwards) carried from block to
block. The image stream reads the text only through (1) each joint attention's text keys and values and (2) the
pooled text embedding added to the timestep embedding (`time_text_embed.text_embedder`), which modulates every
norm. Those are what is cached, per block, after the key norm and the split into heads, as the attention reads
them ([batch, heads, text tokens, head width]).

On a read the text queries are replaced by zeros, so nothing is left that needs the text stream: the context
embedder, every block's text norms, text projections and text feed-forward, and the pooled projection are dead code
and disappear. The image rows of the attention are unchanged (each query row's softmax sees the same keys and
values); the zero text rows are computed and dropped, as the last block's text rows are in the original graph.
So a variant that writes and then reads at the same step, with the same inputs, equals the model (exact up to the
attention kernel's rounding); across steps the image stream sees the text of step m - 1 and the current image.

Why these values: they are the smallest set that makes the whole text stream dead. Caching each block's attention
output instead (as for attn2) would keep the image queries from seeing the current text keys; caching the text
stream's hidden states would keep the key/value projections (a quarter of each text-side block) running.
"""
from __future__ import annotations

import torch
import torch.fx

from ..caches import CROSS_ATTN
from ..errors import PostDiffError
from . import graph_edit
from .cross_attn import CrossAttnGraph
from .regions import find_modules, in_module, nodes_of, output_of

JOINT_ATTENTION = r"transformer_blocks\.\d+\.attn"
POOLED_TEXT = "time_text_embed.text_embedder"


def joint_text_graph(graph: torch.fx.Graph, mode: str) -> CrossAttnGraph:
    """mode "write": the same computation plus every joint attention's text keys and values and the pooled text
    embedding; "read": those are inputs and the text stream is gone. `graph` is left as it is; joint attentions
    no longer computed in it (an attention broadcast read, a block-cache shallow graph) are skipped."""
    if mode not in ("write", "read"):
        raise ValueError(f"mode must be 'write' or 'read', got {mode!r}")
    new, outputs = graph_edit.flat_graph(graph)
    entries, values, queries = [], [], []
    for path in find_modules(new, JOINT_ATTENTION):
        attention = [n for n in nodes_of(new, path) if n.target is torch.ops.aten.scaled_dot_product_attention.default]
        if not attention:
            continue   # its output is read from another cache
        if len(attention) != 1:
            raise PostDiffError(f"{path} computes {len(attention)} attentions; the joint-text cache expects one")
        query, key, value = attention[0].args[:3]
        for name, cat, projection in (("text_key", key, "add_k_proj"), ("text_value", value, "add_v_proj")):
            entries.append(f"{path}:{name}")
            values.append(_text_part(cat, path, f"{path}.{projection}"))
        queries.append((query, _text_part(query, path, f"{path}.add_q_proj")))
    if not values:
        raise PostDiffError("the joint-text cache needs joint text-image attention (SD3); this graph has none")
    entries.append(POOLED_TEXT)
    values.append(output_of(new, POOLED_TEXT))
    if mode == "write":
        graph_edit.set_outputs(new, [*outputs, *values])
    else:
        for i, node in enumerate(values):
            graph_edit.replace_with_input(new, node, f"{CROSS_ATTN}_{i}")
        for cat, text in queries:
            image = next(part for part in cat.args[0] if part is not text)
            with new.inserting_before(cat):
                zeros = graph_edit.new_node(new, "call_function", torch.ops.aten.new_zeros.default,
                                            (image, list(text.meta["val"].shape)), anchor=text)
            cat.replace_input_with(text, zeros)
        graph_edit.eliminate_dead_code(new)
    return CrossAttnGraph(new, entries)


def _text_part(cat: torch.fx.Node, attention: str, projection: str) -> torch.fx.Node:
    """The text tokens' part of a joint attention's query, key or value: the input of its concatenation along the
    tokens that was computed from the text projection `projection`."""
    if cat.target is not torch.ops.aten.cat.default or len(cat.args[0]) != 2:
        raise PostDiffError(f"{attention}: expected the image and text tokens concatenated before the attention")
    text = [part for part in cat.args[0] if _computed_from(part, attention, projection)]
    if len(text) != 1:
        raise PostDiffError(f"{attention}: cannot tell which part of {cat.name} is the text's ({projection})")
    return text[0]


def _computed_from(node: torch.fx.Node, attention: str, projection: str) -> bool:
    """Whether `node` depends on module `projection`, looking back only through nodes of module `attention`."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if in_module(current, projection):
            return True
        if current in seen or not in_module(current, attention):
            continue
        seen.add(current)
        todo.extend(current.all_input_nodes)
    return False
