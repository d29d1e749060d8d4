"""Write docs/configuration.md from the pydantic config models (`--check`: fail if it is out of date)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pyacemaker.config import RunConfig

TARGET = Path(__file__).resolve().parent / "configuration.md"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace("'>", "")
    text = re.sub(r"Annotated\[float, FieldInfo\(.*?metadata=\[Gt\(gt=0\)\]\)\]", "float > 0", text)
    bounded = r"Annotated\[float, FieldInfo\(.*?metadata=\[Gt\(gt=0\), Le\(le=(\w+)\)\]\)\]"
    text = re.sub(bounded, r"float in (0, \1]", text)
    return text.replace("pyacemaker.config.", "").replace(" | ", " or ")


def _first_line(model: type[BaseModel]) -> str:
    lines = (model.__doc__ or "").strip().splitlines()
    return lines[0] if lines else ""


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        members = getattr(field.annotation, "__args__", (field.annotation,))
        sections = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if field.is_required():
            default = "required"
        elif sections:
            default = "(section)"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()}`"  # type: ignore[call-arg]
        else:
            default = "" if field.default is PydanticUndefined else f"`{field.default}`"
        constraints = ", ".join(str(m) for m in field.metadata)
        if len(sections) > 1:
            description = "one of the sections below, chosen by its `backend` key"
        else:
            description = field.description or (_first_line(sections[0]) if sections else "")
        type_text = " or ".join(m.__name__ for m in sections) if sections else _type_name(field.annotation)
        rows.append(f"| `{key}` | {type_text} | {default} | {constraints} | {description} |")
        for section in sections:
            if len(sections) > 1:  # a tagged union: say which tag selects these keys
                rows.append(f"| `{key}` ({section.__name__}) | | | | {_first_line(section)} |")
            rows.extend(_rows(section, f"{key}."))
    return rows


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
        "| key | type | default | constraints | meaning |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + _rows(RunConfig, "")) + "\n"


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
