"""Pick the decode engine for a loaded checkpoint: speculative when its family drafts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.decode.engine import DecodeEngine, TargetEngine
from mach.tokenizer.tokenizer import Tokenizer


def build_engine(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    cache: SequenceCache,
    checkpoint: str | os.PathLike[str],
    arch: str | None = None,
    draft: bool | None = None,
    num_draft_tokens: int = 2,
) -> DecodeEngine:
    """``SpecDecEngine`` when the architecture has a draft family and the checkpoint carries
    its draft (``draft=None`` or ``True``), else ``TargetEngine``.

    ``draft=True`` on a checkpoint without a usable draft raises, rather than silently
    decoding target-only.
    """
    from mach.decode.speculative import DraftGate, SpecDecEngine
    from mach.registry import detect_arch, make_drafter

    path = Path(checkpoint)
    if draft is False or not (path / "config.json").is_file():
        if draft:
            raise ValueError(f"{path}: no config.json, so no draft can be loaded")
        return TargetEngine(model, tokenizer, cache.new)
    config = json.loads((path / "config.json").read_text())
    adapter = detect_arch(config, frozenset(), arch)
    drafter = make_drafter(adapter, model, path, config) if adapter.specdec_kind else None
    if drafter is None:
        if draft:
            raise ValueError(
                f"{path}: {adapter.name} has no draft here (specdec_kind="
                f"{adapter.specdec_kind}; the checkpoint may not ship its draft weights, or the "
                "family's draft switch is off)"
            )
        return TargetEngine(model, tokenizer, cache.new)
    gate = DraftGate.from_env(drafter.default_gate)
    return SpecDecEngine(model, tokenizer, cache.new, drafter, num_draft_tokens, gate)
