"""Container figures: build times (cold, cached, after a source change), image sizes, and a quick run across
containers (`pyacemaker up --runtime podman`, step 1, `down`), on this machine with real podman.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/containers.py [--cold] [--images NAME ...]

--cold removes the images (and the wheelhouse) first, so the first build starts from debootstrap: that is what
a fresh CI machine pays once. Without it the first build is whatever the cache allows. A source change is
simulated by a marker file under pyacemaker/services/ (removed afterwards, and the images rebuilt without it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.deploy import images, podman  # noqa: E402  (the repo root is on sys.path above)

SOURCE_MARKER = REPO_ROOT / "pyacemaker" / "services" / "_benchmark_source_change.py"


def _timed_build(names: list[str]) -> float:
    start = time.monotonic()
    images.build_images(names)
    return time.monotonic() - start


def _cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pyacemaker.cli.main", *args],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"pyacemaker {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return time.monotonic() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cold", action="store_true", help="remove the images and the wheelhouse first")
    parser.add_argument("--images", nargs="*", default=list(images.LEAN_IMAGES))
    args = parser.parse_args()
    if not podman.podman_available():
        print("podman and runc are needed: apt-get install podman runc debootstrap")
        return 1

    if args.cold:
        tags = [images.image_tag(n) for n in args.images] + [images.BASE_IMAGE, images.ROOTFS_IMAGE]
        subprocess.run(podman.podman("rmi", "--force", "--ignore", *tags), capture_output=True, check=False)
        subprocess.run(podman.podman("image", "prune", "--force"), capture_output=True, check=False)
        shutil.rmtree(images.BUILD_DIR / "wheels", ignore_errors=True)
    first = _timed_build(args.images)
    cached = _timed_build(args.images)
    SOURCE_MARKER.write_text(f"# benchmark marker {time.time()}\n")
    try:
        changed = _timed_build(args.images)
    finally:
        SOURCE_MARKER.unlink(missing_ok=True)
    _timed_build(args.images)  # back to the images of the real sources

    print(f"{'first build' + (' (cold)' if args.cold else ''):34s} {first:7.0f} s")
    print(f"{'cached rebuild (no change)':34s} {cached:7.0f} s")
    print(f"{'rebuild after a source change':34s} {changed:7.0f} s")
    for name in ("rootfs", "base", *args.images):
        tag = {"rootfs": images.ROOTFS_IMAGE, "base": images.BASE_IMAGE}.get(name) or images.image_tag(name)
        print(f"  {tag:44s} {podman.image_size(tag) / 1e6:7.0f} MB")

    with tempfile.TemporaryDirectory(prefix="pyacemaker-bench-") as scratch:
        work = Path(scratch)
        env = {"PYACEMAKER_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
        seed = work / "reactant_complex.xyz"
        shutil.copyfile(REPO_ROOT / "examples" / "sn2" / "seeds" / seed.name, seed)
        config = work / "config.yaml"
        config.write_text(
            f"name: bench\nrun_dir: {work / 'run'}\nsystem: {{seeds: [{seed}], charge: -1, spin_multiplicity: 1}}\n"
            "oracle: {backend: xtb}\nteacher: {model: bundled}\nbudget: {max_dft_calls: 10}\n"
            "sampling:\n  pool: {rattle_amplitudes: [0.05, 0.1], rattles_per_amplitude: 20, interpolation_images: 0,"
            " fragment_rotations_per_seed: 0, random_seed: 0}\n  direct: {featuriser: distribution, n_select: 8}\n"
            "stop_after: direct_sampling\n"
        )
        services = "orchestrator,sampler,oracle"
        up_s, _ = _cli("up", "--runtime", "podman", "--ports", "auto", "--services", services, env=env, cwd=work)
        try:
            run_s, _ = _cli("run", str(config), env=env, cwd=work)
            swap = ("up", "--runtime", "podman", "--services", "oracle", "--image")
            swap_s, _ = _cli(*swap, f"oracle={images.image_tag('oracle-qe')}", env=env, cwd=work)
        finally:
            down_s, _ = _cli("down", env=env, cwd=work)
    print(f"{'up (orchestrator, sampler, oracle)':34s} {up_s:7.1f} s")
    print(f"{'step 1 run across containers':34s} {run_s:7.1f} s")
    print(f"{'swap the oracle container (qe)':34s} {swap_s:7.1f} s")
    print(f"{'down':34s} {down_s:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
