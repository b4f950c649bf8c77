"""Decode speed of mach against mlx-lm on one synthetic qwen3_5_moe (Gated DeltaNet) checkpoint.

mlx-lm builds the random-weight model (4-bit, mlx-community layout); both engines then load the
same files in this process, prefill a prompt, decode greedily, and the script prints the ratio.

    uv run --group bench python benchmarks/qwen3_5_decode.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model.random_qwen3_moe import CHAT_TEMPLATE, _tokenizer_json

TEXT = {
    "model_type": "qwen3_5_moe_text", "hidden_size": 512, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 64,
    "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "num_experts": 64,
    "num_experts_per_tok": 8, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256,
    "vocab_size": 4096, "rms_norm_eps": 1e-6, "full_attention_interval": 4,
    "max_position_embeddings": 4096, "rope_theta": 1e6, "partial_rotary_factor": 0.25,
    "tie_word_embeddings": False,
}  # fmt: skip


def write_model(root: Path) -> Path:
    from mlx_lm.models import qwen3_5_moe

    config = {"model_type": "qwen3_5_moe", "text_config": TEXT}
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % 64 == 0)  # fmt: skip
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    root.mkdir(parents=True)
    mx.save_safetensors(str(root / "model.safetensors"), weights, metadata={"format": "mlx"})
    config["quantization"] = {"group_size": 64, "bits": 4, "mode": "affine"}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return root


def timed(tokens: Any) -> tuple[list[int], float]:
    ids, stamps = [], []
    for token in tokens:
        ids.append(token)
        stamps.append(time.perf_counter())
    return ids, (len(ids) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "model")
        prompt = np.random.default_rng(0).integers(0, 256, args.prompt_tokens).tolist()

        from mlx_lm import load
        from mlx_lm.generate import generate_step

        peer, _ = load(str(path))
        list(generate_step(mx.array(prompt[:8]), peer, max_tokens=4))
        peer_ids, peer_tps = timed(
            int(t) for t, _ in generate_step(mx.array(prompt), peer, max_tokens=args.tokens)
        )
        model, _, _, cache = load_moe(path)
        engine = TargetEngine(model, None, cache.new)
        engine.generate(prompt[:8], SamplingParams(max_tokens=4))
        params = SamplingParams(max_tokens=args.tokens)
        ids, tps = timed(e.token for e in engine.stream(prompt, params) if e.token is not None)
    same = next((i for i, (a, b) in enumerate(zip(ids, peer_ids, strict=False)) if a != b),
                len(ids))  # fmt: skip
    print(f"{mx.default_device()}  qwen3_5_moe synthetic (8 layers, 64 experts, top-8, 4-bit)  "
          f"prompt {args.prompt_tokens}  decode {args.tokens}")  # fmt: skip
    print(f"  mach    decode {tps:8.1f} tok/s")
    print(f"  mlx_lm  decode {peer_tps:8.1f} tok/s")
    print(f"  mach / mlx-lm: decode x{tps / peer_tps:.3f}  same greedy prefix: {same}/{len(ids)}")


if __name__ == "__main__":
    main()
