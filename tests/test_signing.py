"""ed25519 signatures: sign, keygen, and `--trust` refusing unsigned, foreign and forged bundles."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from conftest import reseal
from edgeexit.bundle import load_bundle
from edgeexit.cli import main

pytest.importorskip("cryptography")


@pytest.fixture()
def signed(small_spec, tmp_path, capsys):
    """A copy of the small bundle, a key pair, the bundle signed with it, and an input file."""
    bundle = tmp_path / "b"
    shutil.copytree(small_spec.parent / "out", bundle)
    assert main(["keygen", str(tmp_path / "keys" / "owner")]) == 0
    assert main(["sign", str(bundle), "--key", str(tmp_path / "keys" / "owner")]) == 0
    assert "signed:" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    return bundle, tmp_path / "keys" / "owner.pub", tmp_path / "x.npy"


def run(bundle, x, *extra):
    return main(["run", str(bundle), "--input", str(x), *extra])


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600 and (tmp_path / "k.pub").is_file()
    before = (tmp_path / "k").read_bytes()
    assert main(["keygen", str(tmp_path / "k")]) == 2
    assert "does not overwrite keys" in capsys.readouterr().err and (tmp_path / "k").read_bytes() == before


def test_a_signed_bundle_runs_under_trust_and_inspect_names_the_key(signed, capsys):
    bundle, pub, x = signed
    assert load_bundle(bundle)  # manifest.sig is the one file `files` does not list
    assert main(["inspect", str(bundle), "--trust", str(pub)]) == 0
    out = capsys.readouterr().out
    assert "verified against the trusted keys" in out
    assert run(bundle, x, "--trust", str(pub)) == 0
    assert run(bundle, x, "--trust", str(pub.parent)) == 0  # a trust folder of *.pub keys
    assert main(["inspect", str(bundle)]) == 0
    assert "not checked (give --trust PUBKEY)" in capsys.readouterr().out


def test_unsigned_foreign_and_forged_bundles_are_refused(signed, small_spec, tmp_path, capsys, monkeypatch):
    bundle, pub, x = signed
    unsigned = tmp_path / "unsigned"
    shutil.copytree(small_spec.parent / "out", unsigned)
    assert run(unsigned, x, "--trust", str(pub)) == 2
    assert "is not signed" in capsys.readouterr().err
    assert main(["keygen", str(tmp_path / "stranger")]) == 0
    assert run(bundle, x, "--trust", str(tmp_path / "stranger.pub")) == 2
    assert "not among the trusted keys" in capsys.readouterr().err
    monkeypatch.setenv("EDGEEXIT_TRUST", str(pub))  # a device's trust store applies to every command
    assert run(unsigned, x) == 2
    assert "is not signed" in capsys.readouterr().err
    m = json.loads((bundle / "manifest.json").read_text())
    m["gating"]["thresholds"] = [0.0, 0.0, None]  # a forger who knows the format reseals it...
    reseal(bundle, m)
    assert run(bundle, x) == 2  # ...but cannot sign it
    assert "signature is for another manifest" in capsys.readouterr().err


def test_a_tampered_signature_does_not_verify(signed, capsys):
    bundle, pub, x = signed
    record = json.loads((bundle / "manifest.sig").read_text())
    raw = bytearray(__import__("base64").b64decode(record["signature"]))
    raw[0] ^= 1
    record["signature"] = __import__("base64").b64encode(bytes(raw)).decode()
    (bundle / "manifest.sig").write_text(json.dumps(record))
    assert run(bundle, x, "--trust", str(pub)) == 2
    assert "does not verify" in capsys.readouterr().err


def test_an_update_drops_the_signature_and_says_so(signed, capsys):
    bundle, pub, x = signed
    assert main(["profile", str(bundle), "--batch", "1", "--iters", "2", "--warmup", "0", "--quiet"]) == 0
    assert "signature was dropped" in capsys.readouterr().err
    assert not (bundle / "manifest.sig").exists()
    assert run(bundle, x, "--trust", str(pub)) == 2


def test_openssh_keys_work_too(small_spec, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "id_ed25519").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    os.chmod(tmp_path / "id_ed25519", 0o600)
    (tmp_path / "id_ed25519.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" me@host\n")
    bundle = tmp_path / "b"
    shutil.copytree(small_spec.parent / "out", bundle)
    assert main(["sign", str(bundle), "--key", str(tmp_path / "id_ed25519")]) == 0
    assert main(["inspect", str(bundle), "--trust", str(tmp_path / "id_ed25519.pub")]) == 0
    capsys.readouterr()
    assert main(["sign", str(bundle), "--key", str(tmp_path / "id_ed25519.pub")]) == 2
    assert "not an unencrypted PEM or OpenSSH private key" in capsys.readouterr().err


def test_an_empty_trust_is_refused_not_skipped(signed, small_spec, tmp_path, capsys, monkeypatch):
    """`--trust "$UNSET"` or an empty EDGEEXIT_TRUST must not run an unsigned bundle."""
    _, _, x = signed
    unsigned = tmp_path / "unsigned"
    shutil.copytree(small_spec.parent / "out", unsigned)
    assert run(unsigned, x, "--trust", "") == 2
    assert "--trust: empty" in capsys.readouterr().err
    monkeypatch.setenv("EDGEEXIT_TRUST", "")
    assert run(unsigned, x) == 2
    assert "EDGEEXIT_TRUST is set but empty" in capsys.readouterr().err
