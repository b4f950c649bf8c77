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


def make_case(family: str, seed: int, index: int, out: Path) -> dict[str, Any]:
    family_index = sorted(sweep_configs.FAMILIES).index(family)
    rng = np.random.default_rng([seed, family_index, index])
    kwargs, length = sweep_configs.FAMILIES[family](rng, index)
    case: dict[str, Any] = {"case": index, "config": kwargs, "seq_len": length}
    model = build(family, kwargs, int(rng.integers(2**31)))
    ids = rng.integers(3, sweep_configs.VOCAB, size=(2, length))
    prefill = int(rng.integers(1, length)) if length > 1 else 1
    case["prefill"] = prefill
    options = layouts(family, kwargs, model)
    case["layout"] = options[int(rng.integers(len(options)))]
    save(family, model, out, case["layout"])
    ref = reference(model, ids, prefill)
    case["index_ties"] = int(ref["index_ties"])
    np.savez(out / "reference.npz", **ref)
    (out / "case.json").write_text(json.dumps(case))
    return case


def check(dirs: list[Path]) -> list[dict[str, Any]]:
    """mach's errors on each case, from mach's own environment."""
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [str(python)] if python.exists() else ["uv", "run", "--project", str(ROOT), "python"]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.run([*cmd, str(ROOT / "tools" / "fidelity_check.py"), *map(str, dirs)],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or len(results) != len(dirs):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"fidelity_check.py failed (exit {proc.returncode})")
    return results


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


def write_fixture(family: str, seed: int, index: int, name: str) -> None:
    """A case as a golden fixture, so the suite guards it without torch."""
    # Not under tests/fixtures/<family>/, which make_fixtures.py rewrites whole.
    out = ROOT / "tests" / "fixtures" / "sweep" / family / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    case = make_case(family, seed, index, out)
    case["command"] = (f"python tools/fidelity_sweep.py --family {family} --seed {seed} "
                       f"--case {index} --fixture {name}")  # fmt: skip
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
        write_fixture(families[0], args.seed, cases[0], args.fixture)
        return 0
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
