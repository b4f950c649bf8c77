"""Quantized configs the fidelity sweep once found broken, kept as golden fixtures.

Each ``tests/fixtures/sweep-quantized/<family>/<name>`` folder was written by
``tools/fidelity_sweep.py --quantized --fixture``: a float checkpoint, the bits and group size to
convert it with (``case.json``), and transformers' float32 logits on the same checkpoint with
every matrix ``mach convert`` quantizes replaced by its dequantized value. The test converts the
checkpoint itself, so the conversion, the quantized load and the quantized forward are all under
test, at the float32 tolerance: both sides use the same rounded weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.io.convert import convert

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sweep-quantized"
CASES = sorted(FIXTURES.glob("*/*"))


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _converted(case: Path, tmp_path: Path) -> Path:
    setting = json.loads((case / "case.json").read_text())["quantization"]
    return convert(case, tmp_path / "q", bits=setting["bits"], group_size=setting["group_size"])


def test_there_are_quantized_sweep_fixtures() -> None:
    assert len(CASES) >= 3


@pytest.mark.parametrize("streaming", [False, True], ids=["resident", "streaming"])
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_converted_checkpoint_matches_transformers_on_the_rounded_weights(
    case: Path, streaming: bool, tmp_path: Path
) -> None:
    with np.load(case / "reference-quantized.npz") as data:
        ref = {k: data[k] for k in data.files}
    with np.load(case / "reference.npz") as data:
        float_logits = data["logits"]
    model, _, _, cache = load_moe(_converted(case, tmp_path), dtype="float32", streaming=streaming)
    ids, prefill = mx.array(ref["input_ids"]), int(ref["prefill"])
    full = np.array(model(ids).astype(mx.float32))
    np.testing.assert_allclose(full, ref["logits"], atol=1e-4, rtol=0)
    steps = [model(ids[:1, :prefill], cache=cache)]
    steps += [model(ids[:1, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    got = np.array(mx.concatenate(steps, axis=1).astype(mx.float32))
    np.testing.assert_allclose(got, ref["incremental_logits"], atol=1e-4, rtol=0)
    # The rounding is real: the quantized logits are measurably not the float ones.
    assert np.abs(full - float_logits).max() > 1e-3
