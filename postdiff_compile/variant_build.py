"""The variants a plan needs, each captured, rewritten, verified against eager and written in every format.

One capture per batch and resolution (CFG steps run the CFG batch, gated steps batch 1; low-resolution steps
the low-resolution latent), one rewrite per variant. Each variant's manifest entry records what it is,
its inputs and outputs, its FLOPs and how it was verified.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .capture import Bucket
from .errors import PostDiffError
from .exporters.formats import Build, VariantJob, write_variant
from .metrics.flops import count_flops
from .plan import Plan, Step
from .variant_spec import VariantSpec
from .variants import VariantStore, check_variant, variant_input_specs, variant_output_specs

VariantKey = tuple[str, int, tuple[int, int]]   # (variant name, batch, latent size)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Images per call the variants are built for (`compile --max-batch`): the powers of two below `max_batch`, and
    `max_batch`; a runner pads a call to the next bucket. One static shape per bucket, as every backend runs it."""
    if not 1 <= max_batch <= 64:
        raise PostDiffError(f"--max-batch must be between 1 and 64 images per call, got {max_batch}")
    return tuple(sorted({2 ** k for k in range(max_batch.bit_length()) if 2 ** k < max_batch} | {max_batch}))


def variant_key(step: Step, plan: Plan, full_latent: tuple[int, int], images: int = 1) -> VariantKey:
    """The variant a step runs for a call of `images` images (CFG steps: twice as many rows)."""
    low = plan.transition.low_latent if plan.transition else full_latent
    return step.variant, images * (2 if step.cfg else 1), low if step.low_res else full_latent


def window_plans(make_plan_for, steps: int, family) -> list[Plan]:
    """The plans of the windows an image's strength or a refiner's denoising_start can start on an artifact
    (runtime/artifact_img2img.py), for the variants the whole schedule's plan lacks: a window that starts at or after
    the cross-attention cache's gate writes the cache on its first step, at full resolution and with CFG, which no
    step of the whole plan does (benchmarks/results/pipeline_matrix.md: fast's image-to-image at strength 0.3 was
    refused until 8 Dec). Other windows add none (served_keys dedupes them: measured for every preset of SD1.5, SD2,
    SDXL and LCM, only fast gains one variant). U-Net families only (the runners' image-to-image and inpainting).
    `make_plan_for(window)` -> the plan of steps window[0]..end."""
    if family.denoiser_class != "UNet2DConditionModel":
        return []
    plans = []
    for start in range(1, steps):
        try:
            plans.append(make_plan_for((start, steps)))
        except PostDiffError:
            continue   # a window the runner refuses as well
    return plans


def served_keys(plan: Plan, full_latent: tuple[int, int], batches: tuple[int, ...] = (1,),
                windows: tuple[Plan, ...] = ()) -> dict[VariantKey, VariantKey]:
    """Each step's variant, at each bucket, -> the variant built to run it (the steps of the `windows` plans too, for
    one image: a window is a single-image call).
    Variants of one bucket that compute the same thing (deep mode and caches read) and differ only in the caches
    they also return are one variant returning the union: a returned cache that the step does not write costs an
    output buffer, not compute (the loop drops it)."""
    groups: dict[tuple, list[VariantSpec]] = {}
    keys = {variant_key(step, plan, full_latent, b) for step in plan for b in batches}
    for name, batch, size in keys | {variant_key(step, w, full_latent) for w in windows for step in w}:
        spec = VariantSpec.parse(name)
        groups.setdefault((batch, size, spec.deep, spec.reads), []).append(spec)
    served = {}
    for (batch, size, _, _), specs in groups.items():
        union = VariantSpec.union(specs).name
        served.update({(spec.name, batch, size): (union, batch, size) for spec in specs})
    return served


def variant_ids(plan: Plan, full_latent: tuple[int, int], dtype: torch.dtype,
                batches: tuple[int, ...] = (1,), windows: tuple[Plan, ...] = ()) -> dict[VariantKey, str]:
    """The variants to build, largest batch and latent first, with their ids ("full+write_dc@b2_8x8")."""
    wanted = sorted(set(served_keys(plan, full_latent, batches, windows).values()),
                    key=lambda v: (-v[1], -v[2][0] * v[2][1], v[0]))
    return {key: f"{key[0]}@{Bucket(key[1], *key[2], 0, dtype).tag}" for key in wanted}


def step_ids(plan: Plan, full_latent: tuple[int, int], dtype: torch.dtype,
             batches: tuple[int, ...] = (1,), windows: tuple[Plan, ...] = ()) -> dict[VariantKey, str]:
    """Each step's variant at each bucket (its variant_key) -> the id of the variant that runs it."""
    ids = variant_ids(plan, full_latent, dtype, batches, windows)
    return {key: ids[served] for key, served in served_keys(plan, full_latent, batches, windows).items()}


def plan_ids(plan: Plan, full_latent: tuple[int, int], dtype: torch.dtype,
             batches: tuple[int, ...] = (1,), windows: tuple[Plan, ...] = ()) -> dict[int, list[str]]:
    """Images per call -> the id of the variant each step runs (the manifest's plan holds 1's, "batches" the rest)."""
    ids = step_ids(plan, full_latent, dtype, batches, windows)
    return {b: [ids[variant_key(step, plan, full_latent, b)] for step in plan] for b in batches}


def uses_twin(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the rewrites are verified on a float32 twin of the weights.

    float16/bfloat16 convolutions on a CPU run about 250x slower than float32 (70 s for one 320-channel 3x3 conv
    at 96x96, measured here), so there the checks run on a float32 twin of the weights: the same rewrite of the
    same architecture is verified against eager in float32, and the exported low-precision graphs are compared
    with the twin's outputs (onnxruntime runs them at usable speed).
    """
    return dtype != torch.float32 and device.type == "cpu"


def reference_of(dtype: torch.dtype, device: torch.device) -> str:
    """What the manifest says the files were verified against."""
    name = str(dtype).removeprefix("torch.")
    return f"torch eager, float32 twin of the {name} weights" if uses_twin(dtype, device) else f"torch eager, {name}"


class VariantBuilder:
    """Builds the variants of one denoiser, verifying each rewrite against eager (uses_twin says on what)."""

    def __init__(self, module: torch.nn.Module, family, build: Build, cache_branch: int, controlnet: bool = False):
        self.module, self.family, self.build, self.cache_branch = module, family, build, cache_branch
        self.dtype = next(module.parameters()).dtype
        self.twin = uses_twin(self.dtype, build.device)
        self.store = VariantStore(module, family, controlnet=controlnet)   # controlnet: residuals are inputs
        self.check_store = VariantStore(copy.deepcopy(module).float(), family, controlnet=controlnet) \
            if self.twin else None
        self.memo: dict = {}   # per bucket: the verification inputs, eager outputs and oracle caches (check_variant)

    def entry(self, key: VariantKey, tag: str) -> dict:
        job, captured, check = self.job(key, tag)
        variant, build = job.variant, self.build
        files = write_variant(job)
        flops = count_flops(variant.module.graph)
        return {
            "id": tag, "name": key[0], "batch": key[1], "latent_size": list(key[2]),
            "text_length": self.family.text_length, "dtype": build.dtype_name, "upsample_path": captured.upsample_path,
            "inputs": [s.to_json() for s in variant_input_specs(variant)],
            "outputs": [s.to_json() for s in variant_output_specs(variant)],
            "flops": {"paper": flops.paper, "true": flops.true},
            "verification": self.verification(check), "files": files, "capture_seconds": round(captured.seconds, 3),
        }

    def job(self, key: VariantKey, tag: str):
        """The variant captured, rewritten and verified against eager: its VariantJob for the formats to write or
        check, with the capture and the check."""
        name, batch, size = key
        build, timed = self.build, self.build.timed
        bucket = Bucket(batch, *size, self.family.text_length, self.dtype)
        if bucket not in self.store.captured:
            with timed(f"capture {bucket.tag}"):
                self.store.prepare(bucket)
        captured, root = self.store.prepare(bucket)
        with timed(f"rewrite {tag}"):
            variant = self.store.get(name, bucket, self.cache_branch)
        with timed(f"verify {tag}"):
            check = self._check(name, bucket, captured, variant, root)
        if not check.verification.rel_l2_error <= build.tolerance:
            raise PostDiffError(f"variant {tag} differs from eager: relative L2 error "
                                f"{check.verification.rel_l2_error:.3g} > {build.tolerance:g}", build.source)
        # The exported graphs take the artifact's dtype (timesteps stay float32).
        feed = tuple(t.to(s.dtype) for t, s in zip(check.inputs, variant_input_specs(variant)))
        job = VariantJob(build=build, tag=tag, variant=variant, feed=feed, expected=check.outputs,
                         seed=check.verification.seed)
        return job, captured, check

    def verification(self, check) -> dict:
        return {**check.verification.to_json(), "reference": self.build.reference, "tolerance": self.build.tolerance}

    def _check(self, name, bucket, captured, variant, root):
        if not self.twin:
            return check_variant(captured, variant, self.module, self.cache_branch, root, memo=self.memo)
        bucket32 = dataclasses.replace(bucket, dtype=torch.float32)
        captured32, root32 = self.check_store.prepare(bucket32)
        return check_variant(captured32, self.check_store.get(name, bucket32, self.cache_branch),
                             self.check_store.denoiser, self.cache_branch, root32, memo=self.memo)
