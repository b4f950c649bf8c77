"""The expert bank under batched decode: a step of many sequences is a decode step, and one whose
experts outnumber the slots keeps what it read; a prompt chunk still leaves the bank alone."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mach import load_moe
from mach.experts.bank import BankCache, LayerExpertBank
from mach.io.convert import convert

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> LayerExpertBank:
    """One layer's bank of 4 slots over the fixture's 8 experts (top-2)."""
    path = convert(FAMILY / "mlx-q4", tmp_path_factory.mktemp("sidecar") / "q4")
    probe = load_moe(path, streaming=True, expert_budget="1GB").store
    assert isinstance(probe, BankCache)
    store = load_moe(path, streaming=True, expert_budget=probe.slot_bytes * 4).store
    assert isinstance(store, BankCache) and store.slots == 4
    return next(iter(store.layers.values()))


def misses_of(bank: LayerExpertBank, indices: list[list[list[int]]]) -> int:
    before = bank.misses
    bank.route(mx.array(indices))
    return bank.misses - before


def test_a_wide_batched_step_keeps_what_it_read(bank: LayerExpertBank) -> None:
    # 16 sequences, one token each, routed to all 8 experts: more than the 4 slots.
    step = [[[e % 8, (e + 1) % 8]] for e in range(16)]
    assert misses_of(bank, step) == 8
    assert bank.transient_calls == 1
    kept = bank.held()
    assert len(kept) == 4
    assert misses_of(bank, [[kept[:2]]]) == 0


def test_a_prompt_chunk_leaves_the_bank_alone(bank: LayerExpertBank) -> None:
    held = bank.held()
    others = [e for e in range(8) if e not in held][:2]
    chunk = [[others] * 16]  # one sequence, 16 tokens
    assert misses_of(bank, chunk) == 2
    assert bank.held() == held
    assert misses_of(bank, [[others]]) == 2
