"""ed25519 signatures of bundles, for devices that must run only what their owner built.

`edgeexit sign BUNDLE --key K` signs the manifest's seal digest — which covers the manifest
and, through its `files` checksums, every file — and stores the signature in
`manifest.sig`. `--trust PUBKEY` (a key file, or a folder of them: the device's trust
store) makes `run` and `inspect` refuse a bundle that is unsigned, signed by a key not
trusted, or whose signature does not match. Keys are PEM (PKCS#8 / SubjectPublicKeyInfo,
as `openssl genpkey -algorithm ed25519` writes) or OpenSSH (`ssh-keygen -t ed25519`);
`edgeexit keygen` writes a pair. Uses `cryptography` (pip install 'edgeexit[sign]').
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from edgeexit.bundle import SIGNATURE, Bundle, replace_signature
from edgeexit.errors import EdgeExitError
from edgeexit.jsonio import dumps, read_json
from edgeexit.seal import seal_digest

CONTEXT = b"edgeexit-bundle-seal-v1\n"  # domain separation: this key's signatures mean only this
MAX_KEY_BYTES = 64 << 10


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgeExitError("signing: needs the cryptography package: pip install 'edgeexit[sign]'") from None
    return serialization, ed25519


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise EdgeExitError(f"{what}: key file not found: {path}")
    try:
        if path.stat().st_size > MAX_KEY_BYTES:
            raise EdgeExitError(f"{what}: {path} is too large to be a key")
        return path.read_bytes()
    except OSError as exc:
        raise EdgeExitError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def load_private_key(path: Path):
    """An ed25519 private key from a PEM or OpenSSH file (unencrypted)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "--key")
    try:
        key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, None))
    except (ValueError, TypeError) as exc:
        raise EdgeExitError(f"--key: {path} is not an unencrypted PEM or OpenSSH private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgeExitError(f"--key: {path} holds a {type(key).__name__}; bundles are signed with ed25519 keys")
    return key


def load_public_key(path: Path):
    """An ed25519 public key from a PEM file or an OpenSSH `ssh-ed25519 AAAA...` line."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "--trust")
    try:
        key = (serialization.load_ssh_public_key(data.strip()) if data.lstrip().startswith(b"ssh-")
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise EdgeExitError(f"--trust: {path} is not a PEM or OpenSSH public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise EdgeExitError(f"--trust: {path} holds a {type(key).__name__}, not an ed25519 public key")
    return key


def key_id(public_key) -> str:
    """A short fingerprint of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def trusted_keys(trust: Path) -> dict[str, Any]:
    """key id -> public key for `trust`: one key file, or every *.pub / *.pem in a folder."""
    if trust.is_dir():
        try:
            paths = sorted(p for p in trust.iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
        except OSError as exc:
            raise EdgeExitError(f"--trust: cannot read the folder {trust}: {exc.strerror or exc}") from None
        if not paths:
            raise EdgeExitError(f"--trust: {trust} holds no *.pub or *.pem public keys")
    else:
        paths = [trust]
    return {key_id(k): k for k in map(load_public_key, paths)}


def sign_bundle(bundle: Bundle, key_path: Path) -> tuple[Bundle, str]:
    """Sign `bundle` with the private key at `key_path`; returns the bundle and the key id."""
    key = load_private_key(key_path)
    signed = seal_digest(bundle.manifest)
    record = {"format": 1, "algorithm": "ed25519", "key": key_id(key.public_key()), "digest": signed,
              "signature": base64.b64encode(key.sign(CONTEXT + signed.encode())).decode()}
    return replace_signature(bundle, (dumps(record) + "\n").encode(), signed), record["key"]


def signature_record(bundle: Bundle) -> dict[str, Any] | None:
    """The parsed `manifest.sig` of `bundle`, or None when it is unsigned."""
    path = bundle.path / SIGNATURE
    if not path.is_file():
        return None
    record = read_json(path, "signature", MAX_KEY_BYTES)
    if not isinstance(record, dict) or record.get("algorithm") != "ed25519" or not all(
            isinstance(record.get(k), str) for k in ("key", "digest", "signature")):
        raise EdgeExitError(f"signature: {path} is not an edgeexit ed25519 signature record")
    return record


def verify_signature(bundle: Bundle, trust: Path) -> str:
    """Refuse `bundle` unless a key in `trust` signed its current seal; returns the key id."""
    from cryptography.exceptions import InvalidSignature

    keys = trusted_keys(trust)
    record = signature_record(bundle)
    if record is None:
        raise EdgeExitError(f"signature: {bundle.path} is not signed, and --trust accepts only signed bundles "
                            "(edgeexit sign BUNDLE --key KEY)")
    key = keys.get(record["key"])
    if key is None:
        raise EdgeExitError(f"signature: {bundle.path} is signed by key {record['key']}, which is not among the "
                            f"trusted keys in {trust} ({', '.join(sorted(keys))})")
    if record["digest"] != seal_digest(bundle.manifest):
        raise EdgeExitError(f"signature: {bundle.path}'s signature is for another manifest (it changed after "
                            "signing); sign it again")
    try:
        key.verify(base64.b64decode(record["signature"], validate=True), CONTEXT + record["digest"].encode())
    except (InvalidSignature, ValueError):
        raise EdgeExitError(f"signature: {bundle.path}'s signature does not verify with key {record['key']}") from None
    return record["key"]


def write_keypair(path: Path) -> tuple[Path, str]:
    """A new ed25519 key pair: `path` (private, PEM, mode 0600) and `path`.pub (public, PEM);
    refuses to overwrite either. Returns the public key's path and id."""
    serialization, ed25519 = _crypto()
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if os.path.lexists(p):
            raise EdgeExitError(f"keygen: {p} exists; edgeexit does not overwrite keys")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public)
    return pub_path, key_id(key.public_key())
