"""The pre-flight probe a deploy runs on a device before edgeexit is there.

Its source is sent as ``python3 -c SOURCE DIR BUNDLE_BYTES INSTALL_BYTES`` (by `edgeexit
deploy` over ssh, and by the fleet playbook as the same command), so it uses the standard
library only and syntax that the oldest JetPack Python (3.6) parses: a device with an old
interpreter is told so in one line rather than failing on a syntax error. It prints one JSON
object: the interpreter's version, free disk where DIR is (or would be), whether DIR/venv
exists, and ``problem``, the one-line reason this device cannot take the bundle (or null), of
kind ``python``, ``write`` or ``disk``.
"""

import json
import os
import shutil
import sys

MIN_PYTHON = (3, 10)


def gib(n):
    """Bytes as GiB with one decimal, as the deploy lines show them."""
    return "%.1f GiB" % (n / float(1 << 30))


def probe(folder, bundle_bytes, install_bytes):
    """The facts and the verdict for deploying `bundle_bytes` into `folder` (plus the runtime
    install, `install_bytes`, when no venv is there yet)."""
    version = "%d.%d.%d" % tuple(sys.version_info[:3])
    problem = kind = None
    venv = os.path.isfile(os.path.join(folder, "venv/bin/python"))
    if tuple(sys.version_info[:2]) < MIN_PYTHON:
        problem, kind = "%s is Python %s; edgeexit needs %d.%d+" % (sys.executable, version, *MIN_PYTHON), "python"
    else:
        try:
            os.makedirs(folder, exist_ok=True)
            test = os.path.join(folder, ".edgeexit-write-test")
            open(test, "w").close()
            os.unlink(test)
        except OSError as exc:
            problem, kind = "cannot write %s: %s" % (folder, exc.strerror or exc), "write"
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "/"
    free = shutil.disk_usage(existing).free
    need = 2 * bundle_bytes + (0 if venv else install_bytes)  # the new version beside the old one
    if problem is None and free < need:
        problem, kind = "%s free at %s, %s needed" % (gib(free), folder, gib(need)), "disk"
    return {"python": version, "free_bytes": free, "need_bytes": need, "venv": venv, "problem": problem, "kind": kind}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
