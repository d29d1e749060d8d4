"""stream_labels' max_in_flight: a lazily read stream of frames never runs more than the window ahead of its
labels (left to gRPC's transport window, the whole stream is sent before the first label comes back), and
every frame still gets its correct label."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from ase import Atoms

from pyacemaker.clients.oracle import backend_spec, stream_labels
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import add_to_server
from tests.conftest import running_service
from tests.integration.test_oracle_service import LJ_OPTIONS, argon, direct_lj_energy

N_FRAMES, BATCH, WINDOW = 400, 8, 24


@pytest.fixture(scope="module")
def oracle() -> Iterator[grpc.Channel]:
    with running_service(add_to_server) as address, channel(address) as ch:
        yield ch


def test_frames_sent_ahead_of_their_labels_stay_within_the_window(oracle: grpc.Channel) -> None:
    frames = [argon(seed % 5) for seed in range(N_FRAMES)]
    sent = 0

    def lazily() -> Iterator[Atoms]:
        nonlocal sent
        for atoms in frames:
            sent += 1
            yield atoms

    spec = backend_spec("lj", LJ_OPTIONS)
    ahead, energies = [], {}
    for received, (index, labels) in enumerate(
        stream_labels(oracle, spec, lazily(), batch_size=BATCH, timeout=60, max_in_flight=WINDOW), 1
    ):
        ahead.append(sent - received + 1)  # this label's frame counts as in flight until it is handed over
        assert labels.ok, labels.reason
        energies[index] = labels.energy
    assert sorted(energies) == list(range(N_FRAMES))
    assert max(ahead) <= WINDOW + 1  # + the one frame read and waiting for a free place
    assert max(ahead) >= BATCH  # the window is used: a whole batch goes out before its labels return
    for index in range(5):
        assert energies[index] == pytest.approx(direct_lj_energy(frames[index]), rel=1e-12)


def test_a_window_smaller_than_a_batch_is_refused(oracle: grpc.Channel) -> None:
    with pytest.raises(ValueError, match=r"max_in_flight \(4\) must be at least batch_size \(8\)"):
        next(stream_labels(oracle, backend_spec("lj", LJ_OPTIONS), [argon(0)], batch_size=8, max_in_flight=4))
