"""The caches of the flow-matching transformers beyond the block cache, on tiny random models.

- The attention broadcast (passes/attn_broadcast.py) planned statically equals diffusers' Pyramid Attention
  Broadcast hook on FluxPipeline, and changes the result (so the comparison is not vacuous).
- SD3's cross-attention cache of the joint blocks' text stream (passes/joint_text.py) is exact where it should be: a
  variant reading what a variant wrote at the same inputs equals the model, and a batch-2 write reduced to its
  conditional half feeds a batch-1 read that equals the model on the conditional inputs.
- The fast presets of sd3, flux and flux_schnell run through optimize(pipe) and differ from balanced.
"""
import pytest
import torch
from test_pass_invariants import _input, _run
from tiny_models import TINY_CONFIGS, pipeline_embeds, tiny_denoiser, tiny_pipeline

from postdiff_compile import PostDiffConfig, PostDiffError, optimize
from postdiff_compile.capture import Bucket, DenoiserCall, example_inputs
from postdiff_compile.models.families import get_family
from postdiff_compile.passes.attn_broadcast import attn_broadcast_graph
from postdiff_compile.passes.joint_text import joint_text_graph
from postdiff_compile.passes.regions import has_module
from postdiff_compile.plan import build_plan
from postdiff_compile.runtime.denoise import reduce_cross_attn
from postdiff_compile.runtime.pipeline import restore
from postdiff_compile.variants import VariantStore

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(pipe, family, steps, **kwargs):
    args = dict(pipeline_embeds(family), num_inference_steps=steps, height=128, width=128, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    if family == "sd3":
        args["guidance_scale"] = 5.0
    return pipe(**args, **kwargs).images


# --- the plan -------------------------------------------------------------------------------------------------

def _roles(plan):
    return ["read" if "read_ab" in s.variant else "write" if "write_ab" in s.variant else "-" for s in plan]


def test_broadcast_plan_is_the_pab_hook_rule():
    """PAB computes at call 0, outside the window (strict bounds) and at every N-th call; the steps between read,
    and only the last computing step before a read writes."""
    times = [1000, 900, 800, 700, 600, 500, 400, 300, 100]
    plan = build_plan(PostDiffConfig(attn_broadcast_interval=3), len(times), timesteps=times)
    assert _roles(plan) == ["-", "-", "-", "write", "read", "read", "write", "read", "-"]
    assert [s.reads for s in plan][4] == ("attn_broadcast",) and plan[3].writes == ("attn_broadcast",)
    with pytest.raises(PostDiffError, match="needs the scheduler's timesteps"):
        build_plan(PostDiffConfig(attn_broadcast_interval=2), 3)
    assert _roles(build_plan(PostDiffConfig(attn_broadcast_interval=2), 1)) == ["-"]   # nothing to read: no timesteps


def test_broadcast_plan_restarts_where_the_attention_changes_shape_or_batch():
    """The counter restarts at the switch (low -> full resolution) and at the cross-attention cache's steps m - 1
    and m (the batch halves); with the block cache, full steps hold every block's attention."""
    times = [500] * 8
    mixed = build_plan(PostDiffConfig(attn_broadcast_interval=2, low_res_scale=0.5, low_res_fraction=0.5), 8,
                       timesteps=times)
    assert _roles(mixed) == ["write", "read", "write", "read"] * 2
    gated = build_plan(PostDiffConfig(attn_broadcast_interval=2, cross_attn_cache="cond", cross_attn_cache_step=4),
                       8, timesteps=times)
    assert _roles(gated) == ["write", "read", "-", "-", "write", "read", "write", "read"]
    cached = build_plan(PostDiffConfig(attn_broadcast_interval=3, cache_interval=2, cache_branch=1), 8, timesteps=times)
    assert [s.variant for s in cached] == ["full+write_dc+write_ab", "shallow+read_ab", "full+write_dc+read_ab",
                                           "shallow+write_ab", "full+write_dc+read_ab", "shallow+read_ab",
                                           "full+write_dc+write_ab", "shallow+read_ab"]


# --- the passes -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_store():
    return VariantStore(tiny_denoiser("flux"), get_family("flux"))


@pytest.fixture(scope="module")
def sd3_store():
    return VariantStore(tiny_denoiser("sd3"), get_family("sd3"))


def _calls(store, bucket, write, read, args=None):
    """(write variant's outputs, read variant's noise prediction on the written caches, eager) on seed-1 inputs."""
    captured, _ = store.prepare(bucket)
    args = args or example_inputs(captured.inputs, 1)
    writer, reader = store.get(write, bucket), store.get(read, bucket)
    with torch.no_grad():
        out, *caches = writer(*args)
        got = reader(*args, *caches)[0]
        eager = DenoiserCall(store.denoiser, tuple(s.name for s in captured.inputs))(*args)
    assert writer.outputs[1:] == reader.inputs[len(args):]
    return out, got, eager


def test_attn_broadcast_read_of_the_same_step_is_the_model(flux_store):
    bucket = Bucket(1, 16, 16, 10, torch.float32)
    out, got, eager = _calls(flux_store, bucket, "full+write_ab", "full+read_ab")
    assert rel(out, eager) == 0 and rel(got, eager) <= 1e-6
    reader = flux_store.get("full+read_ab", bucket)
    # 4 double-stream attentions (image and text outputs) and 5 single-stream ones; no attention left to run
    assert len(reader.inputs) - 7 == 4 * 2 + 5
    assert not any(n.target is SDPA for n in reader.module.graph.nodes)


@pytest.mark.parametrize("mode", ["write", "read"])
def test_attn_broadcast_and_joint_text_pass_invariants(flux_store, sd3_store, mode):
    for store, bucket, graph_pass in ((flux_store, Bucket(1, 16, 16, 10, torch.float32), attn_broadcast_graph),
                                      (sd3_store, Bucket(1, 16, 16, 12, torch.float32), joint_text_graph)):
        _, root = store.prepare(bucket)
        result, created = _run(graph_pass, _input(root), mode)
        assert sum(n.op == "placeholder" for n in created) == (len(result.entries if hasattr(result, "entries")
                                                                    else result.modules) if mode == "read" else 0)


def test_joint_text_read_drops_the_text_stream_and_is_exact(sd3_store):
    """Write and read at the same inputs equal the model; the read graph runs no text projection, text feed-forward
    or context embedder, and does not use the text inputs."""
    bucket = Bucket(1, 16, 16, 12, torch.float32)
    out, got, eager = _calls(sd3_store, bucket, "full+write_ca", "full+read_ca")
    assert rel(out, eager) == 0 and rel(got, eager) <= 1e-6
    graph = sd3_store.get("full+read_ca", bucket).module.graph
    for path in ("context_embedder", "time_text_embed.text_embedder", "transformer_blocks.0.ff_context",
                 "transformer_blocks.0.norm1_context", "transformer_blocks.3.attn.add_q_proj",
                 "transformer_blocks.5.attn.add_k_proj"):
        assert not has_module(graph, path), path
    unused = [n.name for n in graph.nodes if n.op == "placeholder" and not n.users]
    assert len(unused) == 2   # encoder_hidden_states and pooled_projections


def test_joint_text_cond_half_feeds_a_batch_1_step(sd3_store):
    """Cond mode: the CFG batch [negative; positive] writes, the cache keeps the positive half, and a batch-1 step on
    the negative text inputs (as the runtime feeds them) equals the model on the positive ones."""
    two, one = Bucket(2, 16, 16, 12, torch.float32), Bucket(1, 16, 16, 12, torch.float32)
    captured, _ = sd3_store.prepare(two)
    args = example_inputs(captured.inputs, 1)
    latent, timestep, text, pooled = args
    with torch.no_grad():
        _, *caches = sd3_store.get("full+write_ca", two)(*args)
        cond = [reduce_cross_attn(c, "cond", 5.0) for c in caches]
        got = sd3_store.get("full+read_ca", one)(latent[1:], timestep[1:], text[:1], pooled[:1], *cond)[0]
        eager = DenoiserCall(sd3_store.denoiser, tuple(s.name for s in captured.inputs))(
            latent[1:], timestep[1:], text[1:], pooled[1:])
    assert rel(got, eager) <= 1e-5   # measured 1.1e-7


# --- parity with diffusers' Pyramid Attention Broadcast ---------------------------------------------------------

def test_attn_broadcast_equals_diffusers_pab_hook():
    """FluxPipeline with apply_pyramid_attention_broadcast(spatial_attention_block_skip_range=3, timestep window
    (100, 800)) against optimize(pipe) with the same static schedule; 8 steps, whose timesteps (1000 ... 186) put
    steps 3-7 in the window: steps 4, 5 and 7 reuse the attention."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    pipe = tiny_pipeline("flux")
    baseline = run(pipe, "flux", 8)
    optimize(pipe, "none", attn_broadcast_interval=3, attn_broadcast_t_low=100, attn_broadcast_t_high=800)
    ours = run(pipe, "flux", 8)
    assert _roles(pipe._postdiff.last_plan) == ["-", "-", "-", "write", "read", "read", "write", "read"]
    restore(pipe)
    apply_pyramid_attention_broadcast(pipe.transformer, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=3, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: pipe.current_timestep))
    hooked = run(pipe, "flux", 8)
    assert rel(ours, hooked) <= 1e-5        # measured 0.0
    assert rel(hooked, baseline) > 1e-3     # measured 2.4e-3: the broadcast changes the result


# --- presets --------------------------------------------------------------------------------------------------

# flux in the slow tier for the default tier's budget (7 Dec): its presets run in test_flow_matching.py's default cases
@pytest.mark.parametrize("family", ["sd3", pytest.param("flux", marks=pytest.mark.slow),
                                    pytest.param("flux_schnell", marks=pytest.mark.slow)])
def test_fast_preset_runs_and_differs_from_balanced(family):
    pipe = tiny_pipeline(family)
    steps = 4 if family == "flux_schnell" else 6
    optimize(pipe, "balanced")
    balanced = run(pipe, family, steps)
    optimize(pipe, "fast", **({"cross_attn_cache_step": 3} if family == "sd3" else {}))
    fast = run(pipe, family, steps)
    plan = pipe._postdiff.last_plan
    restore(pipe)
    assert torch.isfinite(fast).all() and rel(fast, balanced) > 1e-3
    if family == "sd3":   # CFG off from step m = 3, written at step 2 (the last low-resolution step)
        assert [s.cfg for s in plan] == [True] * 3 + [False] * 3
        assert "write_ca" in plan[2].variant and all("read_ca" in s.variant for s in plan[3:])
    else:
        assert any("read_ab" in s.variant for s in plan)


@pytest.mark.slow   # about 25 s: four tiny architectures captured per preset
def test_explain_counts_the_fast_caches():
    """On the tiny architectures: fast costs fewer FLOPs than balanced in both conventions, counted from graphs."""
    from postdiff_compile.config import resolve_config
    from postdiff_compile.explain import explain

    for family, steps in (("sd3", 6), ("flux", 6)):
        spec = get_family(family)
        counts = {p: explain(spec, resolve_config(p, family=family, **({"cross_attn_cache_step": 3}
                                                                         if family == "sd3" and p == "fast" else {})),
                             steps=steps, resolution=(128, 128), denoiser_config=TINY_CONFIGS[family]).total
                  for p in ("balanced", "fast")}
        assert counts["fast"].paper < counts["balanced"].paper and counts["fast"].true < counts["balanced"].true


def test_first_block_cache_is_static_only_where_it_degenerates():
    """diffusers' FirstBlockCache runs the remaining blocks when the first block's residual changed by more than
    `threshold` (relative mean absolute change) since the last full step: data-dependent. Only two settings are
    static: a negative threshold always computes (no cache), and infinity computes only the first step and reuses
    its tail residual at every later one. Neither is a schedule worth planning; docs/method.md says so."""
    from diffusers import FirstBlockCacheConfig, apply_first_block_cache

    calls = []
    baseline = run(tiny_pipeline("flux"), "flux", 6)
    for threshold, expected in ((-1.0, 6), (float("inf"), 1)):
        pipe = tiny_pipeline("flux")   # (a pipeline that ran before the hook is applied finds no cache context)
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
        tail = pipe.transformer.single_transformer_blocks[-1].proj_out   # a plain Linear: no diffusers hook on it
        handle = tail.register_forward_pre_hook(lambda *_: calls.append(threshold))
        cached = run(pipe, "flux", 6)
        handle.remove()
        assert calls.count(threshold) == expected
        assert (rel(cached, baseline) == 0) == (threshold < 0)
