"""Which torch device MACE work runs on: a config's `device` (auto | cpu | cuda) turned into the device that
torch gets, in the process that does the work (the trainer's worker, the oracle), never in the orchestrator or
the CLI, which may run on a machine without the GPU.

- `auto`: "cuda" when torch in this process sees a CUDA GPU (`torch.cuda.is_available()`), else "cpu";
- `cpu`: the CPU, also on a GPU machine;
- `cuda`: the (current) CUDA GPU; a process that sees none refuses the work at once with a WrongStateError
  (FAILED_PRECONDITION on the wire) that names the setting, instead of failing inside torch later.
"""

from __future__ import annotations

from typing import Literal, get_args

from pyacemaker.rpc import InvalidInputError, WrongStateError

DeviceSetting = Literal["auto", "cpu", "cuda"]
DEVICE_SETTINGS: tuple[str, ...] = get_args(DeviceSetting)


def cuda_available() -> bool:
    """Whether torch in this process sees a CUDA GPU (the one place that asks torch, so tests can stand in)."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(requested: str, key: str) -> str:
    """ "cpu" or "cuda" for the setting `requested`, named `key` in messages (e.g. "mace_finetune.device")."""
    if requested not in DEVICE_SETTINGS:
        raise InvalidInputError(f"{key}: unknown device {requested!r}; use one of {', '.join(DEVICE_SETTINGS)}")
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "auto":
        return "cpu"
    import torch

    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    raise WrongStateError(
        f"{key}: 'cuda' requested, but this process sees no CUDA GPU (torch {torch.__version__}, {build}, "
        "torch.cuda.is_available() is False); set it to 'auto' (a GPU when one is visible, else the CPU) or 'cpu'"
    )
