"""The architecture facts in FamilySpec / DenoiserKind against the diffusers classes and bundled configs
they describe. Capture, the cache passes and loading read these facts instead of asking the module what it
is, so a wrong fact would send a model down the other kind's path; each check here is cheap (signatures,
bundled JSON, a tiny model on the meta device)."""
import inspect
from types import SimpleNamespace

import pytest
import torch
from tiny_models import TINY_CONFIGS

from postdiff_compile.capture import Bucket, input_specs
from postdiff_compile.errors import PostDiffError
from postdiff_compile.models.build import build_denoiser, denoiser_class
from postdiff_compile.models.families import DENOISER_KINDS, FAMILIES, consistency_distilled, kind_of
from postdiff_compile.models.reference_shapes import reference_table

# The pipeline each denoiser class ships in (the test's own knowledge, not read from the package).
SHIPPED_IN = {"UNet2DConditionModel": "StableDiffusionPipeline", "PixArtTransformer2DModel": "PixArtAlphaPipeline",
              "SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline"}


def _small_model(name: str) -> torch.nn.Module:
    spec = FAMILIES[name]
    config = TINY_CONFIGS.get(name, spec.config())   # scenes32's bundled config is small already
    return build_denoiser(spec.denoiser_class, dict(config), device="meta")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_facts_match_the_diffusers_class(name):
    spec = FAMILIES[name]
    cls = denoiser_class(spec.denoiser_class)
    forward = list(inspect.signature(cls.forward).parameters)[1:]   # after self
    assert forward[0] == spec.latent_input
    assert "encoder_hidden_states" in forward
    # added conditions travel in added_cond_kwargs (U-Nets, PixArt); SD3 and FLUX take plain arguments
    assert ("added_cond_kwargs" in forward) == bool(spec.kind.added_conditions)
    assert ("pooled_projections" in forward) == ("pooled_projection_dim" in spec.config())
    assert ("img_ids" in forward) == spec.kind.packed_latent
    if spec.kind.text_mask:
        assert "encoder_attention_mask" in forward
    assert spec.text_width_key in inspect.signature(cls.__init__).parameters
    assert spec.config()[spec.text_width_key] == spec.context_dim
    # The deep cache follows the top-level structure: transformer blocks (no skip branches) or up blocks.
    model = _small_model(name)
    children = dict(model.named_children())
    assert (spec.deep_cache == "block_cache") == ("transformer_blocks" in children)
    if spec.deep_cache == "block_cache":   # the stacks are the model's block lists, in forward's order
        assert all(isinstance(children[stack], torch.nn.ModuleList) for stack in spec.kind.block_stacks)
        source = inspect.getsource(type(model).forward)
        assert sorted(spec.kind.block_stacks, key=lambda s: source.index(f"self.{s}")) == list(spec.kind.block_stacks)
    assert (spec.deep_cache == "deepcache") == ("up_blocks" in children)
    assert spec.kind.size_dependent_upsampling == hasattr(model, "num_upsamplers")
    assert kind_of(model) is spec.kind


@pytest.mark.parametrize("kind", list(DENOISER_KINDS.values()), ids=list(DENOISER_KINDS))
def test_pipeline_component_is_where_the_pipeline_keeps_the_denoiser(kind):
    import diffusers

    pipeline = getattr(diffusers, SHIPPED_IN[kind.denoiser_class])
    assert kind.pipeline_component in inspect.signature(pipeline.__init__).parameters


def test_checkpoint_layouts_are_the_reference_table_layouts():
    expected = {f"{name}/{layout}" for name, spec in FAMILIES.items() for layout in spec.checkpoint_layouts}
    assert expected == set(reference_table())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_detection_facts_match_the_bundled_config(name):
    spec = FAMILIES[name]
    config = spec.config()
    if spec.head_width:
        assert config["attention_head_dim"] == [c // spec.head_width for c in config["block_out_channels"]]
    else:
        assert isinstance(config["attention_head_dim"], int)
    assert spec.depth_per_level == isinstance(config.get("transformer_layers_per_block"), list)


def test_each_lcm_family_is_its_base_plus_the_guidance_embedding():
    for name, spec in FAMILIES.items():
        base = next((b for b in FAMILIES.values() if b.denoiser_config == spec.denoiser_config
                     and not b.guidance_embedding), None)
        if spec.guidance_embedding:
            assert base is not None and consistency_distilled(base) is spec, name
            assert (spec.head_width, spec.depth_per_level, spec.kind) == (base.head_width, base.depth_per_level,
                                                                         base.kind)
        else:
            assert base is spec


# The export order of each family's inputs: artifacts and runtimes feed tensors in this order.
EXPECTED_INPUTS = {
    "sd15": ["sample", "timestep", "encoder_hidden_states"],
    "sd2": ["sample", "timestep", "encoder_hidden_states"],
    "sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
    "pixart_alpha": ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "resolution",
                     "aspect_ratio"],
    "lcm_sd15": ["sample", "timestep", "encoder_hidden_states", "timestep_cond"],
    "lcm_sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond"],
    "scenes32": ["sample", "timestep", "encoder_hidden_states"],
    "scenes64": ["sample", "timestep", "encoder_hidden_states"],
    "sd3": ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"],
    "flux": ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids",
             "guidance"],
    "flux_schnell": ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "txt_ids",
                     "img_ids"],
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_input_specs_follow_the_family(name):
    spec = FAMILIES[name]
    specs = input_specs(SimpleNamespace(config=spec.config()), spec, Bucket(2, 16, 16, spec.text_length,
                                                                            torch.float16))
    assert [s.name for s in specs] == EXPECTED_INPUTS[name]
    by_name = {s.name: s for s in specs}
    # FLUX's latent is packed inside the graph: the loop's latent has a quarter of the transformer's channels
    channels = spec.config()["in_channels"] // (4 if spec.kind.packed_latent else 1)
    assert by_name[spec.latent_input].shape == (2, channels, 16, 16)
    assert by_name["encoder_hidden_states"].shape == (2, spec.text_length, spec.context_dim)


def test_kind_of_takes_subclasses_and_refuses_other_modules():
    from diffusers import UNet2DConditionModel

    class Custom(UNet2DConditionModel):
        pass

    with torch.device("meta"):
        model = Custom(**TINY_CONFIGS["sd15"])
    assert kind_of(model) is DENOISER_KINDS["UNet2DConditionModel"]
    with pytest.raises(PostDiffError, match="Linear is not a denoiser class"):
        kind_of(torch.nn.Linear(1, 1))


def test_the_cpp_runners_default_guidance_is_every_familys():
    """runtimes/cpp/src/runner.cpp keeps its own copy of FamilySpec.default_guidance (C++ cannot read the Python
    registry); a family missing there makes its artifacts refuse to run without --guidance-scale (scenes64 was)."""
    import re
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "runtimes" / "cpp" / "src" / "runner.cpp").read_text()
    table = source[source.index("double default_guidance("):]
    table = table[:table.index("};")]
    scales = {name: float(value) for name, value in re.findall(r'\{"(\w+)",\s*([0-9.]+)\}', table)}
    assert scales == {name: spec.default_guidance for name, spec in FAMILIES.items()}
