"""DeepSeek-V4 golden fixtures (imported by make_fixtures.py; run in the fixtures venv).

Layouts written under tests/fixtures/deepseek_v4/:

- ``hf-fused``: ``save_pretrained(save_original_format=False)``: HF names, experts fused.
- ``hf-original``: ``save_pretrained()``: upstream tensor names under ``model.``, per expert.
- ``upstream``: the release layout: no ``model.`` prefix (``embed``, ``layers.N.attn.wq_a``,
  ``ffn.experts.E.w1``, ``hc_head_fn``, ``head``), the hub config dialect (``compress_ratios``,
  ``num_hash_layers``, ``rope_scaling``) and an ``mtp.0.*`` module.
- ``upstream-fp8``: the same, packed as the release ships it: FP8 e4m3 matrices with one
  power-of-two scale per 128x128 block, FP4 (E2M1) routed experts two codes per byte with one
  power-of-two (E8M0) scale per 32 inputs. Its reference is transformers run on the
  dequantized weights.

Every reference holds full-sequence logits for two sequences and, for the first, the logits of
a prefill followed by one-token decode steps across window and compression boundaries.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 20261125
VOCAB = 512
SEQ = 45
PREFILL = 37
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)

LAYER_TYPES = [
    "heavily_compressed_attention",
    "compressed_sparse_attention",
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
]
YARN = {"type": "yarn", "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64}  # fmt: skip


def _config(num_layers: int, layer_types: list[str], mlp_types: list[str]) -> object:
    from transformers import DeepseekV4Config

    rope = {k if k != "type" else "rope_type": v for k, v in YARN.items()}
    config = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
        layer_types=layer_types, mlp_layer_types=mlp_types,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        sliding_window=16, index_n_heads=16, index_head_dim=16, index_topk=3, hc_mult=4,
        hc_sinkhorn_iters=20, rope_parameters=rope, max_position_embeddings=1024,
        initializer_range=0.08, eos_token_id=2, bos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return config


def _build(num_layers: int, layer_types: list[str], mlp_types: list[str],
           generator: torch.Generator) -> torch.nn.Module:  # fmt: skip
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM(_config(num_layers, layer_types, mlp_types)).eval()
    perturb(model, generator)
    return model


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move 0/1-initialised parameters off those values; give hash layers distinct experts."""
    config = model.config
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    with torch.no_grad():
        for _, param in model.named_parameters():
            if torch.all(param == 0) or torch.all(param == 1):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                rows = [torch.randperm(experts, generator=generator)[:top_k]
                        for _ in range(config.vocab_size)]  # fmt: skip
                gate.tid2eid.copy_(torch.stack(rows))
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(experts, generator=generator) * 0.1)


def lowest_index_first_indexer(model: torch.nn.Module) -> list[int]:
    """Make transformers' lightning indexer break exact score ties by the lowest entry index.

    ``torch.topk`` leaves the order of equal values unspecified, and the indexer's scores
    (sums of ReLUs) tie at exactly zero often on small random models, so which entry is kept
    is an ambiguity of the reference rather than a property of the model; mach keeps the
    lowest index (``top_k_lowest_first``). Returns a list that counts the (sequence, position)
    pairs where a tie straddled the top-k boundary, so a reference can record it.
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

    ties = [0]

    def keep_scores(scorer: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        scorer._last_scores = out

    def select(indexer: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> Any:
        scores = indexer.scorer._last_scores
        count = scores.shape[-1]
        k = min(indexer.index_topk, count)
        if count == 0 or k == count:
            return out
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[2]
        threshold = ((position_ids + 1) // indexer.compress_rate).unsqueeze(-1)  # [B, S, 1]
        masked = scores.masked_fill(torch.arange(count) >= threshold, float("-inf"))
        top = masked.topk(k + 1, dim=-1).values
        kth = top[..., k - 1 : k]
        ties[0] += int(((top[..., k - 1] == top[..., k]) & (top[..., k] > -torch.inf)).sum())
        above, equal = masked > kth, masked == kth
        room = k - above.sum(-1, keepdim=True)
        chosen = above | (equal & (equal.cumsum(-1) <= room))
        picked = chosen.int().sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.where(picked >= threshold, torch.full_like(picked, -1), picked)

    for module in model.modules():
        if isinstance(module, DeepseekV4Indexer):
            module.scorer.register_forward_hook(keep_scores)
            module.register_forward_hook(select, with_kwargs=True)
    return ties


def _reference(model: torch.nn.Module, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    from transformers import DynamicCache

    ids = torch.from_numpy(input_ids.astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:1, :PREFILL], cache=cache, use_cache=True).logits]
        for t in range(PREFILL, ids.shape[1]):
            steps.append(model(ids[:1, t : t + 1], cache=cache, use_cache=True).logits)
        incremental = torch.cat(steps, dim=1).float().numpy()
        greedy = model.generate(ids[:1, :16], max_new_tokens=12, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[:, 16:]  # fmt: skip
    return {
        "input_ids": input_ids,
        "logits": logits.astype(np.float32),
        "incremental_logits": incremental.astype(np.float32),
        "prefill": np.array(PREFILL, np.int32),
        "greedy": greedy.numpy().astype(np.int32),
    }


def _upstream_name(name: str) -> str:
    """``hf-original`` names (``model.layers.N.attn.wq_a``) -> the release's own."""
    if name.startswith("model.hc_head."):
        return name.replace("model.hc_head.hc_", "hc_head_")
    name = name.removeprefix("model.")
    return {"embed_tokens.weight": "embed.weight"}.get(name, name)


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _mtp_module(generator: torch.Generator, hidden: int) -> dict[str, torch.Tensor]:
    """``mtp.0.*``: one sliding-attention, learned-routing block plus the MTP projections.

    transformers has no MTP; the block's weights come from a one-layer model of the same
    family saved in the original format, then the MTP-only tensors are added.
    """
    block = _build(1, ["sliding_attention"], ["moe"], generator)
    with torch.no_grad():
        block.model.layers[0].mlp.gate.e_score_correction_bias.mul_(0)
    tmp = Path("/tmp") / "mach-mtp-block"
    shutil.rmtree(tmp, ignore_errors=True)
    block.save_pretrained(tmp)
    out = {
        k.replace("model.layers.0.", "mtp.0."): v
        for k, v in _read(tmp).items()
        if k.startswith("model.layers.0.")
    }
    shutil.rmtree(tmp)

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    out["mtp.0.e_proj.weight"] = rand(hidden, hidden, scale=0.15)
    out["mtp.0.h_proj.weight"] = rand(hidden, hidden, scale=0.15)
    for norm in ("enorm", "hnorm", "norm"):
        out[f"mtp.0.{norm}.weight"] = 1 + rand(hidden, scale=0.1)
    out["mtp.0.hc_head_fn"] = rand(4, 4 * hidden)
    out["mtp.0.hc_head_base"] = rand(4, scale=0.1)
    out["mtp.0.hc_head_scale"] = 1 + rand(1, scale=0.1)
    return out


def hub_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The config.json dialect the release ships: per-layer ratios, hash-layer count, yarn.

    The release has no per-layer MoE list, only a count of leading hash layers, so
    ``mlp_layer_types`` must be hash layers first.
    """
    config = dict(hf_config)
    rates = config.pop("compress_rates")
    ratio = {"sliding_attention": 0, **rates}
    config["compress_ratios"] = [ratio[t] for t in config.pop("layer_types")] + [0]
    config["compress_rate_csa"] = rates["compressed_sparse_attention"]
    config["compress_rate_hca"] = rates["heavily_compressed_attention"]  # the release uses 128
    mlp = config.pop("mlp_layer_types")
    hashed = mlp.count("hash_moe")
    assert mlp == ["hash_moe"] * hashed + ["moe"] * (len(mlp) - hashed), mlp
    config["num_hash_layers"] = hashed
    compress = config.pop("rope_parameters")["compress"]
    config["qk_rope_head_dim"] = int(config["head_dim"] * config.pop("partial_rotary_factor"))
    if compress.get("rope_type") == "yarn":
        config["rope_scaling"] = {"type": "yarn", **{k: compress[k] for k in YARN if k != "type"}}
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    return config


def _e8m0(exponent: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((exponent + 127).astype(np.uint8)).view(torch.float8_e8m0fnu)


def _fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 e4m3 codes, E8M0 block scales [ceil(out/128), ceil(in/128)], dequantized float."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // 128), -(-in_dim // 128)
    padded = torch.zeros(rows * 128, cols * 128)
    padded[:out_dim, :in_dim] = w
    blocks = padded.view(rows, 128, cols, 128)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    exponent = torch.ceil(torch.log2(amax / 448.0)).numpy()
    scale = torch.from_numpy(np.exp2(exponent).astype(np.float32))
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    back = (codes.float() * scale[:, None, :, None]).view(rows * 128, cols * 128)
    codes = codes.view(rows * 128, cols * 128)[:out_dim, :in_dim].contiguous()
    return codes, _e8m0(exponent), back[:out_dim, :in_dim].contiguous()


def _fp4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E2M1 codes packed two per int8 (low nibble first), E8M0 scale per 32, dequantized."""
    x = w.numpy().reshape(w.shape[0], -1, 32)
    amax = np.maximum(np.abs(x).max(axis=-1), 1e-12)
    exponent = np.ceil(np.log2(amax / 6.0))
    scaled = x / np.exp2(exponent)[..., None]
    codes = np.abs(scaled[..., None] - E2M1[None, None, None, :8] * np.sign(scaled)[..., None])
    magnitude = codes.argmin(axis=-1)
    code = (magnitude + 8 * (scaled < 0)).astype(np.uint8).reshape(w.shape[0], -1)
    back = (E2M1[code.reshape(x.shape)] * np.exp2(exponent)[..., None]).reshape(w.shape)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return torch.from_numpy(packed), _e8m0(exponent), torch.from_numpy(back.astype(np.float32))


FP8_SUFFIXES = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight",
                ".attn.wo_b.weight", ".attn.indexer.wq_b.weight", ".shared_experts.w1.weight",
                ".shared_experts.w2.weight", ".shared_experts.w3.weight", ".e_proj.weight",
                ".h_proj.weight")  # fmt: skip


Tensors = dict[str, torch.Tensor]


def _pack_release(state: Tensors) -> tuple[Tensors, Tensors]:
    """(packed tensors, the float values they dequantize to)."""
    packed: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        stem = name.removesuffix(".weight")
        if ".ffn.experts." in name and name.endswith(".weight"):
            codes, scale, back = _fp4_groups(value.float())
        elif name.endswith(FP8_SUFFIXES):
            codes, scale, back = _fp8_blocks(value.float())
        else:
            packed[name] = value
            continue
        packed[name], packed[f"{stem}.scale"] = codes, scale
        dequantized[name] = back
    return packed, dequantized


def make(fixtures: Path, tokenizer_dir: Path, write_layout: Callable[..., None]) -> None:
    from safetensors.torch import save_file

    family = fixtures / "deepseek_v4"
    shutil.rmtree(family, ignore_errors=True)
    family.mkdir(parents=True)
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    mlp_types = ["hash_moe", "hash_moe", "moe", "moe", "moe"]
    model = _build(len(LAYER_TYPES), LAYER_TYPES, mlp_types, generator)
    rng = np.random.default_rng(SEED)
    input_ids = rng.integers(3, VOCAB, size=(2, SEQ)).astype(np.int32)
    reference = _reference(model, input_ids)

    out = family / "hf-fused"
    model.save_pretrained(out, save_original_format=False)
    write_layout(out, reference, tokenizer_dir)

    out = family / "hf-original"
    model.save_pretrained(out)
    write_layout(out, reference, tokenizer_dir)

    hf_config = json.loads((out / "config.json").read_text())
    release = {_upstream_name(k): v for k, v in _read(out).items()}
    release.update(_mtp_module(generator, model.config.hidden_size))
    out = family / "upstream"
    out.mkdir()
    save_file(release, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hub_config(hf_config), indent=2))
    write_layout(out, reference, tokenizer_dir)

    packed, dequantized = _pack_release(release)
    hf_names = {_upstream_name(k): k for k in _read(family / "hf-original")}
    state = model.state_dict()
    loadable = {}
    for name, value in dequantized.items():
        if name.startswith("mtp."):
            continue
        loadable[hf_names[name]] = value
    # Load the dequantized weights back through transformers' own original-format mapping.
    tmp = family / "_dequantized"
    shutil.copytree(family / "hf-original", tmp)
    merged = {**_read(tmp), **loadable}
    save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    from transformers import DeepseekV4ForCausalLM

    reloaded = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    missing = [k for k in state if k not in reloaded.state_dict()]
    assert not missing, missing
    shutil.rmtree(tmp)
    out = family / "upstream-fp8"
    out.mkdir()
    save_file(packed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hub_config(hf_config)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    config["expert_dtype"] = "fp4"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_layout(out, _reference(reloaded, input_ids), tokenizer_dir)
