"""Where a checkpoint is: a local folder, or a hub id already in the local Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from mach.errors import MissingFileError


def resolve_model_path(repo_or_path: str | os.PathLike[str]) -> Path:
    """A local folder, or a hub id already present in the local Hugging Face cache."""
    path = Path(repo_or_path).expanduser()
    if path.exists():
        return path
    text = str(repo_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        hub = Path(
            os.environ.get("HF_HUB_CACHE")
            or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        )
        snapshots = hub / f"models--{text.replace('/', '--')}" / "snapshots"
        found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1].parent
        raise MissingFileError(
            f"{text!r} is not a local folder and is not in the Hugging Face cache ({hub}); "
            f"mach does not download weights: fetch it first (huggingface-cli download {text})"
        )
    raise MissingFileError(f"{path}: no such checkpoint folder")
