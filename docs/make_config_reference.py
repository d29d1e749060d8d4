"""Write docs/configuration.md from the pydantic config models (`--check`: fail if it is out of date)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pyacemaker.config import RunConfig
from pyacemaker.teacher.resolve import FOUNDATION_MODELS

TARGET = Path(__file__).resolve().parent / "configuration.md"


def _type_text(annotation: Any) -> str:
    """A field's type as a reader would write it: `float > 0`, `list[float in (0, 100000]]`, `X or null`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        bounds = [_bound(item) for info in args[1:] for item in getattr(info, "metadata", [info])]
        text = _type_text(args[0])
        return ", ".join([text, *(b for b in bounds if b)]).replace(", ", " ", 1)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(f"`{a}`" for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_text(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bound(item: Any) -> str:
    """One constraint of an annotated item type: Gt(gt=0) -> "> 0"."""
    for name, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if getattr(item, name, None) is not None:
            return f"{symbol} {getattr(item, name)}"
    if getattr(item, "min_length", None) is not None:
        return f"at least {item.min_length} long"
    if getattr(item, "max_length", None) is not None:
        return f"at most {item.max_length} long"
    return ""


def _sections(field: FieldInfo) -> tuple[list[type[BaseModel]], bool, str | None]:
    """The sub-models a field holds, whether it may be null, and the key that chooses among several."""
    discriminator = field.discriminator if isinstance(field.discriminator, str) else None
    members: list[Any] = [field.annotation]
    optional = False
    flat: list[Any] = []
    while members:
        member = members.pop(0)
        origin, args = get_origin(member), get_args(member)
        if origin is Annotated:
            for info in args[1:]:
                if isinstance(getattr(info, "discriminator", None), str):
                    discriminator = info.discriminator
            members.insert(0, args[0])
        elif origin in (Union, types.UnionType):
            members[:0] = list(args)
        elif member is type(None):
            optional = True
        else:
            flat.append(member)
    sections = [m for m in flat if isinstance(m, type) and issubclass(m, BaseModel)]
    return (sections if len(sections) == len(flat) else []), optional, discriminator


def _value(value: Any) -> str:
    """A default as it is written in YAML."""
    if isinstance(value, PurePath):
        value = str(value)
    return f"`{json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value}`"


def _summary(model: type[BaseModel]) -> str:
    """The first paragraph of the model's docstring, joined into one line."""
    paragraph = (model.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sections, optional, discriminator = _sections(field)
        if field.is_required():
            default = "required"
        elif sections and optional and field.default is None:
            default = "`null` (optional section)"
        elif sections:
            default = "(section; its defaults below)"
        elif field.default_factory is not None:
            default = _value(field.default_factory())  # type: ignore[call-arg]
        else:
            default = "" if field.default is PydanticUndefined else _value(field.default)
        constraints = ", ".join(_bound(m) or str(m) for m in field.metadata)
        if len(sections) > 1:
            description = f"one of the sections below, chosen by its `{discriminator}` key"
            if field.description:
                description = f"{field.description} {description[0].upper()}{description[1:]}."
        else:
            description = field.description or (_summary(sections[0]) if sections else "")
        type_text = " or ".join(m.__name__ for m in sections) if sections else _type_text(field.annotation)
        if sections and optional:
            type_text += " or null"
        rows.append(f"| `{key}` | {type_text} | {default} | {constraints} | {description} |")
        for section in sections:
            if len(sections) > 1:  # a tagged union: say which tag selects these keys
                rows.append(f"| `{key}` ({section.__name__}) | | | | {_summary(section)} |")
            rows.extend(_rows(section, f"{key}."))
    return rows


def _teacher_models() -> list[str]:
    """The names `teacher.model` (and `oracle.models`) accept, from the table resolve_teacher uses."""
    lines = [
        "",
        "## Teacher models",
        "",
        "`teacher.model` (and each entry of `oracle.models` for the mace backend) is a MACE model file (a path,",
        "relative to the config file), `bundled` (the project's small C/H/Cl teacher, trained on GFN2-xTB), or one",
        "of the mace foundation-model names below (case-insensitive). PyAceMaker never downloads a model: a named",
        "model must already be in mace's cache (`$XDG_CACHE_HOME/mace`, else `~/.cache/mace`) under the file name",
        "given here, as mace itself saves it; `pyacemaker config check` says whether it is there and, if not, which",
        "URL to save where. The teacher must know every element of the seeds: `config check` and `run` refuse a",
        "config whose `teacher.model` lacks an element of the seeds (exit 2, naming the elements).",
        "",
        "Offline, for elements no model at hand knows, let the run train its own teacher instead:",
        "`teacher: {bootstrap: {}}` (without `teacher.model`). Before step 1, a step 0 builds structures around",
        "the seeds (a pool like step 1's, plus MD at the cheap level along `md`'s windows and temperatures),",
        "labels them with `teacher.bootstrap.oracle` (GFN2-xTB by default; any oracle backend), and the trainer fits a",
        "small MACE to them from scratch: the recipe of the bundled teacher, with the cheap level's isolated-atom",
        "energies as its E0s. Nothing of it is charged to the DFT budget. It takes minutes (about 8 for 400",
        "structures and 400 epochs on one core); the model, its training set and its record (`teacher.json`:",
        "counts, validation RMSE against the cheap level, E0s) land in `step0_teacher/`, and the report shows them.",
        "A config with no `teacher` section whose seeds hold an element the bundled teacher lacks gets",
        "`teacher: {bootstrap: {}}` derived (`config check` prints it), so name, seeds, charge, DFT level and budget",
        "are enough for any elements.",
        "",
        "| name | family | file in mace's cache | download |",
        "|---|---|---|---|",
    ]
    for model in FOUNDATION_MODELS.values():
        lines.append(f"| `{model.name}` | {model.family} | `{model.cache_file_name}` | {model.url} |")
    return lines


def render() -> str:
    header = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models in `pyacemaker/config.py` by `docs/make_config_reference.py`;",
        "`make test` fails when this file is out of date. `pyacemaker config schema` prints the JSON schema;",
        "`pyacemaker config check FILE` validates a file. Unknown keys are errors. Relative paths are relative to",
        "the config file. Units: eV, Å, K, fs.",
        "",
        "Values are strict: numbers are finite, within the constraints below and within ±1e12; an integer key",
        'takes a whole number (not `true`, not `"5"`), a number key takes no string, a true/false key only',
        "`true` or `false`; strings and paths hold no control characters (a newline in an `#SBATCH` value is an",
        "error). The input files a config names (seeds, a teacher model file, `oracle.models`,",
        "`oracle.potential`, `oracle.executor.template`) must exist; every seed frame must have atoms of real",
        "elements at finite positions, an integer `charge`/`spin_multiplicity` if it gives one, and as many atoms",
        "as `md.windows.atoms` and `validation.profile.atoms` index. The file must be UTF-8, at most 1 MiB, nested",
        "at most 32 levels, and without YAML anchors or aliases (`&a`, `*a`: write the value out); `1e-9` is a",
        "number, as in YAML 1.2. Each problem is one line naming the key or file; `config check` exits with 2.",
        "",
        "`config check` then looks for what a valid config can still get wrong at run time (`run` does the same",
        "before it contacts any service): the teacher must be present (a file, or a named model in mace's cache)",
        "and know every element of the seeds; PySCF must parse `oracle.functional` and `oracle.basis`, and the",
        "basis must cover the seeds' elements (a misspelt name is refused with the closest one PySCF knows); the",
        "budget must pay for one isolated-atom energy per element, the validation's labels",
        "(`validation.holdout_size` + `validation.profile.count`) and at least 2 DIRECT labels, and be no smaller",
        "than `sampling.direct.n_select`; it warns (exit 0) when the whole DIRECT set or one active-learning batch",
        "does not fit besides the rest (the defaults, 50 DIRECT and 10 hold-out on 60 calls, do not); a nonlinear",
        "ACE needs TensorFlow in this environment (`config check` only: the trainer may run elsewhere). Elements",
        "are named by symbol.",
        "",
        "| key | type | default | constraints | meaning |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + _rows(RunConfig, "") + _teacher_models()) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
