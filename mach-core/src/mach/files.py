"""File names read from a checkpoint's own indexes, kept inside the checkpoint."""

from __future__ import annotations

import posixpath
from pathlib import Path

from mach.errors import CorruptCheckpointError


def member_path(folder: Path, name: object, listed_in: Path) -> Path:
    """``folder / name`` for a file name read from an index, refusing names that leave ``folder``.

    The name is judged as written, not where symlinks lead, since Hugging Face cache snapshots
    are folders of symlinks into a shared blob store.
    """
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(
            f"{listed_in}: {name!r} is not a file name; fix the entry or re-download the checkpoint"
        )
    normal = posixpath.normpath(name)
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise CorruptCheckpointError(
            f"{listed_in}: entry {name!r} points outside {folder}; an index may only name files "
            "inside its own folder: fix the entry or re-download the checkpoint"
        )
    return folder / normal
