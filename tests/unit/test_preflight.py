"""`pyacemaker config check` (and `run`) catch what a valid config still gets wrong before any service is asked:
each case is a real config with real seed files, checked by the CLI in this process; refused ones exit 2 with
one line that names the key and the fix."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from pyacemaker.structure_checks import element_names
from pyacemaker.teacher.resolve import BUNDLED_MODEL, FOUNDATION_MODELS
from tests.conftest import SN2_DIR

SEEDS = ["seeds/reactant_complex.xyz", "seeds/transition_state.xyz", "seeds/product_complex.xyz"]


def _config(tmp_path: Path, **sections: Any) -> Path:
    """The README's minimal SN2 config at a consistent budget, with `sections` merged in, beside real seeds."""
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data: dict[str, Any] = {
        "name": "t",
        "system": {"seeds": list(SEEDS), "charge": -1},
        "oracle": {"backend": "pyscf", "functional": "B3LYP", "basis": "def2-SVP"},
        "budget": {"max_dft_calls": 70},
        "sampling": {"direct": {"n_select": 24}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _fluoride_seeds(tmp_path: Path) -> None:
    """F⁻ + CH3Cl: the incoming chloride (atom 4) of every SN2 seed replaced by fluorine."""
    for name in SEEDS:
        path = tmp_path / name
        lines = path.read_text().splitlines()
        assert lines[6].startswith("Cl ")
        lines[6] = "F " + lines[6][3:]
        path.write_text("\n".join(lines) + "\n")


def _cli(*args: str) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of the pyacemaker CLI run in this process."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, err.getvalue().strip().splitlines(), out.getvalue()


def _refused(config: Path, *fragments: str) -> str:
    """The one error line of `config check`, which must contain every fragment."""
    code, lines, _ = _cli("config", "check", str(config))
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == EXIT_BAD_INPUT and len(errors) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_the_consistent_minimal_config_passes_without_warnings(tmp_path: Path) -> None:
    code, lines, out = _cli("config", "check", str(_config(tmp_path)))
    assert code == EXIT_OK and lines == [] and "OK" in out


def test_a_seed_element_the_bundled_teacher_lacks_is_refused_naming_teacher_element_and_fix(tmp_path: Path) -> None:
    config = _config(tmp_path, teacher={"model": "bundled"})
    _fluoride_seeds(tmp_path)
    line = _refused(
        config,
        "teacher.model: the bundled teacher",
        "knows H, C, Cl, but the seeds also contain F (F in reactant_complex.xyz:0)",
        "set teacher.model to a MACE model file or a foundation model",
        "that covers H, C, F, Cl, or add `teacher: {bootstrap: {}}` to train one from GFN2-xTB in the run",
    )
    assert "[9]" not in line and "atomic number" not in line


def test_without_a_teacher_section_seeds_the_bundled_teacher_lacks_get_a_bootstrapped_one(tmp_path: Path) -> None:
    """The five-line config for F⁻ + CH3Cl: teacher.bootstrap is derived and said, nothing refused; the SN2
    seeds the bundled teacher covers keep it."""
    config = _config(tmp_path)
    code, lines, out = _cli("config", "check", str(config))
    assert code == EXIT_OK and "teacher.bootstrap" not in out + "\n".join(lines)
    _fluoride_seeds(tmp_path)
    code, lines, out = _cli("config", "check", str(config))
    assert code == EXIT_OK and lines == [], lines
    assert (
        "teacher.bootstrap: derived: the bundled teacher does not know F of the seeds, so step 0 trains a small "
        "MACE teacher on GFN2-xTB labels of structures around them (set teacher.model to a MACE file of your own "
        "instead)"
    ) in out.splitlines(), out


def test_a_bootstrapped_teacher_needs_no_model_that_knows_the_seeds(tmp_path: Path) -> None:
    config = _config(tmp_path, teacher={"bootstrap": {"max_epochs": 50}})
    _fluoride_seeds(tmp_path)
    code, lines, out = _cli("config", "check", str(config))
    assert code == EXIT_OK and lines == [] and "OK" in out
    config = _config(tmp_path, teacher={"bootstrap": {}, "model": "small"})
    _refused(config, "teacher.model and teacher.bootstrap exclude each other")


def test_run_refuses_the_same_seeds_with_exit_2_before_contacting_any_service(tmp_path: Path) -> None:
    """Port 1 has no orchestrator: reaching it would be exit 3 (unavailable), not the teacher's exit 2."""
    config = _config(tmp_path, teacher={"model": "bundled"})
    _fluoride_seeds(tmp_path)
    code, lines, _ = _cli("run", str(config), "--orchestrator", "127.0.0.1:1")
    assert code == EXIT_BAD_INPUT, lines
    assert lines == [
        f"error: {config}: teacher.model: the bundled teacher ({BUNDLED_MODEL}) knows H, C, Cl, but the seeds also "
        "contain F (F in reactant_complex.xyz:0); set teacher.model to a MACE model file or a foundation model "
        "(docs/configuration.md#teacher-models) that covers H, C, F, Cl, or add `teacher: {bootstrap: {}}` to "
        "train one from GFN2-xTB in the run"
    ]


def test_a_teacher_file_without_metrics_is_read_with_torch_and_checked_too(tmp_path: Path) -> None:
    """A copy of the bundled model without its metrics file: its elements come from the model itself."""
    shutil.copyfile(BUNDLED_MODEL, tmp_path / "my_teacher.model")
    config = _config(tmp_path, teacher={"model": "my_teacher.model"})
    assert _cli("config", "check", str(config))[0] == EXIT_OK
    _fluoride_seeds(tmp_path)
    _refused(config, f"teacher.model: the teacher {tmp_path / 'my_teacher.model'} knows H, C, Cl", "contain F")


def test_a_teacher_file_that_is_not_a_mace_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.model").write_bytes(b"not a model")
    _refused(_config(tmp_path, teacher={"model": "junk.model"}), "teacher.model: ", "not a readable MACE model")


def test_a_foundation_model_missing_from_the_cache_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = FOUNDATION_MODELS["mace-off23-small"]
    _refused(
        _config(tmp_path, teacher={"model": "mace-off23-small"}),
        "teacher.model: mace foundation model 'mace-off23-small' is not in mace's cache",
        f"Download {model.url} and save it as {tmp_path / 'cache' / 'mace' / model.cache_file_name}",
    )


def test_an_unknown_model_name_is_refused(tmp_path: Path) -> None:
    _refused(
        _config(tmp_path, teacher={"model": "mediun"}),
        "teacher.model: not a model name",
        "no such file",
        "did you mean 'medium'?",
    )
    _refused(
        _config(tmp_path, teacher={"model": "gone/teacher.model"}),
        f"no such file: {tmp_path / 'gone' / 'teacher.model'}; the model names are listed in docs/configuration.md",
    )


@pytest.mark.parametrize("section", ["md", "validation"])
def test_an_atom_index_beyond_the_seeds_is_refused(tmp_path: Path, section: str) -> None:
    key = "windows" if section == "md" else "profile"
    config = _config(tmp_path, **{section: {key: {"atoms": [9, 0, 5], "start": -1.0, "stop": 1.0, "count": 3}}})
    _refused(config, f"error: {config}: {section}.{key}.atoms: atom index 9 is out of range", "(6 atoms)")


def test_a_misspelt_functional_is_refused_with_the_closest_name(tmp_path: Path) -> None:
    _refused(
        _config(tmp_path, oracle={"functional": "B3LPY"}),
        "oracle.functional: PySCF cannot use the functional 'B3LPY'",
        "did you mean 'B3LYP'?",
    )


def test_a_misspelt_basis_is_refused_with_the_closest_name(tmp_path: Path) -> None:
    _refused(
        _config(tmp_path, oracle={"basis": "def2-SPV"}),
        "oracle.basis: PySCF does not know the basis 'def2-SPV'",
        "did you mean 'def2svp'?",
    )


def test_a_basis_without_functions_for_a_seed_element_is_refused(tmp_path: Path) -> None:
    """6-31G stops at Kr: iodine in the seeds (the bundled teacher lacks it too; that is a second line)."""
    config = _config(tmp_path, oracle={"basis": "6-31G"}, teacher={"model": "bundled"})
    for name in SEEDS:
        path = tmp_path / name
        path.write_text(path.read_text().replace("\nCl ", "\nI ", 1))
    code, lines, _ = _cli("config", "check", str(config))
    assert code == EXIT_BAD_INPUT
    expected = f"error: {config}: oracle.basis: PySCF's '6-31G' has no functions for I, which the seeds contain"
    assert any(line.startswith(expected) for line in lines), lines
    assert any(line.startswith(f"error: {config}: teacher.model: ") for line in lines)


def test_60_direct_structures_on_a_budget_of_60_are_refused_naming_the_keys_and_numbers(tmp_path: Path) -> None:
    """Budget 60 and 60 DIRECT (the README's minimal config until now): the isolated atoms, the hold-out and the
    profile points (both derived from the budget: 60 / 7 → 9, 60 / 6 → 10 → odd 9) come first, so 21 selected
    structures would never be labelled: refused, one line."""
    config = _config(tmp_path, budget={"max_dft_calls": 60}, sampling={"direct": {"n_select": 60}})
    line = _refused(config)
    assert line == (
        f"error: {config}: sampling.direct.n_select: 60 DIRECT structures + 3 isolated-atom energies + 9 hold-out "
        "(validation.holdout_size) + 9 profile points (validation.profile.count) = 81 DFT calls, more than "
        "budget.max_dft_calls 60: lower sampling.direct.n_select to at most 39 (38 leaves one active-learning batch "
        "of 1) or raise budget.max_dft_calls to at least 81"
    )


def test_a_budget_that_cannot_label_two_direct_structures_is_refused(tmp_path: Path) -> None:
    profile = {"atoms": [4, 0, 5], "start": -1.0, "stop": 1.0, "count": 5}
    config = _config(tmp_path, budget={"max_dft_calls": 19}, validation={"profile": profile, "holdout_size": 10})
    _refused(
        config,
        "budget.max_dft_calls: 19 DFT calls leave 1 for the DIRECT set after 3 isolated-atom energies and 15 "
        "validation labels (validation.holdout_size + validation.profile.count)",
        "raise it to at least 20",
    )


def test_more_direct_structures_than_the_whole_budget_are_refused(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        budget={"max_dft_calls": 30},
        sampling={"direct": {"n_select": 40}},
        validation={"holdout_size": 10, "profile": None},
        active_learning={"batch_size": 5},
    )
    _refused(
        config,
        "sampling.direct.n_select: 40 DIRECT structures + 3 isolated-atom energies + 10 hold-out "
        "(validation.holdout_size) = 53 DFT calls, more than budget.max_dft_calls 30",
        "lower sampling.direct.n_select to at most 17 (12 leaves one active-learning batch of 5) or raise "
        "budget.max_dft_calls to at least 53",
    )


def test_a_budget_with_no_room_for_one_active_learning_batch_warns(tmp_path: Path) -> None:
    config = _config(tmp_path, budget={"max_dft_calls": 40}, active_learning={"batch_size": 10})
    code, lines, _ = _cli("config", "check", str(config))
    assert code == EXIT_OK and len(lines) == 1
    assert "leave 2 for active learning" in lines[0] and "(active_learning.batch_size 10)" in lines[0]


def test_a_nonlinear_ace_without_tensorflow_is_refused(tmp_path: Path) -> None:
    from pyacemaker.services.trainer.pacemaker_nonlinear import tensorflow_missing

    if tensorflow_missing() is None:
        pytest.skip("TensorFlow and pacemaker are installed here, so a nonlinear ACE is possible")
    _refused(
        _config(tmp_path, ace={"model_kind": "nonlinear"}),
        "ace.model_kind: 'nonlinear' fits with pacemaker, which needs TensorFlow",
        "use 'linear'",
        "pip install",
    )


def test_element_names_are_symbols_in_order_of_atomic_number() -> None:
    assert element_names([17, 1, 6, 1]) == "H, C, Cl"
    assert element_names(range(1, 87), ranges=True) == "H-Rn"
    assert element_names([1, 2, 3, 9, 17, 18], ranges=True) == "H-Li, F, Cl-Ar"


def test_the_mace_backend_names_itself_once() -> None:
    from pyacemaker.rpc import InvalidInputError
    from pyacemaker.services.oracle.backends import create_backend

    with pytest.raises(InvalidInputError) as caught:
        create_backend("mace", {"models": []})
    assert str(caught.value).count("oracle backend 'mace'") == 1
    assert str(caught.value).startswith("oracle backend 'mace': option 'models' is empty")


def test_mace_options_are_checked_with_maces_own_parser_naming_each_key(tmp_path: Path) -> None:
    pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[trainer])")
    extra = {"lr": "fast", "optimizer": "sgd", "num_chanels": 8, "ema": "maybe", "amsgrad": False, "batch_size": 4}
    code, lines, _ = _cli("config", "check", str(_config(tmp_path, mace_finetune={"extra_args": extra})))
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    assert code == EXIT_BAD_INPUT and "Traceback" not in "\n".join(lines)
    prefix = f"{tmp_path / 'config.yaml'}: mace_finetune.extra_args"
    assert sorted(errors) == [
        f"{prefix}.amsgrad: mace's --amsgrad is on whatever is given; it cannot be turned off",
        f"{prefix}.ema: mace's --ema is a flag: give true (set it) or false (leave it out), got 'maybe'",
        f"{prefix}.lr: mace refuses the value 'fast': invalid float value: 'fast'",
        f"{prefix}.num_chanels: mace has no such training option; did you mean 'num_channels'?",
        f"{prefix}.optimizer: mace refuses the value 'sgd': invalid choice: 'sgd' (choose from 'adam', 'adamw', "
        "'schedulefree')",
    ]  # batch_size 4 is fine


def test_mace_options_the_pipeline_sets_are_refused_with_the_reason(tmp_path: Path) -> None:
    for key, reason in [
        ("train_file", "the trainer writes each member's training (bootstrap) and validation sets itself"),
        ("device", "set by mace_finetune.device"),
        ("max_num_epochs", "set by mace_finetune.epochs (step 3) and active_learning.finetune_epochs (step 2)"),
    ]:
        _refused(
            _config(tmp_path, mace_finetune={"extra_args": {key: "x"}}),
            f"mace_finetune.extra_args.{key}: not settable here: {reason}",
        )
    _refused(
        _config(tmp_path, mace_finetune={"extra_args": {"--lr": 0.1}}),
        "mace_finetune.extra_args.--lr: not a mace option name (write it without leading dashes",
    )
