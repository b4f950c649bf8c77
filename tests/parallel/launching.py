"""Starting ranks for the parallel tests: ``mlx.launch`` over the ring backend on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from mach.default_model import default_model_path

FIXTURES = Path(__file__).parents[1] / "fixtures"
RANK_MAIN = Path(__file__).with_name("rank_main.py")
LAUNCH = Path(sys.executable).with_name("mlx.launch")
CHECKPOINTS = {
    "default": default_model_path(),
    "qwen3_moe": FIXTURES / "qwen3_moe" / "mlx-q4",
    "qwen3_5_moe": FIXTURES / "qwen3_5_moe" / "mlx-q4",
    "gpt_oss": FIXTURES / "gpt_oss" / "mlx-mxfp4-q8",
    "gemma4": FIXTURES / "gemma4" / "mlx-q4",
    "deepseek_v4": FIXTURES / "deepseek_v4" / "hf-fused",
}


def launch(ranks: int, *args: str) -> subprocess.CompletedProcess[str]:
    # mlx.launch reads its own options first: the program's follow the python executable.
    return subprocess.run([str(LAUNCH), "-n", str(ranks), "--backend", "ring", sys.executable,
                           *args], capture_output=True, text=True, timeout=240)  # fmt: skip


def run(checkpoint: Path, out: Path, ranks: int, *flags: str) -> dict[str, np.ndarray]:
    """``rank_main.py`` in one process or on ``ranks`` ranks; what rank 0 saved."""
    args = [str(RANK_MAIN), str(checkpoint), str(out), *flags]
    if ranks == 1:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=240)  # fmt: skip
    else:
        done = launch(ranks, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(out) as data:
        return {k: data[k] for k in data.files}
