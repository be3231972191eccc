"""Load YAML data files (catalog, policy, scenarios) and report errors by file and line.

Every data file breakfix reads at start-up goes through ``load_model``: YAML syntax errors
and schema errors both become one ``DataFileError`` naming the file and the line, so the
CLI can print a clear message instead of a traceback. Hostile or careless files are refused
before they cost memory or a traceback (``read_text``, ``parse_yaml``):

- a size limit (``MAX_DATA_BYTES``; ``/dev/zero`` stops there), NUL bytes (binary data) and invalid
  UTF-8 (``file: not UTF-8 at byte N``);
- YAML aliases (``*ref``: the alias bomb) and merge keys are refused; nesting deeper than ``MAX_DEPTH``
  and more than ``MAX_NODES`` nodes are refused, checked on the parser's event stream before anything
  is built;
- every number must be finite (``.inf`` / ``.nan`` are refused wherever they appear, integers beyond 2**63
  too), and a number
  under a key that names a duration, interval, window, timeout, threshold, limit or count must not be
  negative (``_non_negative``). The models add their own tighter bounds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

LineMap = dict[tuple[str | int, ...], int]

MAX_DATA_BYTES = 8 * 1024 * 1024  # catalogs, policies, rules, scenarios, configs
MAX_DEPTH = 32
MAX_NODES = 500_000
# Keys whose numbers count or measure something that cannot be negative.
_NON_NEGATIVE = re.compile(r"(?:^|_)(?:s|ms|seconds|minutes|hours|days|interval|window|timeout|delay|backoff|"
                           r"threshold|limit|max|min|count|budget|retries|attempts|nodes|gpus|burst|per_min|"
                           r"share|rate|gbps|records|size|bytes|port|depth|ttl|age|cap|duration|after|every)(?:_|$)")


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


def read_text(path: str | Path, max_bytes: int = MAX_DATA_BYTES, *, what: str = "", lenient: bool = False) -> str:
    """A text file's content, refused with one ``DataFileError`` when it is too large, binary or not UTF-8.
    Reads at most ``max_bytes + 1`` bytes, so a device like ``/dev/zero`` costs no more than that.
    ``lenient``: undecodable bytes become U+FFFD instead, and NUL bytes are dropped unless the file starts with a
    block of nothing else (logs, where one odd byte, or the runs of NULs an unclean shutdown leaves in syslog, must
    not cost the file; ``/dev/zero`` is still refused at once)."""
    p = Path(path)
    try:
        if p.is_dir():
            raise DataFileError(p, None, "is a directory, not a file")
        chunks: list[bytes] = []
        size = 0
        with p.open("rb") as fh:
            while size <= max_bytes:
                chunk = fh.read(min(1 << 20, max_bytes + 1 - size))
                if not chunk:
                    break
                nul = chunk.find(b"\x00")
                if nul >= 0 and (not lenient or (size == 0 and chunk.count(b"\x00") == len(chunk))):
                    # binary: refused at the first NUL, before reading on (``/dev/zero``)
                    raise DataFileError(p, None, f"binary data, not text (NUL byte at byte {size + nul})")
                size += len(chunk)
                # lenient: a log's runs of NULs (the blocks a crash left unwritten in syslog) are dropped
                chunks.append(chunk.replace(b"\x00", b"") if nul >= 0 else chunk)
    except OSError as exc:
        raise DataFileError(p, None, f"cannot read: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise DataFileError(p, None, f"larger than {max_bytes} bytes{what}")
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8", errors="replace" if lenient else "strict")
    except UnicodeDecodeError as exc:
        raise DataFileError(p, None, f"not UTF-8 at byte {exc.start}") from None


def _yaml_error(path: str | Path, exc: yaml.YAMLError) -> DataFileError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return DataFileError(path, line, f"invalid YAML: {problem}")


def _check_events(text: str, path: str | Path) -> None:
    """Refuse aliases, merge keys, deep nesting and huge documents on the event stream (nothing built yet)."""
    depth = 0
    nodes = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        line = ev.start_mark.line + 1 if ev.start_mark is not None else None
        if isinstance(ev, yaml.AliasEvent):
            raise DataFileError(path, line, "YAML aliases (*ref) are not allowed in data files")
        if isinstance(ev, yaml.ScalarEvent) and ev.value == "<<" and ev.implicit[0]:
            raise DataFileError(path, line, "YAML merge keys (<<) are not allowed in data files")
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise DataFileError(path, line, f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(ev, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise DataFileError(path, line, f"more than {MAX_NODES} YAML nodes")


def _check_numbers(data: Any, path: str | Path, lines: LineMap) -> None:
    """Every float finite; numbers under counting/measuring keys not negative. Iterative (no recursion)."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*loc, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*loc, i), v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            dotted = ".".join(str(x) for x in loc) or "<root>"
            raise DataFileError(path, line_for(lines, loc), f"{dotted}: {value} is not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            dotted = ".".join(str(x) for x in loc) or "<root>"
            raise DataFileError(path, line_for(lines, loc), f"{dotted}: {str(value)[:20]}... is out of range")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value < 0 and _non_negative(loc):
            dotted = ".".join(str(x) for x in loc)
            raise DataFileError(path, line_for(lines, loc), f"{dotted}: must be greater than or equal to 0, "
                                                            f"got {value}")


def _non_negative(loc: tuple[str | int, ...]) -> bool:
    keys = [k for k in loc if isinstance(k, str)]
    return bool(keys) and bool(_NON_NEGATIVE.search(keys[-1].lower()))


def parse_yaml(text: str, path: str | Path) -> tuple[Any, LineMap]:
    """Parse YAML text; return the data and a map from key path to 1-based line."""
    try:
        _check_events(text, path)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except DataFileError:
        raise
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
        raise DataFileError(path, None, f"invalid YAML: {type(exc).__name__}") from None
    lines: LineMap = {}
    if node is not None:
        _walk(node, (), lines)
    _check_numbers(data, path, lines)
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
    except (RecursionError, OverflowError) as exc:
        raise DataFileError(path, None, f"invalid data: {type(exc).__name__}") from None
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
    data, lines = parse_yaml(read_text(p), p)
    return validate(model, data, p, lines)
