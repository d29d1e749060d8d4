# PyAceMaker — every target installs what it needs first (`make install` is idempotent and fast when done).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_NUM_THREADS ?= 1
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/pyacemaker/v1/*.proto)
PROTO_STAMP := pyacemaker/v1/__init__.py

.PHONY: install install-system protos up down demo test lint format clean docs teacher images images-lean apptainer-archives test-fresh

install: install-system $(STAMP) $(PROTO_STAMP)

# Debian packages the DFT gateway and its tests use: Quantum ESPRESSO (pw.x + pseudopotentials) and a real
# single-node Slurm (slurm-wlm + munge); the container images and their tests: podman, runc, debootstrap.
# Skipped when already present.
SYSTEM_PACKAGES := quantum-espresso quantum-espresso-data slurm-wlm munge podman runc debootstrap
install-system:
	@if command -v pw.x >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null \
	  && command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "warning: install $(SYSTEM_PACKAGES) (as root) for the qe oracle, the Slurm executor and the containers"; fi

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[all,dev]"
	touch $(STAMP)

$(PROTO_STAMP): $(PROTOS) protos/build.py $(STAMP)
	$(PY) protos/build.py

protos: $(PROTO_STAMP)

up: install
	$(VENV)/bin/pyacemaker up

down:
	@if [ -x $(VENV)/bin/pyacemaker ]; then $(VENV)/bin/pyacemaker down; fi

# The SN2 demo on the embedded default (local processes): start services, run the flagship (B3LYP/def2-SVP with
# PySCF as DFT), stop them again. `run` prints where the final potential and the report are; then the wall time.
demo: install
	$(VENV)/bin/pyacemaker up
	@start=$$(date +%s); \
	$(VENV)/bin/pyacemaker run examples/sn2/config.yaml; rc=$$?; \
	$(VENV)/bin/pyacemaker down; \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"; \
	exit $$rc

# Container images (containers/, pyacemaker/deploy/images.py): a Debian base from debootstrap, then one image
# per service, from podman's layer cache when nothing changed. `images` builds every image `pyacemaker up
# --runtime podman` starts (trainer and oracle-mace carry torch); images-lean only those without torch (step 1,
# DFT oracles); apptainer-archives saves the images for containers/apptainer/*.def.
images: install
	$(PY) -m pyacemaker.deploy.images

images-lean: install
	$(PY) -m pyacemaker.deploy.images --lean

apptainer-archives: install
	$(PY) -m pyacemaker.deploy.images --save-archives

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy pyacemaker
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The bundled C/H/Cl MACE teacher: GFN2-xTB labels, a small MACE trained on CPU (~7 min on one core). Writes
# pyacemaker/teacher/bundled/sn2_teacher.model and its metrics JSON; intermediate files go to build/teacher.
teacher: install
	$(PY) -m pyacemaker.teacher.build --work-dir build/teacher

docs: install
	$(PY) docs/make_config_reference.py

# Two pytest workers: most of the suite waits on subprocesses (services, DFT codes, MACE jobs) that run one thread
# each (OMP_NUM_THREADS=1), so a second worker uses the second core instead of oversubscribing. --dist loadfile keeps
# each test file on one worker, so a file's module fixtures (a Slurm cluster, container images) are built once.
TEST_WORKERS ?= 2
test: install lint
	$(PY) docs/make_config_reference.py --check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) pyacemaker/v1 .pytest_cache .ruff_cache .mypy_cache

# `make test` in a clean clone of HEAD with a new venv, empty podman storage and empty home/caches (.ci/test-fresh):
# what a fresh machine sees, whatever this one has accumulated.
test-fresh:
	bash .ci/test-fresh
