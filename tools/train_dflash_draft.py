"""Train the DFlash draft shipped with mach's default model (MLX, in mach's own environment).

    uv run python tools/train_dflash_draft.py --minutes 12 \
        --out mach-core/src/mach/default_model/data/draft

The recipe follows DFlash's published one, scaled to the tiny target:

1. Data: prompts cut from the Python standard library's own source (training files only, the
   same split as the default model's), each continued greedily by the target itself, so the
   labels are what the target will say and acceptance is what the draft learns.
2. Features: the target's residual stream after the draft's ``target_layer_ids``, computed once.
3. Blocks: per sequence, random anchor positions ``p``; the block is ``[x_p, mask, ...]`` at
   positions ``p..p+B-1``. Its rows see the context rows strictly before ``p`` (the anchor's own
   hidden state is not known when drafting) and each other; row ``k`` learns ``x_{p+k}``.
4. Loss: cross-entropy through the target's frozen output head, row ``k`` weighted
   ``exp(-(k-1)/gamma)``; AdamW with warm-up and cosine decay.

The script checks that its masked training forward equals the drafting forward before it
trains, and reports the mean accepted length on held-out prompts when it is done.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from train_default_model import _is_validation, _stdlib_files

from mach import load_moe
from mach.decode.dflash import DFlashDraftModel, read_dflash_config
from mach.default_model import default_model_path

SEED = 0


def draft_config(target: dict[str, Any], mask_id: int, layers: int, block: int) -> dict[str, Any]:
    n = target["num_hidden_layers"]
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "hidden_size": target["hidden_size"], "num_hidden_layers": layers,
        "num_attention_heads": target["num_attention_heads"],
        "num_key_value_heads": target["num_key_value_heads"], "head_dim": target["head_dim"],
        "intermediate_size": 2 * target["hidden_size"], "rms_norm_eps": target["rms_norm_eps"],
        "rope_theta": target["rope_theta"], "max_position_embeddings": 2048,
        "block_size": block, "num_target_layers": n,
        "dflash_config": {"mask_token_id": mask_id, "target_layer_ids": [1, n // 2, n - 2]},
    }  # fmt: skip


_CORPUS: dict[bool, np.ndarray] = {}


def prompts(tokenizer: Any, count: int, length: int, validation: bool, seed: int) -> np.ndarray:
    """``count`` token windows of ``length`` at random places in the standard library's files
    (the training or the validation split; each file tokenized once)."""
    if validation not in _CORPUS:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in _stdlib_files()
                 if _is_validation(str(p.relative_to(root))) == validation]  # fmt: skip
        ids: list[int] = []
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            ids += tokenizer.encode(text, add_special_tokens=False)
        _CORPUS[validation] = np.array(ids, dtype=np.int32)
    corpus = _CORPUS[validation]
    starts = np.random.default_rng(seed).integers(len(corpus) - length, size=count)
    return np.stack([corpus[i : i + length] for i in starts])


def continue_greedily(model: Any, make_cache: Any, starts: np.ndarray, new: int) -> np.ndarray:
    """Each row of ``starts`` followed by ``new`` greedy target tokens (one batch)."""
    cache = make_cache()
    tokens = mx.array(starts)
    logits = model(tokens, cache=cache)
    out = [tokens]
    for _ in range(new):
        nxt = mx.argmax(logits[:, -1:, :], axis=-1).astype(mx.int32)
        out.append(nxt)
        logits = model(nxt, cache=cache)
        mx.eval(logits)
    return np.array(mx.concatenate(out, axis=1))


def block_forward(
    draft: DFlashDraftModel, embed: Any, features: mx.array, ids: mx.array, anchors: mx.array,
    block: int, mask_id: int,
) -> mx.array:  # fmt: skip
    """Hidden states of every anchor's block ``[B, A, block, H]``, as drafting would see them."""
    b, s, _ = features.shape
    a = anchors.shape[1]
    context = draft.context(features)  # [B, S, H]
    first = mx.take_along_axis(ids, anchors, axis=1)  # [B, A]
    blocks = mx.concatenate([first[..., None], mx.full((b, a, block - 1), mask_id, ids.dtype)], -1)
    x = embed(blocks.reshape(b, a * block))  # [B, A*block, H]
    positions = (anchors[..., None] + mx.arange(block)).reshape(b, a * block)
    ctx_ok = mx.arange(s)[None, None, :] < mx.repeat(anchors, block, axis=1)[..., None]
    same = mx.arange(a * block) // block
    blk_ok = mx.broadcast_to(same[:, None] == same[None, :], (b, a * block, a * block))
    mask = mx.concatenate([ctx_ok, blk_ok], axis=-1)[:, None]  # [B, 1, A*block, S + A*block]
    for layer in draft.layers:
        attn = layer.self_attn
        xn = layer.input_layernorm(x)
        q = attn.q_norm(attn._split(attn.q_proj(xn), attn.heads))
        k_blk = attn.k_norm(attn._split(attn.k_proj(xn), attn.kv_heads))
        v_blk = attn._split(attn.v_proj(xn), attn.kv_heads)
        k_ctx = attn.rope(attn.k_norm(attn._split(attn.k_proj(context), attn.kv_heads)))
        v_ctx = attn._split(attn.v_proj(context), attn.kv_heads)
        q, k_blk = _rope_at(attn.rope, q, positions), _rope_at(attn.rope, k_blk, positions)
        keys = mx.concatenate([k_ctx, k_blk], axis=2)
        values = mx.concatenate([v_ctx, v_blk], axis=2)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.head_dim**-0.5,
                                                   mask=mask)  # fmt: skip
        x = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(b, a * block, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x).reshape(b, a, block, -1)


def _rope_at(rope: Any, x: mx.array, positions: mx.array) -> mx.array:
    """RoPE at arbitrary per-row positions (``nn.RoPE`` takes one offset per call)."""
    dims, base = rope.dims, rope.base
    freqs = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    angles = positions[:, None, :, None].astype(mx.float32) * freqs  # [B, 1, L, dims/2]
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., : dims // 2], x[..., dims // 2 : dims]
    rotated = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return mx.concatenate([rotated.astype(x.dtype), x[..., dims:]], axis=-1)


def check_against_drafting(draft: DFlashDraftModel, target: Any, feats: mx.array,
                           ids: mx.array, block: int, mask_id: int) -> float:  # fmt: skip
    """Largest difference between the training forward and the drafter's, at one anchor."""
    p = int(ids.shape[1] // 2)
    trained = block_forward(draft, target.model.embed, feats[:1], ids[:1], mx.array([[p]]),
                            block, mask_id)[0, 0]  # fmt: skip
    cache = draft.make_cache()
    first = mx.array([[int(ids[0, p].item())] + [mask_id] * (block - 1)])
    drafted = draft(first, feats[:1, :p], cache, target.model.embed)[0]
    return float(mx.abs(trained - drafted).max().item())


def acceptance(target: Any, make_cache: Any, folder: Path, starts: np.ndarray, new: int) -> dict:
    """Mean tokens per verify pass and accepted drafts, through mach's own engine."""
    from mach.decode.params import SamplingParams
    from mach.decode.select import build_engine

    loaded = load_moe(default_model_path(), draft_path=str(folder))
    engine = build_engine(loaded)
    passes = accepted = drafted = 0
    for row in starts:
        stats = engine.generate(row.tolist(), SamplingParams(max_tokens=new)).stats
        passes, accepted = passes + stats.verify_passes, accepted + stats.accepted_tokens
        drafted += stats.draft_tokens
    return {"tokens_per_pass": (accepted + passes) / max(passes, 1),
            "accepted_share": accepted / max(drafted, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=384)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--new", type=int, default=208)
    parser.add_argument("--anchors", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--gen-batch", type=int, default=32,
                        help="sequences the target reads or continues at once")  # fmt: skip
    parser.add_argument("--init", type=Path, help="start from this draft folder's weights")
    parser.add_argument(
        "--data", choices=["generated", "text"], default="generated",
        help="generated: the target's greedy continuations; text: windows of the source "
        "itself, labelled with the target's next-token choice at every position",
    )  # fmt: skip
    args = parser.parse_args()
    mx.random.seed(SEED)
    loaded = load_moe(default_model_path(), dtype="float32")
    target, tokenizer = loaded.model, loaded.tokenizer
    target.freeze()
    mask_id = tokenizer.token_id("<|mask|>")
    config = draft_config(json.loads((default_model_path() / "config.json").read_text()),
                          mask_id, args.layers, args.block)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    dconf = read_dflash_config(args.out, config["hidden_size"], len(target.layers),
                               target.model.embed_tokens.weight.shape[0])  # fmt: skip
    draft = DFlashDraftModel(dconf)
    if args.init is not None:
        start_from = mx.load(str(args.init / "model.safetensors"))
        draft.load_weights([(k, v.astype(mx.float32)) for k, v in start_from.items()])
    layers = list(dconf.target_layer_ids)

    start = time.time()
    data, features, choices = [], [], []
    for i in range(0, args.sequences, args.gen_batch):
        count = min(args.gen_batch, args.sequences - i)
        if args.data == "generated":
            starts = prompts(tokenizer, count, args.prompt, validation=False, seed=SEED + i)
            seq = continue_greedily(target, loaded.cache.new, starts, args.new)
        else:
            seq = prompts(tokenizer, count, args.prompt + args.new, validation=False,
                          seed=SEED + i)  # fmt: skip
        for rows in range(0, count, 64):  # one forward over every row would be too large
            part = seq[rows : rows + 64]
            logits, feats = target(mx.array(part), hidden_layers=layers)
            # The label of position i is what the target says after position i - 1.
            said = mx.concatenate([mx.array(part[:, :1]), mx.argmax(logits[:, :-1], axis=-1)], 1)
            feats = feats.astype(mx.bfloat16)
            mx.eval(feats, said)
            features.append(feats)
            choices.append(said.astype(mx.int32))
        data.append(seq)
    ids = mx.array(np.concatenate(data))
    feats = mx.concatenate(features)
    labels_of = mx.concatenate(choices)
    print(f"data: {ids.shape[0]} sequences of {ids.shape[1]} tokens in {time.time() - start:.0f} s")
    gap = check_against_drafting(draft, target, feats.astype(mx.float32), ids, args.block, mask_id)
    print(f"training forward vs drafting: {gap:.2e}")

    gamma = {16: 7.0, 10: 5.0, 8: 4.0}.get(args.block, args.block / 2)
    weights = mx.exp(-mx.arange(args.block - 1) / gamma)
    rng = np.random.default_rng(SEED)

    def loss_fn(
        model: DFlashDraftModel, f: mx.array, x: mx.array, y: mx.array, anchors: mx.array
    ) -> mx.array:
        h = block_forward(model, target.model.embed, f.astype(mx.float32), x, anchors,
                          args.block, mask_id)  # fmt: skip
        logits = target.head(h[:, :, 1:])  # [B, A, block-1, V]
        idx = anchors[..., None] + mx.arange(1, args.block)
        labels = mx.take_along_axis(y[:, None, :], idx.reshape(x.shape[0], 1, -1), axis=2)
        labels = labels.reshape(idx.shape)
        ce = nn.losses.cross_entropy(logits, labels, reduction="none")
        return (ce * weights).sum() / (weights.sum() * ce.shape[0] * ce.shape[1])

    optimizer = optim.AdamW(learning_rate=args.lr, weight_decay=0.01)
    step_fn = nn.value_and_grad(draft, loss_fn)
    budget, steps, losses = args.minutes * 60, 0, []
    begin = time.time()
    total_estimate = None
    while time.time() - begin < budget:
        rows = mx.array(rng.integers(ids.shape[0], size=args.batch))
        high = ids.shape[1] - args.block
        # Generated rows are labelled consistently only after the prompt: there every label is
        # the target's own continuation of the tokens before it, as when drafting.
        low = args.prompt if args.data == "generated" else args.prompt // 2
        anchors = np.sort(rng.integers(low, high, size=(args.batch, args.anchors)))
        elapsed = time.time() - begin
        if total_estimate is None and steps == 20:
            total_estimate = int(budget / (elapsed / 20))
        progress = min(1.0, elapsed / budget)
        warm = min(1.0, (steps + 1) / 50)
        optimizer.learning_rate = args.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        loss, grads = step_fn(draft, feats[rows], ids[rows], labels_of[rows],
                              mx.array(anchors, dtype=mx.int32))  # fmt: skip
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(draft, grads)
        mx.eval(draft.parameters(), optimizer.state, loss)
        losses.append(float(loss.item()))
        steps += 1
        if steps % 100 == 0:
            print(f"step {steps}: loss {np.mean(losses[-100:]):.3f} "
                  f"({time.time() - begin:.0f} s)", flush=True)  # fmt: skip
    params = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(draft.parameters())}
    mx.save_safetensors(str(args.out / "model.safetensors"), params, metadata={"format": "mlx"})
    held_out = prompts(tokenizer, 16, args.prompt, validation=True, seed=SEED + 10_000)
    report = acceptance(target, loaded.cache.new, args.out, held_out, 64)
    summary = {"steps": steps, "final_loss": float(np.mean(losses[-100:])), **report}
    print(json.dumps(summary))
    (args.out / "README.md").write_text(_card(args, dconf, summary))
    return 0


def _card(args: argparse.Namespace, config: Any, summary: dict[str, Any]) -> str:
    out = "mach-core/src/mach/default_model/data/draft"
    flags = [a for a in sys.argv[1:]]
    flags[flags.index("--out") + 1] = out
    command = " ".join(["python tools/train_dflash_draft.py", *flags])
    data = (
        f"{args.sequences} target-generated continuations of prompts cut from"
        if args.data == "generated"
        else f"{args.sequences} windows of {args.prompt + args.new} tokens from"
    )
    return f"""# DFlash draft for qwen3_moe-python-tiny

The speculative-decoding draft mach uses with its default model by default (`specdec_v7`):
{config.num_hidden_layers} DFlash layer(s) conditioned on the target's residual stream after
layers {list(config.target_layer_ids)}, blocks of {config.block_size} (one anchor and
{config.block_size - 1} drafts per pass), mask token `<|mask|>` (id {config.mask_token_id}). It
shares the target's embedding and output head, so it stores neither.

Trained by `{command}` ({summary["steps"]} steps; final weighted loss
{summary["final_loss"]:.3f} nats) on {data} the Python standard library's training files,
each position labelled with the target's own next-token choice.

On 16 held-out prompts (validation files), greedy, 64 tokens each, through mach's engine:
{summary["tokens_per_pass"]:.2f} tokens per target pass, {summary["accepted_share"]:.0%} of
drafts accepted. Every draft is verified by the target: in float32 the output is exactly
target-only decoding's; in bfloat16 a verify pass over several tokens can round differently
from one-token steps and so break a near-tie the other way.
"""


if __name__ == "__main__":
    sys.exit(main())
