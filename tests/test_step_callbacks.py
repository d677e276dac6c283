"""callback_on_step_end and pipe._interrupt through optimize(pipe), against diffusers' own loop on the same pipeline."""
import pytest
import torch
from tiny_models import pipeline_embeds, text_embeddings, tiny_pipeline, tiny_sd_pipeline

from postdiff_compile import PostDiffError, optimize, restore
from postdiff_compile.verification import rel_l2

STEPS = 8


def _run(pipe, callback=None, names=None, **kw):
    cond, uncond = text_embeddings(1)
    args = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, guidance_scale=7.5,
                output_type="latent", height=96, width=96, generator=torch.Generator().manual_seed(0))
    if callback is not None:
        args["callback_on_step_end"] = callback
    if names is not None:
        args["callback_on_step_end_tensor_inputs"] = names
    return pipe(**{**args, **kw}).images


class Recorder:
    """Keeps a copy of every tensor it is handed, and the step numbers and timesteps."""

    def __init__(self, interrupt_at=None, scale_at=None):
        self.seen, self.interrupt_at, self.scale_at = [], interrupt_at, scale_at

    def __call__(self, pipe, i, t, kwargs):
        self.seen.append((i, int(t), {k: v.clone() for k, v in kwargs.items()}))
        if i == self.interrupt_at:
            pipe._interrupt = True
        if i == self.scale_at:
            return {"latents": kwargs["latents"] * 0.5}
        return kwargs


def both(pipe, make, preset="none", **kw):
    """(diffusers' run, its callback), (ours, its callback): a fresh callback each."""
    reference = make()
    theirs = _run(pipe, reference, **kw)
    optimize(pipe, preset=preset)
    try:
        mine = make()
        ours = _run(pipe, mine, **kw)
    finally:
        restore(pipe)
    return (theirs, reference), (ours, mine)


def test_a_recording_callback_sees_what_diffusers_hands_it():
    pipe = tiny_sd_pipeline("sd15", "ddim")
    (theirs, ref), (ours, mine) = both(pipe, Recorder, names=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert rel_l2(ours, theirs) <= 1e-5
    assert [(i, t) for i, t, _ in mine.seen] == [(i, t) for i, t, _ in ref.seen] and len(mine.seen) == STEPS
    for (_, _, a), (_, _, b) in zip(mine.seen, ref.seen):
        assert a.keys() == b.keys() == {"latents", "prompt_embeds", "negative_prompt_embeds"}
        assert a["prompt_embeds"].shape == b["prompt_embeds"].shape == (2, 77, 768)   # the CFG batch, as diffusers
        assert all(rel_l2(a[k], b[k]) <= 1e-5 for k in a)


def test_an_interrupt_at_step_5_stops_as_in_diffusers():
    pipe = tiny_sd_pipeline("sd15", "euler")
    full = _run(pipe)
    (theirs, ref), (ours, mine) = both(pipe, lambda: Recorder(interrupt_at=5))
    assert [i for i, _, _ in mine.seen] == [i for i, _, _ in ref.seen] == list(range(6))
    assert rel_l2(ours, theirs) <= 1e-5 and rel_l2(ours, full) > 1e-2   # stopped early: not the full run's latents
    assert pipe._interrupt   # left as diffusers leaves it; the next call starts afresh
    optimize(pipe)
    assert rel_l2(_run(pipe), full) <= 1e-5


def test_a_callback_that_changes_the_latents_takes_effect():
    pipe = tiny_sd_pipeline("sd15", "dpmpp")
    plain = _run(pipe)
    (theirs, _), (ours, _) = both(pipe, lambda: Recorder(scale_at=3))
    assert rel_l2(ours, theirs) <= 1e-5 and rel_l2(ours, plain) > 1e-2


def test_low_resolution_steps_hand_the_callback_low_resolution_latents():
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"), preset="fast")
    recorder = Recorder()
    latents = _run(pipe, recorder)
    plan = pipe._postdiff.last_plan
    switch = next(step.index for step in plan if not step.low_res)
    shapes = [tuple(kw["latents"].shape[2:]) for _, _, kw in recorder.seen]
    # the step before the switch hands over the transition's full-resolution latents
    low = shapes[0]
    assert 0 < switch < STEPS and low[0] < 12
    assert shapes == [low] * (switch - 1) + [(12, 12)] * (STEPS - switch + 1)
    assert latents.shape[2:] == (12, 12)


def test_new_embeddings_from_a_callback_are_refused():
    pipe = optimize(tiny_sd_pipeline("sd15", "ddim"))

    def cut_cfg(pipe, i, t, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"][-1:]}

    with pytest.raises(PostDiffError, match="returned new prompt_embeds at step 0"):
        _run(pipe, cut_cfg, names=["prompt_embeds"])


def test_tensor_inputs_it_cannot_hand_over_are_named():
    pipe = optimize(tiny_pipeline("sdxl"))
    embeds = pipeline_embeds("sdxl")
    call = dict(num_inference_steps=2, height=64, width=64, output_type="latent", **embeds,
                callback_on_step_end=lambda p, i, t, kw: kw)
    with pytest.raises(PostDiffError, match="not add_time_ids"):
        pipe(callback_on_step_end_tensor_inputs=["latents", "add_time_ids"], **call)
    with pytest.raises(PostDiffError, match=r"has to be in .*found \['noise'\]"):
        pipe(callback_on_step_end_tensor_inputs=["noise"], **call)


def test_pixart_has_no_callback_on_step_end():
    pipe = optimize(tiny_pipeline("pixart_alpha"))
    with pytest.raises(PostDiffError, match="does not support argument.*callback_on_step_end"):
        pipe(callback_on_step_end=lambda p, i, t, kw: kw, **pipeline_embeds("pixart_alpha"), num_inference_steps=2,
             output_type="latent")
