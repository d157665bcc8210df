"""`edgeexit container BUNDLE`: a docker build context that runs the bundle on a Jetson.

Fleets of Jetsons often ship software as containers on NVIDIA's L4T images. The context holds:

- ``Dockerfile``: FROM the ``l4t-jetpack`` image for the JetPack of the bundle's target device
  profile (``--base`` replaces it), the torch-free edgeexit wheel in a venv that sees the image's
  TensorRT (``--system-site-packages``), and the bundle, which travels as edgeexit's archive and
  is unpacked by ``edgeexit unpack`` inside the image (every member checked; ``ADD`` would
  extract a tar without checks);
- ``entrypoint.sh``: at every start, the engines are built for the module the container runs on,
  or copied from the engine cache volume when this module, L4T and TensorRT built them before,
  then the command runs;
- ``compose.yaml``: one service with ``runtime: nvidia``, the cache as a named volume, and the
  host's board files (Docker hides the device tree from containers) for ``--device auto``;
- ``.dockerignore`` and a short ``README.md``.

The context appears in one rename. An existing folder is replaced only when it is empty or an
untouched context edgeexit wrote (``.edgeexit-container`` lists every file with its sha256): a file
the user added or edited there is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeexit.atomic import discard_staging, install, locked, make_staging, refuse_under_file
from edgeexit.bundle import Bundle, load_bundle, sha256
from edgeexit.doctor import JETPACK, MIN_PYTHON
from edgeexit.errors import EdgeExitError
from edgeexit.flash import ENGINE_CACHE, edgeexit_wheel

MARKER = ".edgeexit-container"
APP = "/opt/edgeexit"  # where the image holds the venv and the bundle
BOARD = "/run/edgeexit/board"  # EDGEEXIT_BOARD_ROOT inside the container: the host's board files
# The l4t-jetpack images NVIDIA publishes on NGC, by the L4T releases whose hosts run them (as
# jetson-containers decides: an r36.4 image on any 36.4.x host, r36.3 on 36.3, r35.4.1 on any
# 35.x), with the Python of the image's Ubuntu.
IMAGES = (((36, 4), "nvcr.io/nvidia/l4t-jetpack:r36.4.0", (3, 10)),
          ((36, 3), "nvcr.io/nvidia/l4t-jetpack:r36.3.0", (3, 10)),
          ((35,), "nvcr.io/nvidia/l4t-jetpack:r35.4.1", (3, 8)))
_IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


@dataclass(frozen=True)
class BaseImage:
    """The image a context builds FROM, the L4T release it was chosen for (None: --base) and its Python."""

    image: str
    l4t: str | None
    python: tuple[int, int] | None


def l4t_image(device: str) -> BaseImage:
    """The l4t-jetpack image for the JetPack of the device profile `device`; refused in one line
    (suggesting --base) for a host profile, a JetPack edgeexit does not know, or one without an
    image."""
    from edgeexit.devices import load_device

    profile = load_device(device)
    if profile.kind != "jetson":
        raise EdgeExitError(f"container: the bundle targets {device} (kind {profile.kind}), which has no L4T image; "
                            f"pass --base IMAGE (e.g. {IMAGES[0][1]}) or build the bundle for a Jetson")
    l4t = {jetpack: release for release, jetpack in JETPACK.items()}.get(profile.jetpack.version or "")
    if l4t is None:
        raise EdgeExitError(f"container: {device} names JetPack {profile.jetpack.version}, which edgeexit cannot map "
                            "to an L4T release; pass --base IMAGE")
    release = tuple(int(part) for part in l4t.split("."))
    for prefix, image, python in IMAGES:
        if release[:len(prefix)] == prefix:
            return BaseImage(image, l4t, python)
    raise EdgeExitError(f"container: NVIDIA publishes no l4t-jetpack image for L4T {l4t} (JetPack "
                        f"{profile.jetpack.version} on {device}); pass --base IMAGE")


def check_context(out: Path) -> None:
    """Refuse an output folder that is not absent, empty, or an untouched context edgeexit wrote."""
    refuse_under_file(out, "container")
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise EdgeExitError(f"container: {out} exists and is not a folder; choose another -o")
    present = [p for p in sorted(out.rglob("*")) if p.is_symlink() or not p.is_dir()]
    if not present:
        return
    try:
        listed = json.loads((out / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeExitError(f"container: {out} is not empty and not a build context edgeexit wrote (no {MARKER}); "
                            "choose another -o or empty it yourself") from None
    for path in present:
        rel = path.relative_to(out).as_posix()
        if rel != MARKER and (path.is_symlink() or not path.is_file() or listed.get(rel) != sha256(path)):
            raise EdgeExitError(f"container: {path} was added or changed after edgeexit wrote {out}; edgeexit "
                                "replaces only its own files: choose another -o or move it away")


def image_name(bundle: str) -> str:
    """A docker image name (lowercase, no odd characters) for the bundle."""
    return re.sub(r"[^a-z0-9]+", "-", bundle.lower()).strip("-") or "bundle"


def dockerfile(bundle: Bundle, base: BaseImage, wheel: str) -> str:
    name = bundle.name
    chosen = (f"the l4t-jetpack image for L4T {base.l4t} (JetPack of {bundle.manifest['target']['device']})"
              if base.l4t else "given with --base")
    return f"""# syntax=docker/dockerfile:1
# Written by `edgeexit container` for the bundle {name}; base image: {chosen}.
# On the Jetson: docker compose up --build. On an x86 host:
#   docker buildx build --platform linux/arm64 -t {image_name(name)} .
FROM {base.image}

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \\
    PATH={APP}/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv python3-pip \\
    && rm -rf /var/lib/apt/lists/*
# --system-site-packages: the image's own TensorRT bindings stay importable in the venv
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \\
    python3 -m venv --system-site-packages {APP}/venv \\
    && {APP}/venv/bin/python -m pip install --no-cache-dir /tmp/wheels/{wheel}
# edgeexit unpacks and verifies its own archive (ADD would extract a tar without any check)
RUN --mount=type=bind,source={name}.tar,target=/tmp/{name}.tar \\
    edgeexit unpack /tmp/{name}.tar {APP}/{name}
COPY --chmod=0755 entrypoint.sh /usr/local/bin/edgeexit-entrypoint
VOLUME {ENGINE_CACHE}
ENTRYPOINT ["/usr/local/bin/edgeexit-entrypoint"]
# The default command verifies the bundle and lists the engine set the entrypoint just built: a check
# that works for every bundle (profiling needs test data, which the image does not carry; see
# README.md). Put your application in the compose service's `command:` instead.
CMD ["edgeexit", "inspect", "{APP}/{name}"]
"""


def entrypoint(bundle: str) -> str:
    return f"""#!/bin/sh
# Written by `edgeexit container`: build the TensorRT engines of {bundle} for the module this runs on
# (plans this module, L4T and TensorRT built before come from the cache volume), then run the command.
# EDGEEXIT_DEVICE names the device profile where the board files are not mounted (see compose.yaml).
set -eu
edgeexit engines {APP}/{bundle} --device "${{EDGEEXIT_DEVICE:-auto}}" --cache {ENGINE_CACHE} --quiet
exec "$@"
"""


def compose(bundle: str) -> str:
    service = image_name(bundle)
    return f"""# Written by `edgeexit container` for the bundle {bundle}: `docker compose up --build` on the Jetson.
services:
  {service}:
    build: .
    image: {service}:edgeexit
    # the NVIDIA Container Runtime gives the container the GPU and JetPack's driver libraries
    runtime: nvidia
    environment:
      EDGEEXIT_BOARD_ROOT: {BOARD}
    volumes:
      # plans built on this module survive the container: the next start copies them
      - engines:{ENGINE_CACHE}
      # `--device auto` and the engine cache read the host's module and L4T release; Docker hides
      # the device tree (/sys/firmware) from containers, so these files are mounted
      - /etc/nv_tegra_release:{BOARD}/etc/nv_tegra_release:ro
      - /proc/device-tree/model:{BOARD}/proc/device-tree/model:ro
      - /proc/meminfo:{BOARD}/proc/meminfo:ro
volumes:
  engines: {{}}
"""


def dockerignore(bundle: str) -> str:
    return f"""# Written by `edgeexit container`: the build reads only these, nothing else here is sent
*
!entrypoint.sh
!{bundle}.tar
!wheels
"""


def readme(bundle: str, base: BaseImage) -> str:
    image = image_name(bundle)
    return f"""# {bundle} in a container

Written by `edgeexit container` (base image `{base.image}`). At every start the entrypoint builds the
bundle's TensorRT engines for the module it runs on, reusing plans from the `engines` volume, then
runs the command: by default `edgeexit inspect`, which verifies the bundle and lists the engines.
Set `command:` in `compose.yaml` to run your application, or to time the bundle on this module with
test data you mount (an .npz with `x` and `y`):

    docker compose run --rm -v $PWD/test.npz:/data/test.npz:ro {image} \
        edgeexit profile {APP}/{bundle} --backend tensorrt --data /data/test.npz --no-power

On the Jetson (Docker with the NVIDIA Container Runtime, as JetPack installs it):

    docker compose up --build

On an x86 host, build the arm64 image (QEMU emulation: `docker run --privileged --rm
tonistiigi/binfmt --install arm64` once) and move it to the device:

    docker buildx build --platform linux/arm64 -t {image} --load .
    docker save {image} | ssh jetson docker load

With plain `docker run`, give what compose.yaml gives:

    docker run --runtime nvidia -v {image}-engines:{ENGINE_CACHE} -e EDGEEXIT_DEVICE=jetson-orin-nano-8gb {image}

(`EDGEEXIT_DEVICE` names the device profile, see `edgeexit devices`, where the board files are not mounted.)
Running `edgeexit container` again replaces this folder only while it is as edgeexit wrote it.
"""


def write_context(bundle_path: str | Path, base: str | None = None, out: str | Path | None = None,
                  wheel: str | Path | None = None, say: Callable[[str], None] = print) -> Path:
    """Write the build context of the bundle at `bundle_path` into `out` (default
    ``NAME-container`` here) in one rename; returns the folder. `base` replaces the L4T image,
    `wheel` the edgeexit wheel built from this checkout. Refusals come before any write."""
    from edgeexit.archive import pack

    bundle = load_bundle(bundle_path)
    if base is not None:
        if not _IMAGE_REF.match(base):
            raise EdgeExitError(f"--base: {base!r} is not an image reference (e.g. {IMAGES[0][1]})")
        chosen = BaseImage(base, None, None)
    else:
        chosen = l4t_image(bundle.manifest["target"]["device"])
        if chosen.python < MIN_PYTHON:
            raise EdgeExitError(f"container: {chosen.image} (L4T {chosen.l4t}, the bundle's target "
                                f"{bundle.manifest['target']['device']}) has Python {chosen.python[0]}."
                                f"{chosen.python[1]} and TensorRT bindings for it; edgeexit needs 3.10+ (JetPack 6): "
                                "pass --base IMAGE with Python 3.10+ and TensorRT for it")
    name = bundle.name
    dest = Path(os.path.abspath(out if out is not None else f"{name}-container"))
    check_context(dest)
    with tempfile.TemporaryDirectory(prefix="edgeexit-container-") as tmp:
        ours = edgeexit_wheel(Path(tmp), wheel)
        part = make_staging(dest)
        try:
            pack(bundle.path, part / f"{name}.tar")  # engines stay out: they are built on the module
            (part / "wheels").mkdir()
            shutil.copyfile(ours, part / "wheels" / ours.name)
            texts = {"Dockerfile": dockerfile(bundle, chosen, ours.name), "entrypoint.sh": entrypoint(name),
                     "compose.yaml": compose(name), ".dockerignore": dockerignore(name),
                     "README.md": readme(name, chosen)}
            for rel, text in texts.items():
                (part / rel).write_text(text)
            os.chmod(part / "entrypoint.sh", 0o755)
            files = {p.relative_to(part).as_posix(): sha256(p) for p in sorted(part.rglob("*")) if p.is_file()}
            (part / MARKER).write_text(json.dumps({"written_by": "edgeexit container", "files": files},
                                                  indent=2) + "\n")
            with locked(dest):
                check_context(dest)  # again: it may have changed meanwhile
                install(part, dest)
        finally:
            discard_staging(part)
    for rel in files:
        say(f"wrote: {dest / rel}" + (f" (FROM {chosen.image})" if rel == "Dockerfile" else ""))
    say(f"next: on the Jetson, cd {dest} && docker compose up --build "
        "(x86: docker buildx build --platform linux/arm64, see README.md)")
    return dest
