"""Saved variant programs checked against the eager model, outside the compiler.

The compiler records a verification error for every variant it writes; tests that only read that number
test the compiler's word for itself. Here each saved `.pt2` program is loaded and run on fresh inputs, and
its noise prediction is compared with the eager diffusers model called directly. The caches a variant reads
come from places that do not depend on the variant: the cross-attention cache from forward hooks on the
eager model's attn2 modules (the cache holds what attn2 returned), the deep feature from the artifact's own
writer program at the same batch and size (a wrong feature, or a wrong writer, makes the reader differ
from eager).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from postdiff_compile.verification import rel_l2

ADDED = ("text_embeds", "time_ids")   # SDXL's added_cond_kwargs


def _inputs(specs: list[dict], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in specs:
        name, shape, dtype = spec["name"], spec["shape"], getattr(torch, spec["dtype"])
        if name == "deepcache" or name.startswith("cross_attn:"):
            continue
        if name == "timestep":
            out[name] = torch.full(shape, 401.0)
        elif name == "encoder_attention_mask":
            out[name] = torch.ones(shape, dtype=dtype)
        elif name == "time_ids":
            out[name] = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(shape[0], 1).to(dtype)
        else:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
    return out


@torch.no_grad()
def _eager(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output, and every attn2 output by module path, from one plain diffusers call."""
    recorded: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: recorded.__setitem__(name, out))
             for name, m in model.named_modules() if name.endswith("attn2")]
    try:
        if "hidden_states" in named:   # PixArt: the first half of the channels is the noise prediction
            out = model(named["hidden_states"], encoder_hidden_states=named["encoder_hidden_states"],
                        timestep=named["timestep"], encoder_attention_mask=named.get("encoder_attention_mask"),
                        added_cond_kwargs={"resolution": named.get("resolution"),
                                           "aspect_ratio": named.get("aspect_ratio")}).sample
            out = out.chunk(2, dim=1)[0] if out.shape[1] == 2 * named["hidden_states"].shape[1] else out
        else:
            added = {k: named[k] for k in ADDED if k in named}
            out = model(named["sample"], named["timestep"], encoder_hidden_states=named["encoder_hidden_states"],
                        added_cond_kwargs=added or None, timestep_cond=named.get("timestep_cond")).sample
    finally:
        for hook in hooks:
            hook.remove()
    return out, recorded


def _program(folder: Path, file: str) -> torch.nn.Module:
    """A saved program with its weights bound from the artifact's weights file by name (format 2 programs hold none).
    Read with the safetensors library and bound here, not with the runtime's binding."""
    from safetensors.torch import load_file

    program = torch.export.load(str(folder / file))
    if (folder / "weights.safetensors").exists():
        weights = load_file(str(folder / "weights.safetensors"))
        for name in program.state_dict:
            program.state_dict[name] = torch.nn.Parameter(weights[name.removeprefix("denoiser.")], requires_grad=False)
    return program.module()


def variant_errors(folder: Path, model: torch.nn.Module, seed: int = 0) -> dict[str, float]:
    """{variant id: relative L2 error of its saved program against eager}, for every variant of an artifact."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    model = model.eval()
    # Writers of the deep feature first: their outputs feed the readers of the same batch and size.
    variants = sorted(manifest["variants"], key=lambda v: "shallow" in v["name"])
    features: dict[tuple, tuple[dict, torch.Tensor]] = {}
    errors = {}
    for v in variants:
        key = (v["batch"], tuple(v["latent_size"]))
        named = features[key][0] if key in features else _inputs(v["inputs"], seed)
        expected, attn2 = _eager(model, named)
        feed = []
        for spec in v["inputs"]:
            name = spec["name"]
            if name == "deepcache":
                feed.append(features[key][1])
            elif name.startswith("cross_attn:"):
                feed.append(attn2[name.removeprefix("cross_attn:").removeprefix("denoiser.")])
            else:
                feed.append(named[name])
        program = _program(Path(folder), v["files"]["pt2"]["file"])
        with torch.no_grad():
            outputs = program(*feed)
        names = [o["name"] for o in v["outputs"]]
        if "deepcache" in names:
            features[key] = (named, outputs[names.index("deepcache")])
        errors[v["id"]] = rel_l2(outputs[0].float(), expected.float())
    return errors
