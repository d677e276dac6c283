"""Variants: the specialised graphs one captured denoiser graph is rewritten into.

A variant is named by what it does (`VariantSpec.name`, variant_spec.py), e.g. "full", "full+write_dc",
"shallow+read_ca", "full+write_ab".
It takes the denoiser inputs followed by the caches it reads and returns the noise prediction followed
by the caches it writes; `Variant.inputs` / `.outputs` name them ("deepcache", "cross_attn:<attn2 path>",
"attn_broadcast:<attention path>").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .capture import CONTROLNET_DOWN, CONTROLNET_MID, Bucket, Captured, DenoiserCall, TensorSpec, capture, example_inputs
from .caches import ATTN_BROADCAST, CROSS_ATTN, DEEPCACHE
from .config import PostDiffConfig
from .models.families import FamilySpec, kind_of
from .passes import graph_edit
from .passes.attn_broadcast import attn_broadcast_graph
from .passes.block_cache import block_cache_graph, check_block_branch
from .passes.cross_attn import cross_attn_graph
from .passes.deepcache import check_branch, deepcache_graph
from .passes.joint_text import joint_text_graph
from .variant_spec import VariantSpec
from .verification import Verification, rel_l2

# The deep cache of each denoiser kind (FamilySpec.deep_cache): U-Nets cache DeepCache's deep feature;
# transformers, which have no skip branches, the residual of their middle blocks. Both travel under the one
# cache name DEEPCACHE. Each entry: the check of a branch, the graph pass (graph, branch, mode, kind).
_DEEP_CACHES = {"deepcache": (check_branch, lambda graph, branch, mode, kind: deepcache_graph(graph, branch, mode)),
                "block_cache": (check_block_branch, lambda graph, branch, mode, kind: block_cache_graph(
                    graph, branch, mode, kind.block_stacks))}
# What the cross-attention cache holds, by denoiser class: the attn2 outputs, or for SD3's joint blocks (no attn2)
# the text keys and values every joint attention reads and the pooled text embedding (passes/joint_text.py).
# (A DenoiserKind field would be the registry's place; models/families.py is another change's for now.)
_CROSS_ATTN_PASSES = {"SD3Transformer2DModel": joint_text_graph}


def cache_blocks(denoiser: torch.nn.Module) -> int:
    """How many blocks cache_branch counts in: a U-Net's up blocks, a transformer's blocks (all its stacks)."""
    kind = kind_of(denoiser)
    stacks = ("up_blocks",) if kind.deep_cache == "deepcache" else kind.block_stacks
    return sum(len(getattr(denoiser, stack)) for stack in stacks)


def check_cache_branch(denoiser: torch.nn.Module, config: PostDiffConfig) -> None:
    """A clear error, before anything is captured, for a cache_branch this denoiser does not have (only when
    the config caches at all)."""
    if config.cache_interval <= 1:
        return
    check, _ = _DEEP_CACHES[kind_of(denoiser).deep_cache]
    check(cache_blocks(denoiser), config.cache_branch)


@dataclass
class Variant:
    spec: VariantSpec
    module: torch.fx.GraphModule
    inputs: list[str]    # denoiser inputs, then caches read
    outputs: list[str]   # "noise_pred", then caches written
    compiled: Callable[..., Any] | None = None   # torch.compile(module), when the store compiles

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.module if self.compiled is None else self.compiled)(*inputs)


def build_variant(captured: Captured, spec: VariantSpec, cache_branch: int = 0,
                  root: torch.nn.Module | None = None) -> Variant:
    """Rewrite the captured graph into `spec`. `root` is the captured module (made here if not given)."""
    root = root if root is not None else captured.module()
    graph, _ = graph_edit.flat_graph(root.graph)
    inputs = [s.name for s in captured.inputs]
    outputs = ["noise_pred"]
    if spec.deep == "shallow" or spec.write_deepcache:
        _, deep_pass = _DEEP_CACHES[captured.family.deep_cache]
        graph = deep_pass(graph, cache_branch, "read" if spec.deep == "shallow" else "write", captured.family.kind)
        (inputs if spec.deep == "shallow" else outputs).append(DEEPCACHE)
    if spec.attn_broadcast != "compute":
        # before the cross-attention pass: a joint-text read then skips the attentions read from this cache
        ab = attn_broadcast_graph(graph, spec.attn_broadcast)
        graph = ab.graph
        (inputs if spec.attn_broadcast == "read" else outputs).extend(f"{ATTN_BROADCAST}:{e}" for e in ab.entries)
    if spec.cross_attn != "compute":
        ca = _CROSS_ATTN_PASSES.get(captured.family.kind.denoiser_class, cross_attn_graph)(graph, spec.cross_attn)
        graph = ca.graph
        (inputs if spec.cross_attn == "read" else outputs).extend(f"{CROSS_ATTN}:{m}" for m in ca.modules)
    _drop_unused_residuals(graph, inputs)
    module = graph_edit.to_module(root, graph)
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs) or len(graph_edit.outputs_of(module.graph)) != len(outputs):
        raise AssertionError(f"variant {spec.name}: graph I/O does not match its names")  # a bug in a pass
    return Variant(spec, module, inputs, outputs)


def _drop_unused_residuals(graph: torch.fx.Graph, inputs: list[str]) -> None:
    """A shallow variant adds only the ControlNet residuals of the layers it runs: the others stop being inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in list(zip(inputs, placeholders)):
        if name.startswith((CONTROLNET_DOWN, CONTROLNET_MID)) and not node.users:
            graph.erase_node(node)
            inputs.remove(name)


def variant_input_specs(variant: Variant) -> list[TensorSpec]:
    """Every input of a variant (denoiser inputs and caches), with shapes from its graph."""
    placeholders = [n for n in variant.module.graph.nodes if n.op == "placeholder"]
    return [TensorSpec(name, tuple(node.meta["val"].shape), node.meta["val"].dtype)
            for name, node in zip(variant.inputs, placeholders)]


def variant_output_specs(variant: Variant) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(node.meta["val"].shape), node.meta["val"].dtype)
            for name, node in zip(variant.outputs, graph_edit.outputs_of(variant.module.graph))]


@dataclass
class VariantCheck:
    verification: Verification
    inputs: tuple[torch.Tensor, ...]    # every input of the variant, caches included
    outputs: tuple[torch.Tensor, ...]   # what the variant returned on them


def check_variant(captured: Captured, variant: Variant, denoiser: torch.nn.Module, cache_branch: int = 0,
                  root: torch.nn.Module | None = None, seed: int = 1, memo: dict | None = None) -> VariantCheck:
    """The variant's noise prediction against eager on fixed random inputs.

    A variant that reads caches gets them from an oracle variant (the full graph writing those caches, reading
    none) run on the same inputs; with exact caches a rewrite must reproduce the full model. The inputs and
    outputs are returned so that an exported copy of the variant can be checked on the same ones.

    `memo` (a dict the caller keeps for one denoiser) holds what is the same for every variant of a bucket: the
    inputs, the eager outputs and the caches written by the variants and oracles run so far that read none. Each
    variant is still run and compared; the eager reference and the oracles are run once per bucket.
    """
    device = next(denoiser.parameters()).device
    memo = {} if memo is None else memo
    key = (id(captured), seed, cache_branch)
    if key not in memo:
        args = tuple(a.to(device) for a in example_inputs(captured.inputs, seed))
        wrapper = DenoiserCall(denoiser, tuple(s.name for s in captured.inputs)).eval()
        with torch.no_grad():
            memo[key] = (args, wrapper(*args).float(), {})
    args, expected, caches = memo[key]
    spec = variant.spec
    # by name: a shallow variant of a ControlNet capture drops the residuals its layers do not add
    named = dict(zip((s.name for s in captured.inputs), args))
    needed = [name for name in variant.inputs if name not in named]
    with torch.no_grad():
        if any(name not in caches for name in needed):
            oracle_spec = VariantSpec("full", spec.deep == "shallow",
                                      "write" if spec.cross_attn == "read" else "compute",
                                      "write" if spec.attn_broadcast == "read" else "compute")
            oracle = build_variant(captured, oracle_spec, cache_branch, root)
            _, *written = oracle(*args)
            caches.update(zip(oracle.outputs[1:], written))
        inputs = tuple(named[name] if name in named else caches[name] for name in variant.inputs)
        outputs = tuple(variant(*inputs))
    if not spec.reads:
        caches.update(zip(variant.outputs[1:], outputs[1:]))
    got = outputs[0].float()
    return VariantCheck(Verification(float((got - expected).abs().max()), rel_l2(got, expected), seed), inputs, outputs)


def verify_variant(captured: Captured, variant: Variant, denoiser: torch.nn.Module, cache_branch: int = 0,
                   root: torch.nn.Module | None = None, seed: int = 1) -> Verification:
    return check_variant(captured, variant, denoiser, cache_branch, root, seed).verification


class VariantStore:
    """Variants of one denoiser, made on first use: one capture per bucket, rewritten per variant.

    With `compile`, each variant also gets `torch.compile(variant.module)` (made on first use, compiled by
    torch at its first call); the rewritten graphs stay what the passes made, only their execution changes. A
    string is torch.compile's mode: "reduce-overhead" replays each compiled variant from CUDA graphs.
    """

    def __init__(self, denoiser: torch.nn.Module, family: FamilySpec, compile: bool | str = False,
                 controlnet: bool = False):
        self.denoiser = denoiser
        self.family = family
        self.compile = compile
        self.controlnet = controlnet   # the captures take ControlNet residuals (capture.residual_specs)
        self.latent_input = family.latent_input
        self.captured: dict[Bucket, Captured] = {}
        self._roots: dict[Bucket, torch.nn.Module] = {}
        self._variants: dict[tuple[str, int, Bucket], Variant] = {}

    def prepare(self, bucket: Bucket) -> tuple[Captured, torch.nn.Module]:
        """The capture for `bucket` and its unlifted module (the root every variant shares parameters with)."""
        if bucket not in self.captured:
            self.captured[bucket] = capture(self.denoiser, self.family, bucket, self.controlnet)
            self._roots[bucket] = self.captured[bucket].module()
        return self.captured[bucket], self._roots[bucket]

    def get(self, name: str, bucket: Bucket, cache_branch: int = 0) -> Variant:
        spec = VariantSpec.parse(name)
        if spec.deep == "full" and not spec.write_deepcache:
            cache_branch = 0   # the branch only matters to DeepCache variants; share the others
        key = (spec.name, cache_branch, bucket)
        if key not in self._variants:
            captured, root = self.prepare(bucket)
            variant = build_variant(captured, spec, cache_branch, root)
            if self.compile:
                # Every variant is one static shape; dynamic=False keeps torch from guessing at symbolic sizes.
                mode = self.compile if isinstance(self.compile, str) else None
                variant.compiled = torch.compile(variant.module, dynamic=False, mode=mode)
            self._variants[key] = variant
        return self._variants[key]
