"""manifest.json: what an artifact holds, where it came from and how well each graph was verified.

Format version 2 (version 1 is still read: its .pt2 programs and AOTInductor packages hold their own weights,
its ONNX graphs read `weights.bin`), described by manifest.schema.json and, for runtime writers, docs/manifest.md. Beside it,
`manifest.sha256` holds the sha256 of manifest.json's bytes (as `sha256sum` prints it), so that an edited
manifest is refused like a corrupted graph file: every other file is listed in the manifest with its own
sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import safe_json
from ..errors import PostDiffError
from .hashing import file_entry, sha256_file  # noqa: F401  (the manifest's file entries; re-exported)

FORMAT = "postdiff-artifact"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)   # 2: one weights.safetensors for every format (weights_file.py)
MANIFEST = "manifest.json"
CHECKSUM = "manifest.sha256"
SCHEMA = Path(__file__).with_name("manifest.schema.json")


def toolchain() -> dict[str, str]:
    """The versions every artifact records; a format adds its own (exporters/formats.py, `Build.toolchain`)."""
    import diffusers
    import safetensors
    import torch

    from ..version import __version__

    tools = {"postdiff_compile": __version__, "python": platform.python_version(), "torch": torch.__version__,
             "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
             "platform": platform.platform()}
    return tools


def write_manifest(folder: Path, manifest: dict) -> Path:
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    validate(data, folder / MANIFEST)   # a writer bug must not produce an artifact every loader refuses
    text = (json.dumps(data, indent=2) + "\n").encode()
    path = folder / MANIFEST
    path.write_bytes(text)
    (folder / CHECKSUM).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")
    return path


def validate(data: dict, path: Path) -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(top level)"
        message = first.message if len(first.message) <= 300 else first.message[:297] + "..."
        raise PostDiffError(f"not a valid format-{data.get('format_version')} manifest: at {where[:200]}: {message}"
                            + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""), path)


# A manifest of a 40-variant artifact is under 2 MB; this bounds what a hostile one makes the loader read.
MAX_MANIFEST_BYTES = 64 << 20


def member(folder: Path, name: str, what: str = "file") -> Path:
    """`folder / name` if it is a regular file inside the folder: the loader never follows a link out of it."""
    path = Path(folder) / name
    if path.is_symlink():
        raise PostDiffError(f"the {what} is a symbolic link; an artifact holds its files, it does not point at them",
                            path)
    try:
        inside = path.resolve().parent == Path(folder).resolve()
    except (OSError, RuntimeError) as err:   # RuntimeError: a symlink loop on older Pythons
        raise PostDiffError(f"cannot resolve the {what}: {err}", path) from None
    if not inside:
        raise PostDiffError(f"the {what} is outside the artifact folder", path)
    if not path.exists():
        raise PostDiffError(f"the {what} is missing from the artifact", path)
    if not path.is_file():
        raise PostDiffError(f"the {what} is not a regular file", path)
    return path


def _read_small(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise PostDiffError(f"{size} bytes, more than any artifact's ({limit})", path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise PostDiffError(f"cannot read: {err.strerror}", path) from None


def read_manifest(folder: Path, public_key=None) -> dict:
    """The manifest of an artifact folder, after checking its checksum, its format version, its schema and
    the rules across its fields (manifest_rules.py); with `public_key` (a PEM file, PEM bytes or raw key), first
    that manifest.sig is that key's signature of the checksum (signing.py)."""
    from .manifest_rules import check_consistency

    folder = Path(folder)
    if not folder.is_dir():
        raise PostDiffError("not an artifact folder (no such folder)", folder)
    path = member(folder, MANIFEST, "manifest")
    checksum = member(folder, CHECKSUM, "manifest checksum")
    checksum_bytes = _read_small(checksum, 1024)
    if public_key is not None:
        _check_signature(folder, checksum_bytes, public_key)
    raw = _read_small(path, MAX_MANIFEST_BYTES)
    expected = checksum_bytes.split()
    if not expected or hashlib.sha256(raw).hexdigest().encode() != expected[0]:
        raise PostDiffError(f"sha256 does not match {CHECKSUM}: the manifest was edited or damaged after it was "
                            "written; recompile the artifact", path)
    data = safe_json.loads(raw, path, "manifest JSON")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PostDiffError(f"not a {FORMAT} manifest", path)
    version = data.get("format_version")
    if version not in READ_VERSIONS or type(version) is not int:
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:37] + "..."
        raise PostDiffError(f"format version {shown}; this postdiff-compile reads versions "
                            f"{', '.join(map(str, READ_VERSIONS))}: "
                            "recompile the artifact with it", path)
    validate(data, path)
    check_consistency(data, path)
    return data


def graph_entries(manifest: dict) -> list[dict]:
    """Every graph's entry (id, inputs, outputs, files): the denoiser variants, then the ControlNets' graphs."""
    return [*manifest["variants"], *(g for net in manifest.get("controlnets") or [] for g in net["graphs"])]


def listed_files(manifest: dict) -> Iterator[tuple[str, dict]]:
    """(what, entry) for every file the manifest lists with a sha256."""
    for variant in graph_entries(manifest):
        for fmt, entry in variant["files"].items():
            yield f"{fmt} graph of variant {variant['id']}", entry
    if manifest["weights"] is not None:
        yield "shared weights", manifest["weights"]


def check_files(folder: Path, manifest: dict, on_bytes: Callable[[int], None] | None = None) -> None:
    """Every listed file is present, has its size and its sha256."""
    for what, entry in listed_files(manifest):
        path = member(folder, entry["file"], what)
        if path.stat().st_size != entry["bytes"]:
            raise PostDiffError(f"the {what} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                                "the file is damaged or was replaced", path)
        if sha256_file(path, on_bytes) != entry["sha256"]:
            raise PostDiffError(f"the {what} does not match its sha256 in the manifest: the file is damaged or was "
                                "replaced", path)


def _check_signature(folder: Path, checksum: bytes, public_key) -> None:
    from .signing import SIGNATURE, verify

    path = Path(folder) / SIGNATURE
    if not path.exists() and not path.is_symlink():
        raise PostDiffError(f"the artifact is not signed (no {SIGNATURE}) and a public key was given: refusing it",
                            path)
    verify(path, member(folder, SIGNATURE, "signature").read_bytes(), checksum, public_key)


def sign(folder: str | os.PathLike, key: str | os.PathLike) -> Path:
    """Sign a valid artifact's manifest.sha256 with the private key in `key` (signing.py); returns the
    signature file."""
    from .signing import SIGNATURE, load_private_key

    folder = Path(folder)
    private = load_private_key(Path(key))
    manifest = read_manifest(folder)   # sign only what every loader accepts
    check_files(folder, manifest)
    checksum = member(folder, CHECKSUM, "manifest checksum").read_bytes()
    target = folder / SIGNATURE
    if target.is_symlink():
        raise PostDiffError("the signature file is a symbolic link", target)
    tmp = folder / f".{SIGNATURE}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(private.sign(checksum))
        tmp.replace(target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PostDiffError(f"cannot write the signature: {err.strerror}", target) from None
    return target
