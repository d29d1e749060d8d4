"""Config and structure files for fuzzing `pyacemaker config check` and the structure readers: valid bases (one
per oracle backend, with every optional section that takes checks), and mutations that make them clearly
invalid, each with the text the one-line error must contain (the key path or the file name).

Every generator takes `choose(options) -> option`, so the hypothesis tests (tests/unit/test_config_fuzz.py) draw
through hypothesis and the campaign script (benchmarks/config_fuzz_campaign.py) through a seeded Random.
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from pyacemaker.teacher.resolve import BUNDLED_METRICS, BUNDLED_MODEL

T = TypeVar("T")
Choose = Callable[[Sequence[Any]], Any]

SEED = (
    "6\nProperties=species:S:1:pos:R:3 charge=-1 spin_multiplicity=1\n"
    "C 0.0 0.0 0.0\nH 1.025 0.0 0.350\nH -0.513 0.888 0.350\nH -0.513 -0.888 0.350\n"
    "Cl 0.0 0.0 -1.772\nCl 0.0 0.0 2.947\n"
)
# teacher.model: the bundled teacher's bytes with its metrics beside it, so `config check` reads the elements the
# teacher knows from the metrics (milliseconds) instead of loading the model with torch.
AUX_FILES = {
    "job.sh": b"#!/bin/bash\n{commands}\n",
    "teacher.model": BUNDLED_MODEL.read_bytes(),
    "teacher_metrics.json": BUNDLED_METRICS.read_bytes(),
    "pot.yace": b"elements: [C]\n",
}
_COMMON: dict[str, Any] = {
    "name": "fuzz",
    "system": {"seeds": ["seed.xyz"], "charge": -1, "spin_multiplicity": 1},
    "budget": {"max_dft_calls": 20},
    # 3 isolated atoms + 6 validation labels (a hold-out of 20 / 7 → 3, 3 profile points) + 4 DIRECT fit the budget
    "sampling": {"direct": {"n_select": 4}},
    "md": {"windows": {"atoms": [4, 0, 5], "start": -1.5, "stop": 1.5, "count": 3}, "steps": 100},
    "validation": {"profile": {"atoms": [4, 0, 5], "start": -1.5, "stop": 1.5, "count": 3}},
}
ORACLES: dict[str, dict[str, Any]] = {
    "xtb": {
        "backend": "xtb",
        "executor": {"kind": "slurm", "partition": "short"},
    },
    "lj": {"backend": "lj"},
    "pyscf": {
        "backend": "pyscf",
        "executor": {"kind": "pbs", "queue": "q"},
    },
    "qe": {"backend": "qe", "pseudopotentials": {"C": "C.UPF", "H": "H.UPF", "Cl": "Cl.UPF"}, "ecutwfc_ry": 30.0},
    "vasp": {"backend": "vasp", "incar": {"ISMEAR": 0}},
    "mace": {"backend": "mace", "models": ["teacher.model"]},
    "ace": {"backend": "ace", "potential": "pot.yace"},
}
# Path fields that name an input file (must exist); other paths are outputs or remote directories.
INPUT_FILE_KEYS = {"system.seeds", "teacher.model", "oracle.models", "oracle.potential"}


@dataclass
class Case:
    """Files to write into an empty directory; `config.yaml` is the one to check."""

    what: str
    files: dict[str, bytes]
    invalid: bool = True
    expect: str = ""  # text the error line must contain

    def write(self, directory: Path) -> Path:
        for name, content in self.files.items():
            (directory / name).write_bytes(content)
        return directory / "config.yaml"


@dataclass
class Leaf:
    path: tuple[str, ...]
    kind: str  # int, float, bool, str, path, floats (a list), atoms, strmap, literal
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return ".".join(self.path)


def base_config(backend: str) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(_COMMON))  # a deep copy
    data["oracle"] = yaml.safe_load(yaml.safe_dump(ORACLES[backend]))
    if backend == "mace":
        data["teacher"] = {"model": "teacher.model"}
    return data


def files_for(config: dict[str, Any] | bytes, seed: bytes | None = None) -> dict[str, bytes]:
    text = config if isinstance(config, bytes) else yaml.safe_dump(config, sort_keys=False).encode()
    return {"config.yaml": text, "seed.xyz": seed if seed is not None else SEED.encode(), **AUX_FILES}


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _strip(options[0])
    return annotation


def _bounds(field_info: Any) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in field_info.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    return bounds


def _submodel(annotation: Any, value: Any) -> type[BaseModel] | None:
    annotation = _strip(annotation)
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    if len(models) == 1:
        return models[0]
    for model in models:  # a tagged union: the member whose tag the value carries
        for tag in ("backend", "kind"):
            if tag in model.model_fields and isinstance(value, dict):
                default = get_args(model.model_fields[tag].annotation)
                if value.get(tag, model.model_fields[tag].default) in default:
                    return model
    return None


def leaves(model: type[BaseModel], data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """The scalar-ish fields of `model` (as filled by `data`), sub-sections followed where `data` has them or
    their defaults are sections."""
    found = []
    for name, info in model.model_fields.items():
        annotation = _strip(info.annotation)
        value = data.get(name)
        sub = _submodel(info.annotation, value if value is not None else {})
        if sub is not None:
            tagged = get_origin(_strip(info.annotation)) in (Union, types.UnionType)
            if not isinstance(value, dict) and (tagged or not info.default_factory):
                continue  # an absent optional section, or a tagged one that would need its tag
            found += leaves(sub, value if isinstance(value, dict) else {}, (*prefix, name))
            continue
        origin, args = get_origin(annotation), get_args(annotation)
        if annotation in (int, float, bool, str):
            kind = annotation.__name__
        elif isinstance(annotation, type) and issubclass(annotation, Path):
            kind = "path"
        elif origin is list and args and _strip(args[0]) is float:
            kind = "floats"
        elif origin is list and args and _strip(args[0]) in (str, Path):
            kind = "strs"
        elif origin is tuple:
            kind = "atoms"
        elif origin is dict and args and args[1] is str:
            kind = "strmap"
        elif origin is Literal:
            kind = "literal"
        else:
            continue
        found.append(Leaf((*prefix, name), kind, _bounds(info)))
    return found


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


_BAD_VALUES: dict[str, list[Any]] = {
    "int": [True, False, "12", 2**63, -(2**63) - 1, 1.5, math.inf, math.nan, 10**30],
    "float": [True, False, "1.0", math.inf, -math.inf, math.nan, 1e308, -1e308],
    "bool": [2, 0.5, [True], "maybe"],
    "str": ["a\nb", "x\r\n#SBATCH --mem=1", "nul\x00byte", 7, True],
    "path": ["a\nb", 7, True],
    "strs": [["--account=x\n#SBATCH --mem=1G"], ["ok", "tab\tand\x1b"], [True]],
    "floats": [[300, True], [math.nan], [1e308], ["300"], [math.inf, 300]],
    "atoms": [[4, 0, 99], [4, 0, -1], [4, 4, 5], [True, 0, 5], [4, 0, 2**63], [4.5, 0, 5]],
    "strmap": [{"C": "a\nb"}, {"C": 1}],
    "literal": [True, 3, "no-such-option"],
}


def invalid_value_case(choose: Choose) -> Case:
    """A base with one field set to a clearly invalid value (wrong type, non-finite, far out of range, a control
    character, an atom index outside the 6-atom seed, a missing input file)."""
    backend = choose(sorted(ORACLES))
    data = base_config(backend)
    from pyacemaker.config import RunConfig

    leaf = choose(leaves(RunConfig, data))
    if leaf.key in INPUT_FILE_KEYS and choose([True, False]):
        value: Any = "missing/absent.file"
        value = [value] if leaf.kind in ("strs",) or leaf.key in ("system.seeds", "oracle.models") else value
        _set(data, leaf.path, value)
        return Case(f"{leaf.key}: missing file", files_for(data), expect=leaf.key)
    options = list(_BAD_VALUES[leaf.kind])
    if leaf.kind in ("int", "float"):  # past a bound by a wide margin (always two options: the same draws
        # pick the same slots whatever bounds a checkout declares, so campaigns on two checkouts compare)
        options.append(leaf.bounds.get("le", leaf.bounds.get("lt", 10**15)) * 1000 + 1000)
        options.append(leaf.bounds.get("ge", leaf.bounds.get("gt", -(10**15))) - 1000)
    value = choose(options)
    _set(data, leaf.path, value)
    # A bad tag (`backend`, `kind`) makes the section unreadable: its error names the section.
    expect = ".".join(leaf.path[:-1]) if leaf.path[-1] in ("backend", "kind") else leaf.key
    return Case(f"{leaf.key} = {value!r}", files_for(data), expect=expect)


def _alias_bomb() -> bytes:
    rows = ['  A0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        rows.append(f"  A{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    data = base_config("vasp")
    text = yaml.safe_dump(data, sort_keys=False).replace("  incar:\n    ISMEAR: 0\n", "  incar:\n")
    return (text + "".join("  " + row + "\n" for row in rows)).encode()


def document_case(choose: Choose) -> Case:
    """A config file that is not a usable document: an alias bomb, deep nesting, not UTF-8, oversized, a NUL
    byte, not a mapping, malformed YAML, an unknown key, a missing section."""
    data = base_config(choose(sorted(ORACLES)))
    depth = choose([100, 1000, 5000])
    variants: dict[str, Callable[[], bytes]] = {
        "alias bomb": _alias_bomb,
        "anchor": lambda: yaml.safe_dump(data).encode() + b"extra: &x 1\n",
        "deep nesting": lambda: b"name: fuzz\nx: " + b"[" * depth + b"]" * depth + b"\n",
        "deep mappings": lambda: b"name: fuzz\nx: " + b"{a: " * depth + b"1" + b"}" * depth + b"\n",
        "not UTF-8": lambda: yaml.safe_dump(data).encode().replace(b"fuzz", b"f\xffzz"),
        "UTF-16": lambda: yaml.safe_dump(data).encode("utf-16"),
        "NUL byte": lambda: yaml.safe_dump(data).encode() + b"# \x00\n",
        "oversized": lambda: yaml.safe_dump(data).encode() + b"#" + b"x" * (2 << 20) + b"\n",
        "not a mapping": lambda: b"- name: fuzz\n",
        "scalar": lambda: b"42\n",
        "empty": lambda: b"",
        "malformed": lambda: b"name: fuzz\nsystem: [unclosed\n",
        "tab indent": lambda: b"name: fuzz\nsystem:\n\tseeds: [seed.xyz]\n",
        "5000-digit integer": lambda: (
            yaml.safe_dump(data).encode() + b"budget: {max_dft_calls: 1" + b"0" * 5000 + b"}\n"
        ),
        "impossible date": lambda: b"name: 2020-13-45\n",
        "bad tagged scalar": lambda: b"name: !!int abc\n",
        "python tag": lambda: b"name: !!python/object/apply:os.system ['true']\n",
        "binary": lambda: yaml.safe_dump(data).encode().replace(b"name: fuzz", b"name: !!binary aGVsbG8="),
        "unknown key": lambda: yaml.safe_dump({**data, "smapling": {}}).encode(),
        "section not a mapping": lambda: yaml.safe_dump({**data, "md": 5}).encode(),
        "missing oracle": lambda: yaml.safe_dump({k: v for k, v in data.items() if k != "oracle"}).encode(),
    }
    what = choose(sorted(variants))
    expect = {"unknown key": "smapling", "section not a mapping": "md", "missing oracle": "oracle"}
    return Case(what, files_for(variants[what]()), expect=expect.get(what, "config.yaml"))


def seed_case(choose: Choose) -> Case:
    """A valid config whose seed file is malformed: a count line past the file's end (999999999999), counts
    that do not match, a non-integer charge, an unknown element, non-finite or absurd coordinates, no atoms,
    not UTF-8, an impossible spin."""
    lines = SEED.splitlines()
    header, comment, atoms = lines[0], lines[1], lines[2:]
    body = "\n".join(atoms) + "\n"
    variants = {
        "count 999999999999": f"999999999999\n{comment}\n{body}",
        "count 1e12 twice": f"999999999999\n{comment}\n{body}999999999999\n{comment}\n",
        "count too small": f"5\n{comment}\n{body}",
        "count too large": f"7\n{comment}\n{body}",
        "negative count": f"-6\n{comment}\n{body}",
        "count not a number": f"six\n{comment}\n{body}",
        "charge=abc": f"{header}\n{comment.replace('charge=-1', 'charge=abc')}\n{body}",
        "charge=1.5": f"{header}\n{comment.replace('charge=-1', 'charge=1.5')}\n{body}",
        "spin_multiplicity=abc": f"{header}\n{comment.replace('spin_multiplicity=1', 'spin_multiplicity=abc')}\n{body}",
        "unknown element": f"{header}\n{comment}\n{body.replace('Cl 0.0 0.0 2.947', 'Xx 0.0 0.0 2.947')}",
        "dummy atom X": f"{header}\n{comment}\n{body.replace('Cl 0.0 0.0 2.947', 'X 0.0 0.0 2.947')}",
        "NaN coordinate": f"{header}\n{comment}\n{body.replace('2.947', 'nan')}",
        "inf coordinate": f"{header}\n{comment}\n{body.replace('2.947', 'inf')}",
        "1e308 coordinate": f"{header}\n{comment}\n{body.replace('2.947', '1e308')}",
        "missing column": f"{header}\n{comment}\n{body.replace('Cl 0.0 0.0 2.947', 'Cl 0.0 0.0')}",
        "zero atoms": f"0\n{comment}\n",
        "empty file": "",
        "Properties mismatch": f"{header}\nProperties=species:S:1:pos:R:2 charge=-1\n{body}",
        "periodic without cell": f'{header}\n{comment} pbc="T T T"\n{body}',
    }
    what = choose(sorted(variants))
    seed = variants[what].encode()
    if what == "count not a number" and choose([True, False]):
        what, seed = "not UTF-8", SEED.encode().replace(b"Cl 0.0", b"Cl\xff 0.0")
    data = base_config(choose(sorted(ORACLES)))
    return Case(f"seed: {what}", files_for(data, seed), expect="seed.xyz")


def spin_case(choose: Choose) -> Case:
    """A spin multiplicity or charge that no seed allows (spin 1000001, a singlet with an odd count)."""
    data = base_config(choose(sorted(ORACLES)))
    key, value = choose(
        [
            ("spin_multiplicity", 1000001),
            ("spin_multiplicity", 2),
            ("spin_multiplicity", 47),
            ("spin_multiplicity", 0),
            ("charge", 1000),
            ("charge", 2**63),
        ]
    )
    data["system"][key] = value
    if key == "charge":
        data["system"]["seeds"] = ["seed.xyz"]
        data["system"].pop("spin_multiplicity")
    return Case(f"system.{key} = {value}", files_for(data), expect=f"system.{key}")


GENERATORS = (invalid_value_case, document_case, seed_case, spin_case)


def invalid_case(choose: Choose) -> Case:
    return choose(GENERATORS)(choose)


def valid_case(choose: Choose) -> Case:
    """A base with one number set to another value inside its documented bounds: must still be accepted."""
    backend = choose(sorted(ORACLES))
    data = base_config(backend)
    from pyacemaker.config import RunConfig

    numeric = [
        leaf
        for leaf in leaves(RunConfig, data)
        if leaf.kind in ("int", "float")
        and leaf.path[0] not in ("system", "name")
        and leaf.path[-1] != "count"
        # Valid alone, but `config check` weighs them against each other (a budget below the hold-out is refused).
        and leaf.key not in ("budget.max_dft_calls", "validation.holdout_size", "sampling.direct.n_select")
    ]
    leaf = choose(numeric)
    low = leaf.bounds.get("ge", leaf.bounds.get("gt", 0))
    high = leaf.bounds.get("le", leaf.bounds.get("lt", low + 1000))
    fraction = choose([0.0, 0.001, 0.1, 0.5, 0.9])
    value: float = low + (min(high, low + 1000) - low) * fraction
    if leaf.kind == "int":
        value = max(math.ceil(value), int(low) + (1 if "gt" in leaf.bounds else 0))
    else:
        value = max(value, low * 1.001 + 1e-6) if "gt" in leaf.bounds else value
        if "lt" in leaf.bounds and value >= leaf.bounds["lt"]:
            value = (low + leaf.bounds["lt"]) / 2
    if leaf.path[-1] in ("start", "stop"):
        value = -value if leaf.path[-1] == "start" else value
    _set(data, leaf.path, value)
    return Case(f"{leaf.key} = {value!r}", files_for(data), invalid=False)


class CallTimeoutError(Exception):
    """A call that ran past its time limit (a hang)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CallTimeoutError in the main thread after `seconds` (SIGALRM; Python code is interrupted at once)."""

    def _expire(signum: int, frame: Any) -> None:
        raise CallTimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_config_check(path: Path) -> tuple[int, str]:
    """`pyacemaker config check PATH` in this process: (exit code, stderr). Exceptions propagate (a traceback)."""
    from pyacemaker.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["config", "check", str(path)])
    return code, err.getvalue()
