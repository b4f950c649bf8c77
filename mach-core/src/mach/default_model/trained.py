"""The default model: a small qwen3_moe trained on Python's standard library, shipped with mach.

Its weights, tokenizer, model card (``README.md``) and the reference outputs transformers
computed on it live in ``data/`` next to this module; ``tools/train_default_model.py`` made them.
"""

from __future__ import annotations

from pathlib import Path

from mach.errors import MissingFileError

DEFAULT_MODEL_NAME = "qwen3_moe-python-tiny"


def default_model_path() -> Path:
    """The folder of the embedded default model."""
    path = Path(__file__).parent / "data"
    if not (path / "model.safetensors").is_file():
        raise MissingFileError(
            f"{path}: the embedded default model is missing from this installation; "
            "reinstall mach-core"
        )
    return path
