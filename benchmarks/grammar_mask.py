"""Per-token cost of constrained decoding: llguidance against xgrammar, then mach end to end.

Part 1 replays the same valid JSON outputs, token by token, through each grammar engine:
compute the next-token mask, accept the token. Engines alternate round by round; the script
prints each engine's median microseconds per token and the median and range of the ratio,
with compile times kept apart. The vocabulary is the default model's (``--vocab default``)
or a byte-level BPE of ``--vocab N`` tokens trained here on Python's standard library.
xgrammar needs torch, so it is measured only where it imports.

Part 2 decodes the default model with and without a JSON-schema grammar in mach and prints
the decode time per token of each and their difference.

    uv run python benchmarks/grammar_mask.py [--vocab 32000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
from tokenizers import Tokenizer as Backend

from mach.default_model import default_model_path

SCHEMAS: list[dict[str, Any]] = [
    {  # a tool call's arguments
        "type": "object",
        "properties": {
            "path": {"type": "string", "maxLength": 40},
            "recursive": {"type": "boolean"},
            "depth": {"type": "integer", "minimum": 0, "maximum": 20},
            "mode": {"enum": ["read", "write", "append"]},
        },
        "required": ["path", "recursive", "depth", "mode"],
        "additionalProperties": False,
    },
    {  # records in a list
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 16},
                        "score": {"type": "number", "multipleOf": 0.5},
                    },
                    "required": ["name", "score"],
                    "additionalProperties": False,
                },
            },
            "note": {"type": "string", "maxLength": 60},
        },
        "required": ["items", "note"],
        "additionalProperties": False,
    },
    {"type": "object"},  # json_object mode: any object
]
INSTANCES = [
    {"path": "src/mach/decode", "recursive": True, "depth": 3, "mode": "read"},
    {
        "items": [{"name": "alpha", "score": 1.5}, {"name": "beta", "score": -2.0}],
        "note": "two records from the import hook tests",
    },
    {"id": 17, "tags": ["os", "sys"], "nested": {"ok": False, "ratio": 0.25}, "name": "x"},
]


def trained_tokenizer(size: int) -> Backend:
    """A byte-level BPE of ``size`` tokens trained on the standard library's sources."""
    from tokenizers import decoders as dec
    from tokenizers import models, pre_tokenizers, trainers

    cache = Path(tempfile.gettempdir()) / f"mach-bench-bpe-{size}.json"
    if cache.exists():
        return Backend.from_file(str(cache))
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = dec.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))

    def texts() -> Iterator[str]:
        for path in files:
            yield path.read_text(encoding="utf-8", errors="replace")

    backend.train_from_iterator(texts(), trainer)
    backend.save(str(cache))
    return backend


def llguidance_engine(backend: Backend, eos: list[int]) -> tuple[Callable[..., Any], int]:
    import llguidance as llg
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    from mach.decode.grammar import Grammar

    tokenizer = llg.LLTokenizer(backend.to_str(), eos_token=eos)
    mask = allocate_token_bitmask(1, tokenizer.vocab_size)

    def compile_(schema: dict[str, Any]) -> Callable[[list[int]], None]:
        matcher = llg.LLMatcher(tokenizer, Grammar.json(schema).lark, log_level=0)

        def replay(tokens: list[int]) -> None:
            matcher.reset()
            for token in tokens:
                fill_next_token_bitmask(matcher, mask)
                assert matcher.consume_token(token), matcher.get_error()

        return replay

    return compile_, tokenizer.vocab_size


def xgrammar_engine(backend: Backend, eos: list[int]) -> tuple[Callable[..., Any], int] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    info = xgr.TokenizerInfo([t for t, _ in vocab], xgr.VocabType.BYTE_LEVEL,
                             stop_token_ids=eos)  # fmt: skip
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def compile_(schema: dict[str, Any]) -> Callable[[list[int]], None]:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=(", ", ": "))  # fmt: skip

        matcher = xgr.GrammarMatcher(compiled)

        def replay(tokens: list[int]) -> None:
            matcher.reset()
            for token in tokens:
                matcher.fill_next_token_bitmask(mask)
                assert matcher.accept_token(token), token

        return replay

    return compile_, info.vocab_size


def mask_costs(backend: Backend, rounds: int) -> None:
    eos = [0]
    texts = [json.dumps(instance) for instance in INSTANCES]
    sequences = [backend.encode(text, add_special_tokens=False).ids for text in texts]
    engines: dict[str, tuple[Callable[..., Any], int]] = {
        "llguidance": llguidance_engine(backend, eos)
    }
    xg = xgrammar_engine(backend, eos)
    if xg is not None:
        engines["xgrammar"] = xg
    tokens = sum(len(s) for s in sequences)
    print(f"vocabulary {backend.get_vocab_size(with_added_tokens=True)} tokens; "
          f"{len(SCHEMAS)} schemas, {tokens} tokens replayed per round")  # fmt: skip
    replays: dict[str, list[Callable[[list[int]], None]]] = {}
    for name, (compile_, _) in engines.items():
        start = time.perf_counter()
        replays[name] = [compile_(schema) for schema in SCHEMAS]
        print(f"  {name:10s} compile {1e3 * (time.perf_counter() - start) / len(SCHEMAS):8.2f} "
              "ms per schema (first compile, cache cold)")  # fmt: skip
    per_token: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(rounds):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for name in order:
            start = time.perf_counter()
            for replay, sequence in zip(replays[name], sequences, strict=True):
                replay(sequence)
            per_token[name].append(1e6 * (time.perf_counter() - start) / tokens)
    for name, values in per_token.items():
        print(f"  {name:10s} mask + accept  median {statistics.median(values):8.1f} us/token "
              f"(range {min(values):.1f}-{max(values):.1f})")  # fmt: skip
    if "xgrammar" in per_token:
        ratios = [x / g for g, x in zip(per_token["llguidance"], per_token["xgrammar"],
                                        strict=True)]  # fmt: skip
        print(f"  xgrammar / llguidance time per token: median {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


def decode_overhead(rounds: int, tokens: int) -> None:
    """mach on the default model: decode ms per token with and without a grammar."""
    from mach import load_moe
    from mach.decode.engine import TargetEngine
    from mach.decode.grammar import Grammar
    from mach.decode.params import SamplingParams

    model, tokenizer, _, cache = load_moe(default_model_path())
    assert tokenizer is not None
    engine = TargetEngine(model, tokenizer, cache.new)
    prompt = tokenizer.encode("def parse(path):\n    ")
    # A long free string keeps the constrained run going as long as the plain one.
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}},
              "required": ["text"]}  # fmt: skip
    runs = {"plain": SamplingParams(max_tokens=tokens, temperature=0.8, seed=1),
            "grammar": SamplingParams(max_tokens=tokens, temperature=0.8, seed=1,
                                      grammar=Grammar.json(schema))}  # fmt: skip
    engine.generate(prompt, runs["grammar"])
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in runs if round_ % 2 == 0 else list(reversed(runs)):
            stats = engine.generate(prompt, runs[name]).stats
            ms[name].append(1e3 * stats.generation_seconds / stats.generation_tokens)
    plain, grammar = statistics.median(ms["plain"]), statistics.median(ms["grammar"])
    extra = [g - p for p, g in zip(ms["plain"], ms["grammar"], strict=True)]
    print(f"mach decode, default model, {tokens} tokens, sampled:")
    print(f"  plain    median {plain:6.3f} ms/token (range {min(ms['plain']):.3f}-"
          f"{max(ms['plain']):.3f})")  # fmt: skip
    print(f"  grammar  median {grammar:6.3f} ms/token (range {min(ms['grammar']):.3f}-"
          f"{max(ms['grammar']):.3f})")  # fmt: skip
    print(f"  grammar overhead: median {statistics.median(extra) * 1e3:+.0f} us/token "
          f"(range {min(extra) * 1e3:+.0f} to {max(extra) * 1e3:+.0f}), "
          f"{grammar / plain:.3f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", default="default", help="'default' or a BPE size to train")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=200, help="decode tokens in part 2")
    parser.add_argument("--no-decode", action="store_true", help="skip part 2")
    args = parser.parse_args()
    random.seed(0)
    if args.vocab == "default":
        backend = Backend.from_file(str(default_model_path() / "tokenizer.json"))
    else:
        backend = trained_tokenizer(int(args.vocab))
    mask_costs(backend, args.rounds)
    if not args.no_decode:
        decode_overhead(args.rounds, args.tokens)


if __name__ == "__main__":
    main()
