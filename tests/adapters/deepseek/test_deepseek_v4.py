"""deepseek_v4 against transformers: compressed attention, hyper-connections, hash routing,
the release's FP8/FP4 packing and its compressed cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import REGISTRY, arch_summary, load_moe, plugins
from mach.check import check_checkpoint
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.errors import CheckpointError
from mach.io.convert import convert
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "deepseek_v4"
LAYOUTS = ["hf-fused", "hf-original", "upstream", "upstream-fp8"]


def test_entry_point_registers_deepseek_v4() -> None:
    assert "deepseek_v4" in REGISTRY
    assert plugins.plugin_record("deepseek").distribution == "mach-adapter-deepseek"
    summary = arch_summary(REGISTRY["deepseek_v4"])
    assert summary["kv_cache_kind"] == "compressed"
    assert summary["continuous_batching"] is False
    assert summary["specdec_kind"] == "mtp_eagle3"
    assert "mxfp4" in summary["routed_quantization"]


def test_fixture_closes_windows_and_leaves_indexer_choosing() -> None:
    config = json.loads((FAMILY / "hf-fused" / "config.json").read_text())
    ref = checks.reference(FAMILY / "hf-fused")
    length = ref["input_ids"].shape[1]
    assert length > 2 * config["sliding_window"]
    csa = config["compress_rates"]["compressed_sparse_attention"]
    assert length // csa > config["index_topk"]
    assert length // config["compress_rates"]["heavily_compressed_attention"] >= 4
    assert set(config["layer_types"]) == {"sliding_attention", "compressed_sparse_attention",
                                          "heavily_compressed_attention"}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(layout: str) -> None:
    assert checks.max_logit_error(FAMILY / layout) <= 1e-4


@pytest.mark.parametrize("layout", ["hf-fused", "upstream-fp8"])
def test_prefill_then_decode_steps_match_transformers_cache(layout: str) -> None:
    """Decode steps cross window and compression boundaries with mach's compressed cache."""
    ref = checks.reference(FAMILY / layout)
    model, _, _, cache = load_moe(FAMILY / layout)
    ids = mx.array(ref["input_ids"][:1])
    split = int(ref["prefill"])
    steps = [model(ids[:, :split], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(split, ids.shape[1])]
    got = np.array(mx.concatenate(steps, axis=1).astype(mx.float32))
    assert np.abs(got - ref["incremental_logits"]).max() <= 1e-4


@pytest.mark.parametrize("layout", ["upstream", "upstream-fp8"])
def test_greedy_tokens_with_chunked_prefill(layout: str) -> None:
    ref = checks.reference(FAMILY / layout)
    model, _, _, cache = load_moe(FAMILY / layout)
    engine = TargetEngine(model, None, cache.new, prefill_step_size=5)
    params = SamplingParams(max_tokens=ref["greedy"].shape[1], temperature=0.0)
    prompt = ref["input_ids"][0, :16].tolist()  # transformers' generate() ran on these
    assert engine.generate(prompt, params).tokens == ref["greedy"][0].tolist()


def test_batch_rows_match_single_sequences() -> None:
    checks.batch_rows_match_single(FAMILY / "upstream-fp8")


def test_fp4_experts_stay_packed_as_mxfp4() -> None:
    model, _, store, _ = load_moe(FAMILY / "upstream-fp8")
    experts = model.layers[0].mlp.switch_mlp.experts.weights
    for matrix in experts.matrices():
        assert matrix.mode == "mxfp4" and matrix.bits == 4 and matrix.weight.dtype == mx.uint32
    assert store.stats()["kind"] == "resident"


def test_sidecar_streaming_matches_resident(tmp_path: Path) -> None:
    convert(FAMILY / "upstream-fp8", tmp_path / "sidecar")
    ref = checks.reference(FAMILY / "upstream-fp8")
    model, _, store, _ = load_moe(tmp_path / "sidecar", expert_budget="40KB")
    got = np.array(model(mx.array(ref["input_ids"])).astype(mx.float32))
    assert store.stats()["kind"] == "streaming" and store.stats()["misses"] > 0
    assert np.abs(got - ref["logits"]).max() <= 1e-4


def test_release_fp4_experts_stream_in_place() -> None:
    """No conversion: the release's per-expert FP4 tensors are read one by one as mxfp4."""
    ref = checks.reference(FAMILY / "upstream-fp8")
    model, _, store, cache = load_moe(FAMILY / "upstream-fp8", expert_budget="70KB")
    assert store.stats()["kind"] == "streaming" and store.stats()["slots_per_layer"] == 4
    got = np.array(model(mx.array(ref["input_ids"])).astype(mx.float32))
    assert np.abs(got - ref["logits"]).max() <= 1e-4
    split = int(ref["prefill"])
    ids = mx.array(ref["input_ids"][:1])
    steps = [model(ids[:, :split], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(split, ids.shape[1])]
    got = np.array(mx.concatenate(steps, axis=1).astype(mx.float32))
    assert np.abs(got - ref["incremental_logits"]).max() <= 1e-4
    assert store.stats()["misses"] > 0


def test_cache_trim_returns_to_the_earlier_state() -> None:
    """Trimming over closed compression windows rebuilds the compressors from kept rows."""
    model, _, _, cache = load_moe(FAMILY / "hf-fused")
    ids = mx.array(checks.reference(FAMILY / "hf-fused")["input_ids"][:1])
    model(ids[:, :30], cache=cache)
    expected = model(ids[:, 30:33], cache=cache)
    model(ids[:, 33:41], cache=cache)  # closes CSA and HCA windows
    assert cache.trim(11) == 11 and cache.offset == 30
    got = model(ids[:, 30:33], cache=cache)
    assert np.abs(np.array(got) - np.array(expected)).max() == 0


def test_check_reports_the_family() -> None:
    report = check_checkpoint(FAMILY / "upstream-fp8").to_dict()
    assert report["arch"] == "deepseek_v4"
    assert report["continuous_batching"] is False
    assert "compressed" in report["sequential_reason"]
    assert report["specdec_kind"] == "mtp_eagle3"
    assert report["draft_present"] is True
    assert check_checkpoint(FAMILY / "hf-fused").to_dict()["draft_present"] is False


def _copy(tmp_path: Path, layout: str = "upstream-fp8") -> Path:
    target = tmp_path / layout
    shutil.copytree(FAMILY / layout, target)
    return target


def _edit_header(folder: Path, edit: object) -> None:
    """Edit the safetensors header, then pack each tensor's bytes to match it.

    The file is rewritten by hand because numpy cannot hold the release's E8M0 scales; packing
    keeps it valid safetensors (no bytes left between tensors) after an entry is dropped or
    narrowed.
    """
    import struct

    path = folder / "model.safetensors"
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    edit(header)  # type: ignore[operator]
    data, packed = raw[8 + size :], bytearray()
    names = sorted((n for n in header if n != "__metadata__"),
                   key=lambda n: header[n]["data_offsets"][0])  # fmt: skip
    for name in names:
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [len(packed), len(packed) + end - begin]
        packed += data[begin:end]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + packed)


def test_missing_scale_names_the_tensor(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit_header(folder, lambda h: h.pop("layers.1.attn.wq_b.scale"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_b\.scale is missing"):
        load_moe(folder)


def test_wrong_fp4_scale_shape_is_reported(tmp_path: Path) -> None:
    folder = _copy(tmp_path)

    def narrow(header: dict[str, dict[str, list[int]]]) -> None:
        entry = header["layers.2.ffn.experts.3.w1.scale"]
        rows, start = entry["shape"][0], entry["data_offsets"][0]
        entry["shape"], entry["data_offsets"] = [rows, 1], [start, start + rows]

    _edit_header(folder, narrow)
    with pytest.raises(CheckpointError, match=r"w1\.scale.*one scale per 32 inputs"):
        load_moe(folder)


def test_unknown_compress_ratio_is_reported(tmp_path: Path) -> None:
    from mach.errors import ConfigError

    folder = _copy(tmp_path, "upstream")
    config = json.loads((folder / "config.json").read_text())
    config["compress_ratios"][1] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="compress_ratios"):
        load_moe(folder)


def test_snapshot_restore_resumes_a_prefix() -> None:
    model, _, _, cache = load_moe(FAMILY / "hf-fused")
    ids = mx.array(checks.reference(FAMILY / "hf-fused")["input_ids"][:1])
    model(ids[:, :26], cache=cache)
    saved = cache.snapshot()
    first = np.array(model(ids[:, 26:40], cache=cache))
    cache.restore(saved)
    assert cache.offset == 26
    again = np.array(model(ids[:, 26:40], cache=cache))
    assert np.abs(first - again).max() == 0


def test_indexer_breaks_score_ties_by_lowest_index() -> None:
    """Summed-ReLU index scores tie at exactly zero; the choice must not depend on sort order."""
    from mach_adapter_deepseek.compressor import top_k_lowest_first

    scores = mx.array([[0.5, 0.0, -1.0, 0.0, 0.0, -mx.inf], [0.0] * 5 + [-mx.inf]])
    picked = np.sort(np.array(top_k_lowest_first(scores, 3)), axis=-1)
    np.testing.assert_array_equal(picked, [[0, 1, 3], [0, 1, 2]])
    few = np.sort(np.array(top_k_lowest_first(mx.array([[-mx.inf, 2.0, -mx.inf, -mx.inf]]), 2)))
    np.testing.assert_array_equal(few, [[0, 1]])
