"""Fetching a checkpoint from the Hugging Face hub: only the files mach reads.

Needs ``huggingface_hub`` (the ``mach-core[hub]`` extra); the rest of mach runs without it.
``config.json`` comes first, so an architecture no installed adapter runs is refused before
any weights are fetched, and the weight index next, so exactly its shards are fetched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mach.adapter import MoeArchAdapter
from mach.decode.dflash.config import DRAFT_DIR
from mach.errors import HubError
from mach.experts.sidecar import SIDECAR_DIR
from mach.io.checkpoint import INDEX_FILE
from mach.io.paths import has_weights, is_hub_id
from mach.registry import detect_arch

INSTALL_HINT = 'pip install "huggingface_hub>=0.26"'
STANDARD_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
)
"""Files mach reads from every checkpoint (when present) besides its weights."""


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError(
            f"fetching from the Hugging Face hub needs huggingface_hub, which is not installed: "
            f"{INSTALL_HINT}"
        ) from exc
    return huggingface_hub


def checkpoint_patterns(adapter: MoeArchAdapter, shards: list[str] | None) -> list[str]:
    """What to fetch for ``adapter``'s family: the standard files, ``shards`` (from the weight
    index; ``None`` when there is none), the engine sidecar, the DFlash draft where the family
    drafts with one, and the files the adapter lists in ``checkpoint_files``."""
    weights = [INDEX_FILE, *shards] if shards is not None else ["model*.safetensors"]
    draft = [f"{DRAFT_DIR}/*"] if adapter.specdec_kind == "specdec_v7" else []
    return [*STANDARD_FILES, *weights, f"{SIDECAR_DIR}/*", *draft, *adapter.checkpoint_files]


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch what mach needs of ``repo_id`` and return the folder it is in.

    Files already in the local Hugging Face cache (or in ``local_dir``) are not fetched again;
    with ``HF_HUB_OFFLINE=1`` only the cache is used. ``progress`` shows ``huggingface_hub``'s
    progress bars. Every failure raises ``HubError`` with one line saying what failed and what
    to do.
    """
    if not is_hub_id(repo_id):
        raise HubError(f"{repo_id!r} is not a hub id; give it as org/name")
    hub = _hub()
    where = {"revision": revision, "local_dir": None if local_dir is None else str(local_dir)}
    if not progress:
        hub.utils.disable_progress_bars()
    with _explained(repo_id, revision):
        config_file = hub.hf_hub_download(repo_id, "config.json", **where)
        try:
            index_file = hub.hf_hub_download(repo_id, INDEX_FILE, **where)
        except hub.errors.EntryNotFoundError:
            index_file = None
        config = _json(Path(config_file))
        adapter = detect_arch(config, (), arch)
        shards = None
        if index_file is not None:
            weight_map = _json(Path(index_file)).get("weight_map")
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None
        folder = Path(hub.snapshot_download(
            repo_id, allow_patterns=checkpoint_patterns(adapter, shards), **where
        ))  # fmt: skip
    if not has_weights(folder):
        # Offline, huggingface_hub hands back a cached snapshot however little of it is there.
        if hub.constants.HF_HUB_OFFLINE:
            raise HubError(_not_cached(repo_id, offline=True))
        raise HubError(
            f"{repo_id}: {folder} has no complete set of safetensors weights after the "
            "download; mach reads safetensors checkpoints"
        )
    return folder


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(f"{path}: the downloaded file is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


@contextmanager
def _explained(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn ``huggingface_hub``'s exceptions into one ``HubError`` line naming the fix."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        message = _explain(exc, repo_id, revision)
        if message is None:
            raise
        raise HubError(message) from exc


def _not_cached(repo: str, offline: bool) -> str:
    why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
    fix = "unset HF_HUB_OFFLINE" if offline else "check the network connection"
    return (f"{repo} is not (completely) in the local Hugging Face cache and {why}: {fix} and "
            f"run mach download {repo} again")  # fmt: skip


def _explain(exc: Exception, repo: str, revision: str | None) -> str | None:
    hub = _hub()
    errors = hub.errors
    if isinstance(exc, errors.GatedRepoError):
        return (f"{repo} is gated: accept its terms at https://huggingface.co/{repo}, then log "
                "in (hf auth login) or set HF_TOKEN")  # fmt: skip
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"{repo}: no such model on the Hugging Face hub, or it is private (log in with "
                "hf auth login or set HF_TOKEN); check the id")  # fmt: skip
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}; check --revision"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return _not_cached(repo, offline=bool(hub.constants.HF_HUB_OFFLINE))
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{repo} has no config.json, so it is not a checkpoint mach can load"
    if isinstance(exc, errors.HfHubHTTPError):
        lines = str(exc).strip().splitlines()
        return f"the Hugging Face hub refused {repo}: {lines[0] if lines else type(exc).__name__}"
    if isinstance(exc, errors.HFValidationError):
        return f"{repo!r} is not a valid hub id: {exc}"
    if isinstance(exc, OSError):
        return f"fetching {repo} failed: {exc}; run mach download {repo} again to resume"
    return None
