"""Load YAML data files (catalog, policy, scenarios) and report errors by file and line.

Every data file breakfix reads at start-up goes through ``load_model``: YAML syntax errors
and schema errors both become one ``DataFileError`` naming the file and the line, so the
CLI can print a clear message instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

LineMap = dict[tuple[str | int, ...], int]


class DataFileError(ValueError):
    """A data file is unreadable or invalid. ``str()`` is ``path:line: message``."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


def _walk(node: yaml.Node, path: tuple[str | int, ...], out: LineMap) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
            out[(*path, key)] = k.start_mark.line + 1
            _walk(v, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), out)


def parse_yaml(text: str, path: str | Path) -> tuple[Any, LineMap]:
    """Parse YAML text; return the data and a map from key path to 1-based line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise DataFileError(path, line, f"invalid YAML: {problem}") from None
    lines: LineMap = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def line_for(lines: LineMap, loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest known prefix of ``loc``."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def validate(model: type[M], data: Any, path: str | Path, lines: LineMap) -> M:
    """Validate parsed data against a model; errors become ``DataFileError`` with a line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err.get("loc", ()) if isinstance(p, str | int))
        dotted = ".".join(str(p) for p in loc) or "<root>"
        msg = err.get("msg", "invalid")
        more = f" (+{len(exc.errors()) - 1} more errors)" if len(exc.errors()) > 1 else ""
        raise DataFileError(path, line_for(lines, loc), f"{dotted}: {msg}{more}") from None


def load_model(model: type[M], path: str | Path) -> M:
    """Read, parse and validate one YAML data file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataFileError(p, None, f"cannot read: {exc.strerror or exc}") from None
    data, lines = parse_yaml(text, p)
    return validate(model, data, p, lines)
