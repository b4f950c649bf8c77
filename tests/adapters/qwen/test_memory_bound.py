"""Streaming keeps memory within non-expert weights + budget + a stated overhead.

The overhead allowed is one layer's experts (what a transient prefill chunk may gather) plus
4 MB for activations, the KV cache and read buffers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import write_random_qwen3_moe
from mach.io.convert import convert

SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_experts": 64, "num_experts_per_tok": 4,
         "moe_intermediate_size": 128, "head_dim": 64, "intermediate_size": 512}  # fmt: skip


def measure(path: str, options: str) -> None:
    """Load, generate, print peak memory, weight bytes and store statistics (a child process)."""
    mx.reset_peak_memory()
    model, _, store, cache = load_moe(path, **json.loads(options))
    engine = TargetEngine(model, None, cache.new)
    engine.generate(list(range(3, 35)), SamplingParams(max_tokens=24))
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    stats = {k: v for k, v in store.stats().items() if isinstance(v, (int, float, str))}
    print(json.dumps([mx.get_peak_memory(), weights, stats]))


def run(path: Path, **options: object) -> tuple[int, int, dict[str, object]]:
    # MLX's peak counter is shared by everything in a process, so each run gets its own.
    code = "import sys; from tests.adapters.qwen.test_memory_bound import measure; " \
           "measure(sys.argv[1], sys.argv[2])"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(options)],
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parents[3])  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak, weights, stats = json.loads(result.stdout.strip().splitlines()[-1])
    return peak, weights, stats


def test_peak_memory_stays_within_the_budget(tmp_path: Path) -> None:
    source = write_random_qwen3_moe(tmp_path / "source", SHAPE, bits=4)
    sidecar = convert(source, tmp_path / "sidecar")
    layer_files = list((sidecar / "expert_sidecar").glob("layer_*.bin"))
    experts_total = sum(p.stat().st_size for p in layer_files)
    one_layer = max(p.stat().st_size for p in layer_files)
    budget = experts_total // 5

    resident_peak, _, _ = run(sidecar, streaming=False)
    peak, non_expert, stats = run(sidecar, expert_budget=budget)

    assert experts_total >= 4 * budget
    assert stats["misses"] and stats["evictions"]
    assert peak <= non_expert + budget + one_layer + 4 * 2**20, (peak, non_expert, budget)
    assert resident_peak > experts_total > peak
