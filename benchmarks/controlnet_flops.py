"""What a ControlNet costs beside the SD1.5 U-Net, per step, and what a DeepCache shallow step could skip of it.

    python benchmarks/controlnet_flops.py [--resolution 256]

Counts true FLOPs (metrics/flops.py, from the exported graphs, on the meta device: no weights) of one CFG step
(batch 2) of the SD1.5 U-Net, its DeepCache shallow variant (branch 1, the presets' setting), and a ControlNet made
from it: whole, and cut to the residuals the shallow variant adds (the graph's other outputs removed and dead code
eliminated). Writes benchmarks/results/controlnet_flops.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import provenance, write_results   # benchmarks/ on sys.path

ROOT = Path(__file__).parent


def controlnet_graph(controlnet, latent: int, residuals: int | None) -> torch.fx.Graph:
    """The ControlNet's exported graph for a CFG batch at `latent`, keeping the first `residuals` down residuals
    (all of them and the middle one when None)."""
    from postdiff_compile.passes import graph_edit

    class Call(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, sample, timestep, text, image):
            down, mid = self.net(sample, timestep, encoder_hidden_states=text, controlnet_cond=image,
                                 return_dict=False)
            return (*down, mid)

    with torch.device("meta"):
        args = (torch.randn(2, 4, latent, latent), torch.ones(2), torch.randn(2, 77, 768),
                torch.randn(2, 3, 8 * latent, 8 * latent))
    program = torch.export.export(Call(controlnet), args, strict=False)
    graph, outputs = graph_edit.flat_graph(program.graph_module.graph)
    if residuals is not None:
        graph_edit.set_outputs(graph, outputs[:residuals])
    graph_edit.eliminate_dead_code(graph)
    return graph


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    from diffusers import ControlNetModel

    from postdiff_compile.capture import Bucket
    from postdiff_compile.metrics.flops import count_flops
    from postdiff_compile.models.families import get_family
    from postdiff_compile.variants import VariantStore
    from sd15_pipeline import random_sd15_unet

    latent = args.resolution // 8
    unet = random_sd15_unet("meta")
    with torch.device("meta"):   # the architecture only
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    store = VariantStore(unet, get_family("sd15"), controlnet=True)
    bucket = Bucket(2, latent, latent, 77, torch.float32)
    full = store.get("full", bucket)
    shallow = store.get("shallow", bucket, cache_branch=1)
    kept = sum(1 for name in shallow.inputs if name.startswith("controlnet.down."))
    rows = {"U-Net, full step": count_flops(full.module.graph).true,
            "U-Net, DeepCache shallow step (branch 1)": count_flops(shallow.module.graph).true,
            "ControlNet, whole": count_flops(controlnet_graph(controlnet, latent, None)).true,
            f"ControlNet, cut to the shallow step's {kept} residuals": count_flops(
                controlnet_graph(controlnet, latent, kept)).true}
    unit = rows["U-Net, full step"]
    lines = [f"# FLOPs of one CFG step (batch 2) at {args.resolution}x{args.resolution}: SD1.5 U-Net and a ControlNet "
             "made from it", "", f"`{provenance()['command']}`; true FLOPs from the exported graphs (meta device).",
             "", "| graph | GFLOPs | of a full U-Net step |", "|---|---|---|"]
    lines += [f"| {name} | {value / 1e9:.1f} | {value / unit:.2f} |" for name, value in rows.items()]
    record = {**provenance(), "resolution": args.resolution, "flops": rows, "shallow_residuals": kept}
    print("\n".join(lines))
    print(write_results(ROOT / "results", "controlnet_flops", record, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
