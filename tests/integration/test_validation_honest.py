"""The validation's independent checks through real services: the final ACE's MD-stability test (sampler MD with
the ACE served by the oracle) and the independent hold-out MD (the bundled teacher, not the committee, along the
restraint windows, hotter than the run's MD)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import load_config
from pyacemaker.seeds import load_seeds
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.services.orchestrator.steps.validation import final_md_stability, independent_md_frames
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.services.trainer import ace_fit
from pyacemaker.structures import atoms_to_structure, read_structures
from tests.conftest import SN2_DIR, running_service
from tests.sn2_training_data import xtb_e0s, xtb_frames

pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")
pytestmark = pytest.mark.slow


def _config(tmp_path: Path, stability: dict):
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["md"].update(steps=20, save_interval=5, temperatures=[300, 600])
    data["md"]["windows"].update(start=-1.0, stop=1.0, count=3)
    data["validation"]["md_stability"] = stability
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_stability_md_of_the_final_ace_and_the_independent_hold_out_md(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    fit = ace_fit.fit_linear_ace(xtb_frames()[:60], tmp_path / "fit", e0s=xtb_e0s(), cutoff=4.5)
    final = store.put_file(fit.yace_path, "potential")
    teacher_config = _config(tmp_path, {"steps": 40})

    def context(config, sampler: str, oracle: str) -> StepContext:
        return StepContext(
            config=config,
            store=store,
            run_dir=tmp_path / "run",
            seeds=[atoms_to_structure(a) for a in load_seeds(config)],
            sampler_address=sampler,
            oracle_address=oracle,
            trainer_address="",
            report=lambda progress: None,
            previous={"delta_fit": {"yace": final, "yaml": final}},  # the .yaml is not read here
        )

    with (
        running_service(lambda s: add_oracle(s, work_dir=tmp_path / "oracle", store=store)) as oracle,
        running_service(lambda s: add_sampler(s, store)) as sampler,
    ):
        stable = final_md_stability(context(teacher_config, sampler, oracle))
        # An impossible closest approach: the sampler stops every run at once (C–H is about 1.1 Å).
        collapsed = final_md_stability(context(_config(tmp_path, {"steps": 40, "min_distance": 2.0}), sampler, oracle))
        # A nearest-neighbour bound below a C–H bond: every frame counts as split, so a survivor is one whose pieces
        # were always the seeds' own fragments, and its record says so.
        split = final_md_stability(
            context(
                _config(tmp_path, {"steps": 40, "min_distance": 0.2, "max_neighbour_distance": 0.9}), sampler, oracle
            )
        )
        none = final_md_stability(context(_config(tmp_path, {"steps": 0}), sampler, oracle))
        frames_ref = independent_md_frames(context(teacher_config, sampler, oracle), 3)

    assert stable is not None and collapsed is not None and split is not None and none is None
    # 3 seeds × the md temperatures (300, 600 K), one run each.
    assert stable.n_runs == 6 and stable.survivors_by_temperature.keys() == {"300", "600"}
    assert sorted((run.seed, run.temperature_k) for run in stable.runs) == [
        (s, t) for s in range(3) for t in (300.0, 600.0)
    ]
    # This ACE is fitted on 60 rattled frames only: it holds at 300 K for 40 steps, and a run it loses says why.
    assert all(run.survived and run.steps_done == 40 for run in stable.runs if run.temperature_k == 300)
    for run in stable.runs:
        assert run.survived == (run.problem is None)
        assert run.survived or any(
            reason in (run.problem or "") for reason in ("min_distance", "threw it", "no fragment of any seed")
        )
    assert stable.n_survivors == sum(run.survived for run in stable.runs) >= 3
    assert collapsed.n_survivors == 0
    assert all("min_distance" in (run.problem or "") for run in collapsed.runs)
    assert split.n_survivors > 0 and split.n_dissociated == split.n_survivors
    for run in split.runs:
        # The seeds are CH3Cl + Cl (reactant, product) and CH3Cl2 (TS): the record names the pieces.
        assert not run.survived or "into CH3Cl" in (run.dissociation or "")
        assert run.survived or "no fragment of any seed" in (run.problem or "") or "threw it" in (run.problem or "")

    frames = read_structures(store.path(frames_ref))
    assert len(frames) >= 20
    # One replica per window and temperature, the md temperatures plus 1.25 × the highest (750 K).
    assert {a.info["md_temperature_k"] for a in frames} == {300.0, 600.0, 750.0}
    assert len({a.info["md_window"] for a in frames}) == 3  # max(3, 3 wanted) windows over the md ξ range
    assert max(a.info["md_step"] for a in frames) <= 20  # max(4 × save_interval, md.steps // 2)
    assert all(np.isfinite(a.positions).all() for a in frames)
