"""Expert streaming on a synthetic MoE shaped like a scaled-down Qwen3-30B-A3B.

Writes a random-weight qwen3_moe (128 experts, top-8, 4-bit, several GB of experts) as an
mlx-community style sharded checkpoint, converts it to mach's sidecar format, then measures in
one process:

- mlx-lm and mach with every expert resident (decode tok/s, ratio, peak memory);
- mach streaming at 50%, 25% and 10% of the expert bytes: tok/s, hit rate, bytes read per
  token, achieved read GB/s and the fraction of the I/O bound (read GB/s / bytes per token).

    uv run --group bench python benchmarks/streaming.py --layers 24
    uv run --group bench python benchmarks/streaming.py --layers 4 --quick   # a smoke run

Expert files are read through the OS page cache; the first run after writing them reads from
memory-speed cache, as a model used repeatedly does. ``--drop-cache`` evicts them before each
streaming run (posix_fadvise) to start cold.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model.random_qwen3_moe import CHAT_TEMPLATE, SPECIALS, _tokenizer_json
from mach.io.convert import convert


def write_model(root: Path, layers: int, hidden: int, experts: int, inter: int) -> Path:
    """A sharded, 4-bit, mlx-community style qwen3_moe written one layer at a time."""
    rng = np.random.default_rng(0)
    vocab = 256 + len(SPECIALS)
    heads, kv, hd = 16, 4, 64
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "moe_intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hd, "num_experts": experts, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": vocab, "tie_word_embeddings": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 4096,
        "eos_token_id": 2, "quantization": {"group_size": 64, "bits": 4, "mode": "affine"},
    }  # fmt: skip
    root.mkdir(parents=True)

    def mat(*shape: int) -> mx.array:
        return mx.array((rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32))

    def quantized(name: str, w: mx.array, out: dict[str, np.ndarray]) -> None:
        q, s, b = mx.quantize(w, group_size=64, bits=4)
        out[f"{name}.weight"], out[f"{name}.scales"], out[f"{name}.biases"] = (
            np.array(q), np.array(s), np.array(b))  # fmt: skip

    weight_map: dict[str, str] = {}
    shards = layers + 1
    for i in range(shards):
        tensors: dict[str, np.ndarray] = {}
        if i == layers:
            tensors["model.embed_tokens.weight"] = np.array(mat(vocab, hidden))
            tensors["model.norm.weight"] = np.ones(hidden, np.float32)
            quantized("lm_head", mat(vocab, hidden), tensors)
        else:
            p = f"model.layers.{i}"
            tensors[f"{p}.input_layernorm.weight"] = np.ones(hidden, np.float32)
            tensors[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
            tensors[f"{p}.self_attn.q_norm.weight"] = np.ones(hd, np.float32)
            tensors[f"{p}.self_attn.k_norm.weight"] = np.ones(hd, np.float32)
            for name, shape in (
                ("q_proj", (heads * hd, hidden)),
                ("k_proj", (kv * hd, hidden)),
                ("v_proj", (kv * hd, hidden)),
                ("o_proj", (hidden, heads * hd)),
            ):
                quantized(f"{p}.self_attn.{name}", mat(*shape), tensors)
            gate = mat(experts, hidden) * 4.0
            q, s, b = mx.quantize(gate, group_size=64, bits=8)
            tensors[f"{p}.mlp.gate.weight"] = np.array(q)
            tensors[f"{p}.mlp.gate.scales"] = np.array(s)
            tensors[f"{p}.mlp.gate.biases"] = np.array(b)
            config["quantization"][f"{p}.mlp.gate"] = {"group_size": 64, "bits": 8}
            for name, shape in (
                ("gate_proj", (experts, inter, hidden)),
                ("up_proj", (experts, inter, hidden)),
                ("down_proj", (experts, hidden, inter)),
            ):
                quantized(f"{p}.mlp.switch_mlp.{name}", mat(*shape), tensors)
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(root / shard), metadata={"format": "mlx"})
        weight_map.update({k: shard for k in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE})
    )
    return root


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def decode_tps(step_tokens: list[float]) -> float:
    return (len(step_tokens) - 1) / (step_tokens[-1] - step_tokens[0])


def timed(tokens: Any) -> tuple[list[int], float]:
    ids, stamps = [], []
    for t in tokens:
        ids.append(t)
        stamps.append(time.perf_counter())
    return ids, decode_tps(stamps)


def run_mach(path: Path, prompt: list[int], n: int, **kwargs: Any) -> dict[str, Any]:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _, store, cache = load_moe(path, **kwargs)
    engine = TargetEngine(model, None, cache.new)
    params = SamplingParams(max_tokens=n)
    engine.generate(prompt[:8], SamplingParams(max_tokens=4))
    before = store.stats()
    ids, tps = timed(e.token for e in engine.stream(prompt, params) if e.token is not None)
    after = store.stats()
    peak = mx.get_peak_memory() / 1e9
    result: dict[str, Any] = {"decode_tps": tps, "tokens": ids, "peak_gb": peak}
    if after["kind"] == "streaming":
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        read = after["bytes_read"] - before["bytes_read"]
        seconds = after["read_seconds"] - before["read_seconds"]
        per_token = read / (len(prompt) + n)
        gbps = read / seconds / 1e9 if seconds else 0.0
        bound = gbps * 1e9 / per_token if per_token else float("inf")
        result.update(hit_rate=hits / (hits + misses), mb_per_token=per_token / 1e6,
                      read_gbps=gbps, io_bound_tps=bound, fraction_of_bound=tps / bound,
                      slots=after["slots_per_layer"])  # fmt: skip
    del model, store, cache, engine
    return result


def run_mlx_lm(path: Path, prompt: list[int], n: int) -> dict[str, Any]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = load(str(path))
    for _ in generate_step(mx.array(prompt[:8]), model, max_tokens=4):
        pass
    ids, tps = timed(int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n))
    result = {"decode_tps": tps, "tokens": ids, "peak_gb": mx.get_peak_memory() / 1e9}
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--moe-intermediate", type=int, default=384)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--drop-cache", action="store_true")
    parser.add_argument("--quick", action="store_true", help="skip mlx-lm and the 50%% budget")
    parser.add_argument("--dir", help="reuse or keep the synthetic model here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.dir) if args.dir else Path(tmp.name)
    stacked, sidecar = root / "stacked", root / "sidecar"
    if not stacked.exists():
        write_model(stacked, args.layers, args.hidden, args.experts, args.moe_intermediate)
    if not sidecar.exists():
        convert(stacked, sidecar)
    expert_bytes = sum(p.stat().st_size for p in (sidecar / "expert_sidecar").glob("*.bin"))
    prompt = np.random.default_rng(1).integers(3, 250, args.prompt_tokens).tolist()
    print(f"{mx.default_device()}  layers={args.layers} experts={args.experts} top-8 4-bit  "
          f"expert bytes {expert_bytes / 1e9:.2f} GB  prompt {args.prompt_tokens}  "
          f"decode {args.tokens}", flush=True)  # fmt: skip

    rows: list[tuple[str, dict[str, Any]]] = []
    if not args.quick:
        rows.append(("mlx-lm resident", run_mlx_lm(stacked, prompt, args.tokens)))
    rows.append(("mach resident", run_mach(sidecar, prompt, args.tokens, streaming=False)))
    for share in [0.25, 0.10] if args.quick else [0.5, 0.25, 0.10]:
        if args.drop_cache:
            drop_cache(sidecar)
        budget = int(expert_bytes * share)
        rows.append((f"mach streaming {share:.0%}",
                     run_mach(sidecar, prompt, args.tokens, expert_budget=budget)))  # fmt: skip

    baseline = rows[0][1]
    for name, r in rows:
        same = sum(1 for a, b in zip(r["tokens"], baseline["tokens"], strict=False) if a == b)
        ratio = r["decode_tps"] / baseline["decode_tps"]
        line = (f"{name:22s} decode {r['decode_tps']:7.2f} tok/s  x{ratio:.2f}"
                f"  peak {r['peak_gb']:.2f} GB  same tokens {same}/{len(r['tokens'])}")  # fmt: skip
        if "hit_rate" in r:
            line += (f"  hit {r['hit_rate']:.1%}  {r['mb_per_token']:.1f} MB/token  "
                     f"{r['read_gbps']:.2f} GB/s  bound {r['io_bound_tps']:.1f} tok/s "
                     f"({r['fraction_of_bound']:.0%})  slots {r['slots']}")  # fmt: skip
        print(line, flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
