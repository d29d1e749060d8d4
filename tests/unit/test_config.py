"""Config validation: every problem names its key path or file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pyacemaker.config import ConfigError, config_from_json, config_to_json, json_schema, load_config
from pyacemaker.seeds import load_seeds

SEED = "2\ncharge=-1\nCl 0 0 0\nCl 0 0 2.0\n"


def _write(tmp_path: Path, data: dict) -> Path:
    (tmp_path / "seed.xyz").write_text(SEED)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal(**overrides) -> dict:
    data = {"name": "t", "system": {"seeds": ["seed.xyz"], "charge": -1}, "oracle": {"backend": "xtb"}}
    data.update(overrides)
    return data


def test_minimal_config_gets_defaults_and_resolved_paths(tmp_path):
    config = load_config(_write(tmp_path, _minimal()))
    assert config.system.seeds == [(tmp_path / "seed.xyz").resolve()]
    assert config.run_dir == (tmp_path / "runs" / "t").resolve()
    assert (
        config.sampling.direct.n_select == 0
    )  # left to pyacemaker.config_defaults (tests/unit/test_config_defaults.py)
    assert config.oracle.backend == "xtb" and config.oracle.method == "GFN2-xTB"
    assert config_from_json(config_to_json(config)) == config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sampling": {"direct": {"n_selct": 3}}}, "sampling.direct.n_selct: unknown key"),
        ({"md": {"temperatures": [300, -5]}}, "md.temperatures.1: Input should be greater than 0 (got -5)"),
        ({"oracle": {"backend": "xtb", "methd": "GFN2-xTB"}}, "oracle.methd: unknown key"),
        ({"oracle": {"backend": "lj", "sigma": 0}}, "oracle.sigma: Input should be greater than 0 (got 0)"),
        ({"oracle": {"backend": "vasp9"}}, "oracle: Input tag 'vasp9'"),
        ({"sampling": {"direct": {"n_select": -1}}}, "sampling.direct.n_select: Input should be greater than or equal"),
        ({"validation": {"holdout_size": 1}}, "validation.holdout_size: a hold-out needs at least 2 structures"),
        ({"name": "bad name!"}, "name: String should match pattern"),
        (
            {"active_learning": {"md_candidate_steps": -1}},
            "active_learning.md_candidate_steps: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _minimal(**overrides)))
    assert expected in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "config.yaml"))


def test_missing_seed_file_names_the_file(tmp_path):
    path = _write(tmp_path, _minimal(system={"seeds": ["seed.xyz", "nope.xyz"]}))
    with pytest.raises(ConfigError, match=r"system.seeds: seed file not found: .*nope.xyz"):
        load_config(path)


def test_missing_required_section(tmp_path):
    data = _minimal()
    del data["oracle"]
    with pytest.raises(ConfigError, match="oracle: Field required"):
        load_config(_write(tmp_path, data))


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: t\nsystem: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML"):
        load_config(path)


def test_seed_charge_must_match_the_config(tmp_path):
    config = load_config(_write(tmp_path, _minimal(system={"seeds": ["seed.xyz"], "charge": 0})))
    with pytest.raises(ConfigError, match=r"system\.charge: 0 contradicts charge=-1"):
        load_seeds(config)


def test_impossible_spin_multiplicity(tmp_path):
    # Cl2⁻ has 35 electrons: a singlet is impossible.
    config = load_config(
        _write(tmp_path, _minimal(system={"seeds": ["seed.xyz"], "charge": -1, "spin_multiplicity": 1}))
    )
    with pytest.raises(ConfigError, match=r"system\.spin_multiplicity: 1 is impossible with 35 electrons"):
        load_seeds(config)
    ok = load_config(_write(tmp_path, _minimal()))
    assert [s.info["spin_multiplicity"] for s in load_seeds(ok)] == [2]


def test_schema_is_json_and_forbids_extra_keys():
    schema = json.loads(json.dumps(json_schema()))
    assert schema["additionalProperties"] is False
    assert {"system", "oracle", "sampling"} <= set(schema["properties"])


def test_md_defaults_follow_the_budget_and_the_windows() -> None:
    from pyacemaker.config import MdConfig

    windows = {"atoms": (4, 0, 5), "start": -1.5, "stop": 1.5, "count": 13}
    md = MdConfig(replicas=3, save_interval=10, windows=windows)
    resolved = md.resolved(60)
    assert resolved.n_frames == 3000  # 50 per DFT call
    # 39 trajectories must save 6000 frames between them: 154 each, every 10 steps.
    assert resolved.steps == 1540
    assert MdConfig().resolved(2).n_frames == 500 and MdConfig().resolved(10_000).n_frames == 20_000
    assert MdConfig(replicas=64).resolved(10).steps == 500  # never shorter than 500 steps
    explicit = MdConfig(n_frames=7, steps=11).resolved(60)
    assert (explicit.n_frames, explicit.steps) == (7, 11)


@pytest.mark.parametrize(
    ("oracle", "key", "where"),
    [
        ({"backend": "qe", "command": "mpirun pw.x", "pseudopotentials": {"Si": "Si.UPF"}}, "command", "qe.profiles"),
        ({"backend": "qe", "pseudo_dir": "/opt/upf", "pseudopotentials": {"Si": "Si.UPF"}}, "pseudo_dir", "qe.prof"),
        ({"backend": "vasp", "command": "srun vasp_std"}, "command", "vasp.profiles.<profile>.command"),
        ({"backend": "vasp", "potcar_dir": "/opt/potpaw"}, "potcar_dir", "vasp.profiles.<profile>.potcar_dir"),
        ({"backend": "pyscf", "executor": {"kind": "slurm", "template": "/t.sh"}}, "template", "executors.slurm"),
        ({"backend": "pyscf", "executor": {"kind": "local", "scratch_dir": "/s"}}, "scratch_dir", "executors.local"),
        ({"backend": "pyscf", "executor": {"kind": "pbs", "extra_directives": ["-A x"]}}, "extra_directives", "pbs"),
    ],
)
def test_settings_that_moved_to_the_oracle_deployment_say_where_they_are_set(tmp_path, oracle, key, where):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _minimal(oracle=oracle)))
    message = str(info.value)
    assert message.count("\n") == 0 and ": oracle" in message
    assert f"`{key}` is a deployment setting of the oracle service" in message and where in message
    assert "docs/deployment.md" in message


def test_qe_and_vasp_name_a_profile_and_plain_file_names(tmp_path):
    config = load_config(_write(tmp_path, _minimal(oracle={"backend": "qe", "pseudopotentials": {"Si": "Si.UPF"}})))
    assert config.oracle.profile == "default"
    for oracle, key in (
        ({"backend": "qe", "profile": "../x", "pseudopotentials": {}}, "oracle.profile"),
        ({"backend": "qe", "pseudopotentials": {"Si": "/etc/passwd"}}, "oracle.pseudopotentials"),
        ({"backend": "vasp", "setups": {"Si": "/../../etc"}}, "oracle.setups"),
        ({"backend": "pyscf", "basis": "/etc/passwd"}, "oracle.basis"),
        ({"backend": "pyscf", "executor": {"kind": "slurm", "partition": "a\nb"}}, "oracle.executor.partition"),
        ({"backend": "pyscf", "executor": {"kind": "pbs", "queue": "q;rm"}}, "oracle.executor.queue"),
    ):
        with pytest.raises(ConfigError, match=rf"{key}: "):
            load_config(_write(tmp_path, _minimal(oracle=oracle)))


def test_thermal_rattle_amplitudes_follow_the_temperatures_unless_given():
    from pyacemaker.config import PoolConfig, thermal_rattle_amplitudes

    kb = 8.617333262e-5
    expected = [round((kb * t / 10.0) ** 0.5, 4) for t in (300.0, 1000.0, 1250.0)]
    assert thermal_rattle_amplitudes([1000.0, 300.0]) == expected
    assert PoolConfig().resolved([300.0, 1000.0]).rattle_amplitudes == expected
    assert PoolConfig(rattle_amplitudes=[0.2]).resolved([300.0]).rattle_amplitudes == [0.2]
