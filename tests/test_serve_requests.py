"""What POST /generate accepts, checked without a server: each bad request is one error with its HTTP status."""
import base64
import json

import pytest
import torch
from safetensors.torch import save

from postdiff_compile.serve.requests import MAX_BODY, BadRequest, ServedModel, parse_generate

REFERENCE = ServedModel("scenes64", 20, (24, 128), True, 7.5, frozenset("large blue square center on teal".split()))
OTHER = ServedModel("sd15", 20, (77, 768), True, 7.5, None)


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


def _embeddings(**tensors) -> str:
    return base64.b64encode(save(tensors)).decode()


def test_a_good_prompt_and_good_embeddings():
    got = parse_generate(_body(prompt="large blue square center, on teal", seed=3, guidance_scale=4), REFERENCE)
    assert (got.prompt, got.negative_prompt, got.seed, got.guidance_scale) == \
        ("large blue square center, on teal", "", 3, 4.0)
    assert parse_generate(_body(prompt="large blue square center"), REFERENCE).guidance_scale == 7.5
    cond, uncond = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    got = parse_generate(_body(embeddings=_embeddings(prompt_embeds=cond, negative_prompt_embeds=uncond), steps=20),
                         OTHER)
    assert torch.equal(got.prompt_embeds, cond) and torch.equal(got.negative_prompt_embeds, uncond)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (_body(prompt="large", colour="red"), "unknown field"),
    (_body(prompt="large", steps=10), "runs 20 steps"),
    (_body(prompt="large", seed=-1), "seed must be an integer"),
    (_body(prompt="large", seed=1.5), "seed must be an integer"),
    (_body(prompt="large", guidance_scale="high"), "guidance_scale must be a number"),
    (_body(prompt="large", guidance_scale=1e9), "guidance_scale must be a number"),
    (_body(), "exactly one of prompt"),
    (_body(prompt="a small dog"), "does not know: a, small, dog"),
    (_body(prompt=" ".join(["large"] * 30)), "over the text encoder's 24"),
    (_body(prompt="large", negative_prompt=3), "negative_prompt must be a string"),
])
def test_bad_requests_are_400_with_one_line(body, message):
    with pytest.raises(BadRequest, match=message) as caught:
        parse_generate(body, REFERENCE)
    assert caught.value.status == 400 and "\n" not in str(caught.value)


@pytest.mark.parametrize("embeddings, message", [
    ("!!!", "not base64 of a safetensors file"),
    (base64.b64encode(b"garbage").decode(), "not base64 of a safetensors file"),
    (_embeddings(prompt_embeds=torch.randn(1, 77, 768)), "lack negative_prompt_embeds"),
    (_embeddings(prompt_embeds=torch.randn(1, 76, 768), negative_prompt_embeds=torch.randn(1, 77, 768)),
     r"shape \[1, 77, 768\]"),
    (_embeddings(prompt_embeds=torch.full((1, 77, 768), float("nan")), negative_prompt_embeds=torch.randn(1, 77, 768)),
     "must be finite floats"),
    (_embeddings(prompt_embeds=torch.randn(1, 77, 768), negative_prompt_embeds=torch.randn(1, 77, 768),
                 extra=torch.zeros(1)), "does not take: extra"),
])
def test_bad_embeddings_are_400(embeddings, message):
    with pytest.raises(BadRequest, match=message) as caught:
        parse_generate(_body(embeddings=embeddings), OTHER)
    assert caught.value.status == 400


def test_a_prompt_without_a_text_encoder_and_an_oversized_body():
    with pytest.raises(BadRequest, match="without a text encoder: send embeddings"):
        parse_generate(_body(prompt="large"), OTHER)
    with pytest.raises(BadRequest, match="over the limit") as caught:
        parse_generate(b" " * (MAX_BODY + 1), OTHER)
    assert caught.value.status == 413


@pytest.mark.parametrize("n, chunks", [(1, [1]), (3, [2, 1]), (4, [4]), (5, [4, 1]), (6, [4, 2]), (9, [8, 1]),
                                       (12, [8, 4]), (13, [13]), (16, [16])])
def test_queued_requests_are_split_rather_than_padded_far(n, chunks):
    """Buckets 1, 2, 4, 8, 16: at most a quarter of padding, else the largest bucket that fits and the rest."""
    from postdiff_compile.serve.app import bucket_chunks

    assert bucket_chunks(n, [1, 2, 4, 8, 16]) == chunks
    assert sum(chunks) == n
