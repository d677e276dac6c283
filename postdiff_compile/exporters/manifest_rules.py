"""The rules of a manifest that its JSON Schema cannot state: agreements between fields.

The schema checks each field's type and range; these check that the fields describe one runnable
artifact: the plan has `steps` steps in order, each naming a variant of its kind; every variant has a file
in every listed format; the switch step is inside the plan and where the plan switches; the scheduler is a
diffusers scheduler that has that many timesteps; the config is a valid PostDiffConfig. Each broken rule
is one error naming the manifest and the field, so that `load`, `run` and `inspect` refuse what they could
not execute (before this, nine such manifests passed the checksum and crashed with other exception types).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PostDiffError
from .formats import FORMATS


def _serves(variant: str, step: str) -> bool:
    from ..variant_spec import VariantSpec

    try:
        return VariantSpec.parse(variant).serves(VariantSpec.parse(step))
    except PostDiffError:
        return False


def check_consistency(m: dict, path: Path) -> None:
    def bad(where: str, why: str) -> PostDiffError:
        return PostDiffError(f"not a valid manifest: at {where}: {why}", path)

    steps, plan = m["steps"], m["plan"]
    if len(plan) != steps:
        raise bad("plan", f"{len(plan)} steps, but steps is {steps}")
    for i, step in enumerate(plan):
        if step["index"] != i:
            raise bad(f"plan/{i}/index", f"{step['index']}, expected {i}")
    variants = {}
    for i, v in enumerate(m["variants"]):
        if v["id"] in variants:
            raise bad(f"variants/{i}/id", f"{v['id']!r} appears twice")
        variants[v["id"]] = v
        for fmt in set(m["formats"]) & set(FORMATS):   # a later tool's formats are its own business
            if fmt not in v["files"]:
                raise bad(f"variants/{i}/files", f"no {fmt} file, but formats lists {fmt}")
        names = [t["name"] for t in v["inputs"]]
        if len(v["inputs"][0]["shape"]) != 4:
            raise bad(f"variants/{i}/inputs/0", "the latent input must have 4 dimensions")
        if "encoder_hidden_states" not in names:
            raise bad(f"variants/{i}/inputs", "no encoder_hidden_states input")
        text = v["inputs"][names.index("encoder_hidden_states")]
        if len(text["shape"]) != 3:
            raise bad(f"variants/{i}/inputs/{names.index('encoder_hidden_states')}", "the text input must have 3 "
                      "dimensions")
    for i, step in enumerate(plan):
        variant = variants.get(step["variant_id"])
        if variant is None:
            raise bad(f"plan/{i}/variant_id", f"{step['variant_id'][:100]!r} names no variant")
        if not _serves(variant["name"], step["variant"]):
            raise bad(f"plan/{i}/variant", f"{step['variant']!r}, but variant {variant['id']!r} is a "
                      f"{variant['name']!r} variant, which does not run it")
    _check_batches(m, variants, bad)
    _check_controlnets(m, variants, bad)
    _check_weights(m, bad)
    low = sum(step["resolution"] == "low" for step in plan)
    if low == steps:
        raise bad("plan", "every step is at low resolution; the last steps run at full resolution")
    if any(step["resolution"] == "low" for step in plan[low:]):
        raise bad("plan", "a low-resolution step after a full-resolution one")
    transition = m["transition"]
    if transition is None and low:
        raise bad("transition", f"null, but the plan has {low} low-resolution steps")
    if transition is not None and transition["switch_step"] != low:
        raise bad("transition/switch_step", f"{transition['switch_step']}, but the plan switches at step {low}"
                  if low else f"{transition['switch_step']}, but the plan has no low-resolution step")
    _check_scheduler(m["scheduler"], steps, bad)
    sigmas = m.get("set_timesteps", {}).get("sigmas")
    if sigmas is not None and len(sigmas) != steps:
        raise bad("set_timesteps/sigmas", f"{len(sigmas)} sigmas for {steps} steps")
    from ..config import PostDiffConfig

    try:
        PostDiffConfig.from_dict(m["config"])
    except PostDiffError as err:
        raise bad("config", str(err)) from None


# Formats whose files take their weights from the artifact's weights file in format 2 (a TensorRT engine holds its
# own); a file that does not name it would open with the zeros a weightless program reads back.
SHARED_WEIGHTS = ("pt2", "onnx", "aoti")


def _check_controlnets(m: dict, variants: dict, bad) -> None:
    """ControlNets in order, each graph once and in every format, with the residuals the variants take as outputs;
    variants that take residuals only with a ControlNet to make them."""
    from ..capture import CONTROLNET_DOWN, CONTROLNET_MID

    takes = {t["name"] for v in variants.values() for t in v["inputs"]
             if t["name"].startswith((CONTROLNET_DOWN, CONTROLNET_MID))}
    nets = m.get("controlnets") or []
    if takes and not nets:
        raise bad("variants", "the variants take ControlNet residuals, but the manifest has no controlnets")
    ids = set(variants)
    for n, net in enumerate(nets):
        if net["index"] != n:
            raise bad(f"controlnets/{n}/index", f"{net['index']}, expected {n}")
        for g, graph in enumerate(net["graphs"]):
            where = f"controlnets/{n}/graphs/{g}"
            if graph["id"] in ids or not graph["id"].startswith(f"controlnet{n}@"):
                raise bad(f"{where}/id", f"{graph['id'][:100]!r} appears twice or names another ControlNet")
            ids.add(graph["id"])
            for fmt in set(m["formats"]) & set(FORMATS):
                if fmt not in graph["files"]:
                    raise bad(f"{where}/files", f"no {fmt} file, but formats lists {fmt}")
            names = [t["name"] for t in graph["inputs"]]
            if names[0] != "sample" or "controlnet_cond" not in names or "timestep" not in names:
                raise bad(f"{where}/inputs", "a ControlNet graph takes sample first, timestep and controlnet_cond")
            if not takes <= {t["name"] for t in graph["outputs"]}:
                raise bad(f"{where}/outputs", "not every residual the variants take")


def _check_weights(m: dict, bad) -> None:
    from .weights_file import FILE

    if m["format_version"] < 2:
        return
    if m["weights"] is None or m["weights"]["file"] != FILE:
        raise bad("weights", f"a format-2 artifact keeps its weights in {FILE}")
    graphs = [*m["variants"], *(g for net in m.get("controlnets") or [] for g in net["graphs"])]
    for i, v in enumerate(graphs):
        for fmt in SHARED_WEIGHTS:
            if fmt in v["files"] and v["files"][fmt].get("weights") != FILE:
                raise bad(f"variants/{i}/files/{fmt}/weights", f"{str(v['files'][fmt].get('weights'))[:80]!r}, but "
                          f"the {fmt} graphs of a format-2 artifact read {FILE}")


def _check_scheduler(config: dict, steps: int, bad) -> None:
    import diffusers

    name = config["_class_name"]
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise bad("scheduler/_class_name", f"{name!r} is not a diffusers scheduler class")
    train = config.get("num_train_timesteps", 1000)
    if steps > train:
        raise bad("steps", f"{steps}, more than the scheduler's {train} training timesteps")


def _check_batches(m: dict, variants: dict, bad) -> None:
    """Each bucket's ids: one per step, each a variant that runs the step at that many images (CFG: twice)."""
    plan = m["plan"]
    for images, ids in m.get("batches", {}).items():
        if int(images) < 2:
            raise bad(f"batches/{images}", "buckets above 1 image only (the plan's variant_id is the 1-image one)")
        if len(ids) != len(plan):
            raise bad(f"batches/{images}", f"{len(ids)} variant ids for {len(plan)} steps")
        for i, (step, vid) in enumerate(zip(plan, ids)):
            variant, single = variants.get(vid), variants.get(step["variant_id"])
            if variant is None:
                raise bad(f"batches/{images}/{i}", f"{vid[:100]!r} names no variant")
            rows = int(images) * (2 if step["cfg"] else 1)
            if variant["batch"] != rows or variant["latent_size"] != single["latent_size"] or \
                    not _serves(variant["name"], step["variant"]):
                raise bad(f"batches/{images}/{i}", f"variant {vid[:100]!r} does not run step {i} ({step['variant']!r}) "
                          f"for {images} images: it needs batch {rows} at latent {single['latent_size']}")
