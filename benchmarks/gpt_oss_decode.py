"""Decode speed of mach against mlx-lm on one synthetic gpt_oss checkpoint (MXFP4 experts).

mlx-lm builds a random-weight gpt_oss with MXFP4 experts and 8-bit affine attention, router and
embeddings (the mlx-community "MXFP4-Q8" recipe); both engines load the same files in this
process, prefill a prompt longer than the sliding window and decode greedily.

    uv run --group bench python -m benchmarks.gpt_oss_decode
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.nn as nn

from benchmarks.peer import run_synthetic, save_peer_model

CONFIG = {
    "model_type": "gpt_oss", "num_hidden_layers": 8, "num_local_experts": 32,
    "num_experts_per_tok": 4, "vocab_size": 4096, "rms_norm_eps": 1e-5, "hidden_size": 512,
    "intermediate_size": 512, "head_dim": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
    "sliding_window": 128, "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
}  # fmt: skip


def write_model(root: Path) -> Path:
    from mlx_lm.models import gpt_oss

    model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(CONFIG))
    overrides: dict[str, Any] = {}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        if ".experts." in path:
            overrides[path] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        else:
            overrides[path] = {"group_size": 64, "bits": 8, "mode": "affine"}
        return overrides[path]

    nn.quantize(model, class_predicate=predicate)
    return save_peer_model(root, model, CONFIG, {"group_size": 64, "bits": 8, **overrides})


def main() -> None:
    run_synthetic(
        __doc__,
        write_model,
        "gpt_oss synthetic (8 layers, 32 experts, top-4, MXFP4-Q8)",
        prompt_tokens=256,
    )


if __name__ == "__main__":
    main()
