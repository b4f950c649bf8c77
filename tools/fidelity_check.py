"""mach's side of the fidelity sweep: run in mach's environment, one JSON line per case.

    uv run python tools/fidelity_check.py CASE_DIR [CASE_DIR ...]

Each folder holds a checkpoint and the ``reference.npz`` that tools/fidelity_sweep.py wrote.
For each it loads the checkpoint in float32 and prints the largest absolute logit difference of
the full forward (``full``) and of the prefill followed by one-token steps (``incremental``).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

from mach import load_moe


def errors(case: Path) -> dict[str, float]:
    with np.load(case / "reference.npz") as data:
        ref = {k: data[k] for k in data.files}
    model, _, _, cache = load_moe(case, dtype="float32")
    ids = mx.array(ref["input_ids"])
    full = np.array(model(ids).astype(mx.float32))
    prefill = int(ref["prefill"])
    steps = [model(ids[:1, :prefill], cache=cache)]
    steps += [model(ids[:1, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    incremental = np.array(mx.concatenate(steps, axis=1).astype(mx.float32))
    full_diff = np.abs(full - ref["logits"])
    step_diff = np.abs(incremental - ref["incremental_logits"])
    return {
        "full": float(full_diff.max()),
        "incremental": float(step_diff.max()),
        "worst_position": int(np.unravel_index(full_diff.argmax(), full_diff.shape)[1]),
    }


def main(paths: list[str]) -> int:
    for path in paths:
        try:
            result: dict[str, object] = errors(Path(path))
        except Exception as exc:  # one broken case must not hide the others
            lines = traceback.format_exception_only(exc)
            result = {"failure": lines[-1].strip()[:300]}
        print(json.dumps({"path": path, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
