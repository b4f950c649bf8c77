"""Random-weight DFlash drafts in the published layout, written next to a target for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mach.decode.dflash import DFlashDraftModel, read_dflash_config


def write_random_draft(
    folder: Path,
    hidden: int,
    target_layers: int,
    mask_token_id: int,
    *,
    layers: int = 1,
    block: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A draft folder (config.json + model.safetensors) with seeded random weights.

    ``overrides`` edit the config after it is built, so a test can break one field."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": hidden // 4, "intermediate_size": 2 * hidden, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "block_size": block, "num_target_layers": target_layers,
        "dflash_config": {"mask_token_id": mask_token_id,
                          "target_layer_ids": sorted({0, target_layers - 1})},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    draft = DFlashDraftModel(read_dflash_config(folder, hidden, target_layers, 1 << 30))
    # A deliberately broken config goes over the intact one the weights were made for.
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(draft.parameters()):
        if name.endswith("norm.weight"):
            weights[name] = mx.array(1 + 0.1 * rng.standard_normal(value.shape), mx.float32)
        else:
            scale = 0.5 / np.sqrt(value.shape[-1])
            weights[name] = mx.array(scale * rng.standard_normal(value.shape), mx.float32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder
