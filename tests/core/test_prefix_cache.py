"""The prefix cache's tiers: byte budgets, restarts, damaged or foreign entries, two writers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.cache.disk import DiskKVCache
from mach.cache.fingerprint import model_fingerprint
from mach.cache.kv import KVCache
from mach.cache.prefix import PrefixCache, block_keys
from mach.cache.snapshot import CacheSnapshot, LayerState
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.io.load import LoadedModel

FIXTURE = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "hf-per-expert"
BLOCK = 16


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_moe(FIXTURE, dtype="float32")


def prompt(seed: int, n: int = 40) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


def state_after(loaded: LoadedModel, tokens: list[int]) -> list[LayerState]:
    cache = loaded.cache.new()
    loaded.model(mx.array(tokens)[None], cache=cache)
    return cache.export_state()


def snapshot(loaded: LoadedModel, seed: int) -> tuple[str, CacheSnapshot]:
    tokens = prompt(seed, 2 * BLOCK)
    key = block_keys(model_fingerprint(loaded), tokens, BLOCK)[-1]
    return key, CacheSnapshot(tokens, state_after(loaded, tokens))


def test_chain_keys_name_whole_prefixes() -> None:
    a, b = prompt(1, 64), prompt(2, 64)
    assert block_keys("m", a, BLOCK)[:2] == block_keys("m", a[:40], BLOCK)
    assert block_keys("m", a[:32] + b[32:], BLOCK)[:2] == block_keys("m", a, BLOCK)[:2]
    assert block_keys("m", a[:32] + b[32:], BLOCK)[2] != block_keys("m", a, BLOCK)[2]
    assert block_keys("m", a, BLOCK) != block_keys("other model", a, BLOCK)


def test_lookup_finds_the_longest_stored_prefix(loaded: LoadedModel) -> None:
    cache = PrefixCache(model_fingerprint(loaded), block_size=BLOCK)
    tokens = prompt(3, 80)
    for n in (16, 48):
        cache.store(tokens[:n], state_after(loaded, tokens[:n]))
    hit = cache.lookup(tokens)
    assert hit is not None and len(hit.tokens) == 48
    hit = cache.lookup(tokens, limit=47)
    # No snapshot ends at 47, but the one at 48 holds its rows: KV state is cut, not recomputed.
    assert hit is not None and len(hit.tokens) == 47
    exact = state_after(loaded, tokens[:47])
    for cut, full in zip(hit.layers, exact, strict=True):
        assert cut.meta["offset"] == full.meta["offset"] == 47
        for name in full.arrays:
            # Equal up to float rounding: a 48-token forward and a 32-token one block their
            # products differently.
            assert mx.allclose(cut.arrays[name], full.arrays[name], rtol=0, atol=1e-5).item()
    hit = cache.lookup(tokens, limit=31)
    assert hit is not None and len(hit.tokens) == 31
    assert cache.lookup(prompt(4, 80)) is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["tokens_reused"]) == (3, 1, 48 + 47 + 31)


def test_kv_snapshots_end_anywhere_and_are_used_as_far_as_they_agree(
    loaded: LoadedModel,
) -> None:
    cache = PrefixCache(model_fingerprint(loaded), block_size=BLOCK)
    tokens = prompt(3, 80)
    cache.store(tokens[:43], state_after(loaded, tokens[:43]))
    hit = cache.lookup(tokens)
    assert hit is not None and len(hit.tokens) == 43
    # A prompt that leaves this one after 37 tokens reuses exactly those 37.
    other = tokens[:37] + prompt(4, 30)
    hit = cache.lookup(other)
    assert hit is not None and len(hit.tokens) == 37 and hit.layers[0].meta["offset"] == 37
    exact = state_after(loaded, other[:37])
    for cut, full in zip(hit.layers, exact, strict=True):
        for name in full.arrays:
            assert mx.allclose(cut.arrays[name], full.arrays[name], rtol=0, atol=1e-5).item()
    # Shorter than one block: no key to file it under.
    with pytest.raises(ValueError, match="block boundaries"):
        cache.store(tokens[:10], state_after(loaded, tokens[:10]))
    # The same full blocks with another tail replace the older snapshot.
    cache.store(other[:40], state_after(loaded, other[:40]))
    hit = cache.lookup(tokens)
    assert hit is not None and len(hit.tokens) == 37


def test_a_gdn_snapshot_must_end_on_a_block_boundary() -> None:
    from mach.cache.gdn import GDNCache

    gdn = GDNCache()
    gdn.update(mx.ones((1, 3, 8)), mx.ones((1, 2, 4, 4)), tokens=20)
    state = gdn.export_state()
    cache = PrefixCache("m", block_size=BLOCK)
    with pytest.raises(ValueError, match="block boundaries"):
        cache.store(list(range(20)), [state])


def test_loading_state_into_another_cache_kind_is_refused(loaded: LoadedModel) -> None:
    state = state_after(loaded, prompt(5, 8))[0]
    with pytest.raises(ValueError, match="'kv' cache state into a 'gdn'"):
        from mach.cache.gdn import GDNCache

        GDNCache().load_state(state)


def test_memory_tier_evicts_least_recently_used(loaded: LoadedModel) -> None:
    entries = [snapshot(loaded, seed) for seed in range(3)]
    size = entries[0][1].nbytes
    cache = PrefixCache(model_fingerprint(loaded), int(2.5 * size), block_size=BLOCK)
    cache.store(entries[0][1].tokens, entries[0][1].layers)
    cache.store(entries[1][1].tokens, entries[1][1].layers)
    assert cache.lookup(entries[0][1].tokens) is not None  # now the most recent
    cache.store(entries[2][1].tokens, entries[2][1].layers)
    assert cache.lookup(entries[1][1].tokens) is None
    assert cache.lookup(entries[0][1].tokens) is not None
    stats = cache.stats()
    assert stats["l1_evictions"] == 1 and stats["l1_entries"] == 2
    assert stats["l1_bytes"] <= 2.5 * size


def test_disk_tier_evicts_under_its_budget(loaded: LoadedModel, tmp_path: Path) -> None:
    entries = [snapshot(loaded, seed) for seed in range(4)]
    size = entries[0][1].nbytes
    disk = DiskKVCache(tmp_path, int(2.5 * size), model_fingerprint(loaded))
    for key, entry in entries:
        assert disk.put(key, entry)
    assert disk.nbytes <= 2.5 * size and disk.evictions == 2
    assert entries[0][0] not in disk and entries[3][0] in disk
    assert not disk.put("huge", CacheSnapshot(list(range(64)), entries[0][1].layers * 3))


def test_disk_hit_is_promoted_and_survives_a_restart(loaded: LoadedModel, tmp_path: Path) -> None:
    fingerprint = model_fingerprint(loaded)
    tokens = prompt(6, 40)
    first = PrefixCache(fingerprint, disk=DiskKVCache(tmp_path, 1 << 30, fingerprint),
                        block_size=BLOCK)  # fmt: skip
    first.store(tokens[:32], state_after(loaded, tokens[:32]))
    again = PrefixCache(fingerprint, disk=DiskKVCache(tmp_path, 1 << 30, fingerprint),
                        block_size=BLOCK)  # fmt: skip
    assert again.lookup(tokens) is not None and again.lookup(tokens) is not None
    stats = again.stats()
    assert (stats["l2_hits"], stats["l1_hits"], stats["l1_entries"]) == (1, 1, 1)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "corrupt":
        data[-7] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "corrupt", "foreign"])
def test_damaged_or_foreign_entries_are_removed_not_used(
    loaded: LoadedModel, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    fingerprint = model_fingerprint(loaded)
    key, entry = snapshot(loaded, 7)
    DiskKVCache(tmp_path, 1 << 30, fingerprint).put(key, entry)
    _damage(tmp_path / f"{key}.safetensors", how)
    reader = DiskKVCache(tmp_path, 1 << 30, "another model" if how == "foreign" else fingerprint)
    with caplog.at_level(logging.WARNING, logger="mach.cache.disk"):
        assert reader.get(key) is None
    assert key not in reader and reader.rejected == 1
    assert "removing" in caplog.text


def test_a_different_checkpoint_has_a_different_fingerprint(
    loaded: LoadedModel, checkpoint: Path
) -> None:
    assert model_fingerprint(load_moe(checkpoint, dtype="float32")) == model_fingerprint(loaded)
    assert model_fingerprint(load_moe(checkpoint, dtype="bfloat16")) != model_fingerprint(loaded)
    config = json.loads((checkpoint / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(load_moe(checkpoint, dtype="float32")) != model_fingerprint(loaded)


def test_the_fingerprint_names_the_dtype_the_weights_compute_in() -> None:
    """Without a dtype a bfloat16 checkpoint computes in float32 on a CPU and in bfloat16 on a
    GPU: the same options, different KV states, so different fingerprints."""
    from mach.default_model import default_model_path

    loaded = load_moe(default_model_path())
    assert loaded.model.model.embed_tokens.weight.dtype == mx.float32  # widened on this CPU
    on_cpu = model_fingerprint(loaded)
    loaded.model.set_dtype(mx.bfloat16)  # what the same load holds on a GPU
    assert model_fingerprint(loaded) != on_cpu


WRITER = """
import sys
import mlx.core as mx
from mach.cache.disk import DiskKVCache
from mach.cache.kv import KVCache
from mach.cache.snapshot import CacheSnapshot

directory, name, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
disk = DiskKVCache(directory, budget, "model")
for i in range(30):
    layer = KVCache()
    mx.random.seed(i)
    layer.update_and_fetch(mx.random.normal((1, 2, 64, 16)), mx.random.normal((1, 2, 64, 16)))
    disk.put(f"{name}{i:02d}", CacheSnapshot(list(range(64)), [layer.export_state()]))
"""


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    layer = KVCache()
    layer.update_and_fetch(mx.zeros((1, 2, 64, 16)), mx.zeros((1, 2, 64, 16)))
    size = CacheSnapshot(list(range(64)), [layer.export_state()]).nbytes
    budget = 5 * size
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(budget)])
        for name in ("a", "b")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    disk = DiskKVCache(tmp_path, budget, "model")
    names = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert 1 <= len(names) <= 5 and disk.nbytes <= budget + 5 * 4096
    assert not list(tmp_path.glob(".*.tmp.safetensors"))
    assert all(disk.get(name) is not None for name in names) and disk.rejected == 0


def test_streamed_experts_reuse_prefixes(tmp_path: Path) -> None:
    loaded = load_moe(FIXTURE, dtype="float32", streaming=True)
    assert loaded.experts.residency != "resident"
    model, tokenizer, _, cache = loaded
    reuse = PrefixCache.for_model(loaded, directory=tmp_path, block_size=BLOCK)
    engine = TargetEngine(model, tokenizer, cache.new, prefix_cache=reuse)
    plain = TargetEngine(model, tokenizer, cache.new)
    params = SamplingParams(max_tokens=6)
    tokens = prompt(8, 50)
    assert engine.generate(tokens, params).stats.cached_tokens == 0
    result = engine.generate(tokens, params)
    assert result.stats.cached_tokens == 49  # all but the last prompt token
    assert result.tokens == plain.generate(tokens, params).tokens


def test_generate_reuses_the_prompt_cache_dir_in_a_new_process(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mach", "generate", str(FIXTURE), "-p", "import os\n" * 40,
               "-n", "4", "--json", "--prompt-cache-dir", str(tmp_path / "pc")]  # fmt: skip
    runs = [json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]  # fmt: skip
    assert runs[0]["tokens"] == runs[1]["tokens"]
    assert runs[0]["stats"]["cached_tokens"] == 0 and runs[1]["stats"]["cached_tokens"] > 0


def test_unusable_cache_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mach.errors import MachError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(MachError, match="cannot be used as the prompt cache folder"):
        DiskKVCache(blocker / "cache", 1 << 20, "fingerprint")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DiskKVCache("~/c", 1 << 20, "f").directory == tmp_path / "c"


def test_a_failed_disk_write_costs_only_the_reuse(
    tmp_path: Path, loaded: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    disk = DiskKVCache(tmp_path / "c", 1 << 30, model_fingerprint(loaded))
    key, entry = snapshot(loaded, 9)
    # The folder vanishing under a running server (a file in its place fails even for root).
    (tmp_path / "c").rmdir()
    (tmp_path / "c").write_text("")
    with caplog.at_level(logging.WARNING):
        assert disk.put(key, entry) is False
    assert "cannot write" in caplog.text
