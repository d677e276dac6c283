"""The graph rewrites on tiny models: what is left in each variant, and that it computes what eager does."""
import pytest
import torch
from tiny_models import tiny_denoiser

from postdiff_compile import PostDiffError
from postdiff_compile.capture import Bucket, capture, example_inputs
from postdiff_compile.models.families import get_family
from postdiff_compile.passes.deepcache import deepcache_graph
from postdiff_compile.passes.regions import children, find_modules, module_path, output_of
from postdiff_compile.variant_spec import VariantSpec
from postdiff_compile.variants import build_variant


@pytest.fixture(scope="module")
def deep():
    """A tiny SD1.5-layout UNet with 3 resnets per up block (DeepCache's layout), captured at CFG batch 2."""
    model = tiny_denoiser("sd15_deep")
    captured = capture(model, get_family("sd15"), Bucket(2, 12, 12, 77, torch.float32))
    return model, captured, captured.module()


def _paths(variant) -> set[str]:
    return {module_path(n) for n in variant.module.graph.nodes if module_path(n)}


def _top(paths, depth):
    return {".".join(p.split(".")[:depth]) for p in paths}


def test_regions(deep):
    _, _, root = deep
    graph = root.graph
    assert children(graph, "up_blocks") == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert children(graph, "up_blocks.2.resnets") == [f"up_blocks.2.resnets.{i}" for i in range(3)]
    attn2 = find_modules(graph, r".*\.attn2")
    # 2 cross-attn down blocks x 2 + mid 1 + 2 cross-attn up blocks x 3, one transformer block each
    assert len(attn2) == 11 and all(p.endswith("transformer_blocks.0.attn2") for p in attn2)
    out = output_of(graph, "up_blocks.2.attentions.1")
    assert module_path(out).startswith("up_blocks.2.attentions.1")
    assert all(not (module_path(u) or "").startswith("up_blocks.2.attentions.1") for u in out.users)
    with pytest.raises(PostDiffError, match="no module 'up_blocks.9'"):
        output_of(graph, "up_blocks.9")


# What DeepCacheSDHelper recomputes on a retrieve step (peers.md 1.4), at sub-module granularity.
SHALLOW_MODULES = {
    0: {"up_blocks.2.resnets.2", "up_blocks.2.attentions.2"},
    1: {"down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
        "up_blocks.2.resnets.1", "up_blocks.2.attentions.1", "up_blocks.2.resnets.2", "up_blocks.2.attentions.2"},
    3: {"down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1",
        "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0", "up_blocks.1.resnets.2",
        "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0"} | {
        f"up_blocks.2.{kind}.{i}" for kind in ("resnets", "attentions") for i in range(3)},
}
ALWAYS = {"conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out"}


@pytest.mark.parametrize("branch", sorted(SHALLOW_MODULES))
def test_shallow_graph_keeps_only_the_shallow_branch(deep, branch):
    _, captured, root = deep
    shallow = build_variant(captured, VariantSpec("shallow"), branch, root)
    paths = _paths(shallow)
    # sub-layers of the blocks (nodes of a block itself, such as its skip concatenation, are not sub-layers)
    kept = {p for p in _top(paths, 4) if p.split(".")[0] in ("down_blocks", "up_blocks") and p.count(".") == 3}
    assert kept == SHALLOW_MODULES[branch]
    assert _top(paths, 1) - {"down_blocks", "up_blocks"} == ALWAYS
    assert not any(p.startswith("mid_block") for p in paths)
    # Fewer weights, too: the module references only the parameters the shallow branch uses.
    assert sum(p.numel() for p in shallow.module.parameters()) < sum(p.numel() for p in root.parameters()) / 2


@pytest.mark.parametrize("branch", range(9))
def test_shallow_with_the_exact_feature_equals_the_full_model(deep, branch):
    model, captured, root = deep
    args = example_inputs(captured.inputs, seed=5)
    full = build_variant(captured, VariantSpec("full", write_deepcache=True), branch, root)
    shallow = build_variant(captured, VariantSpec("shallow"), branch, root)
    with torch.no_grad():
        eager = model(args[0], args[1], encoder_hidden_states=args[2], return_dict=False)[0]
        noise, feature = full(*args)
        (again,) = shallow(*args, feature)
        (stale,) = shallow(*args, torch.randn_like(feature))
    assert full.outputs == ["noise_pred", "deepcache"] and shallow.inputs[-1] == "deepcache"
    assert torch.equal(noise, eager) and torch.equal(again, noise)
    assert not torch.allclose(stale, noise)   # the shallow graph really uses the feature


def test_branch_out_of_range(deep):
    _, captured, root = deep
    with pytest.raises(PostDiffError, match="cache_branch 9 does not exist.*0..8"):
        build_variant(captured, VariantSpec("shallow"), 9, root)


def test_cross_attn_read_graph_has_no_attn2(deep):
    model, captured, root = deep
    single = capture(model, get_family("sd15"), Bucket(1, 12, 12, 77, torch.float32))
    read = build_variant(single, VariantSpec(cross_attn="read"))
    write = build_variant(single, VariantSpec(cross_attn="write"))
    assert not any(".attn2" in p for p in _paths(read))
    assert sum(".attn2" in p for p in _paths(write)) > 0
    assert not any("attn2" in n.target for n in read.module.graph.nodes if n.op == "get_attr")
    assert read.inputs[3:] == [f"cross_attn:{p}" for p in find_modules(root.graph, r".*\.attn2")]
    assert read.inputs[3:] == write.outputs[1:]
    args = example_inputs(single.inputs, seed=2)
    with torch.no_grad():
        noise, *cached = write(*args)
        (again,) = read(*args, *cached)
        (other_text,) = read(args[0], args[1], torch.randn_like(args[2]), *cached)
    assert torch.equal(again, noise)
    assert torch.equal(other_text, noise)   # the text embeddings no longer matter


def test_shallow_read_ca_reads_only_the_shallow_attn2(deep):
    _, captured, root = deep
    variant = build_variant(captured, VariantSpec("shallow", cross_attn="read"), 0, root)
    assert variant.inputs[3:] == ["deepcache", "cross_attn:up_blocks.2.attentions.2.transformer_blocks.0.attn2"]
    assert not any(".attn2" in p for p in _paths(variant))


def test_deepcache_needs_a_unet():
    model = tiny_denoiser("pixart_alpha")
    captured = capture(model, get_family("pixart_alpha"), Bucket(2, 16, 16, 120, torch.float32))
    with pytest.raises(PostDiffError, match="needs a U-Net with up_blocks"):
        deepcache_graph(captured.module().graph, 0, "read")
    # A transformer's shallow variant is the block cache's (tests/test_block_cache.py); this one has 2 blocks,
    # too few to keep one at each end and cache one between.
    with pytest.raises(PostDiffError, match="needs 3 or more blocks"):
        build_variant(captured, VariantSpec("shallow"), 1)
    read = build_variant(captured, VariantSpec(cross_attn="read"))   # the cross-attention cache works on DiTs
    assert len(read.inputs) == len(captured.inputs) + 2 and not any(".attn2" in p for p in _paths(read))


def test_noop_squeezes_are_dropped_and_real_ones_kept():
    from postdiff_compile.passes.noop_squeeze import drop_noop_squeezes

    class M(torch.nn.Module):
        def forward(self, x):              # x: [2, 1, 5, 1]
            return torch.squeeze(x, 2) * 2 + torch.squeeze(x, (1, 2)).sum() + torch.squeeze(x, 1).sum()

    x = torch.randn(2, 1, 5, 1)
    module = torch.export.export(M(), (x,)).module()
    expected = module(x)

    def squeezes(m):
        return [str(n.target) for n in m.graph.nodes if n.op == "call_function" and "squeeze" in str(n.target)
                and "unsqueeze" not in str(n.target)]

    before = squeezes(module)
    dropped = drop_noop_squeezes(module)
    # squeeze(x, 2) goes, squeeze(x, (1, 2)) keeps dim 1 (a squeeze.dims), squeeze(x, 1) stays
    assert sorted(squeezes(dropped)) == sorted(["aten.squeeze.dim", "aten.squeeze.dims"])
    assert len(before) == 3 and squeezes(module) == before   # the input module is left as it is
    assert torch.equal(dropped(x), expected) and torch.equal(module(x), expected)
