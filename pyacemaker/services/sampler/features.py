"""Featurisers for DIRECT: one fixed-length vector per structure, so that PCA and clustering can compare
structures. A featuriser must be invariant to rotation, translation and permutation of like atoms, otherwise
DIRECT would spend its picks on copies of one structure in different orientations.

New featurisers register themselves in FEATURISERS and are built by name with `get_featuriser`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

from pyacemaker.structure_checks import element_names


class Featuriser(Protocol):
    name: ClassVar[str]

    def __call__(self, frames: Sequence[Atoms]) -> np.ndarray:
        """Features of shape (n_frames, n_features); n_features is the same for every frame of the call."""
        ...


class UnknownFeaturiserError(ValueError):
    """A featuriser name that is not registered; the message lists the known ones."""


@dataclass
class _DirectedPairs:
    """Every ordered neighbour pair (centre → neighbour) within a cutoff, over a batch of frames.

    `centre` is a global atom index (unique over the batch), so triplets can be formed per centre atom.
    """

    frame: np.ndarray  # (n_pairs,) frame index within the batch
    centre: np.ndarray  # (n_pairs,) global index of the centre atom
    centre_z: np.ndarray  # (n_pairs,) atomic number of the centre
    neighbour_z: np.ndarray  # (n_pairs,) atomic number of the neighbour
    distance: np.ndarray  # (n_pairs,) Å
    vector: np.ndarray  # (n_pairs, 3) neighbour − centre, Å

    def subset(self, mask: np.ndarray) -> _DirectedPairs:
        return _DirectedPairs(
            self.frame[mask],
            self.centre[mask],
            self.centre_z[mask],
            self.neighbour_z[mask],
            self.distance[mask],
            self.vector[mask],
        )


def _cosine_cutoff(distance: np.ndarray, cutoff: float) -> np.ndarray:
    """Smooth weight that goes to zero at the cutoff, so a neighbour crossing it changes features
    continuously."""
    return np.where(distance < cutoff, 0.5 * (np.cos(np.pi * distance / cutoff) + 1.0), 0.0)


def _smeared_histogram(
    n_rows: int, row: np.ndarray, values: np.ndarray, weights: np.ndarray, centres: np.ndarray, width: float
) -> np.ndarray:
    """Sum of weighted Gaussians exp(−(c − v)²/2w²) at the bin centres, accumulated per row; (n_rows, n_bins)."""
    kernel = np.exp(-0.5 * ((centres[None, :] - values[:, None]) / width) ** 2) * weights[:, None]
    histogram = np.empty((n_rows, len(centres)))
    for b in range(len(centres)):
        histogram[:, b] = np.bincount(row, weights=kernel[:, b], minlength=n_rows)
    return histogram


class DistributionFeaturiser:
    """Radial and angular distribution histograms, normalised per atom.

    Radial part: for each unordered element pair (a ≤ b), Gaussian-smeared histogram of the a–b distances up
    to `cutoff` (periodic images included), each distance weighted by a cosine cutoff. Angular part: for each
    centre element, Gaussian-smeared histogram of cos θ over pairs of neighbours within `angular_cutoff`,
    weighted by the product of their cosine cutoffs. Both are sums over atoms, so they are invariant to
    rotation, translation and permutation of like atoms; dividing by the atom count makes structures of
    different size comparable.

    The element list fixes the feature layout; when it is not given it is taken from the frames of each call,
    so pass it when featurising a pool in several calls.
    """

    name: ClassVar[str] = "distribution"
    # Upper bound on the pair entries handled at once, to bound memory on large cells.
    _PAIRS_PER_BATCH = 400_000

    def __init__(
        self,
        elements: Sequence[int] | None = None,
        cutoff: float = 6.0,
        n_radial_bins: int = 24,
        angular_cutoff: float = 3.5,
        n_angular_bins: int = 16,
    ) -> None:
        if cutoff <= 0 or angular_cutoff <= 0 or angular_cutoff > cutoff:
            raise ValueError(f"need 0 < angular_cutoff ≤ cutoff, got {angular_cutoff} and {cutoff}")
        if n_radial_bins < 1 or n_angular_bins < 1:
            raise ValueError("bin counts must be at least 1")
        self.elements = sorted({int(z) for z in elements}) if elements is not None else None
        self.cutoff = float(cutoff)
        self.angular_cutoff = float(angular_cutoff)
        self.radial_width = self.cutoff / n_radial_bins
        self.radial_centres = (np.arange(n_radial_bins) + 0.5) * self.radial_width
        self.angular_width = 2.0 / n_angular_bins
        self.angular_centres = -1.0 + (np.arange(n_angular_bins) + 0.5) * self.angular_width

    def __call__(self, frames: Sequence[Atoms]) -> np.ndarray:
        frames = list(frames)
        elements = self.elements or sorted({int(z) for atoms in frames for z in atoms.numbers})
        present = {int(z) for atoms in frames for z in atoms.numbers}
        if missing := present - set(elements):
            raise ValueError(
                f"frames contain {element_names(missing)}, not in the feature layout ({element_names(elements)})"
            )
        n_elements = len(elements)
        element_index = np.full(max([*elements, *present]) + 1, -1, dtype=np.int64)
        element_index[elements] = np.arange(n_elements)
        pair_channel = np.zeros((n_elements, n_elements), dtype=np.int64)
        upper = np.triu_indices(n_elements)
        pair_channel[upper] = np.arange(len(upper[0]))
        pair_channel = np.maximum(pair_channel, pair_channel.T)
        n_radial = len(upper[0]) * len(self.radial_centres)
        n_angular = n_elements * len(self.angular_centres)
        features = np.zeros((len(frames), n_radial + n_angular))
        for batch in self._batches(frames):
            pairs = self._directed_pairs([frames[i] for i in batch])
            radial = self._radial(len(batch), pairs, element_index, pair_channel, len(upper[0]))
            angular = self._angular(len(batch), pairs, element_index, n_elements)
            n_atoms = np.array([len(frames[i]) for i in batch], dtype=np.float64)[:, None]
            features[batch] = np.hstack([radial, angular]) / n_atoms
        return features

    def _batches(self, frames: list[Atoms]) -> Iterator[np.ndarray]:
        """Consecutive frame indices whose pair lists together stay under _PAIRS_PER_BATCH (roughly)."""
        # Rough pair-count estimate: all pairs in a molecule, ~100 neighbours per atom within 6 Å in a solid.
        estimate = [len(a) * (100 if a.pbc.any() else max(len(a) - 1, 1)) for a in frames]
        start, running = 0, 0
        for i, cost in enumerate(estimate):
            if running and running + cost > self._PAIRS_PER_BATCH:
                yield np.arange(start, i)
                start, running = i, 0
            running += cost
        if start < len(frames):
            yield np.arange(start, len(frames))

    def _directed_pairs(self, frames: list[Atoms]) -> _DirectedPairs:
        """All ordered pairs within the cutoff. Molecules with the same atoms are handled together with dense
        distance matrices (fast for small molecules); periodic frames go through ASE's neighbour list."""
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in frames])])
        parts: list[_DirectedPairs] = []
        molecule_groups: dict[tuple[int, ...], list[int]] = {}
        for i, atoms in enumerate(frames):
            if atoms.pbc.any():
                parts.append(self._periodic_pairs(atoms, i, int(offsets[i])))
            else:
                molecule_groups.setdefault(tuple(int(z) for z in atoms.numbers), []).append(i)
        for numbers, members in molecule_groups.items():
            parts.append(self._molecule_pairs(frames, np.array(numbers), np.array(members), offsets))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return _DirectedPairs(empty, empty, empty, empty, np.zeros(0), np.zeros((0, 3)))
        return _DirectedPairs(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in _DirectedPairs.__dataclass_fields__)
        )

    def _periodic_pairs(self, atoms: Atoms, frame: int, offset: int) -> _DirectedPairs:
        first, second, distance, vector = neighbor_list("ijdD", atoms, self.cutoff)
        numbers = atoms.numbers
        return _DirectedPairs(
            np.full(len(first), frame, dtype=np.int64),
            first.astype(np.int64) + offset,
            numbers[first].astype(np.int64),
            numbers[second].astype(np.int64),
            distance,
            vector,
        )

    def _molecule_pairs(
        self, frames: list[Atoms], numbers: np.ndarray, members: np.ndarray, offsets: np.ndarray
    ) -> _DirectedPairs:
        n_atoms = len(numbers)
        centre_local, neighbour_local = np.nonzero(~np.eye(n_atoms, dtype=bool))
        positions = np.stack([frames[i].positions for i in members])  # (n_frames, n_atoms, 3)
        vectors = positions[:, neighbour_local] - positions[:, centre_local]  # (n_frames, n_pairs, 3)
        distances = np.linalg.norm(vectors, axis=-1)
        within = distances < self.cutoff
        frame_of = np.broadcast_to(members[:, None], distances.shape)
        centre = offsets[members][:, None] + centre_local[None, :]
        return _DirectedPairs(
            frame_of[within].astype(np.int64),
            centre[within].astype(np.int64),
            np.broadcast_to(numbers[centre_local], distances.shape)[within].astype(np.int64),
            np.broadcast_to(numbers[neighbour_local], distances.shape)[within].astype(np.int64),
            distances[within],
            vectors[within],
        )

    def _radial(
        self,
        n_frames: int,
        pairs: _DirectedPairs,
        element_index: np.ndarray,
        pair_channel: np.ndarray,
        n_channels: int,
    ) -> np.ndarray:
        channel = pair_channel[element_index[pairs.centre_z], element_index[pairs.neighbour_z]]
        # Every unordered pair appears twice (i → j and j → i), hence the weight ½.
        weights = 0.5 * _cosine_cutoff(pairs.distance, self.cutoff)
        rows = pairs.frame * n_channels + channel
        histogram = _smeared_histogram(
            n_frames * n_channels, rows, pairs.distance, weights, self.radial_centres, self.radial_width
        )
        return histogram.reshape(n_frames, -1)

    def _angular(self, n_frames: int, pairs: _DirectedPairs, element_index: np.ndarray, n_elements: int) -> np.ndarray:
        near = pairs.subset(pairs.distance < self.angular_cutoff)
        order = np.argsort(near.centre, kind="stable")
        near = near.subset(order)
        first, second = _neighbour_pairs_per_centre(near.centre)
        cosine = np.einsum("ij,ij->i", near.vector[first], near.vector[second]) / (
            near.distance[first] * near.distance[second]
        )
        cosine = np.clip(cosine, -1.0, 1.0)
        weights = _cosine_cutoff(near.distance[first], self.angular_cutoff) * _cosine_cutoff(
            near.distance[second], self.angular_cutoff
        )
        rows = near.frame[first] * n_elements + element_index[near.centre_z[first]]
        histogram = _smeared_histogram(
            n_frames * n_elements, rows, cosine, weights, self.angular_centres, self.angular_width
        )
        return histogram.reshape(n_frames, -1)


def _neighbour_pairs_per_centre(sorted_centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pair entries sorted by centre atom, the index pairs (p, q), p < q, of entries sharing a centre:
    the two legs of every angle at that centre."""
    _, starts, counts = np.unique(sorted_centres, return_index=True, return_counts=True)
    firsts: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    for count in np.unique(counts):
        if count < 2:
            continue
        local_first, local_second = np.triu_indices(count, k=1)
        group_starts = starts[counts == count][:, None]
        firsts.append((group_starts + local_first[None, :]).ravel())
        seconds.append((group_starts + local_second[None, :]).ravel())
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


FEATURISERS: dict[str, type] = {DistributionFeaturiser.name: DistributionFeaturiser}


def get_featuriser(name: str, **kwargs: Any) -> Featuriser:
    """Build a registered featuriser by name; keyword arguments go to its constructor."""
    try:
        factory = FEATURISERS[name]
    except KeyError:
        raise UnknownFeaturiserError(f"unknown featuriser {name!r}; known: {', '.join(sorted(FEATURISERS))}") from None
    featuriser: Featuriser = factory(**kwargs)
    return featuriser
