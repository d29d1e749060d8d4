"""The pacemaker export of a linear fit (train.pckl.gzip + input.yaml): pyace builds the fit's exact basis from
the input's potential section, pacemaker's own data loader and fit set-up accept the files, pacemaker's own loss
function at the fit's coefficients is the fit's loss in pacemaker's units, and the delta fit's anchor frames carry
the base's predictions.

`pacemaker input.yaml` itself is not run here: its pyace backend (the one without TensorFlow) minimises with
finite-difference gradients and took over 10 minutes for 36 coefficients (docs/outputs.md)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from pyacemaker.ace_reference_energies import potential_e0s
from pyacemaker.services.trainer import pacemaker_export
from pyacemaker.services.trainer.ace_fit import fit_linear_ace
from pyacemaker.services.trainer.delta import fit_linear_delta
from pyacemaker.services.trainer.evaluation import ace_calculator
from pyacemaker.v1 import common_pb2
from tests.sn2_training_data import level_b, xtb_e0s, xtb_frames

pyace = pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def base_fit(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("base")
    return fit_linear_ace(xtb_frames()[:60], out, e0s=xtb_e0s(), functions_per_element=12, seed=3)


def read_input(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_input_builds_the_fits_own_basis(base_fit) -> None:  # type: ignore[no-untyped-def]
    from pyace.multispecies_basisextension import create_multispecies_basis_config

    kinds = {kind: path for path, kind in base_fit.extra_files}
    config = read_input(kinds["pacemaker_input"])
    rebuilt = pyace.ACEBBasisSet(create_multispecies_basis_config(config["potential"]))
    fitted = pyace.ACEBBasisSet(str(base_fit.yaml_path))
    assert len(rebuilt.basis_coeffs) == len(fitted.basis_coeffs) == base_fit.metrics["basis_functions_count"]
    rebuilt.basis_coeffs = fitted.basis_coeffs  # same functions, same order: the fit's coefficients fit them
    e0s = xtb_e0s()
    for atoms in xtb_frames()[60:64]:
        ours, theirs = atoms.copy(), atoms.copy()
        ours.calc = ace_calculator(base_fit.yaml_path)  # adds the E0s
        theirs.calc = pyace.PyACECalculator(rebuilt)  # the B-basis alone, as pacemaker's energy_corrected
        reference = sum(e0s[int(z)] for z in atoms.numbers)
        assert theirs.get_potential_energy() + reference == pytest.approx(ours.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(theirs.get_forces(), ours.get_forces(), atol=1e-9)
    assert config["data"]["reference_energy"] == pytest.approx({"H": e0s[1], "C": e0s[6], "Cl": e0s[17]})
    assert config["fit"]["trainable_parameters"] == "func" and config["backend"]["evaluator"] == "pyace"
    assert "repulsion" not in config["fit"], "pacemaker's automatic ZBL would replace the fit's core repulsion"


def test_pacemakers_loader_and_fit_set_up_accept_the_export(base_fit, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pyace.generalfit import GeneralACEFit

    kinds = {kind: path for path, kind in base_fit.extra_files}
    frame = pd.read_pickle(kinds["pacemaker_dataset"], compression="gzip")
    frames = xtb_frames()[:60]
    assert len(frame) == 60
    expected = [a.get_potential_energy() - sum(xtb_e0s()[int(z)] for z in a.numbers) for a in frames]
    np.testing.assert_allclose(frame["energy_corrected"], expected, atol=1e-9)
    config = read_input(kinds["pacemaker_input"])
    monkeypatch.chdir(kinds["pacemaker_input"].parent)  # pacemaker writes its side files into the cwd
    fit = GeneralACEFit(
        potential_config=config["potential"],
        fit_config=config["fit"],
        data_config=config["data"],
        backend_config=config["backend"],
        cutoff=config["cutoff"],
        seed=config["seed"],
    )
    data = fit.fitting_data
    np.testing.assert_allclose(data["energy_corrected"], expected, atol=1e-9)  # from reference_energy
    np.testing.assert_allclose(data["w_energy"], 1 / 60)  # each structure alike, as the fit's mean
    n_atoms = sum(len(a) for a in frames)
    np.testing.assert_allclose(np.concatenate(list(data["w_forces"])), 1 / n_atoms)  # each atom alike
    assert fit.loss_spec.kappa == pytest.approx(pacemaker_export.pacemaker_kappa(0.3))

    # pacemaker's own loss function, at the fit's coefficients, is the fit's loss in pacemaker's units: the same
    # objective (up to the shape of the ridge term, here pacemaker's L2 on these coefficients).
    from pyace import BBasisConfiguration
    from pyace.pyacefit import PyACEFit

    loss = PyACEFit(
        basis=BBasisConfiguration(str(base_fit.yaml_path)),
        loss_spec=fit.loss_spec,
        trainable_parameters="func",
        executors_kw_args={"parallel_mode": "serial"},
    )
    loss.preprocess_dataframe(data)
    loss.structures_dataframe = data
    coeffs = np.array(loss.bbasis.basis_coeffs)
    share = 0.3
    ours = (1 - share) * base_fit.metrics["train_energy_rmse_ev_per_atom"] ** 2 + share * base_fit.metrics[
        "train_forces_rmse_ev_per_a"
    ] ** 2
    expected_loss = ours * pacemaker_export.loss_scale(share) + config["fit"]["loss"]["L2_coeffs"] * coeffs @ coeffs
    assert loss.loss(loss.trainable_params) == pytest.approx(expected_loss, rel=1e-8)


def test_kappa_and_uniform_weights_make_pacemakers_loss_the_fits() -> None:
    rng = np.random.default_rng(0)
    energy_errors = rng.normal(size=7)  # per atom, one per structure
    force_errors = [rng.normal(size=(n, 3)) for n in (3, 6, 6, 5, 4, 6, 2)]
    share = 0.3
    ours = (1 - share) * np.mean(energy_errors**2) + share * np.mean(np.concatenate(force_errors).ravel() ** 2)
    kappa = pacemaker_export.pacemaker_kappa(share)
    n_atoms = sum(len(f) for f in force_errors)
    # pacemaker: (1 − κ) Σ w_e dE² + κ Σ_atoms w_f |dF|², weights summing to one.
    theirs = (1 - kappa) * np.mean(energy_errors**2) + kappa * sum(np.sum(f**2) for f in force_errors) / n_atoms
    assert theirs == pytest.approx(ours * pacemaker_export.loss_scale(share), rel=1e-12)


def test_the_delta_export_holds_dft_and_anchor_frames_labelled_as_the_fit_saw_them(base_fit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dft = level_b(xtb_frames()[64:84])
    anchor = xtb_frames()[:30]
    final = fit_linear_delta(base_fit.yaml_path, dft, anchor, tmp_path / "final", surrogate_weight=0.1, seed=1)
    kinds = {kind: path for path, kind in final.extra_files}
    frame = pd.read_pickle(kinds["pacemaker_dataset"], compression="gzip")
    config = read_input(kinds["pacemaker_input"])
    assert len(frame) == 50
    final_e0s = config["data"]["reference_energy"]
    final_refs = potential_e0s(final.yaml_path)
    # The DFT frames as labelled; the anchors as the base predicts them, moved to the final E0s.
    np.testing.assert_allclose(frame["energy"][:20], [a.get_potential_energy() for a in dft], atol=1e-9)
    base = ace_calculator(base_fit.yaml_path)
    base_e0s = xtb_e0s()
    for atoms, energy, forces in zip(anchor[:3], frame["energy"][20:23], frame["forces"][20:23], strict=True):
        copy = atoms.copy()
        copy.calc = base
        shift = sum(
            final_e0s[s] - base_e0s[int(z)] for s, z in zip(copy.get_chemical_symbols(), copy.numbers, strict=True)
        )
        assert energy == pytest.approx(copy.get_potential_energy() + shift, abs=1e-8)
        np.testing.assert_allclose(forces, copy.get_forces(), atol=1e-9)
    # Block weights: DFT 1, anchor 0.1, each spread evenly over its structures and its atoms.
    assert sum(frame["w_energy"][:20]) == pytest.approx(1.0) and sum(frame["w_energy"][20:]) == pytest.approx(0.1)
    assert sum(w.sum() for w in frame["w_forces"][20:]) == pytest.approx(0.1)
    # The reference energies are the final potential's (the base's, shifted by the delta fit).
    assert final_e0s == pytest.approx({"H": final_refs[1], "C": final_refs[6], "Cl": final_refs[17]})
    assert final_refs != pytest.approx(base_e0s)
    # The final .yaml records the section too, so a later fit on it can export again.
    assert pacemaker_export.section_of(final.yaml_path) == config["potential"]


def test_the_run_exports_the_pacemaker_files_beside_the_potential() -> None:
    from pyacemaker.services.orchestrator.steps.ace_fit import potential_outcome

    def ref(name: str, kind: str) -> common_pb2.ArtifactRef:
        return common_pb2.ArtifactRef(uri=f"objects/ab/{name}", sha256=name.ljust(64, "0"), kind=kind)

    job = common_pb2.Job(
        job_id="j1",
        outputs=[
            ref("a.yaml", "potential"),
            ref("b.yace", "potential"),
            ref("c.asi", "active_set"),
            ref("d.json", "report"),
            ref("e.gzip", "pacemaker_dataset"),
            ref("f.yaml", "pacemaker_input"),
        ],
    )
    ctx = SimpleNamespace(export_prefix="iteration_01/")
    outcome = potential_outcome(job, ctx, "final", "step7_delta")  # type: ignore[arg-type]
    assert outcome.outputs["yaml"].uri == "objects/ab/a.yaml", "the potential, not pacemaker's input.yaml"
    assert {path: r.uri for path, r in outcome.exports.items()} == {
        "iteration_01/step7_delta/final.yaml": "objects/ab/a.yaml",
        "iteration_01/step7_delta/final.yace": "objects/ab/b.yace",
        "iteration_01/step7_delta/final.asi": "objects/ab/c.asi",
        "iteration_01/step7_delta/pacemaker/train.pckl.gzip": "objects/ab/e.gzip",
        "iteration_01/step7_delta/pacemaker/input.yaml": "objects/ab/f.yaml",
    }


def test_the_same_export_written_twice_is_the_same_bytes(tmp_path) -> None:
    """No time stamp in the gzip header: a refit of the same data stores one artifact, and a resumed run's
    export verifies against the first."""
    import time

    frames = xtb_frames()[:4]
    args = (frames, xtb_e0s(), {"cutoff": 5.0}, [1.0] * len(frames), [np.ones(3 * len(a)) for a in frames])
    first, _ = pacemaker_export.write_export(tmp_path / "a", *args)
    time.sleep(1.1)  # gzip's header counts whole seconds
    second, _ = pacemaker_export.write_export(tmp_path / "b", *args)
    assert first.read_bytes() == second.read_bytes()
