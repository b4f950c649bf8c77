"""Train mach's embedded default model: a small qwen3_moe that writes Python.

The recipe, in four steps (each reproducible from its seed):

    # 1. corpus: the Python standard library's own source, split by file into train / validation
    python tools/train_default_model.py corpus --out build/default-model
    # 2. tokenizer: byte-level BPE (4096 ids) with chat, tool-call and mask special tokens
    python tools/train_default_model.py tokenizer --work build/default-model
    # 3. train: transformers' Qwen3MoeForCausalLM in torch (a GPU is best; a CPU works, slowly)
    python tools/train_default_model.py train --work build/default-model --minutes 8
    # 4. export: mach's layout (stacked experts, bfloat16), the model card and the reference
    #    logits transformers computes on the exported weights
    python tools/train_default_model.py export --work build/default-model \
        --out mach-core/src/mach/default_model/data

Steps 1, 2 and 4 need `tokenizers`, `safetensors`, `numpy`, `torch` and `transformers`
(tools/requirements-fixtures.txt); step 3 needs torch and transformers and runs where the
accelerator is. Everything a step needs from the one before is a file under --work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
VOCAB = 4096
SEQ_LEN = 512
VALIDATION_SHARE = 20  # one file in twenty goes to validation, chosen by a hash of its path
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<|mask|>",
]
TEXT_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.01,
    "output_router_logits": True,
}
CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call these tools. Put each call in <tool_call></tool_call> as JSON with \
"name" and "arguments".
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TRAINING_ONLY = ("router_aux_loss_coef", "output_router_logits")
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    "]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _is_validation(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % VALIDATION_SHARE == 0


def cmd_corpus(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = str(path.relative_to(root))
        (val if _is_validation(rel) else train).append(text)
    (out / "train.txt").write_text("<|endoftext|>".join(train), encoding="utf-8")
    (out / "val.txt").write_text("<|endoftext|>".join(val), encoding="utf-8")
    recipe = {
        "source": f"Python {platform.python_version()} standard library, every *.py file "
        "outside site-packages, sorted by path",
        "split": f"validation = files whose sha256(relative path) % {VALIDATION_SHARE} == 0",
        "train_files": len(train),
        "validation_files": len(val),
        "train_bytes": sum(len(t.encode()) for t in train),
        "validation_bytes": sum(len(t.encode()) for t in val),
    }
    (out / "corpus.json").write_text(json.dumps(recipe, indent=2))
    print(json.dumps(recipe, indent=2))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    work = Path(args.work)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(work / "train.txt")], trainer)
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    # Tool-call tags are text a caller parses, not control tokens: decoding must keep them.
    saved = json.loads((tok_dir / "tokenizer.json").read_text())
    for added in saved["added_tokens"]:
        added["special"] = added["content"] not in TEXT_TAGS
    (tok_dir / "tokenizer.json").write_text(json.dumps(saved, ensure_ascii=False))
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "additional_special_tokens": SPECIALS[1:],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": CONFIG["max_position_embeddings"],
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    for split in ("train", "val"):
        text = (work / f"{split}.txt").read_text(encoding="utf-8")
        ids = np.array(tok.encode(text).ids, dtype=np.uint16)
        np.save(work / f"{split}.npy", ids)
        print(f"{split}: {ids.size} tokens, {len(text.encode()) / ids.size:.2f} bytes/token")


def _config(tokenizer_dir: Path) -> Any:
    from transformers import Qwen3MoeConfig

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = Qwen3MoeConfig(
        **{k: v for k, v in CONFIG.items() if k != "head_dim"},
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        eos_token_id=[specials["<|endoftext|>"], specials["<|im_end|>"]],
        pad_token_id=specials["<|endoftext|>"],
    )
    config.head_dim = CONFIG["head_dim"]
    return config


def _batches(ids: np.ndarray, batch: int, rng: np.random.Generator) -> Any:
    import torch

    starts = rng.integers(0, ids.size - SEQ_LEN - 1, size=batch)
    rows = np.stack([ids[s : s + SEQ_LEN + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows)


def _evaluate(model: Any, ids: np.ndarray, device: str, batch: int = 32) -> float:
    import torch

    model.eval()
    losses = []
    windows = (ids.size - 1) // SEQ_LEN
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for first in range(0, windows, batch):
            last = min(windows, first + batch)
            rows = [ids[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1] for w in range(first, last)]
            x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            out = model(input_ids=x[:, :-1], labels=x[:, :-1], output_router_logits=False)
            losses.append((out.loss.item(), x.shape[0]))
    model.train()
    total = sum(n for _, n in losses)
    return sum(loss * n for loss, n in losses) / total


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from transformers import Qwen3MoeForCausalLM

    work = Path(args.work)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = _config(work / "tokenizer")
    config._attn_implementation = "sdpa"
    model = Qwen3MoeForCausalLM(config).to(device)
    train_ids, val_ids = np.load(work / "train.npy"), np.load(work / "val.npy")
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda"
    )
    warmup = 200
    budget = args.minutes * 60
    start = time.time()
    log: list[dict[str, float]] = []
    step = 0
    tokens = 0
    while True:
        elapsed = time.time() - start
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        progress = min(1.0, elapsed / budget)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        lr = args.lr * min(1.0, (step + 1) / warmup) * cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = _batches(train_ids, args.batch, rng).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += x[:, :-1].numel()
        if step % 100 == 0:
            seconds = round(time.time() - start, 1)
            entry = {"step": step, "seconds": seconds, "loss": round(out.loss.item(), 4), "lr": lr}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_minutes = round((time.time() - start) / 60, 2)
    val_loss = _evaluate(model, val_ids, device)
    train_loss = _evaluate(model, train_ids[: val_ids.size], device)
    out_dir = work / "hf"
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size="12MB")
    summary = {
        "seed": SEED,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": params,
        "steps": step,
        "batch": args.batch,
        "seq_len": SEQ_LEN,
        "train_tokens_seen": tokens,
        "minutes": train_minutes,
        "peak_lr": args.lr,
        "final_train_loss": round(train_loss, 4),
        "validation_loss": round(val_loss, 4),
        "validation_perplexity": round(math.exp(val_loss), 3),
        "log": log,
    }
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2))


def _active_parameters(config: dict[str, Any]) -> int:
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    attn = d * hd * (2 * heads + 2 * kv) + 2 * hd + 2 * d
    routed = config["num_experts_per_tok"] * 3 * d * config["moe_intermediate_size"]
    router = config["num_experts"] * d
    embeds = 2 * config["vocab_size"] * d + d
    return layers * (attn + routed + router) + embeds


def cmd_export(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import Qwen3MoeForCausalLM

    work, out = Path(args.work), Path(args.out)
    hf = work / "hf"
    summary = json.loads((hf / "train_summary.json").read_text())
    model = Qwen3MoeForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval()
    state = model.state_dict()
    cfg = model.config
    engine: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".mlp.experts." in name:
            continue
        engine[name] = tensor.contiguous()
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp"
        gate_up = state[f"{p}.experts.gate_up_proj"]
        gate, up = gate_up.chunk(2, dim=1)
        engine[f"{p}.switch_mlp.gate_proj.weight"] = gate.contiguous()
        engine[f"{p}.switch_mlp.up_proj.weight"] = up.contiguous()
        engine[f"{p}.switch_mlp.down_proj.weight"] = state[f"{p}.experts.down_proj"].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(engine, str(out / "model.safetensors"), metadata={"format": "mlx"})
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **{k: v for k, v in CONFIG.items() if k not in TRAINING_ONLY},
        "rope_theta": 1000000.0,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": cfg.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((work / "tokenizer" / name).read_bytes())

    # Reference: transformers in float32 on exactly the exported (bfloat16) weights.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = model.float()
    reference.config._attn_implementation = "eager"
    prompt = tok.encode(SAMPLE_PROMPTS[0]).ids
    rng = np.random.default_rng(SEED)
    val = np.load(work / "val.npy")
    start = int(rng.integers(0, val.size - 64))
    batch = np.stack([val[start : start + 32], val[start + 32 : start + 64]]).astype(np.int64)
    with torch.no_grad():
        logits = reference(torch.from_numpy(batch)).logits.numpy().astype(np.float32)
        greedy = reference.generate(
            torch.tensor([prompt]), max_new_tokens=48, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    np.savez(out / "reference.npz", input_ids=batch.astype(np.int32), logits=logits)
    samples = {}
    with torch.no_grad():
        for text in SAMPLE_PROMPTS:
            ids = tok.encode(text).ids
            gen = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
            samples[text] = tok.decode(gen[0, len(ids) :].tolist())
    sample = {
        "prompt": SAMPLE_PROMPTS[0],
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy),
    }
    (out / "sample.json").write_text(json.dumps(sample, indent=2))
    corpus = json.loads((work / "corpus.json").read_text())
    total = sum(t.numel() for t in state.values())
    card = _model_card(config, summary, corpus, total, _active_parameters(config), samples)
    (out / "README.md").write_text(card)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps({"parameters": total, "active": _active_parameters(config), **versions}))


def _model_card(
    config: dict[str, Any],
    summary: dict[str, Any],
    corpus: dict[str, Any],
    total: int,
    active: int,
    samples: dict[str, str],
) -> str:
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in config.items() if k not in ("architectures",))
    train_ppl = math.exp(summary["final_train_loss"])
    shown = "\n\n".join(f"```python\n{p}{s}\n```" for p, s in samples.items())
    return f"""# mach default model: qwen3_moe-python-tiny

A small Mixture-of-Experts language model that mach runs when no model is named. It is a
genuine `Qwen3MoeForCausalLM` checkpoint, trained from scratch with transformers in torch on
the Python standard library's own source, so it writes recognisable Python.

## Shape

| field | value |
|---|---|
{rows}

- parameters: {total:,} ({total * 2 / 1e6:.1f} MB in bfloat16)
- active parameters per token: {active:,} (4 of 32 experts per layer)
- layout: mach's engine layout (mlx-style stacked experts, `switch_mlp.*_proj.weight`
  `[experts, out, in]`), bfloat16

## Training

- corpus: {corpus["source"]}; {corpus["split"]}
  ({corpus["train_files"]} train files, {corpus["train_bytes"]:,} bytes;
  {corpus["validation_files"]} validation files, {corpus["validation_bytes"]:,} bytes)
- tokenizer: byte-level BPE, {VOCAB} ids, trained with `tokenizers` on the training split;
  special tokens {", ".join(f"`{s}`" for s in SPECIALS)}; ChatML chat template with tools
- objective: next-token cross-entropy plus the router load-balancing loss
  (coefficient {CONFIG["router_aux_loss_coef"]})
- optimiser: AdamW (betas 0.9/0.95, weight decay 0.1), peak learning rate {summary["peak_lr"]},
  200 warm-up steps, cosine decay to 10% over a {summary["minutes"]}-minute budget; gradient
  clipping at 1.0; bfloat16 autocast
- seed {summary["seed"]}; {summary["steps"]} steps of {summary["batch"]} x {summary["seq_len"]}
  tokens ({summary["train_tokens_seen"]:,} tokens seen) on {summary["device"]}
  (torch {summary["torch"]}, transformers {summary["transformers"]})

## Results

| split | loss (nats/token) | perplexity |
|---|---|---|
| train (a slice the size of validation) | {summary["final_train_loss"]} | {train_ppl:.2f} |
| validation (held-out files) | {summary["validation_loss"]} | {summary["validation_perplexity"]} |

Greedy samples (48 tokens, transformers):

{shown}

## Reproduce

`tools/train_default_model.py` in the mach repository: `corpus`, `tokenizer`, `train`, `export`.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("corpus")
    p.add_argument("--out", required=True)
    p = sub.add_parser("tokenizer")
    p.add_argument("--work", required=True)
    p = sub.add_parser("train")
    p.add_argument("--work", required=True)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p = sub.add_parser("export")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"corpus": cmd_corpus, "tokenizer": cmd_tokenizer, "train": cmd_train, "export": cmd_export}[
        args.command
    ](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
