"""A seeded fuzzer of safetensors headers, for test_fuzz_headers.py and for the numbers in a closing note.

Each case takes a seed checkpoint (the full-size header fixtures, header only, and tiny checkpoints of every
family whose data section is a sparse run of zeros, so that a header that survives detection goes on through
building the model and reading every tensor), applies one to three mutations drawn from a seeded generator
(structural ones on the parsed header, byte-level ones on its text, the length prefix), writes the file and
calls `load_denoiser` on it, as `postdiff-compile SOURCE` does. The outcome must be a loaded model or a
PostDiffError whose one-line message names the file; anything else, or a run over 5 s, is a finding.

    python tests/header_fuzz.py [COUNT] [SEED]    # prints the outcome table
"""
from __future__ import annotations

import collections
import json
import math
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

FIXTURES = ROOT / "tests" / "fixtures" / "headers"
TINY_SEEDS = (("sd15", "ldm"), ("sdxl", "ldm"), ("sd15", "diffusers"), ("pixart_alpha", "pixart_original"),
              ("lcm_sd15", "ldm"), ("pixart_alpha_sized", "diffusers"), ("sd3", "sd3_original"),
              ("flux", "flux_original"))
MAX_SECONDS = 5.0


@dataclass
class Seed:
    name: str
    entries: dict           # the parsed header, __metadata__ included; never mutated (cases copy what they change)
    data_bytes: int | None  # sparse data section to write after the header; None: header only
    segments: dict = field(default_factory=dict)   # name -> its `"name":{...}` text, for unchanged entries

    def __post_init__(self):
        self.segments = {k: f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in self.entries.items()}


def load_seeds(folder: Path) -> list[Seed]:
    """Full-size header fixtures and tiny checkpoints (their headers; data is re-made sparse per case)."""
    from tiny_models import ldm_extras, tiny_denoiser, write_checkpoint

    seeds = []
    for path in sorted(FIXTURES.glob("*.safetensors")):
        seeds.append(Seed(path.stem, _header_of(path.read_bytes()), None))
    folder.mkdir(parents=True, exist_ok=True)
    for family, layout in TINY_SEEDS:
        path = folder / f"tiny-{family}-{layout}.safetensors"
        if not path.exists():
            write_checkpoint(tiny_denoiser(family), path, layout, extra=ldm_extras() if layout == "ldm" else None)
        header = _header_of(path.read_bytes())
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
        seeds.append(Seed(f"tiny-{family}-{layout}", header, end))
    return seeds


def _header_of(raw: bytes) -> dict:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


# ---- mutations ---------------------------------------------------------------------------------------------

_ODD_VALUES = [True, False, None, -1, 0, 1, 2 ** 63, 2 ** 64 + 1, 10 ** 30, 1.5, float("1e300"), "x", "F16", [],
               [1], {}, {"a": 1}, [[1, 2]], -(2 ** 63)]


def _tensor_names(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def _own(h: dict, name: str):
    """The entry `name`, copied into this case first: the seed's entries are shared by every case."""
    e = h[name]
    if isinstance(e, dict):
        e = {k: (list(v) if isinstance(v, list) else v) for k, v in e.items()}
        h[name] = e
    return e


def m_delete_tensors(h, rng):
    names = _tensor_names(h)
    for name in rng.sample(names, min(len(names), rng.choice([1, 1, 2, 5, 20, len(names) // 2 or 1]))):
        del h[name]


def m_shape_value(h, rng):
    e = _own(h, rng.choice(_tensor_names(h)))
    if isinstance(e.get("shape"), list) and e["shape"]:
        e["shape"][rng.randrange(len(e["shape"]))] = rng.choice(_ODD_VALUES + [0, 3, 7, 64, 100000, 2 ** 40])


def m_shape_rank(h, rng):
    e = _own(h, rng.choice(_tensor_names(h)))
    shape = e.get("shape")
    if isinstance(shape, list):
        if shape and rng.random() < 0.5:
            shape.pop(rng.randrange(len(shape)))
        else:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 3]))
        _fix_offsets(h, rng)


def m_consistent_shape(h, rng):
    """A shape change with offsets kept consistent: reaches detection and the build with odd sizes."""
    e = _own(h, rng.choice(_tensor_names(h)))
    if isinstance(e.get("shape"), list) and e["shape"]:
        i = rng.randrange(len(e["shape"]))
        e["shape"][i] = rng.choice([0, 1, 3, 5, 17, 33, 2 * e["shape"][i] if isinstance(e["shape"][i], int) else 2])
        _fix_offsets(h, rng)


def _fix_offsets(h, rng):
    from postdiff_compile.models.safetensors_header import DTYPE_BYTES

    offset = 0
    for name in _tensor_names(h):
        e = h[name]
        try:
            size = math.prod(e["shape"]) * DTYPE_BYTES[e["dtype"]]
        except (TypeError, KeyError):
            continue
        if isinstance(size, int) and 0 <= size < 1 << 40:
            if e.get("data_offsets") != [offset, offset + size]:
                _own(h, name)["data_offsets"] = [offset, offset + size]
            offset += size


def m_dtype(h, rng):
    e = _own(h, rng.choice(_tensor_names(h)))
    e["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "I8", "BOOL", "F8_E4M3", "Q4", "", ["F16"], 16, None])
    if rng.random() < 0.5:
        _fix_offsets(h, rng)


def m_offsets(h, rng):
    e = _own(h, rng.choice(_tensor_names(h)))
    e["data_offsets"] = rng.choice([[0], [5, 1], [-1, 3], [True, 4], [0, 2 ** 70], "0,4", None, [0, 4, 8],
                                    [2 ** 40, 2 ** 40 + 8]])


def m_rename(h, rng):
    name = rng.choice(_tensor_names(h))
    new = rng.choice([name + ".x", name.replace("weight", "bias"), name.replace(".0.", ".999999999."),
                      name.replace(".1.", "." + "9" * 30 + "."), "model.diffusion_model." + name, name[:5],
                      name.replace("input_blocks", "output_blocks"), "", "\u0663" + name, name.upper()])
    h[new] = h.pop(name)


def m_add_tensor(h, rng):
    template = rng.choice(["model.diffusion_model.input_blocks.{}.0.op.weight", "down_blocks.{}.resnets.0.conv1.weight",
                           "blocks.{}.attn.qkv.weight", "transformer_blocks.{}.attn1.to_q.weight",
                           "model.diffusion_model.label_emb.0.0.weight", "time_embedding.cond_proj.weight",
                           "pos_embed", "x_embedder.proj.weight", "t_block.1.weight"])
    name = template.format(rng.choice([0, 1, 7, 63, 10 ** 6, 10 ** 12]))
    shape = [rng.choice([0, 1, 2, 3, 320, 2048]) for _ in range(rng.choice([0, 1, 2, 4]))]
    h[name] = {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]}
    _fix_offsets(h, rng)


def m_entry_type(h, rng):
    h[rng.choice(_tensor_names(h))] = rng.choice(_ODD_VALUES)


def m_metadata(h, rng):
    h["__metadata__"] = rng.choice([{"modelspec.prediction_type": rng.choice(["v", "eps", 3, None, ["v"]])},
                                    {"a": {"b": 1}}, [1], "x", None, {"prediction_type": "v_prediction"}, 5])


# Texts Python's json cannot produce (or parse back) itself: placeholders replaced in the encoded bytes.
_LITERALS = {}


def _literal(text: str) -> str:
    key = f"@@literal{len(_LITERALS)}@@"
    _LITERALS[key] = text
    return key


def m_nesting(h, rng):
    depth = rng.choice([10, 63, 65, 200, 1000, 5000])
    _own(h, rng.choice(_tensor_names(h)))["shape"] = _literal("[" * depth + "]" * depth)


def m_big_int(h, rng):
    e = _own(h, rng.choice(_tensor_names(h)))
    e[rng.choice(["shape", "data_offsets"])] = [_literal("1" + "0" * rng.choice([19, 41, 4300, 5000])), 1]


STRUCTURAL = [m_delete_tensors, m_shape_value, m_shape_rank, m_consistent_shape, m_dtype, m_offsets, m_rename,
              m_add_tensor, m_entry_type, m_metadata, m_nesting, m_big_int]


def b_flip(raw: bytes, rng) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.choice([1, 2, 8])):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def b_truncate(raw: bytes, rng) -> bytes:
    return raw[:rng.randrange(len(raw) + 1)]


def b_insert(raw: bytes, rng) -> bytes:
    i = rng.randrange(len(raw) + 1)
    return raw[:i] + rng.choice([b"[", b"]", b"{", b'"', b"\\", b"\xff", b"NaN", b"1e999", b",", b"\x00",
                                 b"[" * 3000, b'"' * 1000]) + raw[i:]


BYTE_LEVEL = [b_flip, b_truncate, b_insert]


def make_case(seed: Seed, rng: random.Random) -> tuple[bytes, int | None, list[str]]:
    """(file bytes, sparse data size, mutation names) of one case."""
    header = dict(seed.entries)
    applied = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        if not _tensor_names(header):
            break
        mutation = rng.choice(STRUCTURAL)
        try:
            mutation(header, rng)
        except (TypeError, KeyError, AttributeError, IndexError, ValueError):
            continue   # an earlier mutation left nothing this one can change (an entry that is not an object)
        applied.append(mutation.__name__)
    parts = [seed.segments[k] if k in seed.segments and v is seed.entries[k]
             else f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in header.items()]
    raw = ("{" + ",".join(parts) + "}").encode()
    for key, text in _LITERALS.items():
        raw = raw.replace(f'"{key}"'.encode(), text.encode())
    _LITERALS.clear()
    if rng.random() < 0.25:
        mutation = rng.choice(BYTE_LEVEL)
        raw = mutation(raw, rng)
        applied.append(mutation.__name__)
    length = len(raw)
    if rng.random() < 0.05:
        length = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2 ** 63, 2 ** 27])
        applied.append("length_prefix")
    return struct.pack("<Q", length) + raw, seed.data_bytes, applied


# ---- running -----------------------------------------------------------------------------------------------

@dataclass
class Report:
    cases: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    findings: list[str] = field(default_factory=list)
    slowest: float = 0.0
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{self.cases} cases in {self.seconds:.1f} s, slowest {self.slowest:.2f} s, "
                 f"{len(self.findings)} findings", f"{'outcome':70}  {'count':>6}"]
        lines += [f"{k[:70]:70}  {v:6}" for k, v in self.outcomes.most_common()]
        return "\n".join(lines + self.findings[:20])


def _kind(message: str, path: str) -> str:
    """The error's kind: its text after the file name, with numbers and quoted names folded."""
    import re

    text = message.split(f"{path}: ", 1)[-1]
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|\d+", "_", text)
    return text[:70]


def run(count: int, seed: int, folder: Path) -> Report:
    from postdiff_compile.errors import PostDiffError
    from postdiff_compile.models.load import load_denoiser

    seeds = load_seeds(folder / "seeds")
    rng = random.Random(seed)
    report = Report()
    start = time.perf_counter()
    path = folder / "case.safetensors"
    for i in range(count):
        data, sparse, applied = make_case(seeds[i % len(seeds)], rng)
        with open(path, "wb") as f:
            f.write(data)
            if sparse is not None:
                f.truncate(len(data) + sparse)   # zeros without writing them
        t = time.perf_counter()
        try:
            load_denoiser(str(path))
            outcome = "loaded"
        except PostDiffError as err:
            message = str(err)
            if str(path) not in message or "\n" in message:
                report.findings.append(f"case {i} ({'+'.join(applied)}): error not one line naming the file: "
                                       f"{message[:200]!r}")
            outcome = "error: " + _kind(message, str(path))
        except Exception as err:  # what the fuzzer is for
            outcome = f"ESCAPED {type(err).__name__}"
            report.findings.append(f"case {i} ({'+'.join(applied)}, seed {seeds[i % len(seeds)].name}): "
                                   f"{type(err).__name__}: {str(err)[:200]}")
        elapsed = time.perf_counter() - t
        report.slowest = max(report.slowest, elapsed)
        if elapsed > MAX_SECONDS:
            report.findings.append(f"case {i} ({'+'.join(applied)}): {elapsed:.1f} s")
        report.outcomes[outcome] += 1
        report.cases += 1
    report.seconds = time.perf_counter() - start
    return report


if __name__ == "__main__":
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with tempfile.TemporaryDirectory() as tmp:
        print(run(count, seed, Path(tmp)).table())
