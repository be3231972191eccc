"""Replacing a small file durably: a crash leaves the old file or the new one, never half of one.

Used by ``bus.authinit`` (``nats-server.conf``, ``bus.json``) and, through ``collectors.keyfile``, by the
collector's and node agent's state files. It lives at the bus layer, the lowest one that does I/O, so both
can call it.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, rename it over ``path`` and fsync the folder, so the
    new text is on disk before the rename and the rename before this returns. ``mode``: the new file's permission
    bits (the temp file's default otherwise). Raises ``OSError`` when the disk refuses."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
