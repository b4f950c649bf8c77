"""What this mach can do, so every report (``mach archs``, ``mach check``,
``/v1/capabilities``) says the same thing.

An engine feature that is not built yet is listed in ``UNAVAILABLE`` with the reason; it is
reported as false for every architecture until the change that builds it removes the entry.
"""

from __future__ import annotations

from typing import Any

from mach.adapter import KvCacheKind

UNAVAILABLE: dict[str, str] = {}

OFF_TOGETHER: dict[str, str] = {
    "continuous_batching+speculative_decoding": (
        "a drafting engine decodes one sequence at a time: where requests can batch, mach "
        "serve batches them and drafts only when asked (--draft, or --max-batch 1)"
    ),
    "continuous_batching+affine_kv": (
        "affine KV caches have no batched form: with --kv-format affine, requests decode one at "
        "a time (TurboQuant, the default --kv-bits format, batches)"
    ),
}
"""Pairs of features that each work but not at once, with what happens instead."""

# Which cache kinds each feature can work with once it exists; ``None`` means unknown until a
# checkpoint's caches are built (a rotating cache batches only when it keeps no prefix;
# ``mach check`` and the server verify it). Prefix reuse restores whole per-layer snapshots, so
# it works for every kind, sliding windows included. Quantized KV replaces full-attention
# caches (sliding windows and GDN state stay as they are); a compressed cache has none.
_BY_CACHE_KIND: dict[str, dict[str, bool | None]] = {
    "continuous_batching": {"standard": True, "hybrid_gdn": True, "compressed": False,
                            "rotating": None},
    "prefix_reuse": {"standard": True, "hybrid_gdn": True, "compressed": True, "rotating": True},
    "quantized_kv": {"standard": True, "hybrid_gdn": True, "compressed": False,
                     "rotating": True},
}  # fmt: skip


def available(feature: str) -> bool:
    """Whether mach has built ``feature`` at all."""
    return feature not in UNAVAILABLE


def feature_for(feature: str, kv_cache_kind: KvCacheKind) -> bool | None:
    """``feature`` for an architecture: false while mach lacks it, else what its cache allows."""
    if not available(feature):
        return False
    return _BY_CACHE_KIND[feature][kv_cache_kind]


def arch_features(kv_cache_kind: KvCacheKind) -> dict[str, Any]:
    """Every cache-dependent feature for an architecture, and why any is unavailable."""
    features: dict[str, Any] = {f: feature_for(f, kv_cache_kind) for f in _BY_CACHE_KIND}
    features["unavailable"] = {f: r for f, r in UNAVAILABLE.items() if f in _BY_CACHE_KIND}
    features["off_together"] = dict(OFF_TOGETHER)
    return features
