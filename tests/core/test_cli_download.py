"""``mach download`` and hub ids on the command line, against a local Hugging Face cache.

No hub is reachable from the tests, so they run with ``HF_HUB_OFFLINE=1`` over a cache laid out
as ``huggingface_hub`` leaves it (``models--org--name/refs/main`` naming a snapshot folder).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mach.default_model import default_model_path
from tests.core.test_cli import mach

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub: Path, repo_id: str, files: Path | dict[str, str]) -> Path:
    """Put ``files`` (a checkpoint folder, or name: text) in ``hub`` as ``repo_id``'s main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    if isinstance(files, Path):
        shutil.copytree(files, snapshot)
    else:
        snapshot.mkdir(parents=True)
        for name, text in files.items():
            (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    return tmp_path / "hub"


def offline(hub: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_download_resolves_from_the_cache_and_generate_takes_the_hub_id(hub: Path) -> None:
    snapshot = cache_repo(hub, "acme/python-tiny", default_model_path())
    result = mach("download", "acme/python-tiny", env=offline(hub))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot
    run = mach("generate", "acme/python-tiny", "-n", "4", "--json", env=offline(hub))
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["model"] == "acme/python-tiny" and len(payload["tokens"]) == 4
    check = mach("check", "acme/python-tiny", env=offline(hub))
    assert check.returncode == 0 and "acme/python-tiny" in check.stdout, check.stderr


def test_download_offline_and_missing_is_one_line(hub: Path) -> None:
    line = one_line_error(mach("download", "acme/absent", env=offline(hub)))
    assert "acme/absent is not (completely) in the local Hugging Face cache" in line
    assert "HF_HUB_OFFLINE is set" in line and "mach download acme/absent" in line
    # generate fetches a hub id it does not find, and fails the same way.
    line = one_line_error(mach("generate", "acme/absent", "-n", "2", env=offline(hub)))
    assert "HF_HUB_OFFLINE is set" in line


def test_a_download_cut_short_is_not_taken_for_a_checkpoint(hub: Path) -> None:
    config = (default_model_path() / "config.json").read_text()
    cache_repo(hub, "acme/partial", {"config.json": config})
    line = one_line_error(mach("generate", "acme/partial", "-n", "2", env=offline(hub)))
    assert "HF_HUB_OFFLINE is set" in line


def test_download_reads_the_config_first_and_refuses_an_unknown_family(hub: Path) -> None:
    cache_repo(hub, "acme/dense", {"config.json": json.dumps({"model_type": "llama"})})
    line = one_line_error(mach("download", "acme/dense", env=offline(hub)))
    assert "model_type 'llama'" in line and "pip install" in line


def test_a_local_folder_wins_over_a_hub_id(tmp_path: Path, hub: Path) -> None:
    local = tmp_path / "acme" / "python-tiny"
    shutil.copytree(default_model_path(), local)
    result = subprocess.run(
        [sys.executable, "-m", "mach", "download", "acme/python-tiny"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**offline(hub), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "is a local folder" in result.stderr and result.stdout.strip() == "acme/python-tiny"


def test_without_huggingface_hub_the_error_names_the_install(hub: Path) -> None:
    # An entry of None in sys.modules makes ``import huggingface_hub`` fail as if absent.
    code = ("import sys; sys.modules['huggingface_hub'] = None; "
            "from mach.cli import main; main(['download', 'acme/absent'])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**offline(hub), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    line = one_line_error(result)
    assert 'pip install "huggingface_hub>=0.26"' in line


def test_the_patterns_fetch_what_the_family_reads_and_nothing_else() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from mach.hub import checkpoint_patterns
    from mach.registry import get_adapter

    repo = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", "draft/config.json",
            "draft/model.safetensors", "original/model-00001-of-00002.safetensors",
            "metal/model.bin", ".gitattributes", "LICENSE"]  # fmt: skip
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    wanted = set(filter_repo_objects(repo, allow_patterns=checkpoint_patterns(
        get_adapter("qwen3_moe"), shards)))  # fmt: skip
    assert wanted == set(repo) - {"original/model-00001-of-00002.safetensors",
                                  "metal/model.bin", ".gitattributes", "LICENSE"}  # fmt: skip
    no_draft = set(filter_repo_objects(repo, allow_patterns=checkpoint_patterns(
        get_adapter("deepseek_v4"), None)))  # fmt: skip
    assert (
        "draft/model.safetensors" not in no_draft and "model-00001-of-00002.safetensors" in no_draft
    )
