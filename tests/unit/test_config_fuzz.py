"""Bad input to `pyacemaker config check` and the structure readers: each defect found by the hardening review
reproduced by name, then property-based fuzzing (hypothesis, derandomized, bounded examples). Every check runs
in this process under a per-call time limit: exit code 2 and one line naming the key or file for invalid
input, never a traceback or a hang; valid configs are still accepted."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (the dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyacemaker.cli.main import EXIT_BAD_INPUT, main  # noqa: E402
from pyacemaker.structures import StructureFileError, read_structures  # noqa: E402
from tests import fuzz_inputs  # noqa: E402
from tests.fuzz_inputs import SEED, Case, base_config, files_for, run_config_check, time_limit  # noqa: E402

CALL_LIMIT_S = 10.0
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _check(case: Case) -> tuple[int, list[str]]:
    with tempfile.TemporaryDirectory() as directory, time_limit(CALL_LIMIT_S):
        code, err = run_config_check(case.write(Path(directory)))
    return code, err.strip().splitlines()


def _assert_refused(case: Case) -> str:
    code, lines = _check(case)
    assert code == EXIT_BAD_INPUT, f"{case.what}: accepted (exit {code})"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case.what}: {lines}"
    assert case.expect in lines[0], f"{case.what}: {lines[0]!r} does not name {case.expect!r}"
    return lines[0]


def _with(backend: str, path: str, value: object) -> dict:
    data = base_config(backend)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return data


def _seed(old: str, new: str) -> bytes:
    assert old in SEED
    return SEED.replace(old, new).encode()


# The defects of the review, one each: (what, files, text the error line must contain).
DEFECTS = [
    ("alias bomb", files_for(fuzz_inputs._alias_bomb()), "YAML anchors (&a0) are not allowed"),
    ("non-UTF-8 config", files_for(b"name: f\xffzz\n"), "line 1: not UTF-8 text (byte 0xff)"),
    ("nesting 1000 deep", files_for(b"name: t\nx: " + b"[" * 1000 + b"]" * 1000 + b"\n"), "nested deeper than"),
    ("mappings 5000 deep", files_for(b"x: " + b"{a: " * 5000 + b"1" + b"}" * 5000 + b"\n"), "nested deeper than"),
    (
        "5000-digit integer",
        files_for(b"name: t\nbudget: {max_dft_calls: 1" + b"0" * 5000 + b"}\n"),
        "Exceeds the limit",
    ),
    ("NUL byte", files_for(b"name: t\n# \x00\n"), "unacceptable character"),
    ("oversized", files_for(b"name: t\n#" + b"x" * (2 << 20) + b"\n"), "too large for a config"),
    ("seed count 999999999999", files_for(base_config("xtb"), _seed("6\n", "999999999999\n")), "seed.xyz: line 1"),
    ("seed charge=abc", files_for(base_config("xtb"), _seed("charge=-1", "charge=abc")), "charge='abc' is not an"),
    ("seed spin=abc", files_for(base_config("xtb"), _seed("spin_multiplicity=1", "spin_multiplicity=x")), "seed"),
    ("seed NaN coordinate", files_for(base_config("xtb"), _seed("2.947", "nan")), "positions must be finite"),
    ("seed unknown element", files_for(base_config("xtb"), _seed("Cl 0.0 0.0 2.947", "Xx 0 0 2.9")), "seed.xyz"),
    ("seed not UTF-8", files_for(base_config("xtb"), _seed("Cl 0.0 0.0 2.947", "Cl\xff 0 0 2.9")), "seed.xyz"),
    ("boolean for an integer", files_for(_with("xtb", "budget.max_dft_calls", True)), "budget.max_dft_calls"),
    ("boolean for a float", files_for(_with("xtb", "md.timestep_fs", False)), "md.timestep_fs: expected a number"),
    ("boolean in a list", files_for(_with("xtb", "md.temperatures", [300, True])), "md.temperatures: item 1"),
    ("string for a number", files_for(_with("lj", "oracle.sigma", "3.4")), "oracle.sigma: expected a number"),
    ("integer 2**63", files_for(_with("xtb", "sampling.pool.random_seed", 2**63)), "sampling.pool.random_seed"),
    ("integer -2**63-1", files_for(_with("xtb", "system.charge", -(2**63) - 1)), "system.charge"),
    ("inf", files_for(_with("xtb", "md.friction_per_fs", float("inf"))), "md.friction_per_fs: expected a finite"),
    ("nan", files_for(_with("xtb", "md.pressure_gpa", float("nan"))), "md.pressure_gpa: expected a finite"),
    ("1e308", files_for(_with("xtb", "md.timestep_fs", 1e308)), "md.timestep_fs"),
    (
        "1e308 written as YAML text (YAML 1.1 would read a string)",
        files_for(yaml.safe_dump(_with("xtb", "md.timestep_fs", 0.123)).replace("0.123", "1e308").encode()),
        "md.timestep_fs: 1e+308 is out of range",
    ),
    ("atom index 99", files_for(_with("xtb", "md.windows.atoms", [4, 0, 99])), "md.windows.atoms: atom index 99"),
    ("profile index 99", files_for(_with("xtb", "validation.profile.atoms", [99, 0, 5])), "validation.profile"),
    (
        "#SBATCH lines from the config",
        files_for(_with("xtb", "oracle.executor.extra_directives", ["--account=x\n#SBATCH --mem=1T"])),
        "`extra_directives` is a deployment setting of the oracle service",
    ),
    ("newline in partition", files_for(_with("xtb", "oracle.executor.partition", "a\nb")), "oracle.executor.partition"),
    ("spin 1000001", files_for(_with("xtb", "system.spin_multiplicity", 1000001)), "system.spin_multiplicity"),
    ("spin 47 for 44 electrons", files_for(_with("xtb", "system.spin_multiplicity", 47)), "impossible with 44"),
    ("missing teacher model", files_for(_with("xtb", "teacher.model", "gone/teacher.model")), "teacher.model"),
    ("missing mace model", files_for(_with("mace", "oracle.models", ["gone.model"])), "oracle.models"),
    ("missing ace potential", files_for(_with("ace", "oracle.potential", "gone.yace")), "oracle.potential"),
    (
        "job template from the config",
        files_for(_with("pyscf", "oracle.executor.template", "job.sh")),
        "`template` is a deployment setting of the oracle service",
    ),
    ("missing seed", files_for(_with("xtb", "system.seeds", ["gone.xyz"])), "system.seeds"),
]


@pytest.mark.parametrize(("what", "files", "expected"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_reviewed_defect_is_refused_with_one_line(what: str, files: dict[str, bytes], expected: str) -> None:
    line = _assert_refused(Case(what, files, expect=expected))
    assert "Traceback" not in line


def test_every_base_config_and_every_example_is_accepted() -> None:
    for backend in sorted(fuzz_inputs.ORACLES):
        code, lines = _check(Case(backend, files_for(base_config(backend)), invalid=False))
        assert code == 0, (backend, lines)
    root = Path(__file__).resolve().parents[2]
    for example in sorted((root / "examples").glob("*/config*.yaml")):
        with time_limit(CALL_LIMIT_S):
            assert run_config_check(example)[0] == 0, example


def test_exponent_floats_are_numbers_and_aliases_are_refused_in_place() -> None:
    from pyacemaker.yaml_input import YamlInputError, load_yaml_text

    assert load_yaml_text("a: 1e-9\nb: 1E5\nc: .5\nd: 7\ne: '1e3'\n", "t") == {
        "a": 1e-9,
        "b": 1e5,
        "c": 0.5,
        "d": 7,
        "e": "1e3",
    }
    with pytest.raises(YamlInputError, match=r"t: line 2: YAML aliases \(\*x\) are not allowed"):
        load_yaml_text("a: 1\nb: *x\n", "t")


def test_label_refuses_a_huge_count_line_at_once(tmp_path: Path) -> None:
    """`label` reads its input before it contacts the oracle: the count line is refused, no read to the end."""
    path = tmp_path / "in.xyz"
    path.write_bytes(_seed("6\n", "999999999999\n"))
    with time_limit(CALL_LIMIT_S):
        code = main(["label", str(path), "-o", str(tmp_path / "out.xyz"), "--backend", "lj", "--oracle", "x:1"])
    assert code == EXIT_BAD_INPUT


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_fuzzed_invalid_configs_are_refused_with_one_line_naming_the_key(data: st.DataObject) -> None:
    case = fuzz_inputs.invalid_case(lambda options: data.draw(st.sampled_from(list(options))))
    _assert_refused(case)


@settings(FUZZ, max_examples=40)
@given(st.data())
def test_fuzzed_valid_configs_are_accepted(data: st.DataObject) -> None:
    case = fuzz_inputs.valid_case(lambda options: data.draw(st.sampled_from(list(options))))
    code, lines = _check(case)
    assert code == 0, f"{case.what}: {lines}"


_LINES = SEED.encode().splitlines(keepends=True)


@st.composite
def _mangled_xyz(draw: st.DrawFn) -> bytes:
    """The SN2 seed with a few of its lines replaced by junk, numbers, bytes, or a count, and perhaps cut."""
    lines = list(_LINES) * draw(st.integers(1, 2))
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        lines[index] = draw(
            st.one_of(
                st.binary(max_size=40),
                st.text(max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass")),
                st.integers(-(10**13), 10**13).map(lambda n: f"{n}\n".encode()),
                st.sampled_from([b"nan nan nan\n", b"Cl 1e308 0 0\n", b"charge=abc\n", b"\n", b"X 0 0 0\n"]),
            )
        )
    text = b"".join(lines)
    return text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


@settings(FUZZ, max_examples=200)
@given(_mangled_xyz(), st.sampled_from(["seed.xyz", "seed.extxyz"]))
def test_fuzzed_structure_files_read_or_fail_naming_the_file(content: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(content)
        try:
            with time_limit(CALL_LIMIT_S):
                frames = read_structures(path, max_atoms=100_000)
        except StructureFileError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        else:
            assert frames and all(len(atoms) >= 0 for atoms in frames)


@settings(FUZZ, max_examples=60)
@given(_mangled_xyz(), st.sampled_from(sorted(fuzz_inputs.ORACLES)))
def test_fuzzed_seed_files_give_exit_0_or_2(content: bytes, backend: str) -> None:
    code, lines = _check(Case("mangled seed", files_for(base_config(backend), content)))
    assert code in (0, EXIT_BAD_INPUT), lines
    if code == EXIT_BAD_INPUT:
        assert len(lines) == 1 and ("seed.xyz" in lines[0] or "system." in lines[0]), lines


def test_the_fuzzed_inputs_cover_every_generator() -> None:
    """The generators themselves: the leaves they mutate include every kind of value the config holds."""
    from pyacemaker.config import RunConfig

    kinds = {
        leaf.kind for backend in fuzz_inputs.ORACLES for leaf in fuzz_inputs.leaves(RunConfig, base_config(backend))
    }
    assert {"int", "float", "bool", "str", "path", "floats", "strs", "atoms", "strmap", "literal"} <= kinds
    assert yaml.safe_load(files_for(base_config("xtb"))["config.yaml"])["name"] == "fuzz"
