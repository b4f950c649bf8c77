"""The identity of a loaded model as far as its cache state is concerned.

Two loads share prefix snapshots only when their fingerprints match: same architecture and
config, same weights (tensor headers, file sizes and a sample of each file's bytes), the same
dtypes in the loaded weights, the same expert format, and the same mach snapshot format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mach.cache.snapshot import FORMAT_VERSION

if TYPE_CHECKING:
    from mach.io.load import LoadedModel

SAMPLE_BYTES = 1 << 16


def model_fingerprint(loaded: LoadedModel) -> str:
    """A hex digest naming the model, its weights, dtype and the cache format."""
    ckpt = loaded.checkpoint
    digest = hashlib.sha256()
    tensors = sorted(
        (t.name, t.file.name, t.dtype, list(t.shape), t.start, t.end) for t in ckpt.tensors.values()
    )
    identity = {
        "format": FORMAT_VERSION,
        "arch": loaded.adapter.name,
        "config": ckpt.config,
        # What the weights compute in, not the option: without one, a CPU load widens half
        # precision, so its KV states differ from a GPU load of the same checkpoint.
        "dtype": _weight_dtypes(loaded),
        "residency": loaded.experts.residency,
        "quantization": loaded.experts.quantization,
        "kv": [loaded.options.kv_format, loaded.options.kv_bits],
        "tensors": tensors,
    }
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    digest_files(digest, ckpt.files)
    return digest.hexdigest()


def _weight_dtypes(loaded: LoadedModel) -> list[str]:
    from mlx.utils import tree_flatten

    flat: list[tuple[str, mx.array]] = tree_flatten(loaded.model.parameters())  # type: ignore[assignment]
    floating = {
        v.dtype for _, v in flat if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)
    }
    return sorted(str(d) for d in floating)


def digest_files(digest: hashlib._Hash, files: Iterable[Path]) -> None:
    """Add each file's name, size and a sample of its bytes to ``digest``."""
    for path in sorted(files):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        # Headers alone miss retrained weights of the same shapes; a sample of bytes does not.
        with open(path, "rb") as handle:
            for where in (size // 2, max(0, size - SAMPLE_BYTES)):
                handle.seek(where)
                digest.update(handle.read(SAMPLE_BYTES))
