"""Expert streaming on a synthetic MoE shaped like a scaled-down Qwen3-30B-A3B.

Writes a random-weight qwen3_moe (128 experts, top-8, 4-bit, several GB of experts) as an
mlx-community style sharded checkpoint, converts it to mach's sidecar format, then measures in
one process:

- mlx-lm and mach with every expert resident (prefill and decode tok/s, ratio);
- mach streaming at 50%, 25% and 10% of the expert bytes: tok/s, hit rate and bytes read for
  prefill and decode apart, achieved read GB/s and the share of the read bound (decode tok/s
  against read GB/s / decode bytes per token).

The engines alternate round by round (``harness.alternate``) and every figure is a median with
its range over rounds.

    uv run --group bench python benchmarks/streaming.py --layers 24
    uv run --group bench python benchmarks/streaming.py --layers 4 --quick   # a smoke run

Expert files are read through the OS page cache; the first run after writing them reads from
memory-speed cache, as a model used repeatedly does. ``--drop-cache`` evicts them before each
streaming run (posix_fadvise) to start cold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from mach.default_model import default_model_path
from mach.default_model.random_qwen3_moe import CHAT_TEMPLATE, SPECIALS, _tokenizer_json
from mach.experts.bank import BudgetError
from mach.io.convert import convert

sys.path.insert(0, str(Path(__file__).parent))
from harness import Run, alternate, report
from peer import mach_engine, mlx_lm_engine

PYTHON_PROMPT = '''def parse_header(self, buffer, offset=0):
    """Read one record header from buffer, starting at offset."""
    '''


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--moe-intermediate", type=int, default=384)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drop-cache", action="store_true")
    parser.add_argument("--quick", action="store_true", help="skip mlx-lm and the 50%% budget")
    parser.add_argument("--dir", help="reuse or keep the synthetic model here")
    parser.add_argument("--checkpoint",
                        help="stream this checkpoint instead of a random one; 'default' is the "
                        "embedded default model, prompted with Python")  # fmt: skip
    parser.add_argument("--shared", action="store_true",
                        help="also stream through one slot pool shared by all layers")  # fmt: skip
    parser.add_argument("--no-peer", action="store_true", help="skip mlx-lm")
    parser.add_argument("--routing", choices=["default", "host", "device", "both"],
                        default="default",
                        help="streamed experts looked up on the host per layer, on the device "
                        "per step (mach.experts.device_routing), both as rows, or mach's "
                        "default for the device")  # fmt: skip
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.dir) if args.dir else Path(tmp.name)
    stacked, sidecar = root / "stacked", root / "sidecar"
    if args.checkpoint:
        stacked = default_model_path() if args.checkpoint == "default" else Path(args.checkpoint)
        text = Tokenizer.from_file(str(stacked / "tokenizer.json"))
        prompt = text.encode(PYTHON_PROMPT).ids[: args.prompt_tokens]
    else:
        if not stacked.exists():
            write_model(stacked, args.layers, args.hidden, args.experts, args.moe_intermediate)
        prompt = np.random.default_rng(1).integers(3, 250, args.prompt_tokens).tolist()
    if not sidecar.exists():
        convert(stacked, sidecar)
    expert_bytes = sum(p.stat().st_size for p in (sidecar / "expert_sidecar").glob("*.bin"))

    engines: list[tuple[str, Callable[[], Run]]] = []
    if not (args.quick or args.no_peer):
        engines.append(("mlx-lm resident", mlx_lm_engine(stacked, prompt, args.tokens)))
    engines.append(("mach resident", mach_engine(sidecar, prompt, args.tokens, streaming=False)))
    for share in [0.25, 0.10] if args.quick else [0.5, 0.25, 0.10]:
        budget = int(expert_bytes * share)
        pools = ["layer", "shared"] if args.shared else ["layer"]
        routings = {"default": [None], "host": [False], "device": [True],
                    "both": [False, True]}[args.routing]  # fmt: skip
        for pool, routing in itertools.product(pools, routings):
            name = (f"mach streaming {share:.0%}" + (" shared" if pool == "shared" else "")
                    + {None: "", False: " host", True: " device"}[routing])  # fmt: skip
            try:
                once = mach_engine(sidecar, prompt, args.tokens, expert_budget=budget,
                                   slot_pool=pool, device_routing=routing)  # fmt: skip
            except BudgetError as exc:  # e.g. float experts, widened to float32 on a CPU
                print(f"{name}: skipped, {exc}", file=sys.stderr)
                continue
            engines.append((name, with_bound(once, args.drop_cache, sidecar)))
    results = alternate(engines, args.rounds)
    model = args.checkpoint or (f"layers={args.layers} experts={args.experts} top-8 4-bit")
    report(results, engines[0][0], f"{model}  expert bytes {expert_bytes / 1e9:.3f} GB  "
           f"prompt {len(prompt)}  decode {args.tokens}")  # fmt: skip
    tmp.cleanup()


def with_bound(once: Callable[[], Run], cold: bool, folder: Path) -> Callable[[], Run]:
    """A streaming run, from a cold page cache when ``cold``, with the share of the read bound
    it reached: decode tok/s against what the achieved read rate allows at its bytes/token."""

    def run() -> Run:
        if cold:
            drop_cache(folder)
        out = once()
        per_token = out.figures["decode_mb_per_token"] * 1e6
        if per_token:
            bound = out.figures["read_gbps"] * 1e9 / per_token
            out.figures["read_bound_share"] = out.decode_tps / bound
        return out

    return run


if __name__ == "__main__":
    main()
