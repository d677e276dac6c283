"""Open a .pt2 program file the way safetensors are opened: nothing in it is unpickled or evaluated.

`torch.export.load` trusts its archive: it unpickles the sample inputs with a `weights_only=False`
fallback, unpickles weights and constants marked `use_pickle`, rebuilds custom objects with pickle, hands
symbolic shape expressions to `sympy.sympify` (which evaluates Python) and turns `guards_code` into Python
that `.module()` executes. The manifest's hashes do not help against an edited file (whoever edits it can
rewrite them), so before torch sees an archive, `check_pt2` reads it as data and refuses anything but what
`save_pt2` (exporters/pt2.py) writes for a static-shape graph of ATen ops:

- uncompressed zip members with known names under one root folder, each name once;
- weights and constants as raw tensor bytes (`use_pickle` false, tensor file names only, integer sizes);
- empty sample inputs (the file torch would unpickle);
- a program whose every node calls `torch.ops.aten.*`, whose arguments are tensors and constants only, with
  no symbolic values, range constraints, custom objects, subgraphs or guard code.

The bytes checked are the bytes loaded (read once, hashed against the manifest, passed to torch as a buffer),
and torch.load is forced to weights_only while torch reads them, in case a torch version adds a path.
AOTInductor packages and TensorRT engines are native code by nature and are not covered: see
docs/manifest.md, "Trust".
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from .. import safe_json
from ..errors import PostDiffError

_ROOT = re.compile(r"^[A-Za-z0-9@_.+-]{1,200}$")
_MEMBERS = re.compile(r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                      r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_[0-9]{1,9}"
                      r"|data/constants/model_constants_config\.json|data/constants/tensor_[0-9]{1,9}"
                      r"|data/sample_inputs/model\.pt)$")
_TARGET = re.compile(r"^torch\.ops\.aten\.[A-Za-z0-9_]{1,100}\.[A-Za-z0-9_]{1,100}$")
# Argument kinds of a static ATen graph; every other `as_*` key (as_graph, as_operator, as_custom_obj, as_sym_*,
# as_expr, ...) names a graph, an operator, a custom object or a symbol, and is refused, as is `expr_str`.
_ARGUMENTS = {"as_none", "as_tensor", "as_tensors", "as_optional_tensor", "as_optional_tensors", "as_int",
              "as_ints", "as_float", "as_floats", "as_bool", "as_bools", "as_string", "as_strings",
              "as_scalar_type", "as_memory_format", "as_layout", "as_device", "as_complex"}
_TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}
MAX_MEMBERS = 100_000


def check_pt2(data: bytes, path: Path) -> None:
    """Refuse, with one error naming `path` and the member, an archive torch would have to trust."""
    def bad(why: str) -> PostDiffError:
        return PostDiffError(f"refused .pt2 program: {why} (an artifact's programs hold data only; this file was "
                             "not written by postdiff-compile or was edited)", path)

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise bad(f"not a zip archive ({err})") from None
    if not infos or len(infos) > MAX_MEMBERS:
        raise bad(f"{len(infos)} members")
    root = infos[0].filename.split("/", 1)[0]
    if not _ROOT.match(root):
        raise bad(f"archive root {root[:60]!r}")
    seen: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        rel = name[len(root) + 1:] if name.startswith(root + "/") else None
        if rel is None or not _MEMBERS.match(rel):
            raise bad(f"unexpected member {name[:120]!r}")
        if rel in seen:
            raise bad(f"member {name[:120]!r} appears twice")
        if info.compress_type != zipfile.ZIP_STORED:
            raise bad(f"member {name[:120]!r} is compressed")
        seen[rel] = info
    for required in ("archive_version", "models/model.json", "data/weights/model_weights_config.json",
                     "data/constants/model_constants_config.json"):
        if required not in seen:
            raise bad(f"member {root}/{required} is missing")

    def read(rel: str) -> bytes:
        try:
            return archive.read(seen[rel])
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise bad(f"member {root}/{rel} cannot be read ({err})") from None

    if "data/sample_inputs/model.pt" in seen and seen["data/sample_inputs/model.pt"].file_size:
        raise bad("it has sample inputs, which torch unpickles")
    for rel, prefix in (("data/weights/model_weights_config.json", "weight_"),
                        ("data/constants/model_constants_config.json", "tensor_")):
        raw = read(rel)
        config = _json(raw, path, f"{root}/{rel}")
        _scan(raw, bad, f"{root}/{rel}")
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise bad(f"{root}/{rel} has no config object")
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                raise bad(f"{root}/{rel}: {str(fqn)[:80]!r} is stored as a pickle")
            name = meta.get("path_name")
            if not isinstance(name, str) or not re.fullmatch(prefix + r"[0-9]{1,9}", name):
                raise bad(f"{root}/{rel}: {str(fqn)[:80]!r} is not a tensor file ({str(name)[:60]!r})")
    raw = read("models/model.json")
    program = _json(raw, path, f"{root}/models/model.json")
    _check_program(program, bad)
    _scan(raw, bad, "models/model.json")


def _json(raw: bytes, path: Path, member: str) -> Any:
    try:
        return safe_json.loads(raw, None, "JSON")
    except PostDiffError as err:
        raise PostDiffError(f"refused .pt2 program: member {member}: {err}", path) from None


# Over the JSON text, not its parsed objects (a Python walk of a 1.7 MB program took 0.2 s a variant): in JSON a
# quote inside a string is escaped, so `"as_x":` matches keys only.
_KEY = re.compile(rb'"(as_[A-Za-z0-9_]*|expr_str)"\s*:')
_BAD_NAME = re.compile(rb'"name"\s*+:\s*+(?!"[A-Za-z_][A-Za-z0-9_.]{0,199}")')


def _scan(raw: bytes, bad, where: str) -> None:
    """No key anywhere that makes torch evaluate a symbol, build an object or load a graph; names identifiers."""
    for key in {m[1].decode() for m in _KEY.finditer(raw)}:
        if key not in _ARGUMENTS:
            raise bad(f"{where} holds {key[:60]!r}, which torch would evaluate or deserialise as code")
    if (m := _BAD_NAME.search(raw)) is not None:
        # FX writes node names into the Python source of .module(): identifiers only.
        raise bad(f"{where} has the value name {raw[m.end():m.end() + 60].decode(errors='replace')!r}, not an "
                  "identifier")


def _check_program(program: Any, bad) -> None:
    where = "models/model.json"
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise bad(f"{where} is not an exported program")
    if program.get("guards_code") not in (None, []):
        raise bad(f"{where} has guard code, which .module() would execute")
    if program.get("range_constraints") not in (None, {}):
        raise bad(f"{where} has symbolic shapes (range constraints); artifact graphs are static")
    module = program["graph_module"]
    graph = module.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise bad(f"{where} has no graph")
    for key in ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"):
        if graph.get(key) not in (None, {}):
            raise bad(f"{where} has {key}; artifact graphs are static tensor programs")
    for i, node in enumerate(graph["nodes"]):
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str) or not _TARGET.match(target):
            raise bad(f"{where}: node {i} calls {str(target)[:80]!r}, not an ATen operator")
    for call in module.get("module_call_graph") or []:
        signature = call.get("signature") if isinstance(call, dict) else None
        for spec_key in ("in_spec", "out_spec"):
            spec = signature.get(spec_key) if isinstance(signature, dict) else None
            if spec is None:
                continue
            if not isinstance(spec, str):
                raise bad(f"{where}: {spec_key} is not a tree spec")
            types = set(re.findall(r'"type": ?("[^"]*"|null)', spec))
            if {None if t == "null" else t.strip('"') for t in types} - _TREESPEC_TYPES:
                raise bad(f"{where}: {spec_key} names types other than tuple, list and dict")


@contextlib.contextmanager
def _weights_only_loads():
    # Read by torch.load at each call: any torch.load torch makes while we load is weights_only.
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_program(path: Path, sha256: str | None = None):
    """The ExportedProgram in `path`, after checking its bytes against `sha256` and `check_pt2`."""
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PostDiffError(f"cannot read the program: {err.strerror}", path) from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise PostDiffError("the program does not match its sha256 in the manifest: the file is damaged or was "
                            "replaced", path)
    check_pt2(data, path)
    try:
        with _weights_only_loads():
            return torch.export.load(io.BytesIO(data))
    except Exception as err:  # torch.export.load raises several types for a bad archive
        raise PostDiffError(f"torch.export cannot load the program: {type(err).__name__}: {str(err)[:300]}",
                            path) from None
