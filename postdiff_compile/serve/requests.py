"""What a client may send to `POST /generate`, checked before anything runs: one error per bad request, with the
HTTP status it gets (400; 413 for a body over the limit), so that the server answers it and goes on serving.

A request is a JSON object:

    {"prompt": "large blue square center, on teal",     # reference models: the server encodes it
     "embeddings": "<base64 of a safetensors file>",     # other families: prompt_embeds, negative_prompt_embeds
     "negative_prompt": "",  "seed": 0,  "guidance_scale": 4.0,  "steps": 20}

`steps` may be given only as the artifact's own count (a compiled plan has one).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

import torch

MAX_BODY = 4 * 1024 * 1024          # bytes: two [1, 77, 2048] float32 embeddings in base64 fit
FIELDS = {"prompt", "negative_prompt", "embeddings", "seed", "guidance_scale", "steps"}
MAX_SEED = 2 ** 63 - 1


class BadRequest(Exception):
    """A request the server refuses: `status` (400 or 413) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedModel:
    """What the server checks requests against: the artifact's facts and, for reference models, the vocabulary."""
    family: str
    steps: int
    text_shape: tuple[int, int]         # (tokens, width) of the encoder_hidden_states input
    cfg: bool
    default_guidance: float
    vocabulary: frozenset[str] | None   # words the server's tokenizer knows; None: no text encoder, embeddings only


@dataclass(frozen=True)
class GenerateRequest:
    seed: int
    guidance_scale: float
    prompt: str | None = None
    negative_prompt: str = ""
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None


def parse_generate(body: bytes, model: ServedModel) -> GenerateRequest:
    if len(body) > MAX_BODY:
        raise BadRequest(f"the body is {len(body)} bytes, over the limit of {MAX_BODY}", 413)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be an integer in [0, 2^63), got {seed!r}")
    guidance = data.get("guidance_scale", model.default_guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= 100:
        raise BadRequest(f"guidance_scale must be a number in [0, 100], got {guidance!r}")
    steps = data.get("steps", model.steps)
    if steps != model.steps or isinstance(steps, bool):
        raise BadRequest(f"this artifact runs {model.steps} steps (its plan is compiled for them); steps "
                         f"{steps!r} needs another artifact")
    if ("prompt" in data) == ("embeddings" in data):
        raise BadRequest("give exactly one of prompt (reference models) and embeddings (base64 safetensors)")
    if "embeddings" in data:
        return GenerateRequest(seed, float(guidance), **_embeddings(data["embeddings"], model))
    if model.vocabulary is None:
        raise BadRequest(f"a {model.family} artifact is served without a text encoder: send embeddings "
                         f"(prompt_embeds{', negative_prompt_embeds' if model.cfg else ''} of shape "
                         f"[1, {model.text_shape[0]}, {model.text_shape[1]}], base64 safetensors)")
    prompt, negative = data["prompt"], data.get("negative_prompt", "")
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        _check_words(name, text, model)
    return GenerateRequest(seed, float(guidance), prompt=prompt, negative_prompt=negative)


def _check_words(name: str, text, model: ServedModel) -> None:
    if not isinstance(text, str):
        raise BadRequest(f"{name} must be a string")
    words = text.replace(",", " ").split()
    # bos and eos take two of the tokenizer's places; a comma is a token of its own
    tokens = len(words) + text.count(",") + 2
    if tokens > model.text_shape[0]:
        raise BadRequest(f"{name} is {tokens} tokens, over the text encoder's {model.text_shape[0]}")
    unknown = [w for w in dict.fromkeys(words) if w not in model.vocabulary]
    if unknown:
        raise BadRequest(f"{name} has word(s) the model does not know: {', '.join(unknown[:10])}")


def _embeddings(encoded, model: ServedModel) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(encoded, str):
        raise BadRequest("embeddings must be a base64 string of a safetensors file")
    try:
        tensors = load(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError, SafetensorError) as err:
        raise BadRequest(f"embeddings are not base64 of a safetensors file: {str(err)[:200]}") from None
    wanted = ["prompt_embeds", *(["negative_prompt_embeds"] if model.cfg else [])]
    shape = [1, *model.text_shape]
    unexpected = sorted(set(tensors) - set(wanted))
    if unexpected:
        raise BadRequest(f"embeddings hold tensor(s) this artifact does not take: {', '.join(unexpected[:10])}")
    for name in wanted:
        if name not in tensors:
            raise BadRequest(f"embeddings lack {name} (shape {shape})")
        tensor = tensors[name]
        if list(tensor.shape) != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise BadRequest(f"{name} must be finite floats of shape {shape}, got {tensor.dtype} "
                             f"{list(tensor.shape)}")
    return {k: tensors[k].float() for k in wanted}
