"""The backend registry: option validation with messages that name the problem, GetInfo's content, and the
server's backend cache."""

from __future__ import annotations

import pytest

from pyacemaker.clients.oracle import backend_spec
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.oracle.backends import backend_infos, create_backend
from pyacemaker.services.oracle.backends.lj import LennardJonesBackend
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.oracle.server import OracleService


def test_unknown_backend_is_named_with_the_known_ones() -> None:
    with pytest.raises(
        InvalidInputError, match=r"unknown oracle backend 'dftb'.*known: ace, lj, mace, pyscf, qe, vasp, xtb"
    ):
        create_backend("dftb", {})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lj", {"epsilon": -0.1}, r"'lj' options: epsilon: .*greater than 0.*-0\.1"),
        ("lj", {"eps": 0.01}, r"'lj' options: eps: unknown key"),
        ("xtb", {"method": "GFN3-xTB"}, r"'xtb' options: method: .*GFN3-xTB"),
        ("xtb", {"max_iterations": 2.5}, r"'xtb' options: max_iterations: .*2\.5"),
        ("xtb", {"backend": "lj"}, r"'xtb': option 'backend' contradicts"),
    ],
)
def test_bad_options_name_the_option(name: str, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        create_backend(name, options)


def test_options_become_the_backend_config() -> None:
    # A protobuf Struct carries every number as a double; whole numbers must still fill integer options.
    xtb = create_backend("xtb", {"method": "GFN1-xTB", "max_iterations": 40.0, "accuracy": 0.1})
    assert isinstance(xtb, XtbBackend)
    assert (xtb.config.method, xtb.config.max_iterations, xtb.config.accuracy) == ("GFN1-xTB", 40, 0.1)
    lj = create_backend("lj", {"backend": "lj", "sigma": 2.5})
    assert isinstance(lj, LennardJonesBackend)
    assert lj.level_of_theory == "lj:eps=0.0103,sigma=2.5,rc=10.2"


def test_backend_infos_list_lj_and_xtb_as_available() -> None:
    infos = {info.name: info for info in backend_infos()}
    assert set(infos) >= {"lj", "xtb"}
    for name in ("lj", "xtb"):
        assert infos[name].available, infos[name].unavailable_reason
        assert set(infos[name].implemented_properties) == {"energy", "forces", "stress"}
        assert not infos[name].descriptors


def test_the_server_reuses_a_backend_for_equal_settings() -> None:
    service = OracleService()
    first = service.backend(backend_spec("lj", {"epsilon": 0.02, "sigma": 3.0}))
    again = service.backend(backend_spec("lj", {"sigma": 3.0, "epsilon": 0.02}))
    other = service.backend(backend_spec("lj", {"epsilon": 0.03, "sigma": 3.0}))
    assert first is again
    assert other is not first
    assert other.level_of_theory != first.level_of_theory
