"""The LoRA state of a live denoiser that a captured graph bakes in.

`optimize(pipe)` on a pipeline with a LoRA loaded (diffusers' `load_lora_weights`, unfused) captures PEFT's LoRA
layers with their active adapters and scales as constants of the graph; `fuse_lora` changes the base weights in
place and marks the layers merged. So a graph captured before `set_adapters`, `fuse_lora`, `unfuse_lora`,
`disable_lora` or a new `load_lora_weights` would run the old adapters (or apply a fused LoRA twice). The runtime
compares this state before each call and captures again when it changed: the change takes effect.
"""
from __future__ import annotations

import torch


def adapter_state(denoiser: torch.nn.Module) -> tuple:
    """Per PEFT tuner layer: its active and merged adapters, whether adapters are disabled, and their scales."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:   # without peft no adapter can be loaded
        return ()
    state = []
    for name, module in denoiser.named_modules():
        if isinstance(module, BaseTunerLayer):
            scaling = getattr(module, "scaling", {})
            state.append((name, tuple(module.active_adapters), tuple(module.merged_adapters),
                          bool(module.disable_adapters), tuple(sorted((k, float(v)) for k, v in scaling.items()))))
    return tuple(state)
