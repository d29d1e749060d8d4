"""Container images of the services, built with podman from a local base image (no registry needed).

Layers, each cached by podman so a second build only redoes what changed:

1. `pyacemaker-rootfs:bookworm` — a Debian bookworm rootfs made by `debootstrap --variant=minbase` with
   Debian's Python 3.11, imported with `podman import` (no registry is reachable, so nothing is pulled).
2. `pyacemaker-base` (containers/Containerfile.base) — a venv with the core dependencies, a non-root user,
   the health probe and the entrypoint.
3. one image per service (containers/Containerfile), each installing only its extras from pyproject.toml:
   the sampler and the orchestrator get no torch; `oracle` serves lj, xtb and pyscf; `oracle-qe` adds
   Quantum ESPRESSO from Debian; `oracle-mace` (mace and ace backends besides lj/xtb/pyscf; the oracle image
   `up` starts by default) and `trainer` carry torch.

Python packages come from a wheelhouse built on the host with the host's own pip configuration (so the
pinned CPU torch wheel lying on disk is used, not a multi-GB CUDA build) and mounted read-only into the build
(`podman build --volume`), so the images hold no wheel files and the build needs no index.

`python -m pyacemaker.deploy.images [NAME ...]` builds the named images (default: all of them; `--lean`: the
ones without torch) and prints the build times and image sizes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pyacemaker.deploy.podman import ULIMITS, PodmanError, image_exists, image_size, image_tag, podman

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_DIR = REPO_ROOT / "containers"
BUILD_DIR = REPO_ROOT / "build" / "containers"
ROOTFS_IMAGE = "localhost/pyacemaker-rootfs:bookworm"
BASE_IMAGE = "localhost/pyacemaker-base:latest"
# Debian's python3 is 3.11 in bookworm, which pyproject.toml requires; libgomp1 is the OpenMP runtime the
# pyscf and tblite wheels link against.
ROOTFS_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libgomp1")
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class ImageSpec:
    name: str
    service: str
    extras: tuple[str, ...]
    apt_packages: tuple[str, ...] = ()
    needs_torch: bool = False

    @property
    def tag(self) -> str:
        return image_tag(self.name)


IMAGES = {
    spec.name: spec
    for spec in (
        ImageSpec("orchestrator", "orchestrator", ("orchestrator",)),
        ImageSpec("sampler", "sampler", ("sampler",)),
        ImageSpec("oracle", "oracle", ("oracle",)),
        ImageSpec("oracle-qe", "oracle", ("oracle",), apt_packages=("quantum-espresso", "quantum-espresso-data")),
        # mace serves the teacher; python-ace (the `ace` backend, validation) comes only with the trainer extra.
        ImageSpec("oracle-mace", "oracle", ("oracle", "mace", "trainer"), needs_torch=True),
        ImageSpec("trainer", "trainer", ("trainer",), needs_torch=True),
    )
}
# `make images` builds every image, so `pyacemaker up --runtime podman` finds all it starts by default;
# `make images-lean` only those without torch (each torch image adds ~1.5 GB): enough for step 1 and a DFT oracle.
DEFAULT_IMAGES = tuple(IMAGES)
LEAN_IMAGES = tuple(name for name, spec in IMAGES.items() if not spec.needs_torch)


def requirements(extras: tuple[str, ...], pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The pinned requirements of the core plus `extras`, read from pyproject.toml (self-references like
    `pyacemaker[sampler]` expanded), in a stable order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    found: dict[str, None] = dict.fromkeys(project["dependencies"])
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no optional dependency group {extra!r}")
        for requirement in optional[extra]:
            nested = re.fullmatch(rf"{project['name']}\[(.+)\]", requirement)
            if nested:
                pending += [name.strip() for name in nested.group(1).split(",")]
            else:
                found[requirement] = None
    return list(found)


def _run(command: list[str], what: str, **kwargs: object) -> None:
    print(f"+ {' '.join(command)}", flush=True)
    result = subprocess.run(command, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise PodmanError(f"{what} failed (exit {result.returncode}): {' '.join(command)}")


def build_rootfs_image(rebuild: bool = False) -> None:
    """The Debian base as an image, from a debootstrap rootfs (apt caches, docs and man pages dropped)."""
    if image_exists(ROOTFS_IMAGE) and not rebuild:
        return
    if shutil.which("debootstrap") is None:
        raise PodmanError("debootstrap is missing: install it (apt-get install debootstrap) to build the base image")
    rootfs = BUILD_DIR / "rootfs"
    if rootfs.exists():
        _check_nothing_mounted_under(rootfs)
        shutil.rmtree(rootfs)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            "bookworm",
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        "debootstrap",
        stdout=subprocess.DEVNULL,
    )
    _check_nothing_mounted_under(rootfs)  # debootstrap mounts /proc inside while it works; never delete through it
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info"):
        shutil.rmtree(rootfs / junk, ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(podman("import", "-", ROOTFS_IMAGE), stdin=tar.stdout, check=False)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    if imported.returncode != 0 or tar.returncode != 0:
        raise PodmanError(f"importing the debootstrap rootfs as {ROOTFS_IMAGE} failed")


def _check_nothing_mounted_under(directory: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    inside = [m for m in mounts if Path(m).is_relative_to(directory.resolve())]
    if inside:
        raise PodmanError(f"{', '.join(inside)} still mounted; unmount before building the base image again")


def build_wheelhouse(specs: list[ImageSpec]) -> Path:
    """Wheels for every requirement of `specs`, built with the host's pip (its indexes and local wheels)."""
    wheels = BUILD_DIR / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    needed = {req: None for spec in specs for req in requirements(spec.extras)}
    listing = BUILD_DIR / "requirements-all.txt"
    wanted = "\n".join(sorted(needed)) + "\n"
    # The wheelhouse records what it was filled for: the same pins again need no pip run (no index queries).
    done = wheels / "requirements.done"
    if done.is_file() and set(done.read_text().split()) >= set(wanted.split()):
        return wheels
    listing.write_text(wanted)
    # --find-links on the wheelhouse itself: a second build resolves from it without downloading again.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--wheel-dir",
            str(wheels),
            "--find-links",
            str(wheels),
            "-r",
            str(listing),
        ],
        "building the wheelhouse",
    )
    previous = set(done.read_text().split()) if done.is_file() else set()
    done.write_text("\n".join(sorted(previous | set(wanted.split()))) + "\n")
    return wheels


def _stage_context(context: Path) -> None:
    """The build context: the sources the services import, the requirement lists, the container scripts.
    podman's layer cache keys on content, so a fresh directory per build still reuses every unchanged layer."""
    (context / "requirements").mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pyacemaker",):
        shutil.copytree(REPO_ROOT / package, context / "src" / package, ignore=ignore)
    (context / "requirements" / "core.txt").write_text("\n".join(requirements(())) + "\n")
    for spec in IMAGES.values():
        (context / "requirements" / f"{spec.name}.txt").write_text("\n".join(requirements(spec.extras)) + "\n")
    for script in ("entrypoint.sh", "healthcheck.py"):
        shutil.copy2(CONTAINERS_DIR / script, context / script)


def _podman_build(containerfile: Path, tag: str, context: Path, wheels: Path, args: dict[str, str]) -> None:
    # --format docker: the OCI format has no HEALTHCHECK.
    command = podman("build", "--format", "docker", "--layers", "--file", str(containerfile), "--tag", tag, *ULIMITS)
    command += ["--volume", f"{wheels}:/wheels:ro"]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    _run([*command, str(context)], f"building {tag}")


def build_images(names: list[str]) -> dict[str, float]:
    """Build the base layers and the named images; returns seconds per stage."""
    unknown = [name for name in names if name not in IMAGES]
    if unknown:
        raise KeyError(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(IMAGES)}")
    specs = [IMAGES[name] for name in names]
    timings: dict[str, float] = {}
    start = time.monotonic()
    build_rootfs_image()
    timings["rootfs"] = time.monotonic() - start
    start = time.monotonic()
    wheels = build_wheelhouse(specs)
    timings["wheelhouse"] = time.monotonic() - start
    # One context per build, so builds running at once (a test and `make images`) do not restage each other's.
    with tempfile.TemporaryDirectory(prefix="context-", dir=BUILD_DIR) as staging:
        context = Path(staging)
        _stage_context(context)
        start = time.monotonic()
        _podman_build(CONTAINERS_DIR / "Containerfile.base", BASE_IMAGE, context, wheels, {"ROOTFS": ROOTFS_IMAGE})
        timings["base"] = time.monotonic() - start
        for spec in specs:
            start = time.monotonic()
            apt = " ".join(spec.apt_packages)
            args = {"BASE": BASE_IMAGE, "IMAGE": spec.name, "SERVICE": spec.service, "APT": apt}
            _podman_build(CONTAINERS_DIR / "Containerfile", spec.tag, context, wheels, args)
            timings[spec.name] = time.monotonic() - start
    return timings


def save_archives(names: list[str]) -> list[Path]:
    """`podman save` each image as the docker-archive the Apptainer definitions bootstrap from
    (containers/apptainer/NAME.def: `From: build/containers/archives/pyacemaker-NAME.tar`)."""
    archives = BUILD_DIR / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    saved = []
    for name in names:
        target = archive_path(name)
        target.unlink(missing_ok=True)
        _run(podman("save", "--format", "docker-archive", "--output", str(target), image_tag(name)), f"saving {name}")
        saved.append(target)
    return saved


def archive_path(name: str) -> Path:
    return BUILD_DIR / "archives" / f"pyacemaker-{name}.tar"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyacemaker.deploy.images", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"images to build (default: {' '.join(DEFAULT_IMAGES)})")
    parser.add_argument("--lean", action="store_true", help=f"only the images without torch ({' '.join(LEAN_IMAGES)})")
    parser.add_argument(
        "--save-archives", action="store_true", help="then `podman save` them for the Apptainer definitions"
    )
    args = parser.parse_args(argv)
    if args.lean and args.names:
        parser.error("give image names or --lean, not both")
    names = list(LEAN_IMAGES) if args.lean else (args.names or list(DEFAULT_IMAGES))
    total = time.monotonic()
    try:
        timings = build_images(names)
    except (PodmanError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built in {time.monotonic() - total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    for name in ("base", *names):
        tag = BASE_IMAGE if name == "base" else image_tag(name)
        print(f"{tag:45s} {image_size(tag) / 1e6:8.0f} MB")
    if args.save_archives:
        for archive in save_archives(names):
            print(f"saved {archive} ({archive.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
