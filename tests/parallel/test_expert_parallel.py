"""Expert parallelism under ``mlx.launch`` (ring backend, ranks on this machine's loopback):
each rank holds a slice of every MoE layer's experts, and the results are those of one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mach.errors import MachError
from tests.parallel.launching import CHECKPOINTS, launch, run


@pytest.mark.parametrize(("name", "ranks"), [(name, 2) for name in CHECKPOINTS] + [("default", 4)])
def test_sharded_experts_give_one_process_results(name: str, ranks: int, tmp_path: Path) -> None:
    one = run(CHECKPOINTS[name], tmp_path / "one.npz", 1)
    many = run(CHECKPOINTS[name], tmp_path / "many.npz", ranks)
    assert int(many["ranks"]) == ranks and int(one["ranks"]) == 1
    # Each rank holds its slice of every layer's experts.
    assert (many["held"] * ranks == one["held"]).all()
    np.testing.assert_array_equal(many["logits"], one["logits"])
    np.testing.assert_array_equal(many["tokens"], one["tokens"])


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mach.io.convert import convert

    return convert(CHECKPOINTS["qwen3_moe"], tmp_path_factory.mktemp("ep") / "q4")


@pytest.mark.parametrize("layout", ["sidecar", "stacked"])
@pytest.mark.parametrize("streamed", [True, False])
def test_each_rank_streams_or_reads_only_its_experts(
    layout: str, streamed: bool, sidecar: Path, tmp_path: Path
) -> None:
    path = sidecar if layout == "sidecar" else CHECKPOINTS["qwen3_moe"]
    # Two slots per layer (the fixture routes top-2): each rank's 4 experts cannot all stay.
    budget = 2 * 15360 if streamed else None
    one = run(path, tmp_path / "one.npz", 1)
    many = run(path, tmp_path / "many.npz", 2, *(["--budget", str(budget)] if budget else []))
    assert (many["held"] * 2 == one["held"]).all()
    np.testing.assert_array_equal(many["logits"], one["logits"])
    np.testing.assert_array_equal(many["tokens"], one["tokens"])


def test_mach_generate_under_mlx_launch_reports_its_ranks() -> None:
    args = ["-m", "mach", "generate", "--max-tokens", "6", "--json"]
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240)
    shared = launch(2, *args)
    assert alone.returncode == 0 and shared.returncode == 0, shared.stderr
    lines = [line for line in shared.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "rank 0 alone prints"
    one, two = json.loads(alone.stdout), json.loads(lines[0])
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert two["tokens"] == one["tokens"]


def test_mach_check_under_mlx_launch_reports_the_layout() -> None:
    from mach.check import check_checkpoint

    path = str(CHECKPOINTS["default"])
    assert check_checkpoint(path).parallel == {"ranks": 1}
    shared = launch(2, "-m", "mach", "check", "--json", path)
    assert shared.returncode == 0, shared.stderr
    report = json.loads(shared.stdout)["checkpoints"][0]  # rank 0 alone prints
    alone = check_checkpoint(path)
    assert report["parallel"] == {
        "ranks": 2,
        "mode": "expert",
        "experts_per_layer_per_rank": alone.experts_per_layer // 2,
        "expert_bytes_per_rank": alone.expert_bytes // 2,
    }
    text = launch(2, "-m", "mach", "check", path).stdout
    assert text.count("expert parallel over 2 ranks: each holds up to 16 of 32 experts") == 1


def test_what_does_not_shard_yet_says_so() -> None:
    from mach.decode.select import build_engine
    from mach.experts.parallel import ExpertShard
    from mach.io.load import load_moe

    loaded = load_moe(CHECKPOINTS["default"])
    loaded.shard = ExpertShard(0, 2)  # as under mlx.launch: build_engine refuses what cannot run
    with pytest.raises(MachError, match="one sequence at a time with no prompt cache"):
        build_engine(loaded, max_batch=8)


@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_a_rank_that_stops_ends_the_run_instead_of_hanging(mode: str) -> None:
    done = launch(2, str(Path(__file__).with_name("rank_dies.py")), mode)  # 240 s bound, ~3 s
    said = done.stdout + done.stderr
    assert "rank 0 finished alone" not in said
    # mlx.launch stops the others when one rank exits; where it cannot, the ring's error
    # reaches rank 0 as a RankLostError.
    assert "exited with code" in said or "rank 0 saw: rank 0 of 2" in said


def test_a_failed_exchange_is_named() -> None:
    from mach.experts.parallel import ExpertShard, RankLostError, collective_errors

    named = pytest.raises(RankLostError, match=r"rank 1 of 4: .*peer gone.*that rank's output")
    with named, collective_errors(ExpertShard(1, 4)):
        raise RuntimeError("peer gone")
    with pytest.raises(RuntimeError, match="alone"), collective_errors(None):
        raise RuntimeError("alone")


@pytest.mark.parametrize("differ", ["dtype", "parallel"])
def test_ranks_that_load_differently_are_named_before_any_step(differ: str) -> None:
    done = launch(2, str(Path(__file__).with_name("rank_disagrees.py")), differ)
    out = done.stdout + done.stderr  # mlx.launch itself exits 0; each rank exits 2
    assert "loaded" not in out and "Traceback" not in out
    for rank in (0, 1):
        assert (
            f"rank {rank} saw: rank {rank} of 2: rank(s) 1 load a different checkpoint or "
            "different options from rank 0" in out
        )
    assert differ in out and "same flags" in out
