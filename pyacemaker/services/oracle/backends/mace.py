"""MACE models as an oracle: one model or a committee, evaluated in batches through mace's own graph code.

Labels are the committee mean of energy, forces and (periodic cells) stress; the uncertainty is the committee
spread with the population definition MACECalculator uses for `energy_var` / `forces_var` (variance over the
K models with divisor K): energy_std = √var(E), force_std of atom i = √(Σ_xyz var(F_i)), max_force_std its
largest entry. With one model they are zero. Structures go through `mace.data.AtomicData.from_config` and are
collated into one graph batch per `batch_size` structures (what mace's data loader does), so a batch costs one
forward and one backward pass per model instead of one ASE call per structure.

Descriptors (the Describe RPC, for DIRECT): the invariant part of the first model's node features of every
interaction layer (as MACECalculator.get_descriptors extracts them), averaged over the atoms of each element,
concatenated in the model's element order; an element the structure lacks contributes zeros. So every
structure gets a vector of the same length, invariant to rotation, translation and permutation of like atoms.

Security: a MACE model file is a whole pickled torch module (mace-torch 0.3.16 saves `torch.save(model)`, not a
state dict), so torch's weights-only unpickler refuses it: the bundled teacher names 31 classes and functions
beyond tensors, among them torch.fx's reduce_graph_module, which rebuilds a module by executing Python source
stored in the file, so allow-listing them would not make loading safe either. The oracle service therefore loads
only files that reach it as artifact references into the shared store (confined to the store root, digest
verified) or the bundled teacher: pyacemaker/services/oracle/deployment.py resolves the `models` option before this
backend
sees it, and refuses paths, names and anything outside the store. Whoever can write into the store can still make
the oracle unpickle a file: the store must be writable only by the services.

Threads: torch uses OMP_NUM_THREADS threads when it is set (mace work gains little from more than one core
here, and loses much when cores are shared). The `threads` option evaluates that many committee members at the
same time instead, each in a thread of its own, which does use a second core (see MaceCommittee).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from pyacemaker.config import MaceOracleConfig
from pyacemaker.labels import Labels, LabelStatus, Uncertainty
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.oracle.backends.base import OracleBackend
from pyacemaker.structure_checks import StructureLimits, element_names
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, bounded_batches
from pyacemaker.teacher.resolve import TeacherNotFoundError, resolve_teacher
from pyacemaker.torch_device import resolve_device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Loaded models kept in memory, keyed by file digest, dtype and device (several backends with other batch
# sizes share them).
MODEL_CACHE_SIZE = 8
# Atoms in one graph batch at most (past its first structure), besides the `batch_size` structures: a batch's
# memory grows with its atoms and edges. Measured: step 5 on 216-atom Si cells in batches of 64 structures
# (13 800 atoms) peaked at 3.1 GB in the oracle; 64 six-atom SN2 frames are 384 atoms, untouched by the bound.
MAX_BATCH_ATOMS = 4096
# How the atoms' info reaches models that read total charge / spin (standard MACE ignores both). mace's
# MACECalculator maps total_charge to info["charge"] too.
_INFO_KEYS = {"total_charge": CHARGE_KEY, "total_spin": SPIN_KEY}
# torch's default dtype is process-global; graphs are built in float64 under this lock, then cast per model.
_DEFAULT_DTYPE_LOCK = threading.Lock()


@functools.cache
def _missing_packages() -> str | None:
    """Checked without importing: importing mace costs seconds and ~450 MB, which GetInfo should not pay."""
    missing = [name for name in ("torch", "mace") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed; install pyacemaker[mace]"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_torch_threads() -> None:
    """torch's intra-op threads from OMP_NUM_THREADS (torch reads it only at start-up, and not always)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


@functools.lru_cache(maxsize=MODEL_CACHE_SIZE)
def load_model(path: str, sha256: str, dtype: str, device: str) -> torch.nn.Module:
    """A MACE model from `path` (whose digest is `sha256`; part of the cache key so a replaced file is
    reloaded), in `dtype` on `device`, with gradients of its parameters off."""
    import torch

    model = torch.load(path, map_location=device, weights_only=False)  # a pickle: see the module docstring
    model = model.double() if dtype == "float64" else model.float()
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model


@dataclass
class CommitteeOutput:
    """Raw outputs of every model for one structure: energies (K,), forces (K, n, 3), stress (K, 3, 3) or None."""

    energies: np.ndarray
    forces: np.ndarray
    stress: np.ndarray | None


class MaceCommittee:
    """K MACE models that share elements, cutoff and head, evaluated together on graph batches; `threads` > 1
    evaluates that many members at the same time (torch runs a model's operations without the GIL: measured on
    39 SN2 replicas, a committee of 3 on 2 threads took 42 instead of 64 ms per batch, what the split 2 + 1
    allows)."""

    def __init__(self, models: Sequence[torch.nn.Module], device: str, dtype: str, threads: int = 1) -> None:
        if not models:
            raise InvalidInputError("a MACE committee needs at least one model")
        # Any: mace's model attributes (atomic_numbers, r_max, products, ...) are not visible to a type checker.
        self.models: list[Any] = list(models)
        self.device = device
        self.dtype = dtype
        first = self.models[0]
        self.atomic_numbers = [int(z) for z in first.atomic_numbers]
        self.r_max = float(first.r_max)
        self.heads: list[str] = list(getattr(first, "heads", ["Default"]))
        for index, model in enumerate(self.models[1:], start=1):
            if [int(z) for z in model.atomic_numbers] != self.atomic_numbers or float(model.r_max) != self.r_max:
                raise InvalidInputError(
                    f"committee model {index} has elements {element_names(model.atomic_numbers)} and r_max "
                    f"{float(model.r_max)}, model 0 has {element_names(self.atomic_numbers)} and {self.r_max}; "
                    "committee members must share both"
                )
        self.head = _default_head(self.heads)
        # Members may order their heads differently (a multi-head fine-tune adds one), so each model gets the
        # index of its own default head in the batch.
        self.head_indices = [
            list(m.heads).index(_default_head(list(m.heads))) if hasattr(m, "heads") else 0 for m in self.models
        ]
        workers = min(max(1, threads), len(self.models))
        self._members = ThreadPoolExecutor(workers, thread_name_prefix="mace-member") if workers > 1 else None

    # -- graphs -------------------------------------------------------------------------------------------------

    def unsupported_elements(self, atoms: Atoms) -> list[int]:
        return sorted(set(int(z) for z in atoms.numbers) - set(self.atomic_numbers))

    def graph_inputs(self, frames: Sequence[Atoms]) -> dict[str, Any]:
        """The frames' graphs collated into one batch (mace's data loader collation), as the models' input
        dict with floating tensors in the committee's dtype on its device."""
        import torch
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools
        from mace.tools.utils import AtomicNumberTable

        z_table = AtomicNumberTable(self.atomic_numbers)
        keyspec = mace_data.KeySpecification(info_keys=dict(_INFO_KEYS), arrays_keys={})
        with _DEFAULT_DTYPE_LOCK, torch_tools.default_dtype("float64"):
            graphs = [
                mace_data.AtomicData.from_config(
                    mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name=self.head),
                    z_table=z_table,
                    cutoff=self.r_max,
                    heads=self.heads,
                )
                for atoms in frames
            ]
        inputs: dict[str, Any] = torch_geometric.Batch.from_data_list(graphs).to_dict()
        target = torch.float64 if self.dtype == "float64" else torch.float32
        for key, value in inputs.items():
            if torch.is_tensor(value):
                if torch.is_floating_point(value) and value.dtype != target:
                    value = value.to(dtype=target)
                inputs[key] = value.to(self.device) if self.device != "cpu" else value
        return inputs

    @staticmethod
    def _inputs(base: dict[str, Any], head_index: int) -> dict[str, Any]:
        """One model's input dict: a shallow copy, since a model replaces entries (positions and shifts when it
        computes stress) but changes no tensor in place; with the model's own default head."""
        inputs = dict(base)
        inputs["head"] = base["head"].new_full(base["head"].shape, head_index)
        return inputs

    # -- labels -------------------------------------------------------------------------------------------------

    def evaluate(self, frames: Sequence[Atoms]) -> list[CommitteeOutput]:
        """Every model's energy, forces and (for periodic frames) stress, frame by frame."""
        base = self.graph_inputs(frames)
        compute_stress = any(atoms.pbc.any() for atoms in frames)

        def member(index: int) -> dict[str, np.ndarray]:
            model, head_index = self.models[index], self.head_indices[index]
            out = model(self._inputs(base, head_index), compute_stress=compute_stress, training=False)
            keys = ("energy", "forces", "stress") if compute_stress else ("energy", "forces")
            return {key: out[key].detach().cpu().numpy().astype(np.float64) for key in keys}

        members = range(len(self.models))
        results = list(self._members.map(member, members) if self._members else map(member, members))
        energies = [result["energy"] for result in results]
        forces = [result["forces"] for result in results]
        stresses = [result["stress"] for result in results] if compute_stress else []
        energy_k = np.stack(energies)  # (K, n_graphs)
        force_k = np.stack(forces)  # (K, n_nodes, 3)
        stress_k = np.stack(stresses) if compute_stress else None  # (K, n_graphs, 3, 3)
        ptr = base["ptr"].cpu().numpy()
        outputs = []
        for g, atoms in enumerate(frames):
            outputs.append(
                CommitteeOutput(
                    energies=energy_k[:, g],
                    forces=force_k[:, ptr[g] : ptr[g + 1]],
                    stress=stress_k[:, g] if stress_k is not None and atoms.pbc.any() else None,
                )
            )
        return outputs

    # -- descriptors --------------------------------------------------------------------------------------------

    def descriptor_length(self) -> int:
        return len(self.atomic_numbers) * self._invariant_layout()[2]

    def _invariant_layout(self) -> tuple[int, int, int]:
        """(number of layers, invariant features per layer, total invariant features per atom), as
        MACECalculator.get_descriptors reads them off the first model."""
        from e3nn import o3

        model = self.models[0]
        irreps_out = o3.Irreps(str(model.products[0].linear.irreps_out))
        num_features = irreps_out.dim // (irreps_out.lmax + 1) ** 2
        num_layers = int(model.num_interactions)
        return num_layers, num_features, num_layers * num_features

    def describe(self, frames: Sequence[Atoms]) -> np.ndarray:
        """Per-element means of the first model's invariant node features; (n_frames, descriptor_length)."""
        from e3nn import o3
        from mace.modules.utils import extract_invariant

        base = self.graph_inputs(frames)
        model = self.models[0]
        out = model(self._inputs(base, self.head_indices[0]), compute_force=False, training=False)
        num_layers, num_features, per_atom = self._invariant_layout()
        l_max = o3.Irreps(str(model.products[0].linear.irreps_out)).lmax
        invariant = extract_invariant(out["node_feats"], num_layers=num_layers, num_features=num_features, l_max=l_max)
        node_values = invariant[:, :per_atom].detach().cpu().numpy().astype(np.float64)
        ptr = base["ptr"].cpu().numpy()
        result = np.zeros((len(frames), len(self.atomic_numbers), per_atom))
        for g, atoms in enumerate(frames):
            values = node_values[ptr[g] : ptr[g + 1]]
            for e, z in enumerate(self.atomic_numbers):
                mask = atoms.numbers == z
                if mask.any():
                    result[g, e] = values[mask].mean(axis=0)
        return result.reshape(len(frames), -1)


def _default_head(heads: Sequence[str]) -> str:
    """The head MACECalculator picks without a `head` argument: the only one, else the one named "default"."""
    if len(heads) == 1:
        return heads[0]
    for head in heads:
        if head.lower() == "default":
            return head
    raise InvalidInputError(f"the model has heads {list(heads)} and none is 'default'; choose a single-head model")


def committee_labels(output: CommitteeOutput, level_of_theory: str, wall_time_s: float) -> Labels:
    """Committee mean and spread as Labels (population variance over the models, as MACECalculator)."""
    energy = float(output.energies.mean())
    forces = output.forces.mean(axis=0)
    stress = None
    if output.stress is not None:
        s = output.stress.mean(axis=0)
        stress = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    if not (np.isfinite(energy) and np.all(np.isfinite(forces)) and (stress is None or np.all(np.isfinite(stress)))):
        reason = "ArithmeticError: the model returned a non-finite energy, force or stress"
        return Labels.failed(reason, level_of_theory)
    force_std = np.sqrt(output.forces.var(axis=0).sum(axis=1))
    return Labels(
        LabelStatus.OK,
        energy=energy,
        forces=forces,
        stress=stress,
        uncertainty=Uncertainty(
            energy_std=float(np.sqrt(output.energies.var())),
            force_std=force_std,
            max_force_std=float(force_std.max(initial=0.0)),
        ),
        level_of_theory=level_of_theory,
        wall_time_s=wall_time_s,
        attempts=1,
    )


def _chunks(frames: Sequence[Atoms], size: int) -> Iterator[list[Atoms]]:
    """Graph batches of at most `size` structures and MAX_BATCH_ATOMS atoms (past the first structure)."""
    for batch in bounded_batches([len(atoms) for atoms in frames], size, MAX_BATCH_ATOMS):
        yield [frames[index] for index in batch]


class MaceBackend(OracleBackend):
    name: ClassVar[str] = "mace"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")
    descriptors: ClassVar[bool] = True

    def __init__(self, config: MaceOracleConfig) -> None:
        self.config = config
        if not config.models:
            raise InvalidInputError(
                "oracle backend 'mace': option 'models' is empty; name the model files (or 'bundled', or a mace "
                "foundation-model name). In a run, the orchestrator passes the run's teacher here."
            )
        self.model_paths = []
        for entry in config.models:
            try:
                self.model_paths.append(resolve_teacher(entry))
            except TeacherNotFoundError as exc:
                raise InvalidInputError(f"oracle backend 'mace': {exc}") from None
        # Resolved here, in the oracle process that evaluates (a run's orchestrator passes mace_finetune.device).
        self.device = resolve_device(config.device, "oracle backend 'mace': option 'device'")
        set_torch_threads()
        self.digests = [file_sha256(path) for path in self.model_paths]
        models = [
            load_model(str(path), digest, config.default_dtype, self.device)
            for path, digest in zip(self.model_paths, self.digests, strict=True)
        ]
        threads = config.threads or len(os.sched_getaffinity(0))
        self.committee = MaceCommittee(models, self.device, config.default_dtype, threads)
        log.info(
            "mace committee of %d on %s (%s, elements %s, r_max %.2f Å)",
            len(models),
            self.device,
            ", ".join(str(p) for p in self.model_paths),
            self.committee.atomic_numbers,
            self.committee.r_max,
        )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _missing_packages()

    def structure_limits(self) -> StructureLimits:
        return StructureLimits(
            cutoff=self.committee.r_max,
            elements=frozenset(self.committee.atomic_numbers),
            owner="oracle backend 'mace'",
        )

    @property
    def level_of_theory(self) -> str:
        # The model files' digests define the physics; float32 evaluation differs in the last digits.
        level = "mace:" + "+".join(digest[:16] for digest in self.digests)
        if self.config.default_dtype != "float64":
            level += f",{self.config.default_dtype}"
        return level

    def calculator(self, atoms: Atoms, attempt: int = 0) -> Calculator:
        """mace's own ASE calculator over the same (cached) models, for callers that want one structure."""
        from mace.calculators import MACECalculator

        return MACECalculator(models=self.committee.models, device=self.device, default_dtype=self.config.default_dtype)

    def label(self, atoms: Atoms, attempt: int = 0) -> Labels:
        return next(self.label_batch([atoms]))

    def label_batch(self, frames: Sequence[Atoms]) -> Iterator[Labels]:
        """Labels in order, one graph batch of `batch_size` structures at a time; a structure the model cannot
        treat (an unknown element, no atoms) gets a FAILED label and the rest of its batch goes on."""
        for chunk in _chunks(frames, self.config.batch_size):
            reasons = [self._unlabellable_reason(atoms) for atoms in chunk]
            valid = [atoms for atoms, reason in zip(chunk, reasons, strict=True) if reason is None]
            results = iter(self._evaluate(valid))
            for reason in reasons:
                yield Labels.failed(reason, self.level_of_theory) if reason is not None else next(results)

    def _unlabellable_reason(self, atoms: Atoms) -> str | None:
        if len(atoms) == 0:
            return "ValueError: the structure has no atoms"
        unknown = self.committee.unsupported_elements(atoms)
        if unknown:
            return (
                f"ValueError: {element_names(unknown)} {'is' if len(unknown) == 1 else 'are'} not in the MACE model "
                f"(it knows {element_names(self.committee.atomic_numbers)})"
            )
        return None

    def _evaluate(self, frames: list[Atoms]) -> list[Labels]:
        if not frames:
            return []
        start = time.perf_counter()
        try:
            outputs = self.committee.evaluate(frames)
        except (RuntimeError, ValueError, IndexError) as exc:
            if len(frames) == 1:
                return [Labels.failed(f"{type(exc).__name__}: {exc}", self.level_of_theory)]
            # Find the structure that breaks the batch; the others still get labels.
            return [label for atoms in frames for label in self._evaluate([atoms])]
        wall_time_s = (time.perf_counter() - start) / len(frames)
        return [committee_labels(output, self.level_of_theory, wall_time_s) for output in outputs]

    def describe_batch(self, frames: Sequence[Atoms], first_index: int = 0) -> Iterator[np.ndarray]:
        """Descriptor vectors in order (see the module docstring), `batch_size` structures per forward pass.
        Raises InvalidInputError for a structure the model cannot describe (numbered from `first_index`):
        every vector must have the same length and meaning, so there is no "failed" descriptor."""
        for offset, atoms in enumerate(frames):
            reason = self._unlabellable_reason(atoms)
            if reason is not None:
                raise InvalidInputError(f"structure {first_index + offset} cannot be described: {reason}")
        for chunk in _chunks(frames, self.config.batch_size):
            yield from self.committee.describe(chunk)
