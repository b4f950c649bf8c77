"""Fidelity sweep: mach against transformers over many random configs of every family.

Run it in the fixtures environment (torch CPU, transformers; see make_fixtures.py):

    .venv-fixtures/bin/python tools/fidelity_sweep.py --seed 0 --count 50

For each case it draws a valid config from the family's own transformers config class
(tools/sweep_configs.py), builds the model with random weights (0/1-initialised parameters
perturbed, as the golden fixtures do), saves it in one of the layouts people download and
records transformers' float32 eager logits: a full forward of two sequences, and a prefill
followed by one-token steps through transformers' cache. mach then loads every case in its own
environment (tools/fidelity_check.py, through ``uv run``) and reports the largest difference.
The same ``--seed`` and ``--count`` give the same configs, weights and tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelity_quantized
import fixtures_deepseek_v4
import sweep_configs
from make_fixtures import perturb_layer_scalars, perturb_unit_params, to_hub_dialect

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def _classes(family: str) -> tuple[Any, Any]:
    import transformers as t

    return {
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM),
        "qwen3_5_moe": (t.Qwen3_5MoeTextConfig, t.Qwen3_5MoeForCausalLM),
        "gpt_oss": (t.GptOssConfig, t.GptOssForCausalLM),
        "gemma4": (t.Gemma4TextConfig, t.Gemma4ForCausalLM),
        "deepseek_v4": (t.DeepseekV4Config, t.DeepseekV4ForCausalLM),
    }[family]


def build(family: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    config_class, model_class = _classes(family)
    config = config_class(vocab_size=sweep_configs.VOCAB, initializer_range=0.08,
                          eos_token_id=2, bos_token_id=1, pad_token_id=0, **kwargs)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    if family == "deepseek_v4":
        fixtures_deepseek_v4.perturb(model, generator)
        model.index_ties = fixtures_deepseek_v4.lowest_index_first_indexer(model)
    else:
        perturb_unit_params(model, generator)
        perturb_layer_scalars(model, generator)
    return model


def reference(model: torch.nn.Module, ids: np.ndarray, prefill: int) -> dict[str, np.ndarray]:
    """Full-sequence logits of every row, and row 0 prefilled then stepped through the cache."""
    tokens = torch.from_numpy(ids.astype(np.int64))
    extra: dict[str, Any] = {}
    if set(getattr(model.config, "layer_types", None) or ()) == {"linear_attention"}:
        # transformers cannot build a causal mask from a cache without attention layers; none
        # is needed (the recurrent layers take no mask without padding), so pass none.
        extra["attention_mask"] = {"full_attention": None, "linear_attention": None}
    with torch.no_grad():
        # Explicit positions: a Qwen3.5 cache of linear-attention layers only has no length.
        positions = torch.arange(tokens.shape[1])[None]
        full = model(
            tokens, position_ids=positions.expand(len(tokens), -1), use_cache=False, **extra
        ).logits
        out = model(
            tokens[:1, :prefill], position_ids=positions[:, :prefill], use_cache=True, **extra
        )
        steps, cache = [out.logits], out.past_key_values
        for t in range(prefill, tokens.shape[1]):
            out = model(tokens[:1, t : t + 1], position_ids=positions[:, t : t + 1],
                        cache=cache, use_cache=True, **extra)  # fmt: skip
            steps.append(out.logits)
    return {
        "input_ids": ids.astype(np.int32),
        "logits": full.float().numpy(),
        "incremental_logits": torch.cat(steps, dim=1).float().numpy(),
        "prefill": np.array(prefill, np.int32),
        "index_ties": np.array(getattr(model, "index_ties", [0])[0], np.int32),
    }


def save(family: str, model: torch.nn.Module, out: Path, layout: str) -> None:
    if family == "deepseek_v4" and layout == "upstream":
        model.save_pretrained(out)
        tensors = fixtures_deepseek_v4._read(out)
        from safetensors.torch import save_file

        for f in out.glob("*.safetensors"):
            f.unlink()
        renamed = {fixtures_deepseek_v4._upstream_name(k): v for k, v in tensors.items()}
        save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(fixtures_deepseek_v4.hub_config(config)))
        return
    model.save_pretrained(out, save_original_format=layout != "fused")
    if layout == "hub-dialect":
        to_hub_dialect(out / "config.json")
    (out / "generation_config.json").unlink(missing_ok=True)


def layouts(family: str, kwargs: dict[str, Any], model: torch.nn.Module) -> list[str]:
    """The on-disk layouts this case can be saved in."""
    if family == "qwen3_moe":
        return ["original", "fused", "hub-dialect"]
    if family == "qwen3_5_moe":
        return ["original", "fused"]
    if family == "gpt_oss":
        return ["original", "hub-dialect"]
    if family == "deepseek_v4":
        mlp = model.config.mlp_layer_types
        hashed = mlp.count("hash_moe")
        hash_first = mlp == ["hash_moe"] * hashed + ["moe"] * (len(mlp) - hashed)
        return ["original", "fused"] + (["upstream"] if hash_first else [])
    return ["original"]


def make_case(
    family: str, seed: int, index: int, out: Path, quantized: bool = False
) -> dict[str, Any]:
    family_index = sorted(sweep_configs.FAMILIES).index(family)
    rng = np.random.default_rng([seed, family_index, index])
    kwargs, length = sweep_configs.FAMILIES[family](rng, index)
    quantization = fidelity_quantized.setting(index)
    if quantized:
        kwargs = fidelity_quantized.quantizable(family, kwargs, quantization["group_size"])
    case: dict[str, Any] = {"case": index, "config": kwargs, "seq_len": length}
    model = build(family, kwargs, int(rng.integers(2**31)))
    ids = rng.integers(3, sweep_configs.VOCAB, size=(2, length))
    prefill = int(rng.integers(1, length)) if length > 1 else 1
    case["prefill"] = prefill
    options = layouts(family, kwargs, model)
    case["layout"] = options[int(rng.integers(len(options)))]
    if quantized:
        # The layout people quantize from, which both converters read.
        case["layout"] = "original"
        case["quantization"] = quantization
    save(family, model, out, case["layout"])
    ref = reference(model, ids, prefill)
    case["index_ties"] = int(ref["index_ties"])
    np.savez(out / "reference.npz", **ref)
    (out / "case.json").write_text(json.dumps(case))
    return case


def in_mach(script: str, dirs: list[Path]) -> list[dict[str, Any]]:
    """Run a tools/ script in mach's own environment; one JSON result per folder."""
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [str(python)] if python.exists() else ["uv", "run", "--project", str(ROOT), "python"]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.run([*cmd, str(ROOT / "tools" / script), *map(str, dirs)],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or len(results) != len(dirs):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{script} failed (exit {proc.returncode})")
    return results


def check(dirs: list[Path]) -> list[dict[str, Any]]:
    """mach's errors on each case."""
    return in_mach("fidelity_check.py", dirs)


def run_family(family: str, seed: int, cases: list[int], keep: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = keep / family if keep else Path(tmp)
        dirs, meta = [], []
        for index in cases:
            out = root / f"case{index:03d}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            meta.append(make_case(family, seed, index, out))
            dirs.append(out)
        results = check(dirs)
    rows = [{**m, **r} for m, r in zip(meta, results, strict=True)]
    for row in rows:
        row["error"] = max(row.get("full", np.inf), row.get("incremental", np.inf))
    return {"family": family, "rows": rows}


def finisher(family: str) -> Any:
    """What a reloaded reference model needs besides its weights (DeepSeek-V4's tie order)."""
    if family == "deepseek_v4":
        return fixtures_deepseek_v4.lowest_index_first_indexer
    return lambda model: None


def run_family_quantized(
    family: str, seed: int, cases: list[int], keep: Path | None
) -> dict[str, Any]:
    """Each case through ``mach convert --bits`` and mlx-lm's converter, against references
    computed on the same rounded weights (tools/fidelity_quantized.py says how)."""
    _, model_class = _classes(family)
    with tempfile.TemporaryDirectory() as tmp:
        root = (keep / f"{family}-quantized") if keep else Path(tmp)
        dirs, meta = [], []
        for index in cases:
            out = root / f"case{index:03d}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            meta.append(make_case(family, seed, index, out, quantized=True))
            dirs.append(out)
        prepared = in_mach("quantized_reference.py", dirs)
        targets: list[tuple[int, str, Path]] = []
        for i, (case, ready) in enumerate(zip(dirs, prepared, strict=True)):
            if "failure" in ready:
                meta[i]["mach_failure"] = ready["failure"]
                continue
            ref = fidelity_quantized.transformers_reference(model_class, case, reference,
                                                            finisher(family))  # fmt: skip
            np.savez(case / "mach-q" / "reference.npz", **ref)
            with np.load(case / "reference.npz") as plain:
                meta[i]["rounding"] = float(np.abs(ref["logits"] - plain["logits"]).max())
            targets.append((i, "mach", case / "mach-q"))
            mlx = fidelity_quantized.mlx_lm_reference(case, meta[i]["quantization"], TOLERANCE)
            if isinstance(mlx, str):
                meta[i]["mlx_lm_unread"] = mlx
            else:
                targets.append((i, "mlx_lm", case / "mlx-lm-q"))
        results = check([t[2] for t in targets]) if targets else []
    for (i, kind, _), result in zip(targets, results, strict=True):
        meta[i][kind] = result
    return {"family": family, "rows": meta}


def _worst(result: dict[str, Any] | None) -> float:
    if result is None:
        return np.nan
    return max(result.get("full", np.inf), result.get("incremental", np.inf))


def report_quantized(results: list[dict[str, Any]], seed: int) -> bool:
    """Print the quantized table; True when a case failed or went over the tolerance."""
    failed = False
    lines = []
    for result in results:
        rows, family = result["rows"], result["family"]
        mach = [r for r in rows if "mach" in r]
        mlx = [r for r in rows if "mlx_lm" in r]
        bad = [r for r in rows if "mach_failure" in r or not _worst(r.get("mach")) <= TOLERANCE
               or ("mlx_lm" in r and not _worst(r["mlx_lm"]) <= TOLERANCE)]  # fmt: skip
        failed = failed or bool(bad)
        unread: dict[str, int] = {}
        for r in rows:
            if "mlx_lm_unread" in r:  # one line per kind of reason, numbers left out
                key = re.sub(r"\b\d+(\.\d+)?\b", "N", r["mlx_lm_unread"])[:100]
                unread[key] = unread.get(key, 0) + 1
        print(f"\n{family} (quantized): {len(rows)} configs, {len(bad)} failing")
        for row in bad:
            msg = row.get("mach_failure") or (
                f"mach-q {_worst(row.get('mach')):.3g}, mlx-lm-q {_worst(row.get('mlx_lm')):.3g}"
            )
            print(f"  {msg}  {describe(row)}")
        for reason, count in sorted(unread.items(), key=lambda kv: -kv[1]):
            print(f"  mlx-lm is no reference for {count}: {reason}")
        bits = sorted({(r["quantization"]["bits"], r["quantization"]["group_size"]) for r in rows})
        worst = max(mach, key=lambda r: _worst(r["mach"])) if mach else None
        lines.append(
            f"| {family} | {len(mach)} | "
            + ", ".join(f"{b}-bit/g{g}" for b, g in bits)
            + f" | {max((r['rounding'] for r in mach), default=np.nan):.2g}"
            + f" | {max((_worst(r['mach']) for r in mach), default=np.nan):.2e} | {len(mlx)} | "
            + (f"{max(_worst(r['mlx_lm']) for r in mlx):.2e} | " if mlx else "- | ")
            + (describe(worst) if worst else "")
            + " |"
        )
    print(f"\nseed {seed}, tolerance {TOLERANCE:g}: quantized checkpoints, float32 logits")
    print(
        "| family | mach convert configs | settings | quantization's effect on the "
        "logits | max error, mach vs transformers on the same rounded weights | mlx-lm "
        "convert configs | max error, mach vs mlx-lm | worst config |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return failed


def write_fixture(family: str, seed: int, index: int, name: str, quantized: bool) -> None:
    """A case as a golden fixture, so the suite guards it without torch.

    A quantized fixture keeps the float source and, as ``reference-quantized.npz``,
    transformers' logits on its dequantized weights; the suite runs ``mach convert`` itself.
    """
    # Not under tests/fixtures/<family>/, which make_fixtures.py rewrites whole.
    folder = "sweep-quantized" if quantized else "sweep"
    out = ROOT / "tests" / "fixtures" / folder / family / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    case = make_case(family, seed, index, out, quantized=quantized)
    if quantized:
        (ready,) = in_mach("quantized_reference.py", [out])
        if "failure" in ready:
            raise SystemExit(f"mach convert failed: {ready['failure']}")
        ref = fidelity_quantized.transformers_reference(_classes(family)[1], out, reference,
                                                        finisher(family))  # fmt: skip
        np.savez(out / "reference-quantized.npz", **ref)
        shutil.rmtree(out / "mach-q")
        shutil.rmtree(out / "dequantized")
    case["command"] = (f"python tools/fidelity_sweep.py --family {family} --seed {seed} "
                       f"--case {index} --fixture {name}"
                       + (" --quantized" if quantized else ""))  # fmt: skip
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def describe(row: dict[str, Any]) -> str:
    return (f"case {row['case']} ({row['layout']}, {row['seq_len']} tokens, prefill "
            f"{row['prefill']}): {json.dumps(row['config'], separators=(',', ':'))}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(sweep_configs.FAMILIES),
                        help="repeat for several; default: every family")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--case", type=int, action="append", help="run only these case indices")
    parser.add_argument("--keep", type=Path, help="keep each case's checkpoint under this folder")
    parser.add_argument(
        "--quantized",
        action="store_true",
        help="convert each case to 4 or 8 bits",
    )
    parser.add_argument(
        "--fixture",
        metavar="NAME",
        help="save the one --family/--case as tests/fixtures/sweep/<family>/NAME",
    )
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    families = args.family or list(sweep_configs.FAMILIES)
    cases = args.case or list(range(args.count))
    if args.fixture:
        if len(families) != 1 or len(cases) != 1:
            parser.error("--fixture takes exactly one --family and one --case")
        write_fixture(families[0], args.seed, cases[0], args.fixture, args.quantized)
        return 0
    if args.quantized:
        done = [run_family_quantized(f, args.seed, cases, args.keep) for f in families]
        return 1 if report_quantized(done, args.seed) else 0
    summary, failed = [], False
    for family in families:
        result = run_family(family, args.seed, cases, args.keep)
        rows = result["rows"]
        worst = max(rows, key=lambda r: r["error"])
        bad = [r for r in rows if not r["error"] <= TOLERANCE]
        failed = failed or bool(bad)
        tied = sum(1 for r in rows if r["index_ties"])
        print(
            f"\n{family}: {len(rows)} configs, {len(bad)} over {TOLERANCE:g}"
            + (f"; {tied} with index-score ties (lowest index first)" if tied else "")
        )
        for row in bad:
            msg = row.get("failure") or f"full {row['full']:.3g}, step {row['incremental']:.3g}"
            print(f"  {msg}  {describe(row)}")
        summary.append((family, len(rows), max(r.get("full", np.inf) for r in rows),
                        max(r.get("incremental", np.inf) for r in rows), worst))  # fmt: skip
    print(f"\nseed {args.seed}, tolerance {TOLERANCE:g}: max |mach - transformers|, float32 logits")
    print("| family | configs | max error (full) | max error (prefill + steps) | worst config |")
    print("|---|---|---|---|---|")
    for family, n, full, step, worst in summary:
        print(f"| {family} | {n} | {full:.2e} | {step:.2e} | {describe(worst)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
