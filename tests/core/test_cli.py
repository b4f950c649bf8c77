"""The mach command line, run as users run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "hf-fused"


def mach(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mach", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_archs_json_lists_installed_families() -> None:
    result = mach("archs", "--json")
    assert result.returncode == 0, result.stderr
    names = [a["name"] for a in json.loads(result.stdout)["archs"]]
    assert names == ["deepseek_v4", "gemma4", "gpt_oss", "qwen3_5_moe", "qwen3_moe", "toy_moe"]


def test_mach_archs_console_script() -> None:
    exe = shutil.which("mach-archs", path=os.path.dirname(sys.executable))
    assert exe is not None
    result = subprocess.run([exe, "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "qwen3_moe" in result.stdout


def test_archs_with_no_family_says_how_to_install() -> None:
    result = mach("archs", env={"MACH_LOAD_PLUGINS": ""})
    assert result.returncode == 0
    assert "No architectures are installed" in result.stdout
    assert "pip install mach-adapter-qwen" in result.stdout


def test_generate_default_model_json() -> None:
    result = mach("generate", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["default_model"] is True
    assert len(payload["tokens"]) == 5 and payload["finish_reason"] == "length"
    assert set(payload["stats"]) >= {"prompt_tps", "generation_tps", "peak_memory_bytes"}
    stats = payload["stats"]
    assert stats["compiled_passes"] == stats["target_passes"] - 1  # all but the prompt's pass
    again = json.loads(mach("generate", "-n", "5", "--json", "--prewarm").stdout)
    assert again["tokens"] == payload["tokens"]
    uncompiled = json.loads(mach("generate", "-n", "5", "--json", "--no-compile").stdout)
    assert uncompiled["tokens"] == payload["tokens"]
    assert uncompiled["stats"]["compiled_passes"] == 0


def test_generate_streams_text_and_reports_stats() -> None:
    result = mach("generate", str(FIXTURE), "--prompt", "def main():", "-n", "8")
    assert result.returncode == 0, result.stderr
    assert "generation: 8 tokens" in result.stderr and "finish: length" in result.stderr


def test_generate_chat_and_sampling_flags() -> None:
    args = ["generate", str(FIXTURE), "--chat", "hello", "--system", "be brief", "-n", "6",
            "--temp", "0.8", "--top-p", "0.9", "--top-k", "50", "--min-p", "0.01", "--seed", "7",
            "--repetition-penalty", "1.1", "--json"]  # fmt: skip
    first, second = mach(*args), mach(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["tokens"] == json.loads(second.stdout)["tokens"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "/nonexistent/model"], "no such checkpoint folder"),
        (["generate", str(FIXTURE), "--prompt", "a", "--chat", "b"], "either --prompt or --chat"),
        (["generate", str(FIXTURE), "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", str(FIXTURE), "--arch", "nosuch_moe"], 'pip install "mach-moe[all]"'),
        (["generate", str(FIXTURE), "--dtype", "int8"], "dtype must be one of float32"),
    ],
)
def test_generate_errors_are_one_clear_line(args: list[str], message: str) -> None:
    result = mach(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_without_tokenizer_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "no-tok"
    shutil.copytree(FIXTURE, target)
    (target / "tokenizer.json").unlink()
    result = mach("generate", str(target))
    assert result.returncode == 1
    assert "tokenizer.json is missing" in result.stderr


def test_convert_then_stream_from_the_cli(tmp_path: Path) -> None:
    target = tmp_path / "engine"
    result = mach("convert", str(FIXTURE), str(target), "--bits", "4")
    assert result.returncode == 0, result.stderr
    assert (target / "expert_sidecar" / "index.json").is_file()
    again = mach("convert", str(FIXTURE), str(target))
    assert again.returncode == 1 and "already exists" in again.stderr
    run = mach("generate", str(target), "-n", "6", "--expert-budget", "200KB", "--json")
    assert run.returncode == 0, run.stderr
    experts = json.loads(run.stdout)["experts"]
    assert 0 <= experts["hit_rate"] <= 1 and experts["bytes_read_per_token"] > 0
    streamed = mach("generate", str(target), "-n", "6", "--expert-budget", "200KB")
    assert "experts: hit rate" in streamed.stderr and "MB/token" in streamed.stderr


def test_bench_reports_speed_and_expert_traffic() -> None:
    args = ["bench", "--prompt-tokens", "16", "--tokens", "8", "--repeats", "1"]
    result = mach(*args, "--expert-budget", "10MB", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["store"] == "streaming" and report["generation_tps"] > 0
    assert report["experts"]["bytes_read"] > 0
    text = mach(*args, "--no-streaming")
    assert text.returncode == 0 and "resident store" in text.stdout and "decode" in text.stdout


def test_too_small_budget_is_one_clear_line() -> None:
    result = mach("generate", "-n", "2", "--expert-budget", "1KB")
    assert result.returncode == 1
    assert "give at least" in result.stderr and "Traceback" not in result.stderr


def test_draft_options_are_validated() -> None:
    too_long = mach("generate", str(FIXTURE), "--draft-tokens", "40")
    assert too_long.returncode == 2 and "--draft-tokens" in too_long.stderr
    # The qwen3_moe fixture has no draft family: asking for one is an error, not a silent no.
    forced = mach("generate", str(FIXTURE), "-p", "x", "-n", "2", "--draft")
    assert forced.returncode == 1 and "no draft here" in forced.stderr


def test_version_and_short_help() -> None:
    from mach import __version__

    version = mach("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mach {__version__}"
    for args in (["-h"], ["generate", "-h"], ["check", "-h"]):
        result = mach(*args)
        assert result.returncode == 0 and "Usage: mach" in result.stdout, args


def test_prompt_from_stdin_equals_the_same_prompt_given_inline() -> None:
    text = "def add(a, b):\n"
    piped = subprocess.run([sys.executable, "-m", "mach", "generate", "-p", "-", "-n", "6",
                            "--json"], input=text, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    inline = mach("generate", "-p", text, "-n", "6", "--json")
    assert piped.returncode == 0 and inline.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["tokens"] == json.loads(inline.stdout)["tokens"]


def test_check_names_the_expert_kernels_and_structured_output() -> None:
    from mach.experts.dispatch import dispatch_paths

    quantized = FIXTURE.parent / "mlx-q4"
    result = mach("check", "--json", str(FIXTURE), str(quantized))
    assert result.returncode == 0, result.stderr
    float_report, q4_report = json.loads(result.stdout)["checkpoints"]
    assert float_report["dispatch"] == dispatch_paths(float_report["experts_per_layer"], False)
    assert q4_report["dispatch"] == dispatch_paths(q4_report["experts_per_layer"], True)
    assert float_report["serving"]["structured_output"] is True
    text = mach("check", str(quantized)).stdout
    assert f"{quantized}: expert kernels here: decode gather_qmm; prefill dequantized" in text
    assert "serve chat+json" in text
