"""Pipeline parallelism under ``mlx.launch`` (ring backend, ranks on this machine's loopback):
each rank runs a contiguous run of whole layers, and the results are those of one process.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mach.errors import AdapterError, MachError
from tests.dflash_drafts import write_random_draft
from tests.parallel.launching import CHECKPOINTS, launch, run

PIPELINE = ("--parallel", "pipeline")


SPLITS = [(name, 2) for name in CHECKPOINTS] + [("default", 3), ("default", 4)]


@pytest.mark.parametrize(("name", "ranks"), SPLITS)
def test_pipeline_stages_give_one_process_results(name: str, ranks: int, tmp_path: Path) -> None:
    one = run(CHECKPOINTS[name], tmp_path / "one.npz", 1)
    many = run(CHECKPOINTS[name], tmp_path / "many.npz", ranks, *PIPELINE)
    assert int(many["ranks"]) == ranks and int(one["ranks"]) == 1
    # Rank 0 holds the experts of its own layers only, all of them.
    moe_layers = len(one["held"])
    assert 0 < len(many["held"]) < moe_layers
    assert (many["held"] == one["held"][: len(many["held"])]).all()
    np.testing.assert_array_equal(many["logits"], one["logits"])
    np.testing.assert_array_equal(many["tokens"], one["tokens"])


def test_each_stage_streams_its_own_layers(tmp_path: Path) -> None:
    # Two slots per layer for 8 experts routed top-2: misses are read on every rank.
    flags = ("--budget", str(3 * 2 * 15360))
    one = run(CHECKPOINTS["qwen3_moe"], tmp_path / "one.npz", 1, *flags)
    many = run(CHECKPOINTS["qwen3_moe"], tmp_path / "many.npz", 2, *flags, *PIPELINE)
    np.testing.assert_array_equal(many["logits"], one["logits"])
    np.testing.assert_array_equal(many["tokens"], one["tokens"])


def test_bfloat16_stages_match_one_bfloat16_process(tmp_path: Path) -> None:
    flags = ("--dtype", "bfloat16")
    one = run(CHECKPOINTS["default"], tmp_path / "one.npz", 1, *flags)
    many = run(CHECKPOINTS["default"], tmp_path / "many.npz", 2, *flags, *PIPELINE)
    np.testing.assert_array_equal(many["logits"], one["logits"])
    np.testing.assert_array_equal(many["tokens"], one["tokens"])


def test_dflash_drafts_across_stages(tmp_path: Path) -> None:
    # The shipped draft reads target layers 1, 3 and 4: at 2 ranks they come from both stages.
    plain = run(CHECKPOINTS["default"], tmp_path / "plain.npz", 1)
    one = run(CHECKPOINTS["default"], tmp_path / "one.npz", 1, "--draft")
    many = run(CHECKPOINTS["default"], tmp_path / "many.npz", 2, "--draft", *PIPELINE)
    assert int(many["verify_passes"]) > 0
    assert int(many["verify_passes"]) == int(one["verify_passes"])
    np.testing.assert_array_equal(many["tokens"], one["tokens"])
    np.testing.assert_array_equal(many["tokens"], plain["tokens"])


def test_dflash_rolls_back_gated_deltanet_layers_across_stages(tmp_path: Path) -> None:
    # A random draft rejects most drafts: every verify pass rolls the GDN states back.
    target = CHECKPOINTS["qwen3_5_moe"]
    config = json.loads((target / "config.json").read_text())
    config = config.get("text_config", config)
    draft = write_random_draft(tmp_path / "draft", config["hidden_size"],
                               config["num_hidden_layers"], 100, block=4)  # fmt: skip
    flags = ("--draft", "--draft-path", str(draft))
    plain = run(target, tmp_path / "plain.npz", 1)
    many = run(target, tmp_path / "many.npz", 2, *flags, *PIPELINE)
    assert int(many["verify_passes"]) > 0
    np.testing.assert_array_equal(many["tokens"], plain["tokens"])


def test_mach_generate_and_check_report_the_stages() -> None:
    args = ["-m", "mach", "generate", "--max-tokens", "6", "--json"]
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240)
    shared = launch(2, *args, *PIPELINE)
    assert alone.returncode == 0 and shared.returncode == 0, shared.stderr
    lines = [line for line in shared.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "rank 0 alone prints"
    one, two = json.loads(alone.stdout), json.loads(lines[0])
    assert two["ranks"] == 2 and two["parallel"] == "pipeline"
    assert two["tokens"] == one["tokens"]

    from mach.check import check_checkpoint

    path = str(CHECKPOINTS["default"])
    report = json.loads(launch(2, "-m", "mach", "check", "--json", path, *PIPELINE).stdout)
    parallel = report["checkpoints"][0]["parallel"]
    alone_report = check_checkpoint(path)
    assert parallel["ranks"] == 2 and parallel["mode"] == "pipeline"
    assert parallel["layers"] == [[0, 3], [3, 6]]
    # Half the layers and their experts, plus the embedding and head every rank keeps.
    assert alone_report.total_bytes // 2 < parallel["bytes_per_rank"] < alone_report.total_bytes
    text = launch(2, "-m", "mach", "check", path, *PIPELINE).stdout
    assert text.count("pipeline parallel over 2 ranks: layers 0-2, 3-5") == 1


def test_more_ranks_than_layers_is_refused() -> None:
    from mach.io.plan import plan_load
    from mach.layers.pipeline import PipelineStage, install_stage

    plan = plan_load(CHECKPOINTS["gpt_oss"])  # 2 layers
    with pytest.raises(MachError, match="2 decoder layers cannot be split over 3 ranks"):
        install_stage(plan.model, PipelineStage(0, 3))


def test_a_frame_without_stages_is_named() -> None:
    import mlx.nn as nn

    from mach.layers.pipeline import PipelineStage, install_stage

    class Frame(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [nn.Linear(2, 2), nn.Linear(2, 2)]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Frame()

        @property
        def layers(self) -> list[nn.Module]:
            return self.model.layers

    with pytest.raises(AdapterError, match=r"does not run pipeline stages.*--parallel expert"):
        install_stage(Model(), PipelineStage(0, 2))


def test_remote_caches_count_positions_and_hold_nothing() -> None:
    from mach.layers.pipeline import RemoteCache

    cache = RemoteCache()
    cache.advance(5)
    saved = cache.snapshot()
    cache.advance(3)
    assert cache.offset == 8 and cache.trim(2) == 2 and cache.offset == 6
    cache.restore(saved)
    assert cache.offset == 5 and cache.nbytes == 0 and cache.is_trimmable()
    with pytest.raises(MachError, match="prompt cache is off under pipeline parallelism"):
        cache.export_state()


def test_stage_spans_cover_every_layer_once() -> None:
    from mach.layers.pipeline import PipelineStage

    for layers in (2, 5, 6, 48, 61):
        for ranks in range(1, min(layers, 8) + 1):
            spans = [PipelineStage(r, ranks).layers(layers) for r in range(ranks)]
            assert spans[0][0] == 0 and spans[-1][1] == layers
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1
            for r, (lo, hi) in enumerate(spans):
                assert all(PipelineStage(0, ranks).owner(i, layers) == r for i in range(lo, hi))


def test_parallel_mode_is_validated() -> None:
    from mach.errors import OptionsError
    from mach.io.options import LoadOptions

    with pytest.raises(OptionsError, match="parallel must be one of expert, pipeline"):
        LoadOptions(parallel="tensor")  # type: ignore[arg-type]
