"""``LoadPlan``: every decision and check of a load, made from headers before tensor data.

``plan_load`` opens the checkpoint, detects the architecture and runs the adapter's planner;
the generic planner (``plan_checkpoint``) builds the model, binds its routed experts to the
adapter's activation, reads lazy arrays, sanitizes them, plans the expert store and checks every
name and shape against the model. ``mach check`` stops there; ``load_moe`` goes on to read data.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mach.adapter import MoeArchAdapter
from mach.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    MachError,
    OptionsError,
    ShapeMismatchError,
)
from mach.experts.swap import bind_switches
from mach.experts.switch import SwitchSpec
from mach.io.checkpoint import Checkpoint, open_checkpoint
from mach.io.options import LoadOptions
from mach.io.paths import resolve_model_path
from mach.io.quant import quantize_modules
from mach.io.residency import ExpertPlan, plan_experts
from mach.registry import detect_arch
from mach.tokenizer.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class LoadPlan:
    """What a load will do, decided and checked without reading tensor data."""

    checkpoint: Checkpoint
    adapter: MoeArchAdapter
    options: LoadOptions
    model: nn.Module
    """The built model: routed experts unbound, quantized modules in place, no weights yet."""
    switches: dict[str, SwitchSpec]
    """Every routed-expert block, by module path, with the adapter's activation bound."""
    weights: dict[str, mx.array]
    """Lazy non-expert weights under engine names (emptied once loaded)."""
    experts: ExpertPlan
    tokenizer: Tokenizer | None
    non_expert_bytes: int
    origin: dict[int, str]

    @property
    def memory_bytes(self) -> int:
        """Bytes of weights the loaded model holds: non-expert weights plus the expert store."""
        return self.non_expert_bytes + self.experts.memory_bytes

    def where(self, array_or_name: Any) -> str:
        """The file a lazy array came from, for error messages."""
        return _locate(self.checkpoint, self.origin, array_or_name)


def _locate(ckpt: Checkpoint, origin: dict[int, str], array_or_name: Any) -> str:
    if isinstance(array_or_name, mx.array):
        return origin.get(id(array_or_name), str(ckpt.path))
    return str(ckpt.path)


def plan_load(
    checkpoint: str | os.PathLike[str] | Checkpoint, options: LoadOptions | None = None
) -> LoadPlan:
    """Open ``checkpoint``, detect its architecture and plan the load with ``options``."""
    options = options or LoadOptions()
    ckpt = (checkpoint if isinstance(checkpoint, Checkpoint)
            else open_checkpoint(resolve_model_path(checkpoint)))  # fmt: skip
    adapter = detect_arch(ckpt.config, ckpt.tensor_names, options.arch)
    return adapter.plan(ckpt, options)


def _build_model(ckpt: Checkpoint, adapter: MoeArchAdapter) -> nn.Module:
    config_path = ckpt.path / "config.json"
    try:
        return adapter.build_model(ckpt.config)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    except KeyError as exc:
        raise ConfigError(
            f"{config_path}: required field {exc} is missing for {adapter.name}"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{config_path}: does not describe a {adapter.name} model ({exc}); check the "
            "field types and values against the model's original config"
        ) from exc


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


def _cast(
    weights: dict[str, mx.array], dtype: mx.Dtype, only: tuple[mx.Dtype, ...] | None = None
) -> dict[str, mx.array]:
    def cast(v: mx.array) -> bool:
        return mx.issubdtype(v.dtype, mx.floating) and (only is None or v.dtype in only)

    return {k: v.astype(dtype) if cast(v) else v for k, v in weights.items()}


def check_shapes(
    model: nn.Module, weights: dict[str, mx.array], path: Path, where: Callable[[Any], str]
) -> None:
    """Every parameter of ``model`` has a tensor of its shape, and no tensor is left over."""
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
            f"{path}: weights do not match config.json: {'; '.join(problems)}. "
            "Check that config.json belongs to these weights and that every shard is present"
        )


def _stream_embeddings(plan: LoadPlan) -> None:
    from mach.experts.swap import set_child
    from mach.layers.streaming_embedding import StreamingEmbedding

    ckpt = plan.checkpoint
    if ckpt.config.get("tie_word_embeddings"):
        raise OptionsError(
            "the token embedding is tied to the output head, which needs the whole table in "
            "memory; streaming_embedding applies to untied embeddings only"
        )
    found = [path for path, m in plan.model.named_modules() if isinstance(m, nn.Embedding)]
    for path in found:
        info = ckpt.tensors.get(f"{path}.weight")
        if info is None or f"{path}.scales" in plan.weights:
            raise CheckpointError(
                f"{path} is not stored as a plain float table under its own name in "
                f"{ckpt.path}; streaming_embedding needs one"
            )
        plan.weights.pop(f"{path}.weight")
        set_child(plan.model, path, StreamingEmbedding(info))


def read_model(
    ckpt: Checkpoint, adapter: MoeArchAdapter, dtype: str | None = None
) -> tuple[nn.Module, dict[str, SwitchSpec], dict[str, mx.array], dict[int, str]]:
    """The first planning steps: the built model with its routed experts bound to the
    adapter's activation, and the checkpoint's lazy arrays under engine names (cast to
    ``dtype`` when given), with the file each came from. Reads no tensor data."""
    model = _build_model(ckpt, adapter)
    activation = adapter.gate_activation(ckpt.config)
    if activation.kind != adapter.swiglu_variant:
        raise AdapterError(
            f"{adapter.name}: gate_activation gives {activation.kind} but swiglu_variant is "
            f"{adapter.swiglu_variant}"
        )
    switches = bind_switches(model, activation, adapter.has_expert_bias, adapter.name)
    weights, origin = _read_weights(ckpt)
    try:
        weights = adapter.sanitize(weights, ckpt.config)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, MachError):
            raise
        raise CheckpointError(
            f"{ckpt.path}: {adapter.name} cannot map these tensors to its model ({exc!r}); the "
            "weights do not match config.json or come from another architecture"
        ) from exc
    if dtype is not None:
        weights = _cast(weights, _DTYPES[dtype])
    return model, switches, weights, origin


def plan_checkpoint(ckpt: Checkpoint, adapter: MoeArchAdapter, options: LoadOptions) -> LoadPlan:
    """The generic planner: every step of a load up to, not including, reading tensor data.

    Raises a ``MachError`` naming the file and the problem for a config the adapter cannot
    build, weights that do not match the model, or options the checkpoint cannot honour.
    """
    model, switches, weights, origin = read_model(ckpt, adapter, options.dtype)
    where = functools.partial(_locate, ckpt, origin)
    experts = plan_experts(ckpt, adapter, switches, weights, where, options)
    if options.dtype is None and mx.default_device() == mx.cpu:
        # MLX's CPU backend multiplies half-precision matrices without BLAS, 4-12x slower than
        # float32 at decode sizes, so there the stored dtype of the dense weights is only a
        # storage format (routed experts are widened by their stores).
        weights.update(_cast(weights, mx.float32, only=(mx.float16, mx.bfloat16)))
    plan = LoadPlan(ckpt, adapter, options, model, switches, weights, experts, None, 0, origin)
    if options.streaming_embedding:
        _stream_embeddings(plan)
    quantize_modules(model, ckpt.config, weights)
    check_shapes(model, weights, ckpt.path, plan.where)
    plan.non_expert_bytes = sum(int(v.nbytes) for v in weights.values())
    plan.tokenizer = load_tokenizer(ckpt.path, ckpt.config)
    return plan
