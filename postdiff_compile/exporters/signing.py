"""Detached ed25519 signatures over an artifact's `manifest.sha256`: who built it, not only that it is whole.

The checksum chain (manifest.sha256 -> manifest.json -> every file's sha256) shows an artifact is intact;
anyone who edits a file can rewrite the chain. A signature by the builder's private key over
`manifest.sha256` covers the whole chain, so a deployment that holds the public key refuses any artifact
the builder did not sign. That matters most for `aoti` (and TensorRT) artifacts, which are native code
and run with the process's rights once loaded.

    postdiff-compile keygen --out KEY             # KEY (private, mode 0600) and KEY.pub, PEM
    postdiff-compile sign DIR --key KEY           # writes DIR/manifest.sig (64 raw bytes)
    load(DIR, public_key="KEY.pub")               # refuses an unsigned or badly signed artifact
    postdiff-compile run|inspect DIR --public-key KEY.pub

Keys and signatures are here; signing an artifact folder and checking its signature on load are the
manifest's (manifest.py: `sign`, `read_manifest`), which knows the folder's files.

The same check without this tool:
    openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in DIR/manifest.sha256 -sigfile DIR/manifest.sig
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PostDiffError

SIGNATURE = "manifest.sig"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise PostDiffError("signatures need the cryptography package: pip install cryptography") from None
    return serialization, ed25519, InvalidSignature


def _read_key(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > 64 << 10:
            raise PostDiffError(f"{size} bytes: not a {what} key file", path)
        return path.read_bytes()
    except OSError as err:
        raise PostDiffError(f"cannot read the {what} key: {err.strerror}", path) from None


def load_public_key(key: str | os.PathLike | bytes):
    """An Ed25519 public key from a PEM file path, PEM bytes or 32 raw bytes."""
    serialization, ed25519, _ = _crypto()
    source = None
    if not isinstance(key, bytes):
        source, key = Path(key), _read_key(Path(key), "public")
    try:
        if len(key) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(key)
        loaded = serialization.load_pem_public_key(key)
    except ValueError as err:
        raise PostDiffError(f"not an Ed25519 public key (PEM): {err}", source) from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise PostDiffError(f"a {type(loaded).__name__}, not an Ed25519 public key", source)
    return loaded


def load_private_key(path: Path):
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(_read_key(path, "private"), password=None)
    except (ValueError, TypeError) as err:
        raise PostDiffError(f"not an unencrypted Ed25519 private key (PEM): {err}", path) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PostDiffError(f"a {type(key).__name__}, not an Ed25519 private key", path)
    return key


def generate_key(out: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key to `out` (mode 0600) and its public key to `out.pub`; neither may exist."""
    serialization, ed25519, _ = _crypto()
    private_path, public_path = Path(out), Path(f"{out}.pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise PostDiffError("key file already exists; choose another name", path)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        public_path.write_bytes(public)
    except OSError as err:
        raise PostDiffError(f"cannot write the key: {err.strerror}", private_path) from None
    return private_path, public_path


def verify(path: Path, signature: bytes, checksum: bytes, public_key) -> None:
    """Refuse unless `signature` (read from `path`, the artifact's manifest.sig) is the key's signature of
    `checksum` (manifest.sha256's bytes, as the caller read and checked them)."""
    _, _, invalid = _crypto()
    key = load_public_key(public_key) if not hasattr(public_key, "verify") else public_key
    try:
        key.verify(signature, checksum)
    except invalid:
        raise PostDiffError("the signature does not match: the artifact was changed after it was signed, or "
                            "signed with another key; refusing it", path) from None
