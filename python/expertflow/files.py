"""Output files: never overwrite without being asked, never leave a partial file behind.

Writers produce a temporary sibling and rename it over the target only once it is complete, so a full
disk or an interrupt leaves the previous output (or nothing), not a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_output", "atomic_output"]


def check_output(path: str | Path, force: bool) -> Path:
    """Refuses an existing ``path`` unless ``force``, and a missing parent folder; call before heavy work."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it, or choose another --out")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write a file or folder at; on success it replaces
    ``path`` by a rename, on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():  # a folder cannot be renamed over: move the old one aside
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
