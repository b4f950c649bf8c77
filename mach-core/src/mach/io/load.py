"""The load pipeline: checkpoint -> adapter -> model with experts bound to a store."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mach.adapter import MoeArchAdapter
from mach.cache.base import LayerCache, SequenceCache
from mach.errors import MissingFileError, ShapeMismatchError
from mach.experts.bank import PrefillMode
from mach.experts.store import ExpertStore
from mach.experts.swap import find_switches, swap_switch_mlp
from mach.io.checkpoint import Checkpoint, open_checkpoint
from mach.io.quant import quantize_modules
from mach.io.residency import build_store
from mach.registry import detect_arch, load_object
from mach.tokenizer.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


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


def _read_weights(ckpt: Checkpoint) -> tuple[dict[str, mx.array], dict[int, str]]:
    """Lazy arrays (no data read yet) and, for error messages, which file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[int, str] = {}
    for file in ckpt.files:
        loaded = mx.load(str(file))
        assert isinstance(loaded, dict)
        for name, array in loaded.items():
            weights[name] = array
            origin[id(array)] = file.name
    return weights, origin


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def _check_shapes(
    model: nn.Module, weights: dict[str, mx.array], ckpt: Checkpoint, where: Any
) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
    for name in sorted(expected.keys() & weights.keys()):
        want, got = tuple(expected[name].shape), tuple(weights[name].shape)
        if want != got:
            problems.append(
                f"{name} in {where(weights[name])} has shape {list(got)}, config implies "
                f"{list(want)}"
            )
            break
    if problems:
        raise ShapeMismatchError(
            f"{ckpt.path}: weights do not match config.json: {'; '.join(problems)}. Check that "
            "config.json belongs to these weights and that every shard is present"
        )


def _stream_embeddings(model: nn.Module, weights: dict[str, mx.array], ckpt: Checkpoint) -> None:
    from mach.experts.swap import set_child
    from mach.layers.streaming_embedding import StreamingEmbedding

    if ckpt.config.get("tie_word_embeddings"):
        raise ValueError(
            "the token embedding is tied to the output head, which needs the whole table in "
            "memory; streaming_embedding applies to untied embeddings only"
        )
    found = [path for path, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for path in found:
        info = ckpt.tensors.get(f"{path}.weight")
        if info is None or f"{path}.scales" in weights:
            raise ValueError(
                f"{path} is not stored as a plain float table under its own name in "
                f"{ckpt.path}; streaming_embedding needs one"
            )
        weights.pop(f"{path}.weight")
        set_child(model, path, StreamingEmbedding(info))


def load_moe(
    checkpoint: str | os.PathLike[str],
    arch: str | None = None,
    *,
    dtype: str | None = None,
    streaming: bool | None = None,
    expert_budget: int | str | None = None,
    expert_residency: str | None = None,
    prefill: PrefillMode = "transient",
    gather_dispatch: bool | None = None,
    verify_experts: bool = True,
    streaming_embedding: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, Tokenizer | None, ExpertStore, SequenceCache]:
    """Load a MoE checkpoint: ``(model, tokenizer, store, cache)``.

    Steps: read ``config.json`` and safetensors headers; ``detect_arch``; the adapter builds the
    model; its routed-expert blocks are bound to the expert store; non-expert weights load.
    Every file and shape is checked before tensor data is read. ``dtype`` (``float32``,
    ``float16``, ``bfloat16``) casts floating weights; by default they keep the stored dtype.
    ``tokenizer`` is ``None`` (with a warning) when the checkpoint has no ``tokenizer.json``.
    ``progress(done, total)`` is called with bytes as weights are read.

    Expert residency: ``streaming=True`` (or an ``expert_budget`` such as ``"2GB"``) keeps a
    bounded bank of experts per layer and reads misses from disk (``BankCache``);
    ``streaming=False`` keeps every expert resident (``ResidentStackedExpertCache``). Left unset,
    mach streams only when the model would not fit in memory. ``expert_residency`` names the
    store directly (``resident``, ``streaming``, ``bf16_streaming``). ``prefill`` says whether
    prompt chunks stream their experts through a temporary set (``transient``, keeping the decode
    working set) or through the bank (``resident``). ``gather_dispatch=False`` selects the legacy
    per-expert loop (default: ``LME_USE_GATHER_DISPATCH``). ``verify_experts`` checks each sidecar
    record's CRC-32 as it is read. ``streaming_embedding`` leaves an untied, unquantized token
    embedding on disk and reads the rows each call needs.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    ckpt = open_checkpoint(resolve_model_path(checkpoint))
    adapter = detect_arch(ckpt.config, ckpt.tensor_names, arch)
    options: dict[str, Any] = dict(dtype=dtype, streaming=streaming, expert_budget=expert_budget,
                   expert_residency=expert_residency, prefill=prefill,
                   gather_dispatch=gather_dispatch, verify_experts=verify_experts,
                   streaming_embedding=streaming_embedding, progress=progress)  # fmt: skip
    if adapter.load_path is not None:
        loader = load_object(adapter.load_path, f"{adapter.name} load_path")
        return loader(ckpt, adapter, **options)  # type: ignore[no-any-return]
    return load_checkpoint(ckpt, adapter, **options)


def load_checkpoint(
    ckpt: Checkpoint,
    adapter: MoeArchAdapter,
    *,
    dtype: str | None = None,
    streaming: bool | None = None,
    expert_budget: int | str | None = None,
    expert_residency: str | None = None,
    prefill: PrefillMode = "transient",
    gather_dispatch: bool | None = None,
    verify_experts: bool = True,
    streaming_embedding: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, Tokenizer | None, ExpertStore, SequenceCache]:
    """The generic pipeline behind ``load_moe`` for an opened checkpoint and its adapter.

    A family's own load path (``MoeArchAdapter.load_path``) calls this for the parts it shares.
    """
    model = adapter.build_model(ckpt.config)
    weights, origin = _read_weights(ckpt)
    weights = adapter.sanitize(weights, ckpt.config)
    if dtype is not None:
        weights = _cast(weights, _DTYPES[dtype])

    def where(array_or_name: Any) -> str:
        if isinstance(array_or_name, mx.array):
            return origin.get(id(array_or_name), str(ckpt.path))
        return str(ckpt.path)

    store = build_store(
        ckpt,
        adapter,
        find_switches(model),
        weights,
        where,
        streaming=streaming,
        residency=expert_residency,
        budget=expert_budget,
        prefill=prefill,
        verify=verify_experts,
    )
    if streaming_embedding:
        _stream_embeddings(model, weights, ckpt)
    quantize_modules(model, ckpt.config, weights)
    _check_shapes(model, weights, ckpt, where)

    total = sum(info.nbytes for info in ckpt.tensors.values())
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done = min(total, done + nbytes)
        if progress is not None:
            progress(done, total)

    store.materialize(advance)
    swap_switch_mlp(model, store, gather_dispatch)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    advance(total)
    model.eval()

    tokenizer = load_tokenizer(ckpt.path, ckpt.config)
    if tokenizer is None:
        warnings.warn(
            f"{ckpt.path}: no tokenizer.json; the model loads for token-id use only",
            stacklevel=2,
        )

    def factory() -> list[LayerCache]:
        return adapter.make_cache(model)

    return model, tokenizer, store, SequenceCache(factory(), factory)


def load(
    repo_or_path: str | os.PathLike[str], **kwargs: Any
) -> tuple[nn.Module, Tokenizer | None, ExpertStore, SequenceCache]:
    """``load_moe`` with the architecture detected from the checkpoint."""
    return load_moe(repo_or_path, **kwargs)
