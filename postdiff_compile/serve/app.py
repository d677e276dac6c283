"""The Ray Serve application of `postdiff-compile serve`: one artifact behind an HTTP JSON API.

    POST /generate   a request (requests.py) -> PNG (reference models) or, with `accept:
                     application/x-safetensors`, the latents as a safetensors file
    GET  /healthz    {"status": "ok"}
    GET  /info       family, preset, steps, plan, FLOPs, backend, batch buckets

Concurrent requests run their steps as one batch (`@serve.batch`, up to the artifact's largest bucket): every
request runs the same plan, so the batch-1 steps after the cross-attention gate and the low-resolution steps
fill the device together. Each image's noise comes from its own seed (ArtifactRunner.run_batch), so a response
equals the offline runner's for the same seed. Replicas take a GPU where Ray has one, a CPU otherwise.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from ..runtime.artifact import load
from .requests import BadRequest, GenerateRequest, ServedModel, parse_generate

LATENTS = "application/x-safetensors"
PNG = "image/png"


class ArtifactServer:
    """A replica: the artifact opened on its backend, the reference model's text encoder and decoder if it is one."""

    def __init__(self, artifact: str, backend: str = "onnxruntime", max_batch: int = 16, batch_wait_ms: float = 10.0,
                 threads: int | None = None):
        self.runner = load(artifact, backend, threads=threads)
        manifest = self.runner.manifest
        self.reference = _reference_pipeline(Path(artifact), manifest)
        vocabulary = None
        if self.reference is not None:
            from ..lab.scenes import vocabulary as words
            vocabulary = frozenset(words())
        self.model = ServedModel(manifest["source"]["family"], manifest["steps"], tuple(self.runner.text["shape"][1:]),
                                 self.runner.cfg, self.runner.default_guidance_scale, vocabulary)
        self.info = {"family": self.model.family, "steps": self.model.steps, "backend": backend,
                     "config": manifest["config"], "resolution": manifest["resolution"],
                     "plan": [{k: s[k] for k in ("variant", "cfg", "resolution")} for s in manifest["plan"]],
                     "flops": {"true": sum(_step_flops(manifest))}, "batches": self.runner.batches,
                     "text": self.runner.text["shape"], "responses": [PNG, LATENTS] if self.reference else [LATENTS]}
        self._batch.set_max_batch_size(min(max_batch, self.runner.batches[-1]))
        self._batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        path, method = request.url.path.rstrip("/").rsplit("/", 1)[-1], request.method
        if method == "GET" and path == "healthz":
            return JSONResponse({"status": "ok"})
        if method == "GET" and path == "info":
            return JSONResponse(self.info)
        if method != "POST" or path != "generate":
            return JSONResponse({"error": f"no {method} /{path}: POST /generate, GET /healthz, GET /info"}, 404)
        try:
            accept = _response_type(request.headers.get("accept", PNG), self.reference is not None)
            parsed = parse_generate(await request.body(), self.model)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, err.status)
        cond, uncond = self._embeddings(parsed)
        latents = await self._batch((cond, uncond, parsed.seed, parsed.guidance_scale))
        if accept == LATENTS:
            from safetensors.torch import save

            return Response(save({"latents": latents.contiguous()}), media_type=LATENTS)
        return Response(self._png(latents), media_type=PNG)

    def _embeddings(self, parsed: GenerateRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        if parsed.prompt_embeds is not None:
            return parsed.prompt_embeds, parsed.negative_prompt_embeds
        with torch.no_grad():
            cond, uncond = self.reference.encode_prompt(parsed.prompt, torch.device("cpu"), 1, True,
                                                        parsed.negative_prompt)
        return cond, uncond

    def _png(self, latents: torch.Tensor) -> bytes:
        with torch.no_grad():
            vae = self.reference.vae
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        buffer = io.BytesIO()
        self.reference.image_processor.postprocess(image, output_type="pil")[0].save(buffer, format="PNG")
        return buffer.getvalue()

    async def _batch(self, items: list[tuple]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for size in bucket_chunks(len(items), self.runner.batches):
            chunk, items = items[:size], items[size:]
            cond = torch.cat([c for c, _, _, _ in chunk])
            uncond = torch.cat([u for _, u, _, _ in chunk]) if self.runner.cfg else None
            latents = self.runner.run_batch(cond, uncond, seeds=[s for _, _, s, _ in chunk],
                                            guidance_scales=[g for _, _, _, g in chunk])
            out += list(latents.split(1))
        return out


def bucket_chunks(n: int, buckets: tuple[int, ...] | list[int]) -> list[int]:
    """How to run n queued requests on the artifact's batch buckets: one padded call when padding adds at most a
    quarter of n rows, else the largest bucket that fits, then the rest the same way. Padding 9 requests to 16
    computes 7 images for nothing: on a CPU a call's cost grows with its rows (benchmarks/results/
    serve_cpu_reference*.md: the served torch artifact fell from 4.5 to 3.0 images/s at concurrency 16)."""
    sizes = []
    while n:
        fits = [b for b in buckets if b >= n]
        if fits and fits[0] - n <= n / 4:
            sizes.append(n)
            break
        size = max(b for b in buckets if b <= n)
        sizes.append(size)
        n -= size
    return sizes


def _step_flops(manifest: dict):
    by_id = {v["id"]: v for v in manifest["variants"]}
    return [by_id[s["variant_id"]]["flops"]["true"] for s in manifest["plan"]]


def _response_type(accept: str, can_decode: bool) -> str:
    if LATENTS in accept:
        return LATENTS
    if can_decode and (PNG in accept or "*/*" in accept or "image/*" in accept):
        return PNG
    raise BadRequest(f"this server answers {PNG + ' or ' if can_decode else ''}{LATENTS}; accept: {accept[:100]!r}",
                     406)


def _reference_pipeline(folder: Path, manifest: dict):
    """The shipped reference model, for its text encoder and decoder, when the artifact was compiled from it (the
    denoiser's files have the sha256 the manifest records); None otherwise."""
    from ..lab.reference_models import LAB_FAMILIES, load_lab_pipeline, shipped_folder

    family = manifest["source"]["family"]
    if family not in LAB_FAMILIES:
        return None
    from ..exporters.manifest import sha256_file

    shipped = shipped_folder(family)
    for entry in manifest["source"]["files"]:
        name = Path(entry["file"]).name
        if not any(p.is_file() and sha256_file(p) == entry["sha256"] for p in shipped.rglob(name)):
            return None
    return load_lab_pipeline(shipped)


def build_app(artifact: str | Path, backend: str = "onnxruntime", replicas: int = 1, max_batch: int = 16,
              batch_wait_ms: float = 10.0, threads: int | None = None, gpus: float = 0.0):
    """The bound Ray Serve application (serve.run it). A replica takes `gpus` GPUs (1 on GPU machines) or a CPU."""
    from ray import serve

    actor = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
    deployment = serve.deployment(ArtifactServer, name="postdiff", num_replicas=replicas, ray_actor_options=actor,
                                  max_ongoing_requests=4 * max(1, max_batch))
    return deployment.bind(str(artifact), backend, max_batch, batch_wait_ms, threads)


def _decorate() -> None:
    """serve.batch wraps the batch method at import when Ray is installed (the module imports without it)."""
    try:
        from ray import serve
    except ImportError:
        return
    ArtifactServer._batch = serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)(ArtifactServer._batch)


_decorate()


def app_from_args(args: dict):
    """The application for `serve deploy` (cli/serve.py's --print-config): build_app from the config's args."""
    return build_app(args["artifact"], args.get("backend", "onnxruntime"), int(args.get("replicas", 1)),
                     int(args.get("max_batch", 16)), float(args.get("batch_wait_ms", 10.0)), gpus=float(args.get("gpus", 0)))
