"""Choosing the surrogate set from the MD frames: exactly `n_select` of them (all when there are fewer).

"stride" decorrelates: every trajectory gets a share of the selection proportional to its frame count (largest
remainders), taken as evenly spaced frames from its end backwards, so the spacing in time is as wide as the
share allows and the frames furthest from the start structure come first. "direct" runs DIRECT
(pyacemaker/services/sampler/direct.py) on the frames' features, which favours rare configurations over the many similar
ones a long trajectory produces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ase import Atoms

from pyacemaker.services.sampler.direct import select_direct
from pyacemaker.services.sampler.features import get_featuriser
from pyacemaker.services.sampler.md import REPLICA_KEY

FRAME_SELECTIONS = ("stride", "direct")


def stride_selection(trajectory_ids: Sequence[int], n_select: int) -> np.ndarray:
    """Ascending indices into the frame list; `trajectory_ids[i]` names the trajectory of frame i (its
    frames in time order)."""
    ids = np.asarray(trajectory_ids, dtype=np.int64)
    if n_select >= len(ids):
        return np.arange(len(ids))
    trajectories, counts = np.unique(ids, return_counts=True)
    exact = counts * n_select / len(ids)
    quota = np.floor(exact).astype(np.int64)
    # Largest remainders get the frames still missing (ties: the longer trajectory, then the lower id).
    order = np.lexsort((trajectories, -counts, -(exact - quota)))
    quota[order[: n_select - int(quota.sum())]] += 1
    chosen = []
    for trajectory, count in zip(trajectories, quota, strict=True):
        members = np.flatnonzero(ids == trajectory)
        if count:
            chosen.append(members[_spaced_from_end(len(members), int(count))])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _spaced_from_end(length: int, count: int) -> np.ndarray:
    """`count` distinct positions in range(length), spaced length/count apart, the last position included."""
    spacing = length / count
    return (length - 1 - np.floor(np.arange(count) * spacing)).astype(np.int64)[::-1]


def select_frames(
    frames: Sequence[Atoms],
    trajectory_ids: Sequence[int],
    n_select: int,
    method: str,
    featuriser: Callable[[Sequence[Atoms]], np.ndarray],
    random_seed: int = 0,
) -> np.ndarray:
    """Ascending indices of the chosen frames. ValueError for an unknown method or n_select < 1."""
    if method not in FRAME_SELECTIONS:
        raise ValueError(f"unknown frame selection {method!r} (known: {', '.join(FRAME_SELECTIONS)})")
    if n_select < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_select}")
    if len(frames) != len(trajectory_ids):
        raise ValueError(f"{len(frames)} frames but {len(trajectory_ids)} trajectory ids")
    if n_select >= len(frames):
        return np.arange(len(frames))
    if method == "stride":
        return stride_selection(trajectory_ids, n_select)
    return np.sort(select_direct(featuriser(frames), n_select, random_seed=random_seed).indices)


def select_saved_frames(frames: Sequence[Atoms], n_select: int, method: str, random_seed: int = 0) -> np.ndarray:
    """`select_frames` over an MD run's saved frames (each knows its replica), on the distribution features;
    n_select 0 keeps them all."""
    return select_frames(
        frames,
        [int(atoms.info[REPLICA_KEY]) for atoms in frames],
        n_select or len(frames),
        method,
        get_featuriser("distribution"),
        random_seed,
    )
