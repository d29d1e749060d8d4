"""Where MACE work runs (mace_finetune.device, the mace oracle's device) and how mace's own options reach its
command line. Without a GPU here, torch's answer to "is a CUDA GPU visible?" is the one thing stood in for
(pyacemaker.torch_device.cuda_available's torch.cuda.is_available): nothing runs on CUDA, the tests read the
device the trainer hands mace and the command line mace's own parser reads back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyacemaker.rpc import InvalidInputError, WrongStateError
from pyacemaker.torch_device import resolve_device
from pyacemaker.v1 import trainer_pb2

torch = pytest.importorskip("torch", reason="torch is not installed (pyacemaker[mace])")
pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[trainer])")

from pyacemaker.services.trainer.mace_finetune import finetune_settings, mace_arguments  # noqa: E402

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: these check the CPU-only case")


def _arguments(spec: trainer_pb2.MaceFinetuneSpec, tmp_path: Path, n_train: int = 8) -> list[str]:
    settings = finetune_settings(spec, tmp_path / "teacher.model")
    return mace_arguments(settings, tmp_path, "m", 1, tmp_path / "t.xyz", None, {1: -13.6}, n_train, None, 0, False)


def _parsed(arguments: list[str]) -> object:
    """The command line as mace's own parser reads it."""
    from mace.tools import build_default_arg_parser

    return build_default_arg_parser().parse_args(arguments)


@no_gpu
def test_auto_is_the_cpu_without_a_gpu(tmp_path: Path) -> None:
    assert resolve_device("auto", "mace_finetune.device") == "cpu"
    arguments = _arguments(trainer_pb2.MaceFinetuneSpec(), tmp_path)  # device unset: auto
    assert _parsed(arguments).device == "cpu"  # type: ignore[attr-defined]


@no_gpu
def test_cuda_without_a_gpu_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(WrongStateError) as caught:
        finetune_settings(trainer_pb2.MaceFinetuneSpec(device="cuda"), tmp_path / "teacher.model")
    assert str(caught.value).startswith("mace_finetune.device: 'cuda' requested, but this process sees no CUDA GPU")
    assert "set it to 'auto'" in str(caught.value)
    with pytest.raises(InvalidInputError, match=re.escape("mace_finetune.device: unknown device 'gpu'")):
        resolve_device("gpu", "mace_finetune.device")


@no_gpu
def test_the_mace_oracle_resolves_its_device_and_refuses_a_missing_gpu_naming_the_option() -> None:
    from pyacemaker.services.oracle.backends import create_backend

    assert create_backend("mace", {"models": ["bundled"]}).device == "cpu"  # the default: auto
    with pytest.raises(WrongStateError) as caught:
        create_backend("mace", {"models": ["bundled"], "device": "cuda"})
    assert str(caught.value).startswith("oracle backend 'mace': option 'device': 'cuda' requested, but this process")


def test_a_visible_gpu_makes_auto_and_cuda_train_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "mace_finetune.device") == "cuda"
    for device in ("", "auto", "cuda"):
        settings = finetune_settings(trainer_pb2.MaceFinetuneSpec(device=device), tmp_path / "teacher.model")
        assert settings.device == "cuda"  # what the evaluations around the training get too
        assert _parsed(_arguments(trainer_pb2.MaceFinetuneSpec(device=device), tmp_path)).device == "cuda"  # type: ignore[attr-defined]
    cpu = _arguments(trainer_pb2.MaceFinetuneSpec(device="cpu"), tmp_path)
    assert _parsed(cpu).device == "cpu"  # type: ignore[attr-defined]


def test_extra_args_override_the_finetuning_defaults_as_mace_reads_them(tmp_path: Path) -> None:
    defaults = _parsed(_arguments(trainer_pb2.MaceFinetuneSpec(), tmp_path, n_train=20))
    assert (defaults.lr, defaults.batch_size, defaults.valid_batch_size) == (0.01, 5, 5)  # type: ignore[attr-defined]
    assert (defaults.ema, defaults.amsgrad, defaults.swa, defaults.ema_decay) == (True, True, False, 0.99)  # type: ignore[attr-defined]
    extra = {"lr": "0.005", "batch_size": "4", "ema": "false", "stage_two": "true", "weight_decay": "1e-06"}
    arguments = _arguments(trainer_pb2.MaceFinetuneSpec(extra_args=extra), tmp_path, n_train=20)
    parsed = _parsed(arguments)
    assert (parsed.lr, parsed.batch_size, parsed.valid_batch_size) == (0.005, 4, 5)  # type: ignore[attr-defined]
    assert (parsed.ema, parsed.swa, parsed.weight_decay) == (False, True, 1e-6)  # type: ignore[attr-defined]
    assert sum(argument.startswith("--lr") for argument in arguments) == 1  # replaced, not appended


def test_extra_args_mace_refuses_fail_the_job_at_its_start_naming_each_key(tmp_path: Path) -> None:
    spec = trainer_pb2.MaceFinetuneSpec(extra_args={"lr": "fast", "scheduler_patience": "2.5", "ema_decay": "0.9"})
    with pytest.raises(InvalidInputError) as caught:
        finetune_settings(spec, tmp_path / "teacher.model")
    assert str(caught.value) == (
        "mace_finetune.extra_args.lr: mace refuses the value 'fast': invalid float value: 'fast'; "
        "mace_finetune.extra_args.scheduler_patience: mace refuses the value '2.5': invalid int value: '2.5'"
    )


def test_start_job_refuses_options_the_trainer_sets_and_unknown_devices() -> None:
    from pyacemaker.services.trainer.mace_finetune import validate_mace_finetune
    from pyacemaker.v1 import common_pb2

    ref = common_pb2.ArtifactRef(uri="sha256:0", sha256="0")
    spec = trainer_pb2.MaceFinetuneSpec(foundation_model=ref, train_data=[ref], extra_args={"seed": "3", "lr": "1"})
    with pytest.raises(InvalidInputError) as caught:
        validate_mace_finetune(spec, None)  # type: ignore[arg-type]  # refused before the store is consulted
    assert str(caught.value).startswith("mace_finetune.extra_args.seed: not settable here: each member's seed")
    spec = trainer_pb2.MaceFinetuneSpec(foundation_model=ref, train_data=[ref], device="gpu")
    with pytest.raises(
        InvalidInputError, match=re.escape("mace_finetune.device: unknown device 'gpu'; use one of auto, cpu")
    ):
        validate_mace_finetune(spec, None)  # type: ignore[arg-type]


def test_the_device_is_no_input_of_the_finetuning_step_and_extra_args_are() -> None:
    from pyacemaker.config import MaceFinetuneConfig

    default = MaceFinetuneConfig()
    # As before the two keys existed, so that older runs keep their step keys.
    assert default.key_material() == {"epochs": 40, "stress_weight": 10.0, "random_seed": 1}
    assert MaceFinetuneConfig(device="cuda").key_material() == default.key_material()
    tuned = MaceFinetuneConfig(device="cpu", extra_args={"lr": 0.005})
    assert tuned.key_material() == {**default.key_material(), "extra_args": {"lr": 0.005}}
