"""A DFlash draft's ``config.json``: Qwen3-style layers plus ``dflash_config``, checked against
the target it drafts for."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mach.errors import ConfigError, MissingFileError


def default_target_layers(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The target layers a draft reads when its config does not list them: spread from the
    second layer to the fourth from last, one per draft layer."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    step = (end - start) / (num_draft_layers - 1)
    return [round(start + i * step) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DFlashConfig:
    """What the draft model and the drafter need; ``raw`` keeps the whole file (RoPE fields)."""

    path: Path
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    raw: Mapping[str, Any]


def _positive(config: Mapping[str, Any], key: str, where: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive whole number, got {value!r}")
    return value


def read_dflash_config(
    folder: Path, target_hidden: int, target_layers: int, vocab_size: int
) -> DFlashConfig:
    """Read and check ``folder/config.json`` against the target's hidden size, layer count and
    vocabulary. Raises ``ConfigError`` (or ``MissingFileError``) naming the field and the fix."""
    where = folder / "config.json"
    if not where.is_file():
        raise MissingFileError(f"{where}: not found; a DFlash draft folder holds config.json and "
                               "model.safetensors")  # fmt: skip
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: cannot be read as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: not a JSON object")
    dflash = raw.get("dflash_config")
    if not isinstance(dflash, dict):
        raise ConfigError(f"{where}: no dflash_config; this is not a DFlash draft")
    hidden = _positive(raw, "hidden_size", where)
    if hidden != target_hidden:
        raise ConfigError(
            f"{where}: hidden_size {hidden} differs from the target's {target_hidden}; a DFlash "
            "draft shares the target's embedding and output head, so it must be trained for it"
        )
    layers = _positive(raw, "num_hidden_layers", where)
    heads = _positive(raw, "num_attention_heads", where)
    kv_heads = _positive(raw, "num_key_value_heads", where, heads)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads ({heads}) is not a multiple of "
                          f"num_key_value_heads ({kv_heads})")  # fmt: skip
    block = dflash.get("block_size", raw.get("block_size"))
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ConfigError(
            f"{where}: block_size must be a whole number of at least 2, got {block!r}"
        )
    ids = dflash.get("target_layer_ids")
    if ids is None:
        ids = default_target_layers(target_layers, layers)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise ConfigError(
            f"{where}: dflash_config.target_layer_ids must be a list of layer numbers"
        )
    outside = [i for i in ids if not 0 <= i < target_layers]
    if outside:
        raise ConfigError(
            f"{where}: target_layer_ids {outside} are outside the target's {target_layers} "
            "layers; the draft was trained for another model"
        )
    mask = dflash.get("mask_token_id")
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < vocab_size:
        raise ConfigError(
            f"{where}: dflash_config.mask_token_id {mask!r} is not a token of the target's "
            f"vocabulary (size {vocab_size})"
        )
    eps = raw.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ConfigError(f"{where}: rms_norm_eps must be a positive number, got {eps!r}")
    return DFlashConfig(
        path=folder, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=_positive(raw, "head_dim", where, hidden // heads),
        intermediate_size=_positive(raw, "intermediate_size", where), rms_norm_eps=float(eps),
        block_size=block, target_layer_ids=tuple(ids), mask_token_id=mask, raw=raw,
    )  # fmt: skip


DRAFT_DIR = "draft"
"""Where a checkpoint carries its DFlash draft: ``<checkpoint>/draft/``."""


def draft_folder(checkpoint: Path, chosen: str | None = None) -> Path | None:
    """The DFlash draft to use: ``chosen`` (``LoadOptions.draft_path``) when given, else
    ``<checkpoint>/draft/`` when it holds a DFlash config, else ``None``."""
    if chosen is not None:
        return Path(chosen)
    beside = checkpoint / DRAFT_DIR / "config.json"
    if not beside.is_file():
        return None
    try:
        raw = json.loads(beside.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return beside.parent  # the loader names the problem
    return beside.parent if isinstance(raw, dict) and "dflash_config" in raw else None
