"""Mixed resolution on SDXL, PixArt-alpha and LCM against eager loops that write the equations themselves.

As in test_mixed_resolution.py, the reference calls neither the library's transition nor its plan: the
family's diffusers denoiser and scheduler, torch.randn, F.interpolate and the equations of docs/manifest.md.
What each family adds is written here as its diffusers pipeline does it: SDXL's pooled embeddings and time ids
(of the requested full-size image at every step, the library's documented choice), PixArt-alpha's learned
variance, attention masks and resolution / aspect-ratio conditioning (full size again), LCM's guidance
embedding, its noise drawn inside the scheduler's step and its `denoised` output, without CFG.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import base_family, pipeline_embeds, tiny_pipeline

from postdiff_compile import optimize
from postdiff_compile.verification import rel_l2

TOLERANCE = 1e-5
GUIDANCE = 4.5
SIZE = (128, 128)          # latent 16x16


def _conditioning(pipe, family, embeds, full_px):
    """A function (x, t) -> the guided model output, as the family's pipeline computes it."""
    base = base_family(family)
    h, w = full_px
    if base == "pixart_alpha":
        model = pipe.transformer
        text = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
        mask = torch.cat([embeds["negative_prompt_attention_mask"], embeds["prompt_attention_mask"]])
        added = {"resolution": None, "aspect_ratio": None}
        if model.config.sample_size == 128:       # as PixArtAlphaPipeline decides
            added = {"resolution": torch.tensor([[h, w]] * 2, dtype=torch.float32),
                     "aspect_ratio": torch.tensor([[h / w]] * 2, dtype=torch.float32)}

        def predict(x, t):
            out = model(torch.cat([x] * 2), encoder_hidden_states=text, encoder_attention_mask=mask,
                        timestep=t.expand(2), added_cond_kwargs=added).sample
            u, c = out.chunk(2)
            out = u + GUIDANCE * (c - u)
            return out.chunk(2, dim=1)[0]          # learned variance: the first half is the noise prediction
        return predict
    unet = pipe.unet
    if base.startswith("lcm"):
        w_emb = pipe.get_guidance_scale_embedding(torch.tensor([GUIDANCE - 1.0]),
                                                  embedding_dim=unet.config.time_cond_proj_dim)
        added = None
        if "sdxl" in base:
            added = {"text_embeds": embeds["pooled_prompt_embeds"],
                     "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)}
        return lambda x, t: unet(x, t, encoder_hidden_states=embeds["prompt_embeds"], timestep_cond=w_emb,
                                 added_cond_kwargs=added).sample
    text = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    added = None
    if base == "sdxl":
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        added = {"text_embeds": torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]),
                 "time_ids": torch.cat([ids, ids])}

    def predict(x, t):
        u, c = unet(torch.cat([x] * 2), t, encoder_hidden_states=text, added_cond_kwargs=added).sample.chunk(2)
        return u + GUIDANCE * (c - u)
    return predict


@torch.no_grad()
def eager_mixed(pipe, family, steps, scale, fraction, seed=0):
    """Low resolution for round(fraction * N) steps, then x0 -> bilinear up -> fresh noise, then full resolution."""
    embeds = pipeline_embeds(family)
    predict = _conditioning(pipe, family, embeds, SIZE)
    make = lambda: type(pipe.scheduler).from_config(pipe.scheduler.config)  # noqa: E731
    scheduler = make()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    sigma_space = type(scheduler).__name__ == "EulerDiscreteScheduler"
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    full = (SIZE[0] // 8, SIZE[1] // 8)
    low = (round(full[0] * scale), round(full[1] * scale))
    switch = math.floor(fraction * steps + 0.5)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, *low), generator=gen) * scheduler.init_noise_sigma
    denoised = None
    for i, t in enumerate(timesteps):
        out = predict(scheduler.scale_model_input(latents, t), t)
        if i != switch - 1:
            result = scheduler.step(out, t, latents, **({"generator": gen} if takes_generator else {}),
                                    return_dict=False)
            latents, denoised = result[0], (result[1] if len(result) > 1 else None)
            continue
        noise_shape = (1, 4, *full)
        if sigma_space:
            sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
            x0 = F.interpolate(latents - sigma * out, size=full, mode="bilinear", align_corners=False)
            latents = x0 + sigma_next * torch.randn(noise_shape, generator=gen)
        else:
            if hasattr(scheduler, "sigmas") and type(scheduler).__name__ == "DPMSolverMultistepScheduler":
                # DPM-Solver's own alpha: 1 / (1 + sigma^2) from its sigma table, as the scheduler converts it.
                a, a_next = (float(scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[j])[0] ** 2) for j in (i, i + 1))
            else:
                a, a_next = (float(scheduler.alphas_cumprod[int(timesteps[j])]) for j in (i, i + 1))
            x0 = (latents - math.sqrt(1 - a) * out) / math.sqrt(a)
            x0 = F.interpolate(x0, size=full, mode="bilinear", align_corners=False)
            latents = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * torch.randn(noise_shape, generator=gen)
        scheduler = make()              # a multistep solver starts its history afresh
        scheduler.set_timesteps(steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(switch)
    return denoised if denoised is not None else latents   # LCM's pipeline returns the last `denoised`


def _optimized(pipe, family, steps, scale, fraction, seed=0):
    args = dict(**pipeline_embeds(family), num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="latent",
                height=SIZE[0], width=SIZE[1], generator=torch.Generator().manual_seed(seed))
    if family.startswith("pixart"):
        args["use_resolution_binning"] = False
    optimize(pipe, preset="none", low_res_scale=scale, low_res_fraction=fraction)
    return pipe(**args).images


@pytest.mark.parametrize("family, steps, scale", [
    ("sdxl", 8, 0.75),                  # Euler: sigma space, input scaling; SDXL's added conditioning
    ("pixart_alpha_sized", 8, 0.75),    # DPM-Solver++: history restarted; masks, resolution conditioning
    ("lcm_sd15", 4, 0.5),               # LCM: noise inside the step, guidance embedding, no CFG
    pytest.param("lcm_sdxl", 4, 0.5, marks=pytest.mark.slow),
])
def test_mixed_resolution_matches_eager(family, steps, scale):
    pipe = tiny_pipeline(family)
    expected = eager_mixed(pipe, family, steps, scale, 0.5)
    got = _optimized(pipe, family, steps, scale, 0.5)
    err = rel_l2(got, expected)
    print(f"{family}: rel L2 {err:.2e}")
    assert got.shape == (1, 4, 16, 16) and err <= TOLERANCE
    # Not vacuous: the switch changes the result against full resolution throughout.
    assert rel_l2(_optimized(pipe, family, steps, scale, 0.0), expected) > 1e-2
