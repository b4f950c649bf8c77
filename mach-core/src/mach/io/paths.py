"""Where a checkpoint is: a local folder, or a hub id already in the local Hugging Face cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mach.errors import MissingFileError
from mach.io.checkpoint import INDEX_FILE


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, found the way ``huggingface_hub`` finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub repository id (``org/name``) rather than a path."""
    org, _, name = text.partition("/")
    return bool(org and name) and "/" not in name and not text.startswith((".", "~"))


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds ``config.json`` and every weight file its index names."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / INDEX_FILE
    if not index.is_file():
        return any(folder.glob("*.safetensors"))
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # opening the checkpoint names what is wrong with the index
    return all((folder / shard).is_file() for shard in shards)


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The complete snapshot of ``repo_id`` at ``revision`` in the local hub cache, if any.

    A branch or tag is followed through ``refs/``; a snapshot whose download stopped part way
    (config but not every shard) does not count.
    """
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    if ref.is_file():
        candidates = [repo / "snapshots" / ref.read_text(encoding="utf-8").strip()]
    elif (repo / "snapshots" / revision).is_dir():
        candidates = [repo / "snapshots" / revision]
    elif revision == "main":
        found = (repo / "snapshots").glob("*/config.json")
        candidates = [p.parent for p in sorted(found, key=lambda p: -p.stat().st_mtime)]
    else:
        candidates = []
    return next((c for c in candidates if has_weights(c)), None)


def resolve_model_path(repo_or_path: str | os.PathLike[str]) -> Path:
    """A local folder, or a hub id already present in the local Hugging Face cache.

    A local path that exists always wins. Nothing is downloaded here: ``mach download`` (or
    ``mach.hub.download``) fetches a hub id first.
    """
    path = Path(repo_or_path).expanduser()
    if path.exists():
        return path
    text = str(repo_or_path)
    if is_hub_id(text):
        found = cached_snapshot(text)
        if found is not None:
            return found
        raise MissingFileError(
            f"{text!r} is not a local folder and is not (completely) in the Hugging Face cache "
            f"({hub_cache()}); fetch it first: mach download {text}"
        )
    raise MissingFileError(f"{path}: no such checkpoint folder")
