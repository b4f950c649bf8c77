"""The quantized half of the fidelity sweep (``fidelity_sweep.py --quantized``), fixtures side.

Each case is converted twice, and each conversion gets a reference nobody here wrote:

- ``mach convert --bits B --group-size G`` (tools/quantized_reference.py, in mach's
  environment) writes ``mach-q`` and ``dequantized``: the source checkpoint with every matrix
  the conversion quantized replaced by its dequantized value. transformers runs on
  ``dequantized``; mach runs on ``mach-q``. Both compute with the same rounded weights, so the
  float32 tolerance still holds: the difference left is arithmetic, not quantization error.
- mlx-lm's own converter writes ``mlx-lm-q`` from the same source; mlx-lm's float32 logits on
  it are the reference for mach's on it (same files, same codes and scales).

Quantization needs every routed expert matrix's input size to be a multiple of the group size,
so the quantized pass rounds the hidden size and expert widths of the drawn config up to a
multiple of the group size (``quantizable``); the bits (4 or 8) and the group size (32 or 64)
follow the case index. Other matrices keep their drawn sizes, so some stay float.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from make_fixtures import to_hub_dialect

# Per family, the config fields that are routed-expert input sizes.
_EXPERT_WIDTHS = {
    "qwen3_moe": ("moe_intermediate_size",),
    "qwen3_5_moe": ("moe_intermediate_size",),
    "gpt_oss": ("intermediate_size",),
    "gemma4": ("moe_intermediate_size",),
    "deepseek_v4": ("moe_intermediate_size",),
}


def setting(index: int) -> dict[str, int]:
    """Bits and group size of a case: 4 and 8 bits alternate, and groups of 32 and 64."""
    return {"bits": (4, 8)[index % 2], "group_size": (32, 64)[(index // 2) % 2]}


def quantizable(family: str, kwargs: dict[str, Any], group: int) -> dict[str, Any]:
    """``kwargs`` with the hidden size and every expert width rounded up to a multiple of
    ``group``, so every routed expert can be quantized."""
    out = dict(kwargs)
    for field in ("hidden_size", *_EXPERT_WIDTHS[family]):
        width = out.get(field)
        if isinstance(width, int) and width % group:
            out[field] = -(-width // group) * group
    return out


def transformers_reference(
    model_class: Any, case: Path, reference: Any, finish: Any
) -> dict[str, np.ndarray]:
    """transformers' logits on the dequantized copy, for the same tokens as the float case."""
    with np.load(case / "reference.npz") as data:
        ids, prefill = data["input_ids"], int(data["prefill"])
    model = model_class.from_pretrained(case / "dequantized", dtype=torch.float32,
                                        attn_implementation="eager").eval()  # fmt: skip
    finish(model)
    return reference(model, ids, prefill)


def mlx_lm_reference(
    case: Path, quantization: dict[str, int], tolerance: float
) -> dict[str, np.ndarray] | str:
    """Convert with mlx-lm and record its float32 logits, or say why mlx-lm is no reference here.

    mlx-lm is a reference for a config only where its own float model matches transformers, so
    the source is converted unquantized first and checked against the float reference.
    """
    import mlx.core as mx

    source, plain, out = case / "mlx-lm-source", case / "mlx-lm-float", case / "mlx-lm-q"
    for folder in (source, plain, out):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(case, source, ignore=shutil.ignore_patterns(
        "*.npz", "mach-q", "dequantized", "mlx-lm-*", "probe"))  # fmt: skip
    with np.load(case / "reference.npz") as data:
        ids, prefill, expected = data["input_ids"], int(data["prefill"]), data["logits"]
    try:
        to_hub_dialect(source / "config.json")
        if not (source / "tokenizer.json").exists():
            _tiny_tokenizer(source)
        float_model = _mlx_lm_convert(source, plain, None)
        logits = np.array(float_model(mx.array(ids)).astype(mx.float32))
        off = float(np.abs(logits - expected).max())
        if not off <= tolerance:
            return f"mlx-lm's own float32 forward differs from transformers by {off:.2g}"
        model = _mlx_lm_convert(source, out, quantization)
    except Exception as exc:  # mlx-lm does not read every family and layout
        shutil.rmtree(out, ignore_errors=True)
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(plain, ignore_errors=True)
    result = {"input_ids": ids, "prefill": np.array(prefill, np.int32)}
    result.update(_logits(model, ids, prefill))
    np.savez(out / "reference.npz", **result)
    return result


def _mlx_lm_convert(source: Path, out: Path, quantization: dict[str, int] | None) -> Any:
    from mlx_lm import convert
    from mlx_lm.utils import load_model

    settings: dict[str, Any] = {}
    if quantization is not None:
        settings = {"quantize": True, "q_bits": quantization["bits"],
                    "q_group_size": quantization["group_size"]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(source), str(out), dtype="float32", **settings)
    return load_model(out)[0]


def _logits(model: Any, ids: np.ndarray, prefill: int) -> dict[str, np.ndarray]:
    """mlx-lm's full forward, and a prefill followed by one-token steps through its cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.array(ids)
    cache = make_prompt_cache(model)
    steps = [model(tokens[:1, :prefill], cache=cache)]
    steps += [model(tokens[:1, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return {
        "logits": np.array(model(tokens).astype(mx.float32)),
        "incremental_logits": np.array(mx.concatenate(steps, axis=1).astype(mx.float32)),
    }


def _tiny_tokenizer(folder: Path) -> None:
    """mlx-lm's converter loads a tokenizer; a word-level one over the sweep's ids will do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    config = json.loads((folder / "config.json").read_text())
    vocab = {f"t{i}": i for i in range(int(config.get("vocab_size", 256)))}
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
