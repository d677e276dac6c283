"""Capture keeps module paths, bakes in the upsampling path eager takes, and equals eager."""
import pytest
import torch
from tiny_models import base_family, tiny_denoiser

from postdiff_compile.capture import Bucket, capture
from postdiff_compile.models.families import get_family
from postdiff_compile.variant_spec import VariantSpec
from postdiff_compile.variants import build_variant, verify_variant


@pytest.mark.parametrize("family, latent, path", [
    ("sdxl", (16, 16), "scale_factor"),   # 2 upsamplers: 16 is a multiple of 4
    ("sdxl", (10, 14), "size"),           # 10 is not: diffusers upsamples to the skip's size
    ("pixart_alpha", (12, 16), "none"),
    # the optional inputs of each kind: LCM's timestep_cond, PixArt's resolution and aspect ratio
    ("lcm_sd15", (8, 8), "scale_factor"),
    ("pixart_alpha_sized", (8, 8), "none"),
])
def test_capture_equals_eager(family, latent, path):
    model = tiny_denoiser(family)
    text = 8 if family.startswith("pixart_alpha") else 77
    captured = capture(model, get_family(base_family(family)), Bucket(2, *latent, text, torch.float32))
    assert captured.upsample_path == path
    check = verify_variant(captured, build_variant(captured, VariantSpec()), model)
    assert check.rel_l2_error <= 1e-6 and check.max_abs_error <= 1e-5
    names = [s.name for s in captured.inputs]
    expected = {"sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
                "lcm_sd15": ["sample", "timestep", "encoder_hidden_states", "timestep_cond"],
                "pixart_alpha": ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"],
                "pixart_alpha_sized": ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                                       "resolution", "aspect_ratio"]}
    assert names == expected[family]
    # Passes find regions by module path: every computing node carries nn_module_stack.
    calls = [n for n in captured.program.graph.nodes if n.op == "call_function"]
    paths = {path for n in calls for path, _ in n.meta.get("nn_module_stack", {}).values()}
    block = "denoiser.transformer_blocks.1" if family.startswith("pixart_alpha") else \
        "denoiser.up_blocks.1.attentions.0"
    assert block in paths
    assert sum(1 for n in calls if "nn_module_stack" not in n.meta) == 0


def test_wrong_size_path_would_be_wrong():
    """The reason for one graph per size: a graph traced at 16x16 refuses 10x14 instead of computing garbage."""
    model = tiny_denoiser("sdxl")
    captured = capture(model, get_family("sdxl"), Bucket(2, 16, 16, 77, torch.float32))
    args = [torch.randn(2, 4, 10, 14), torch.ones(2), torch.randn(2, 77, 2048), torch.randn(2, 1280),
            torch.randn(2, 6)]
    # torch.export's shape guard on the latent's height: the graph's own refusal, not some unrelated error.
    with pytest.raises(AssertionError, match=r"Guard failed: inputs_0\.size\(\)\[2\] == 16"):
        captured.module()(*args)
    args[0] = torch.randn(2, 4, 16, 16)      # the size it was traced at runs
    assert captured.module()(*args).shape == (2, 4, 16, 16)
