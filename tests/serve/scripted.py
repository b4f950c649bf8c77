"""Real qwen3_moe checkpoints whose weights are set by hand to follow a chosen chain of tokens.

Attention and experts write nothing to the residual stream, and the output head maps each
token of the chain to the next, so greedy decoding spells the chain and then ends the turn.
Each token may appear once in a chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mach.default_model import default_model_path
from mach.tokenizer.tokenizer import Tokenizer, load_tokenizer


def distinct_tokens(tokenizer: Tokenizer, text: str, avoid: set[int]) -> list[int]:
    """Token ids that decode to ``text``, no id used twice (depth-first over segmentations)."""
    pieces: dict[str, list[int]] = {}
    for token in range(tokenizer.vocab_size):
        piece = tokenizer.decode([token], skip_special_tokens=False)
        if piece and piece in text:
            pieces.setdefault(piece, []).append(token)

    def search(pos: int, used: set[int]) -> list[int] | None:
        if pos == len(text):
            return []
        for piece in sorted((p for p in pieces if text.startswith(p, pos)), key=len, reverse=True):
            for token in pieces[piece]:
                if token in used:
                    continue
                rest = search(pos + len(piece), used | {token})
                if rest is not None:
                    return [token, *rest]
        return None

    found = search(0, set(avoid))
    assert found is not None, "no segmentation without repeats"
    return found


def write_scripted_model(root: Path, vocab: int, after: int, chain: list[int]) -> Path:
    d, heads, kv, hd, experts = 256, 4, 2, 64, 4
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((vocab, d)).astype(np.float32)
    embed /= np.linalg.norm(embed, axis=1, keepdims=True)
    head = np.zeros((vocab, d), np.float32)
    for current, following in zip([after, *chain[:-1]], chain, strict=True):
        head[following] = embed[current]

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    p = "model.layers.0"
    weights = {
        "model.embed_tokens.weight": embed, "lm_head.weight": head,
        "model.norm.weight": np.ones(d, np.float32),
        f"{p}.input_layernorm.weight": np.ones(d, np.float32),
        f"{p}.post_attention_layernorm.weight": np.ones(d, np.float32),
        f"{p}.self_attn.q_proj.weight": normal(heads * hd, d),
        f"{p}.self_attn.k_proj.weight": normal(kv * hd, d),
        f"{p}.self_attn.v_proj.weight": normal(kv * hd, d),
        f"{p}.self_attn.o_proj.weight": np.zeros((d, heads * hd), np.float32),
        f"{p}.self_attn.q_norm.weight": np.ones(hd, np.float32),
        f"{p}.self_attn.k_norm.weight": np.ones(hd, np.float32),
        f"{p}.mlp.gate.weight": normal(experts, d),
        f"{p}.mlp.switch_mlp.gate_proj.weight": normal(experts, 64, d),
        f"{p}.mlp.switch_mlp.up_proj.weight": normal(experts, 64, d),
        f"{p}.mlp.switch_mlp.down_proj.weight": np.zeros((experts, d, 64), np.float32),
    }  # fmt: skip
    config = {"model_type": "qwen3_moe", "hidden_size": d, "num_hidden_layers": 1,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
              "num_experts": experts, "num_experts_per_tok": 1, "moe_intermediate_size": 64,
              "norm_topk_prob": True, "vocab_size": vocab, "rope_theta": 1e6,
              "max_position_embeddings": 512, "eos_token_id": chain[-1]}  # fmt: skip
    root.mkdir(exist_ok=True)
    save_file(weights, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config))
    return root


def scripted_checkpoint(
    root: Path,
    text: str,
    messages: list[dict[str, object]],
    tools: list[dict[str, object]] | None = None,
    template_suffix: str = "",
    specials: tuple[str, ...] = (),
    template: str | None = None,
    end: str = "<|im_end|>",
) -> Path:
    """A checkpoint that answers ``messages`` with exactly ``text``, then ``end``.

    ``specials`` adds special tokens to the default model's tokenizer; ``template`` replaces its
    chat template and ``template_suffix`` is appended to its generation prompt (an opening
    ``<think>`` tag, as reasoning models' templates do).
    """
    root.mkdir(parents=True)
    source = default_model_path()
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    next_id = max(t["id"] for t in tokenizer_json["added_tokens"]) + 1
    next_id = max(next_id, len(tokenizer_json["model"]["vocab"]))
    for offset, content in enumerate(specials):
        tokenizer_json["added_tokens"].append({
            "id": next_id + offset, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True})  # fmt: skip
    (root / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((source / "tokenizer_config.json").read_text())
    chat = template or config["chat_template"]
    if template_suffix:
        chat = chat.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n" + template_suffix)
    config["chat_template"] = chat
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(root)
    assert tokenizer is not None
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools),
                              add_special_tokens=False)  # fmt: skip
    end_id = tokenizer.token_id(end)
    assert end_id is not None
    chain = [*distinct_tokens(tokenizer, text, {prompt[-1], end_id}), end_id]
    return write_scripted_model(root, tokenizer.vocab_size, prompt[-1], chain)
