"""The block cache pass on a tiny 5-block PixArt: what the read graph keeps, and that write + read computes
what a plain eager implementation with forward hooks computes."""
import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_denoiser

from postdiff_compile import PostDiffError
from postdiff_compile.capture import Bucket, DenoiserCall, capture, example_inputs
from postdiff_compile.verification import rel_l2
from postdiff_compile.models.families import get_family
from postdiff_compile.passes import graph_edit
from postdiff_compile.passes.block_cache import block_cache_graph, check_block_branch
from postdiff_compile.passes.regions import module_path

NUM_BLOCKS = 5
BRANCHES = (1, 2)   # every valid branch of a 5-block transformer


@pytest.fixture(scope="module")
def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**TINY_CONFIGS["pixart_alpha"], "num_layers": NUM_BLOCKS}).eval()
    with torch.no_grad():   # as tiny_denoiser does: no parameter left at an exact 0 or 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    captured = capture(model, get_family("pixart_alpha"), Bucket(2, 16, 16, 8, torch.float32))
    return model, captured, captured.module()


def _variant(root, branch, mode):
    """The pass composed as variants.build_variant composes passes."""
    graph, _ = graph_edit.flat_graph(root.graph)
    return graph_edit.to_module(root, block_cache_graph(graph, branch, mode))


def _eager(model, captured, args):
    with torch.no_grad():
        return DenoiserCall(model, tuple(s.name for s in captured.inputs)).eval()(*args)


def _block_indices(module) -> set[int]:
    indices = set()
    for node in module.graph.nodes:
        path = module_path(node) or ""
        if path.startswith("transformer_blocks."):
            indices.add(int(path.split(".")[1]))
    return indices


def _hook_reference(model, captured, branch, full_args, cached_args):
    """Block caching in eager PyTorch: on the full call, remember what blocks b..n-b-1 added to the hidden
    state; on the cached call, those blocks pass their input through and the last adds the remembered sum."""
    blocks = model.transformer_blocks
    first, last = branch, len(blocks) - branch - 1
    seen = {}

    def remember(name):
        def hook(module, args, output):
            seen[name] = output
        return hook

    handles = [blocks[first - 1].register_forward_hook(remember("entering")),
               blocks[last].register_forward_hook(remember("leaving"))]
    try:
        _eager(model, captured, full_args)
    finally:
        for h in handles:
            h.remove()
    residual = seen["leaving"] - seen["entering"]

    def skip(module, args, output):
        return args[0]

    def restore(module, args, output):
        return args[0] + residual   # args[0] is the hidden state entering block b: the skipped ones pass it on

    handles = [blocks[i].register_forward_hook(skip) for i in range(first, last)]
    handles.append(blocks[last].register_forward_hook(restore))
    try:
        return _eager(model, captured, cached_args)
    finally:
        for h in handles:
            h.remove()


def test_regions_of_pixart_blocks(pixart):
    _, _, root = pixart
    full = _variant(root, 1, "write")
    assert _block_indices(full) == set(range(NUM_BLOCKS))


@pytest.mark.parametrize("branch", BRANCHES)
def test_read_graph_keeps_only_the_end_blocks(pixart, branch):
    _, captured, root = pixart
    read = _variant(root, branch, "read")
    kept = set(range(branch)) | set(range(NUM_BLOCKS - branch, NUM_BLOCKS))
    assert _block_indices(read) == kept
    # the cached blocks' weights are no longer referenced either
    targets = [n.target for n in read.graph.nodes if n.op == "get_attr"]
    for i in set(range(NUM_BLOCKS)) - kept:
        assert not any(f"transformer_blocks_{i}_" in t for t in targets)
    placeholders = [n for n in read.graph.nodes if n.op == "placeholder"]
    # the denoiser inputs, then the residual
    assert len(placeholders) == len(captured.inputs) + 1 and placeholders[-1].name == "deepcache"
    assert tuple(placeholders[-1].meta["val"].shape) == (2, 64, 32)   # [batch, (16/2)^2 tokens, width]


@pytest.mark.parametrize("branch", BRANCHES)
def test_write_then_read_reproduces_the_full_model(pixart, branch):
    model, captured, root = pixart
    args = example_inputs(captured.inputs, seed=3)
    write, read = _variant(root, branch, "write"), _variant(root, branch, "read")
    written = graph_edit.outputs_of(write.graph)[-1]
    assert tuple(written.meta["val"].shape) == (2, 64, 32) and written.meta["val"].dtype == torch.float32
    expected = _eager(model, captured, args)
    with torch.no_grad():
        noise, residual = write(*args)
        (again,) = read(*args, residual)
        (stale,) = read(*args, torch.zeros_like(residual))
    assert residual.shape == (2, 64, 32)
    assert torch.equal(noise, expected)
    assert rel_l2(again, noise) < 1e-5
    assert rel_l2(stale, noise) > 1e-3   # the read graph really uses the residual


@pytest.mark.parametrize("branch", BRANCHES)
def test_cached_step_matches_the_hook_reference(pixart, branch):
    model, captured, root = pixart
    full_args = example_inputs(captured.inputs, seed=11)
    cached_args = example_inputs(captured.inputs, seed=12)   # other latents, timesteps and text
    assert not torch.equal(full_args[1], cached_args[1])
    write, read = _variant(root, branch, "write"), _variant(root, branch, "read")
    with torch.no_grad():
        _, residual = write(*full_args)
        (got,) = read(*cached_args, residual)
    reference = _hook_reference(model, captured, branch, full_args, cached_args)
    plain = _eager(model, captured, cached_args)
    assert rel_l2(got, reference) < 1e-5
    assert rel_l2(reference, plain) > 1e-3   # a cached step is not the full step, so the match means something


def test_input_graph_is_not_mutated(pixart):
    _, _, root = pixart
    graph, _ = graph_edit.flat_graph(root.graph)
    before = [(n.name, n.op, str(n.target), tuple(map(str, n.args))) for n in graph.nodes]
    block_cache_graph(graph, 1, "write")
    block_cache_graph(graph, 2, "read")
    assert [(n.name, n.op, str(n.target), tuple(map(str, n.args))) for n in graph.nodes] == before


@pytest.mark.parametrize("branch", [0, -1, 3, 4])
def test_branch_out_of_range(pixart, branch):
    _, _, root = pixart
    graph, _ = graph_edit.flat_graph(root.graph)
    with pytest.raises(PostDiffError, match=f"cache_branch {branch} does not exist for a transformer of 5 blocks"
                                            r".*must be in 1\.\.2"):
        block_cache_graph(graph, branch, "read")


def test_check_block_branch():
    check_block_branch(3, 1)
    check_block_branch(4, 1)
    with pytest.raises(PostDiffError, match=r"cache_branch 2 does not exist for a transformer of 4 blocks.*1\.\.1"):
        check_block_branch(4, 2)
    with pytest.raises(PostDiffError, match="3 or more blocks"):
        check_block_branch(2, 1)


def test_bad_mode(pixart):
    _, _, root = pixart
    with pytest.raises(ValueError, match="mode"):
        block_cache_graph(root.graph, 1, "shallow")


def test_block_cache_needs_a_transformer():
    model = tiny_denoiser("sd15")
    captured = capture(model, get_family("sd15"), Bucket(1, 8, 8, 8, torch.float32))
    with pytest.raises(PostDiffError, match="needs a transformer with transformer_blocks"):
        block_cache_graph(captured.module().graph, 1, "write")
