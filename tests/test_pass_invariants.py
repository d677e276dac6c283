"""The invariants of postdiff_compile/passes/README.md, checked on every pass: the input graph is left as it
is, every node a pass creates carries val, nn_module_stack and stack_trace, and no output newly aliases an
input or another output."""
import pytest
import torch
from tiny_models import tiny_denoiser

from postdiff_compile.capture import Bucket, capture, example_inputs
from postdiff_compile.models.families import get_family
from postdiff_compile.passes import graph_edit
from postdiff_compile.passes.block_cache import block_cache_graph
from postdiff_compile.passes.cross_attn import cross_attn_graph
from postdiff_compile.passes.deepcache import deepcache_graph
from postdiff_compile.passes.noop_squeeze import drop_noop_squeezes
from postdiff_compile.passes.regions import has_module, module_path, output_of
from postdiff_compile.variant_spec import VariantSpec
from postdiff_compile.variants import build_variant

ORIGIN = "test_origin"   # tag on every input node; copies carry it, nodes a pass creates do not


@pytest.fixture(scope="module")
def unet():
    """The tiny SD1.5 U-Net (2 resnets per up block), batch 1, 8x8 latent: DeepCache and the cross-attention cache."""
    model = tiny_denoiser("sd15")
    captured = capture(model, get_family("sd15"), Bucket(1, 8, 8, 77, torch.float32))
    return captured, captured.module()


@pytest.fixture(scope="module")
def dit():
    """A tiny 6-block PixArt, batch 1: the block cache, and the no-op squeeze PixArt has."""
    model = tiny_denoiser("pixart_alpha_deep")
    captured = capture(model, get_family("pixart_alpha"), Bucket(1, 8, 8, 8, torch.float32))
    return captured, captured.module()


def _input(root) -> torch.fx.Graph:
    """The graph a pass is given in build_variant (a flat copy of the capture), each node tagged."""
    graph, _ = graph_edit.flat_graph(root.graph)
    for node in graph.nodes:
        node.meta[ORIGIN] = node.name
    return graph


def _snapshot(graph: torch.fx.Graph):
    """Everything a pass could change in place: the code, the node list and each node's metadata."""
    nodes = [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), len(n.users)) for n in graph.nodes]
    meta = {n.name: ({k: id(v) for k, v in n.meta.items()}, dict(n.meta.get("nn_module_stack") or {}),
                     n.meta.get("stack_trace")) for n in graph.nodes}
    return str(graph), graph.python_code("self").src, nodes, meta


def _views_base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage `node` shares, following view ops (schema returns an alias, not a write)."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args:
        returns = node.target._schema.returns
        if not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write):
            break
        node = node.args[0]
    return node


def _aliasing(graph: torch.fx.Graph) -> set[tuple]:
    """("input", i, name): output i is, or is a view of, input `name`; ("output", i, j): outputs i < j share storage."""
    bases = [_views_base(n) for n in graph_edit.outputs_of(graph)]
    pairs = {("input", i, b.name) for i, b in enumerate(bases) if b.op == "placeholder"}
    pairs |= {("output", i, j) for i in range(len(bases)) for j in range(i + 1, len(bases)) if bases[i] is bases[j]}
    return pairs


def _check(before: torch.fx.Graph, snapshot, after: torch.fx.Graph) -> list[torch.fx.Node]:
    """The README's invariants for one pass run; returns the nodes the pass created."""
    assert after is not before
    assert _snapshot(before) == snapshot, "the pass changed the graph it was given"
    created = [n for n in after.nodes if ORIGIN not in n.meta]
    for node in created:
        missing = {"val", "nn_module_stack", "stack_trace"} - set(node.meta)
        assert not missing, f"{node.format_node()} has no {missing}"
        if node.op == "output":
            assert len(node.meta["val"]) == len(node.args[0]) and node.meta["nn_module_stack"] == {}
            continue
        assert isinstance(node.meta["val"], torch.Tensor)
        assert node.meta["tensor_meta"].shape == node.meta["val"].shape
        # every anchor is a captured tensor, so the trace names the source line
        assert isinstance(node.meta["stack_trace"], str) and node.meta["stack_trace"]
        if node.op == "placeholder":
            assert node.meta["nn_module_stack"] == {}   # no module computes an input
        else:
            assert node.meta["nn_module_stack"], f"{node.format_node()} has an empty nn_module_stack"
    assert _aliasing(after) <= _aliasing(before), "the pass made an output alias an input or another output"
    after.lint()
    return created


def _run(graph_pass, given, *args):
    """`graph_pass(given, *args)` and its invariants; `given` is a Graph or (noop_squeeze) a GraphModule."""
    before = getattr(given, "graph", given)
    snapshot = _snapshot(before)
    result = graph_pass(given, *args)
    return result, _check(before, snapshot, getattr(result, "graph", result))   # CrossAttnGraph / GraphModule


@pytest.mark.parametrize("mode", ["write", "read"])
@pytest.mark.parametrize("branch", [0, 4])
def test_deepcache_invariants(unet, branch, mode):
    _, root = unet
    _, created = _run(deepcache_graph, _input(root), branch, mode)
    ops = sorted(n.op for n in created)
    assert ops == (["output"] if mode == "write" else ["output", "placeholder"])


@pytest.mark.parametrize("mode", ["write", "read"])
def test_cross_attn_invariants(unet, mode):
    _, root = unet
    result, created = _run(cross_attn_graph, _input(root), mode)
    inputs = [n for n in created if n.op == "placeholder"]
    assert len(inputs) == (len(result.modules) if mode == "read" else 0)


def test_composed_passes_invariants(unet):
    """cross_attn on a DeepCache shallow graph, as build_variant composes them: the second pass leaves the
    first one's graph (with its created nodes) as it is."""
    _, root = unet
    shallow = deepcache_graph(_input(root), 0, "read")
    for node in shallow.nodes:
        node.meta.setdefault(ORIGIN, node.name)
    result, created = _run(cross_attn_graph, shallow, "read")
    assert result.modules and sum(n.op == "placeholder" for n in created) == len(result.modules)


@pytest.mark.parametrize("mode", ["write", "read"])
@pytest.mark.parametrize("branch", [1, 2])
def test_block_cache_invariants(dit, branch, mode):
    _, root = dit
    new, created = _run(block_cache_graph, _input(root), branch, mode)
    (op,) = [n for n in created if n.op == "call_function"]
    assert op.target is (torch.ops.aten.sub.Tensor if mode == "write" else torch.ops.aten.add.Tensor)
    # The stand-in for the cached blocks belongs to the transformer, not to the block whose output it replaces.
    assert module_path(op) == ""
    last = f"transformer_blocks.{6 - branch - 1}"
    assert has_module(new, last) == (mode == "write")
    if mode == "write":
        output_of(new, last)   # still exactly one output: the residual is not counted as part of the block


def test_noop_squeeze_invariants(dit):
    """On a PixArt variant (a squeeze of a 16-token dimension, dropped) and on a squeeze that keeps one of
    its dimensions (a new node)."""
    captured, root = dit
    variant = build_variant(captured, VariantSpec(), root=root)
    module = variant.module
    for node in module.graph.nodes:
        node.meta[ORIGIN] = node.name
    args = example_inputs(captured.inputs, seed=4)
    with torch.no_grad():
        expected = module(*args)
    code = module.code
    dropped, created = _run(drop_noop_squeezes, module)
    assert module.code == code and dropped is not module
    assert not any(n.target is torch.ops.aten.squeeze.dim for n in dropped.graph.nodes)
    assert any(n.target is torch.ops.aten.squeeze.dim for n in module.graph.nodes)
    assert [n.op for n in created] == []
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(dropped(*args), expected))

    class Squeezes(torch.nn.Module):
        def forward(self, x):              # x: [2, 1, 5, 1]
            return torch.squeeze(x, (1, 2)) * 2

    x = torch.randn(2, 1, 5, 1)
    exported = torch.export.export(Squeezes(), (x,)).module()
    for node in exported.graph.nodes:
        node.meta[ORIGIN] = node.name
    dropped, created = _run(drop_noop_squeezes, exported)
    (node,) = created
    assert node.target is torch.ops.aten.squeeze.dims and node.args[1] == [1]
    assert tuple(node.meta["val"].shape) == (2, 5, 1)
    assert torch.equal(dropped(x), exported(x))


def test_the_checks_catch_broken_passes(dit):
    """Each check fails on a pass that breaks its invariant, so the tests above can fail."""
    _, root = dit

    def in_place(graph):           # edits the graph it is given
        node = next(n for n in graph.nodes if n.op == "call_function")
        node.meta["stack_trace"] = "edited"
        return graph_edit.flat_graph(graph)[0]

    def bare_node(graph):          # creates a node without the helper
        new, outputs = graph_edit.flat_graph(graph)
        with new.inserting_before(graph_edit._output_node(new)):
            extra = new.call_function(torch.ops.aten.neg.default, (outputs[0],))
        graph_edit.set_outputs(new, [*outputs, extra])
        return new

    def returns_an_input(graph):   # a new output that is an input
        new, outputs = graph_edit.flat_graph(graph)
        graph_edit.set_outputs(new, [*outputs, next(n for n in new.nodes if n.op == "placeholder")])
        return new

    for broken, message in ((in_place, "changed the graph"), (bare_node, "has no"), (returns_an_input, "alias")):
        with pytest.raises(AssertionError, match=message):
            _run(broken, _input(root))
