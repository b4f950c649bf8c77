"""A shared slot pool (``slot_pool="shared"``) streams with the reference's results, from a
budget as small as one layer's top-k, and puts the budget where routing needs it."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.errors import OptionsError
from mach.experts.bank import BankCache, BudgetError, check_shared_pool
from mach.io.convert import convert
from mach.io.load import LoadedModel
from mach.io.options import LoadOptions
from mach.io.residency import StackedStreamingWarning

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"
MOE_LAYERS, EXPERTS, TOP_K = 2, 8, 2  # the fixture: 3 layers, 2 of them MoE


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(FAMILY / "mlx-q4", tmp_path_factory.mktemp("pool") / "q4")


@pytest.fixture(scope="module")
def one_slot(sidecar: Path) -> int:
    """Bytes of one expert of one layer in a bank."""
    store = load_moe(sidecar, expert_budget="1GB", slot_pool="shared").store
    assert isinstance(store, BankCache)
    return store.slot_bytes


def reference() -> dict[str, np.ndarray]:
    with np.load(FAMILY / "mlx-q4" / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def pooled(path: Path, slots: int, one_slot: int, **options: Any) -> LoadedModel:
    return load_moe(path, expert_budget=one_slot * slots, slot_pool="shared", **options)


@pytest.mark.parametrize("slots", [TOP_K, 3, 7, MOE_LAYERS * EXPERTS])
@pytest.mark.parametrize("source", ["sidecar", "stacked"])
def test_a_shared_pool_matches_the_reference(
    slots: int, source: str, sidecar: Path, one_slot: int
) -> None:
    ref = reference()
    path = sidecar if source == "sidecar" else FAMILY / "mlx-q4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        loaded = pooled(path, slots, one_slot)
    logits = np.array(loaded.model(mx.array(ref["input_ids"])))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    engine = TargetEngine(loaded.model, None, loaded.cache.new, prefill_step_size=5)
    params = SamplingParams(max_tokens=ref["greedy"].shape[1])
    assert engine.generate(ref["input_ids"][0].tolist(), params).tokens == ref["greedy"][0].tolist()
    stats = loaded.store.stats()
    assert stats["slot_pool"] == "shared" and stats["slots"] == slots
    assert stats["slots_per_layer"] is None and stats["layers"] == MOE_LAYERS
    assert loaded.store.nbytes == slots * one_slot
    if slots < MOE_LAYERS * TOP_K:  # fewer slots than the layers' experts of one token
        assert stats["evictions"] > 0


def test_the_smallest_budget_is_one_layers_top_k(sidecar: Path, one_slot: int) -> None:
    budget = one_slot * TOP_K
    with pytest.raises(BudgetError, match="per layer"):
        load_moe(sidecar, expert_budget=budget)
    assert pooled(sidecar, TOP_K, one_slot).store.stats()["slots"] == TOP_K
    with pytest.raises(BudgetError, match=f"in the shared pool.*--expert-budget {budget}"):
        load_moe(sidecar, expert_budget=budget - 1, slot_pool="shared")


def test_the_pool_follows_routing_across_layers(sidecar: Path, one_slot: int) -> None:
    loaded = pooled(sidecar, 10, one_slot)
    store = loaded.store
    assert isinstance(store, BankCache)
    first, *rest = store.layers.values()
    # One layer routes to 6 experts in one call: with a shared pool it may hold all six.
    first.route(mx.array([[[0, 1], [2, 3], [4, 5]]]))
    assert first.held() == [0, 1, 2, 3, 4, 5]
    assert all(bank.held() == [] for bank in rest)
    rest[0].route(mx.array([[[6, 7]]]))
    held = sum(len(b.held()) for b in store.layers.values())
    assert held == 8 and store.stats()["evictions"] == 0


def test_batched_steps_through_a_shared_pool_match_sequential(sidecar: Path, one_slot: int) -> None:
    prompts = [[5, 9, 23, 7, 1], [44, 3, 3, 61], [12, 90, 8, 8, 8, 2], [70, 71]]
    params = [SamplingParams(max_tokens=10) for _ in prompts]
    resident = load_moe(sidecar, streaming=False)
    engine = TargetEngine(resident.model, None, resident.cache.new)
    expected = [engine.generate(p, q).tokens for p, q in zip(prompts, params, strict=True)]
    loaded = pooled(sidecar, 3, one_slot)
    scheduler = ContinuousBatchScheduler(loaded.model, None, loaded.cache.new, max_batch=4,
                                         store=loaded.store)  # fmt: skip
    got = [r.tokens for r in scheduler.generate_batch(prompts, params)]
    assert got == expected
    assert loaded.store.stats()["transient_calls"] > 0  # steps wider than the 3 slots


def test_layers_of_different_shapes_cannot_share_a_pool(sidecar: Path) -> None:
    sources = load_moe(sidecar, streaming=True).plan.experts.sources
    first, second = list(sources)[:2]
    piece = sources[second].pieces["down_proj.weight"]
    odd = dataclasses.replace(piece, shape=(piece.shape[0] + 1, *piece.shape[1:]))
    changed = {**sources, second: dataclasses.replace(
        sources[second], pieces={**sources[second].pieces, "down_proj.weight": odd})}  # fmt: skip
    with pytest.raises(OptionsError, match=f"experts of {second} differ.*{first}"):
        check_shared_pool(changed)
    # A store built without planning meets the same refusal from the bank that cannot fit.
    with pytest.raises(OptionsError, match=f"{second}: a shared slot pool needs"):
        BankCache(changed, 10**9, slot_pool="shared")


def test_slot_pool_is_a_streaming_option() -> None:
    with pytest.raises(OptionsError, match="slot_pool must be one of layer, shared"):
        LoadOptions(slot_pool="global")
    with pytest.raises(OptionsError, match="slot_pool applies only to streaming"):
        LoadOptions(streaming=False, slot_pool="shared")


def test_the_command_line_takes_and_reports_a_shared_pool(sidecar: Path, one_slot: int) -> None:
    import json
    import subprocess
    import sys

    budget = str(one_slot * 3)

    def mach(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mach", *args, "--slot-pool", "shared",
                               "--expert-budget", budget], capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    check = mach("check", str(sidecar))
    assert check.returncode == 0, check.stderr
    assert "3 shared slots" in check.stdout
    run = mach("generate", str(sidecar), "-p", "hi", "-n", "4", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["experts"]["slots"] == 3
    bad = subprocess.run([sys.executable, "-m", "mach", "check", str(sidecar), "--slot-pool",
                          "global"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "slot_pool must be one of layer, shared" in bad.stderr
