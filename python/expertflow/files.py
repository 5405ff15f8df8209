"""Output files: never overwrite without being asked, never leave a partial file behind.

Writers produce a temporary sibling and rename it over the target only once it is complete, so a full
disk or an interrupt leaves the previous output (or nothing), not a truncated one. Replacing never
deletes anything the new output would not hold: a file does not replace a folder, nor a folder a
file, and a folder is replaced only when everything in it is something the new one writes too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_output", "atomic_output"]


def check_output(path: str | Path, force: bool, folder_files: frozenset[str] | None = None) -> Path:
    """Refuses an existing ``path`` unless ``force``; even then an existing one of the other kind (a
    file, or a folder when ``folder_files`` names the files of a folder output) and a folder holding
    anything else; and a missing parent folder. Call it before heavy work."""
    path = Path(path)
    folder = folder_files is not None
    if path.exists() or path.is_symlink():
        if path.is_dir() != folder:
            have, want = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
            raise FileExistsError(f"{path} is {have} and this command writes {want} there; choose another --out")
        foreign = sorted({p.name for p in path.iterdir()} - folder_files) if folder_files is not None else []
        if foreign:
            raise FileExistsError(f"{path} holds {', '.join(foreign[:5])}, which this command does not write; "
                                  "choose another --out")
        if not force:
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
        old_is_folder = path.is_dir() and not path.is_symlink()
        if (path.exists() or path.is_symlink()) and old_is_folder != tmp.is_dir():
            raise FileExistsError(f"{path} is a {'folder' if old_is_folder else 'file'}; it is not replaced by a "
                                  f"{'folder' if tmp.is_dir() else 'file'}")
        if old_is_folder:  # a folder cannot be renamed over: move the old one aside
            foreign = sorted({p.name for p in path.iterdir()} - {p.name for p in tmp.iterdir()})
            if foreign:
                raise FileExistsError(f"{path} holds {', '.join(foreign[:5])}, which this output does not write; "
                                      "it is not replaced")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
