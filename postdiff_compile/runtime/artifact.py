"""`load(DIR, backend)`: execute a compiled artifact from its files alone.

The runner rebuilds the artifact's scheduler from the manifest, draws the initial latent as diffusers'
`prepare_latents` does, and walks the manifest's plan with the same loop as `optimize(pipe)` (denoise.py),
over the variant files opened on a backend, with the transition between resolutions. Before anything
runs, the artifact is validated: manifest checksum, format version and schema, every file's size and
sha256, and the toolchain the chosen backend needs. A mismatch is one error naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..capture import Bucket, flux_position_ids
from ..errors import PostDiffError
from ..exporters.formats import FORMATS, of_backend
from ..exporters.manifest import MANIFEST, check_files, graph_entries, read_manifest
from ..exporters.weights_file import artifact_weights
from ..plan import Plan
from ..variant_spec import VariantSpec
from ..models.families import get_family
from ..schedulers import alpha_bars, make_scheduler, transition_levels
from .backends import BackendVariant, open_variant
from .artifact_controlnet import ArtifactControlNets
from .artifact_img2img import sample_from_image
from .denoise import sample

ADDED_INPUTS = ("text_embeds", "time_ids", "resolution", "aspect_ratio", "encoder_attention_mask", "timestep_cond",
                "pooled_projections", "guidance")
# Inputs the runner makes for each latent size, shared by the batch: FLUX's rotary positions.
SHARED_INPUTS = ("txt_ids", "img_ids")


def check_toolchain(folder: Path, manifest: dict, backend: str, device: torch.device | None = None) -> None:
    """Refuse what this machine cannot run faithfully, naming the file and what to do."""
    fmt = of_backend(backend)
    if fmt.name not in manifest["formats"]:
        raise PostDiffError(f"the artifact has no {fmt.name} files for backend {backend!r} (it has "
                            f"{', '.join(manifest['formats'])}); recompile with --format {fmt.name}",
                            Path(folder) / MANIFEST)
    check = getattr(fmt.impl(), "check_toolchain", None)
    if check is not None:
        check(folder, manifest, device if device is not None else torch.device("cpu"))


@dataclass
class _Variants:
    """The VariantSource of an artifact: variants by (name, batch, latent size)."""
    by_key: dict[tuple[str, int, int, int], BackendVariant]

    def get(self, name: str, bucket: Bucket, cache_branch: int = 0) -> BackendVariant:
        key = (name, bucket.batch, bucket.latent_height, bucket.latent_width)
        if key not in self.by_key:   # a window's plan may name a kind the whole plan never ran: a variant writing
            # more caches runs it, found once (get runs at every step)
            found = next((k for k in self.by_key if k[1:] == key[1:] and VariantSpec.parse(k[0]).serves(
                VariantSpec.parse(name))), None)
            if found is None:
                raise PostDiffError(f"the artifact has no variant {name} for batch {bucket.batch} at latent "
                                    f"{bucket.latent_height}x{bucket.latent_width}")
            self.by_key[key] = self.by_key[found]
        return self.by_key[key]


def _open_variants(folder: Path, manifest: dict, backend: str, device: torch.device, weights) -> _Variants:
    """Each plan step's variant name at its bucket -> the opened variant its variant_id names (one variant may run
    steps of several names: variant_build.served_keys)."""
    entries = {v["id"]: v for v in manifest["variants"]}
    opened = {i: open_variant(backend, folder, v, device, weights) for i, v in entries.items()}
    by_key = {}
    buckets = [[step["variant_id"] for step in manifest["plan"]], *manifest.get("batches", {}).values()]
    for ids in buckets:
        for step, vid in zip(manifest["plan"], ids):
            v = entries[vid]
            by_key[(step["variant"], v["batch"], *v["latent_size"])] = opened[vid]
    for vid, v in entries.items():   # built for windows only (variant_build.window_plans): found by their name
        by_key.setdefault((v["name"], v["batch"], *v["latent_size"]), opened[vid])
    return _Variants(by_key)


class ArtifactRunner:
    """Text embeddings in, latents out, on one backend. Made by `load`."""

    def __init__(self, folder: Path, manifest: dict, backend: str, device: torch.device):
        self.folder, self.manifest, self.backend, self.device = Path(folder), manifest, backend, device
        self.dtype = getattr(torch, manifest["denoiser"]["dtype"])
        try:
            self.plan = Plan.from_manifest(manifest)
        except PostDiffError as err:
            raise PostDiffError(str(err), self.folder / MANIFEST) from None
        weights = artifact_weights(folder, manifest)
        self.variants = _open_variants(folder, manifest, backend, device, weights)
        self.controlnets = ArtifactControlNets(folder, manifest, backend, device, weights)
        first = manifest["variants"][0]["inputs"]
        self.latent_input = first[0]["name"]
        self.latent_channels = first[0]["shape"][1]
        self.text = {i["name"]: i for i in first}["encoder_hidden_states"]
        self.added_inputs = [i["name"] for i in first if i["name"] in ADDED_INPUTS]
        self.input_shapes = {i["name"]: i["shape"] for i in first}
        self.cfg = self.plan.cfg   # False for LCM: no negative half
        self.scheduler = make_scheduler(manifest["scheduler"], self.folder / MANIFEST)
        self.timing = manifest.get("set_timesteps", {})   # absent before flow matching: nothing but the steps
        self._check_scheduler()

    @property
    def steps(self) -> int:
        return self.manifest["steps"]

    @property
    def batches(self) -> list[int]:
        """Images per call the variants were built for (compile --max-batch); a call is padded to the next one."""
        return [1, *sorted(int(b) for b in self.manifest.get("batches", {}))]

    def _check_scheduler(self) -> None:
        """The transition's numbers come from the scheduler; a diffusers that computes others must not run it."""
        try:   # every scheduler setting and step count the manifest holds passed its rules; diffusers has its own
            self.scheduler.set_timesteps(self.steps, **self.timing)
        except Exception as err:
            raise PostDiffError(f"{type(self.scheduler).__name__} cannot run {self.steps} steps: {type(err).__name__}: "
                                f"{str(err)[:200]}", self.folder / MANIFEST) from None
        transition = self.manifest["transition"]
        if transition is None:
            return
        step = transition["switch_step"]
        flow = transition["prediction_type"] == "flow"
        level, names = ((transition_levels, ("sigma_t", "sigma_next")) if flow else
                        (alpha_bars, ("alpha_bar_t", "alpha_bar_next")))
        got_levels = level(self.scheduler, self.scheduler.timesteps, step - 1)
        want_levels = tuple(transition[n] for n in names)
        cast = float if flow else int   # flow timesteps are sigma * 1000, not integers
        got = (cast(self.scheduler.timesteps[step - 1]), cast(self.scheduler.timesteps[step]))
        want = (transition["timestep_t"], transition["timestep_next"])
        if any(abs(a - b) > 1e-6 * (1 + abs(b)) for a, b in zip(got + got_levels, want + want_levels)):
            raise PostDiffError(f"this diffusers' {type(self.scheduler).__name__} gives timesteps {got} and "
                                f"{names[0].removesuffix('_t')} ({got_levels[0]:.6g}, {got_levels[1]:.6g}) at the "
                                f"switch, the manifest {want} and ({want_levels[0]:.6g}, {want_levels[1]:.6g})",
                                self.folder / MANIFEST)

    def _check_embeds(self, name: str, tensor: torch.Tensor | None, shape: list[int], rows: int = 1) -> torch.Tensor:
        if tensor is None:
            raise PostDiffError(f"the artifact needs {name} of shape {[rows, *shape[1:]]}")
        if list(tensor.shape) != [rows, *shape[1:]]:
            per_call = "one image per call" if rows == 1 else f"{rows} images in this call"
            raise PostDiffError(f"{name} must have shape {[rows, *shape[1:]]} ({per_call}; the artifact was "
                                f"compiled for text length {shape[1]}), got {list(tensor.shape)}")
        return tensor.to(self.device, self.dtype)

    @torch.no_grad()
    def run_batch(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
                  seeds: list[int], guidance_scales: list[float] | None = None, on_step=None) -> torch.Tensor:
        """Latents [n, C, H, W] of n = len(seeds) images in one walk of the plan, each variant called on the
        smallest bucket of `batches` that holds n (padded with copies of the last image, dropped after). Image i
        equals `self(prompt_embeds[i:i+1], negative_prompt_embeds[i:i+1], seed=seeds[i],
        guidance_scale=guidance_scales[i])` up to float noise (another batch size, other kernels): its noise comes
        from its own seed and its guidance is its own. Artifacts whose denoiser takes added inputs (SDXL, PixArt,
        SD3, FLUX, LCM) run one image per call."""
        n = len(seeds)
        if n < 1:
            raise PostDiffError("run_batch needs at least one seed (one per image)")
        if self.added_inputs or len(self.controlnets):
            takes = ", ".join(self.added_inputs) or "ControlNet residuals"
            raise PostDiffError(f"this artifact's denoiser takes {takes}: call it one image at a time (batched calls "
                                "cover denoisers that take the text embeddings alone)")
        fits = [b for b in self.batches if b >= n]
        if not fits:
            raise PostDiffError(f"{n} images in one call, but the artifact was compiled for at most "
                                f"{self.batches[-1]} (compile --max-batch)", self.folder / MANIFEST)
        pad = fits[0] - n
        scales = list(guidance_scales) if guidance_scales is not None else [self.default_guidance_scale] * n
        if len(scales) != n:
            raise PostDiffError(f"{len(scales)} guidance scales for {n} images")
        shape = self.text["shape"]
        embeds = self._check_embeds("prompt_embeds", prompt_embeds, shape, n)
        negative = self._check_embeds("negative_prompt_embeds", negative_prompt_embeds, shape, n) if self.cfg else None

        def padded(rows: torch.Tensor | None):
            return rows if rows is None or not pad else torch.cat([rows, rows[-1:].expand(pad, *rows.shape[1:])])

        generators = [torch.Generator(self.device).manual_seed(s) for s in [*seeds, *[seeds[-1]] * pad]]
        resolution = self.manifest["resolution"]
        latents = sample(self.variants, self.scheduler, self.plan, self.steps, channels=self.latent_channels,
                         full_latent=(resolution["latent_height"], resolution["latent_width"]), device=self.device,
                         dtype=self.dtype, generator=generators, latent_input=self.latent_input, on_step=on_step,
                         prompt_embeds=padded(embeds), negative_prompt_embeds=padded(negative),
                         guidance_scale=torch.tensor([*scales, *[scales[-1]] * pad], dtype=torch.float32),
                         timestep_kwargs=self.timing)
        return latents[:n]

    def default_added_cond(self, guidance_scale: float, negative: bool = False) -> dict[str, torch.Tensor]:
        """Added inputs the runner fills in as the diffusers pipelines do for a full-size request: SDXL's
        time_ids (original size = target size = the artifact's resolution, no crop; a refiner's 5: the aesthetic
        score instead of the target size, 6.0 and for the `negative` half 2.5), PixArt's resolution and
        aspect ratio, and LCM's guidance embedding (from `guidance_scale`). Pooled text embeddings (SDXL's
        text_embeds) and PixArt's attention masks come from the text encoder with the embeddings and must be
        given: an all-ones mask would let the prompt attend to its padding, which diffusers never does."""
        from .conditioning import guidance_embedding

        h, w = self.manifest["resolution"]["height"], self.manifest["resolution"]["width"]
        refiner = self.input_shapes.get("time_ids", [1, 6])[1] == 5
        defaults = {"time_ids": torch.tensor([[h, w, 0, 0, *((2.5 if negative else 6.0,) if refiner else (h, w))]],
                                             dtype=torch.float32),
                    "resolution": torch.tensor([[h, w]], dtype=torch.float32),
                    "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32)}
        if "timestep_cond" in self.input_shapes:
            defaults["timestep_cond"] = guidance_embedding(guidance_scale, 1, self.input_shapes["timestep_cond"][1],
                                                           torch.float32)
        if "guidance" in self.input_shapes:   # FLUX-dev takes the scale itself
            defaults["guidance"] = torch.full([1], guidance_scale, dtype=torch.float32)
        return {k: v for k, v in defaults.items() if k in self.added_inputs}

    def shared_inputs(self, latent: tuple[int, int]) -> dict[str, torch.Tensor]:
        """FLUX's rotary positions for a step at latent size `latent`, as FluxPipeline makes them: zeros for the
        text tokens, (0, row, column) per packed image token (at low resolution, the low grid's own positions)."""
        values = {"txt_ids": torch.zeros(self.text["shape"][1], 3, device=self.device, dtype=self.dtype),
                  "img_ids": flux_position_ids(latent, dtype=self.dtype, device=self.device)}
        return {k: v for k, v in values.items() if k in self.input_shapes}

    @property
    def default_guidance_scale(self) -> float:
        """The family's pipeline default (FamilySpec.default_guidance): 7.5 for the SD U-Nets, 8.5 for LCM, 7.0
        for SD3, 3.5 for FLUX."""
        return get_family(self.manifest["source"]["family"]).default_guidance

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
                 added_cond: dict[str, torch.Tensor] | None = None,
                 negative_added_cond: dict[str, torch.Tensor] | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 guidance_scale: float | None = None, on_step=None, image_latents: torch.Tensor | None = None,
                 strength: float = 0.8, mask: torch.Tensor | None = None,
                 masked_image_latents: torch.Tensor | None = None,
                 denoising_end: float | None = None, denoising_start: float | None = None,
                 control_image=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0) -> torch.Tensor:
        """Latents [1, C, H, W] of one image. Without a generator, `seed` (default 0) seeds one on the device.
        With `image_latents` (an encoded image, scaled), image-to-image at `strength`; with `mask` and
        `masked_image_latents` too, inpainting on an inpainting U-Net's artifact; `denoising_end` stops early, as
        an SDXL base for its refiner, and `denoising_start` starts late from `image_latents` as the refiner does
        (artifact_img2img.py). An artifact compiled with ControlNets takes
        `control_image` (one per ControlNet: a PIL image or a [1, 3, H, W] tensor in [0, 1]) and the ControlNet
        pipeline's scale and guidance window (artifact_controlnet.py).

        `added_cond` / `negative_added_cond` hold the added inputs of the positive and negative halves; a key
        missing from `negative_added_cond` takes the positive value where diffusers shares it (time ids,
        resolution, aspect ratio, the guidance embedding), and is an error where it comes from the negative
        prompt (pooled embeddings, attention mask)."""
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        shape = self.text["shape"]
        embeds = self._check_embeds("prompt_embeds", prompt_embeds, shape)
        negative = None
        if self.cfg:
            negative = self._check_embeds("negative_prompt_embeds", negative_prompt_embeds, shape)
        added = negative_added = None
        if self.added_inputs:
            specs = self.input_shapes   # by name
            defaults = self.default_added_cond(guidance_scale)
            given = {**defaults, **(added_cond or {})}
            added = {k: self._check_embeds(k, given.get(k), specs[k]) for k in self.added_inputs}
            # Without CFG the negative half only feeds the steps that read the cross-attention cache, where
            # it is the positive one (no negative prompt exists).
            shared = set(defaults) if self.cfg else set(self.added_inputs)
            negative_defaults = self.default_added_cond(guidance_scale, negative=True)   # differ for a refiner

            def pick(k):   # a positive value given by the caller carries over to the negative half
                return given[k] if k in (added_cond or {}) else negative_defaults.get(k, given[k])
            given_negative = {**{k: pick(k) for k in shared if k in given}, **(negative_added_cond or {})}
            negative_added = {k: self._check_embeds(f"negative {k}", given_negative.get(k), specs[k])
                              for k in self.added_inputs}
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(0 if seed is None else seed)
        conditioning = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=guidance_scale,
                            added_cond=added, negative_added_cond=negative_added,
                            shared_inputs=self.shared_inputs if any(n in self.input_shapes for n in SHARED_INPUTS)
                            else None)
        if len(self.controlnets) or control_image is not None:
            conditioning["residuals"] = self.controlnets.residuals(
                control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                from_image=image_latents is not None or mask is not None, device=self.device, dtype=self.dtype)
        if image_latents is not None or mask is not None or denoising_end is not None or denoising_start is not None:
            return sample_from_image(self, image_latents, strength, generator=generator, on_step=on_step, mask=mask,
                                     masked_image_latents=masked_image_latents, denoising_end=denoising_end,
                                     denoising_start=denoising_start, **conditioning)
        if self.latent_channels == 9:
            raise PostDiffError("this artifact's U-Net takes 9 input channels (an inpainting U-Net): pass mask and "
                                "masked_image_latents (and image_latents below strength 1)", self.folder / MANIFEST)
        resolution = self.manifest["resolution"]
        return sample(self.variants, self.scheduler, self.plan, self.steps, channels=self.latent_channels,
                      full_latent=(resolution["latent_height"], resolution["latent_width"]), device=self.device,
                      dtype=self.dtype, generator=generator, latent_input=self.latent_input, on_step=on_step,
                      timestep_kwargs=self.timing, **conditioning)


def check_contents(folder: Path, manifest: dict) -> None:
    """What each backend checks before it opens a file, for every file: .pt2 programs read as data only, ONNX
    graphs reading only the shared weights file. `inspect` runs it; `load` checks the files it opens."""
    for variant in graph_entries(manifest):
        for fmt, entry in variant["files"].items():
            check = getattr(FORMATS[fmt].impl(), "check_file", None)
            if check is not None:
                check(Path(folder) / entry["file"])


def load(folder: str | Path, backend: str = "torch", device: str | torch.device | None = None,
         verify_files: bool = True, public_key=None, *, threads: int | None = None,
         cuda_graphs: bool = False) -> ArtifactRunner:
    """Validate an artifact folder and open it on `backend` ("torch", "onnxruntime", "tensorrt" or "aoti").

    With `public_key` (an Ed25519 public key: PEM file path, PEM bytes or 32 raw bytes), the artifact must carry
    that key's signature of its manifest checksum (signing.py); an unsigned or badly signed one is refused.
    Nothing is unpickled from a .pt2 program (pt2_archive.py) and no file outside the folder is read; an
    `aoti` or `tensorrt` artifact is native code: load one only from a source you trust, or signed.

    Refuses, with an error naming the file: an edited or damaged manifest, a missing, damaged or replaced
    file, a format version or schema it does not know, and a toolchain the backend cannot use (a TensorRT
    engine from another TensorRT version or GPU architecture, .pt2 programs from a newer torch, AOTInductor
    packages from another torch or for another device).

    `threads` sets the CPU threads of torch and of the onnxruntime sessions. `cuda_graphs` (torch and aoti
    backends on a CUDA device) replays each variant from a CUDA graph captured at its first call.
    """
    of_backend(backend)   # an unknown backend fails before any file is read
    if threads is not None and threads < 1:
        raise PostDiffError(f"threads must be at least 1, got {threads}")
    folder = Path(folder)
    manifest = read_manifest(folder, public_key)
    if verify_files:
        check_files(folder, manifest)
    device = torch.device(device if device is not None else ("cuda" if backend == "tensorrt" else "cpu"))
    if cuda_graphs and (device.type != "cuda" or backend not in ("torch", "aoti")):
        raise PostDiffError(f"cuda_graphs needs the torch or aoti backend on a CUDA device, not {backend} on {device}"
                            " (onnxruntime and TensorRT capture graphs of their own)")
    if threads is not None:
        torch.set_num_threads(threads)
    check_toolchain(folder, manifest, backend, device)
    runner = ArtifactRunner(folder, manifest, backend, device)
    if cuda_graphs:
        from .cuda_graphs import GraphedSource

        runner.variants = GraphedSource(runner.variants)
    return runner
