"""DFlash drafts: published layout, lossless greedy and sampled decoding, named errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.decode.dflash import DFlashDrafter, default_target_layers
from mach.decode.dflash.drafter import AdaptiveBlock
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.sampler import Sampler
from mach.decode.select import build_engine
from mach.decode.speculative import Draft, SpecDecEngine, accept_draft
from mach.errors import MachError
from mach.io.convert import convert
from tests.dflash_drafts import write_random_draft

FIXTURES = Path(__file__).parents[1] / "fixtures"
# mlx-q4: a quantized embedding, whose packed rows do not give the hidden size.
TARGETS = [
    "qwen3_moe/hf-per-expert",
    "qwen3_5_moe/hf-per-expert",
    "gpt_oss/mxfp4",
    "gemma4/hf",
    "qwen3_moe/mlx-q4",
]


def _shape(path: Path) -> tuple[int, int, int]:
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    return config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]


def _draft(tmp_path: Path, target: Path, **overrides: object) -> Path:
    hidden, layers, _ = _shape(target)
    return write_random_draft(tmp_path / "draft", hidden, layers, 100, **overrides)


def test_target_layers_follow_the_published_rule() -> None:
    assert default_target_layers(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layers(28, 1) == [14]


@pytest.mark.parametrize("streaming", [False, True], ids=["resident", "streaming"])
@pytest.mark.parametrize("target", TARGETS)
def test_greedy_with_a_dflash_draft_is_target_only_output(
    target: str, streaming: bool, tmp_path: Path
) -> None:
    path = FIXTURES / target
    folder = _draft(tmp_path, path, block=5)
    if streaming:  # the engine format streams every family's experts one by one
        path = convert(path, tmp_path / "sidecar")
    loaded = load_moe(path, dtype="float32", streaming=streaming, draft_path=str(folder))
    assert (loaded.experts.residency == "resident") is not streaming
    engine = build_engine(loaded)
    assert isinstance(engine, SpecDecEngine) and isinstance(engine.drafter, DFlashDrafter)
    assert engine.k == 4  # the draft's block, less its anchor
    plain = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompt = np.random.default_rng(5).integers(3, 200, size=19).tolist()
    got = engine.generate(prompt, params)
    assert got.tokens == plain.generate(prompt, params).tokens
    assert got.stats.draft_tokens > 0 and got.stats.verify_passes > 0


def test_sampling_with_a_dflash_draft_is_reproducible(tmp_path: Path) -> None:
    path = FIXTURES / "qwen3_moe" / "hf-per-expert"
    loaded = load_moe(path, dtype="float32", draft_path=str(_draft(tmp_path, path)))
    engine = build_engine(loaded)
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=11)
    prompt = list(range(5, 30))
    first, second = engine.generate(prompt, params), engine.generate(prompt, params)
    assert first.tokens == second.tokens and len(first.tokens) == 20


def test_a_point_mass_draft_keeps_the_target_distribution() -> None:
    """DFlash drafts greedily; verifying such a draft must still sample from the target."""
    p = np.array([0.5, 0.2, 0.2, 0.1], np.float32)
    target = mx.log(mx.array(np.stack([p, p])))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    onehot = mx.where(mx.arange(4) == 1, 0.0, -mx.inf)[None]
    counts = np.zeros(4)
    for _ in range(4000):
        accepted, bonus = accept_draft(target, Draft([1], onehot, [1.0]), sampler)
        counts[1 if accepted else bonus] += 1
    assert np.abs(counts / counts.sum() - p).max() < 0.03


def test_the_block_shrinks_while_drafts_are_rejected_and_probes_again() -> None:
    block = AdaptiveBlock(small=3, window=4, hold=5)
    for _ in range(4):
        assert block.size(8) == 8
        block.record(8, 1, 8)
    assert block.size(8) == 3
    for _ in range(5):
        block.record(3, 3, 8)
    assert block.size(8) == 8
    for _ in range(4):
        block.record(8, 7, 8)
    assert block.size(8) == 8


def test_a_draft_beside_the_checkpoint_is_found_and_no_draft_can_be_asked(
    tmp_path: Path,
) -> None:
    import shutil

    target = tmp_path / "model"
    shutil.copytree(FIXTURES / "qwen3_moe" / "hf-per-expert", target)
    hidden, layers, _ = _shape(target)
    write_random_draft(target / "draft", hidden, layers, 100)
    loaded = load_moe(target, dtype="float32")
    assert isinstance(build_engine(loaded), SpecDecEngine)
    assert isinstance(build_engine(loaded, draft=False), TargetEngine)
    bare = load_moe(FIXTURES / "qwen3_moe" / "hf-per-expert", dtype="float32")
    assert isinstance(build_engine(bare), TargetEngine)
    with pytest.raises(MachError, match="has no draft here"):
        build_engine(bare, draft=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 48}, "hidden_size 48 differs from the target's"),
        (
            {"dflash_config": {"mask_token_id": 1, "target_layer_ids": [0, 9]}},
            r"target_layer_ids \[9\] are outside the target's",
        ),
        (
            {"dflash_config": {"mask_token_id": 10**6, "target_layer_ids": [0]}},
            "mask_token_id 1000000 is not a token of the target's vocabulary",
        ),
        ({"dflash_config": None}, "no dflash_config; this is not a DFlash draft"),
        ({"block_size": 1}, "block_size must be a whole number of at least 2"),
    ],
)
def test_a_draft_that_does_not_fit_the_target_is_named(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    path = FIXTURES / "qwen3_moe" / "hf-per-expert"
    folder = _draft(tmp_path, path, **overrides)
    loaded = load_moe(path, dtype="float32", draft_path=str(folder))
    with pytest.raises(MachError, match=message):
        build_engine(loaded)


def test_missing_or_misshapen_draft_tensors_are_named(tmp_path: Path) -> None:
    path = FIXTURES / "qwen3_moe" / "hf-per-expert"
    folder = _draft(tmp_path, path)
    weights = mx.load(str(folder / "model.safetensors"))
    assert isinstance(weights, dict)
    del weights["layers.0.mlp.up_proj.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    loaded = load_moe(path, dtype="float32", draft_path=str(folder))
    with pytest.raises(MachError, match=r"missing \['layers.0.mlp.up_proj.weight'\]"):
        build_engine(loaded)
    weights["layers.0.mlp.up_proj.weight"] = mx.zeros((3, 3))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(MachError, match=r"layers.0.mlp.up_proj.weight has shape \(3, 3\)"):
        build_engine(loaded)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MachError, match=r"no \.safetensors file"):
        build_engine(loaded)


def test_a_draft_path_that_is_not_there_is_named(tmp_path: Path) -> None:
    path = FIXTURES / "qwen3_moe" / "hf-per-expert"
    loaded = load_moe(path, dtype="float32", draft_path=str(tmp_path / "nowhere"))
    with pytest.raises(MachError, match=r"nowhere/config.json: not found"):
        build_engine(loaded)


def test_check_reports_a_draft_only_where_there_is_one(tmp_path: Path) -> None:
    import shutil

    from mach.check import check_checkpoint

    target = tmp_path / "model"
    shutil.copytree(FIXTURES / "qwen3_moe" / "hf-per-expert", target)
    assert not check_checkpoint(target).draft_present
    (target / "draft").mkdir()
    (target / "draft" / "config.json").write_text('{"model_type": "qwen3"}')  # not DFlash
    assert not check_checkpoint(target).draft_present
    hidden, layers, _ = _shape(target)
    write_random_draft(target / "draft", hidden, layers, 100)
    assert check_checkpoint(target).draft_present


def test_a_rotating_window_trims_its_newest_positions_within_its_slack() -> None:
    from mach.cache.rotating import TRIM_SLACK, RotatingKVCache

    cache = RotatingKVCache(window=4)
    rows = mx.arange(40, dtype=mx.float32).reshape(1, 1, 40, 1)
    cache.update_and_fetch(rows, rows)
    assert cache.keys is not None and cache.keys.shape[2] == 3 + TRIM_SLACK
    assert cache.trim(5) == 5 and cache.offset == 35
    assert cache.keys[0, 0, -1, 0].item() == 34  # the newest kept row is position 34
    # Never below the window: at most the slack, counted from a full window.
    assert cache.trim(100) == TRIM_SLACK - 5 and cache.keys.shape[2] == 3
