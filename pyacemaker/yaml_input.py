"""Reading a YAML document that a user wrote: bounded in size and nesting, UTF-8, and without anchors or aliases
(an alias repeats a node without copying it in the file, so a few hundred bytes can expand to gigabytes).

Scalars follow PyYAML's safe loader (YAML 1.1) with one change: `1e-9` and `1e308`, which YAML 1.1 reads as
strings because they lack a dot, are numbers, as in YAML 1.2 and JSON.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a run config is a few kB; 1 MiB leaves room and parses in about a second
MAX_DEPTH = 32  # nested mappings/lists; the run config needs 4


class YamlInputError(ValueError):
    """A YAML file that is not read; the message names the file (and the line where there is one)."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing anchors and aliases and nesting deeper than MAX_DEPTH."""

    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}  # noqa: RUF012

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self._source = source
        self._depth = 0

    def _refuse(self, mark: Any, problem: str) -> None:
        raise YamlInputError(f"{self._source}: line {mark.line + 1}: {problem}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._refuse(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed; write the value out")
        if getattr(event, "anchor", None) is not None:
            self._refuse(event.start_mark, f"YAML anchors (&{event.anchor}) are not allowed; write the value out")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            self._refuse(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


for _first in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp)
        for tag, regexp in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
    _Loader.yaml_implicit_resolvers[_first].insert(0, ("tag:yaml.org,2002:float", _FLOAT))


def load_yaml_file(path: Path) -> Any:
    """The document in `path`; raises YamlInputError (one line naming the file) for a missing, oversized,
    non-UTF-8 or malformed file, an alias or anchor, or nesting deeper than MAX_DEPTH."""
    if not path.is_file():
        raise YamlInputError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlInputError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise YamlInputError(f"{path}: too large for a config (at most {MAX_BYTES} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise YamlInputError(f"{path}: line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, source: str) -> Any:
    """The document in `text` (see load_yaml_file); `source` names it in errors."""
    loader = None
    try:
        loader = _Loader(text, source)  # the reader refuses non-printable characters (NUL) here already
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlInputError(f"{source}:{where} not valid YAML: {problem}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar that its tag cannot build (a 5000-digit
        # integer, month 13 in a date, !!int abc)
        raise YamlInputError(f"{source}: not valid YAML: {str(exc).splitlines()[0][:120]}") from None
    except (RecursionError, MemoryError) as exc:  # defensive: nesting is bounded above, sizes by MAX_BYTES
        raise YamlInputError(f"{source}: too deeply nested or too large ({type(exc).__name__})") from None
    finally:
        if loader is not None:
            loader.dispose()
