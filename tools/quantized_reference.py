"""mach's side of the quantized sweep: convert a case, and write the weights its reference runs on.

    uv run python tools/quantized_reference.py CASE_DIR [CASE_DIR ...]

For each sweep case (a float32 checkpoint written by tools/fidelity_sweep.py) this runs
``mach convert --bits`` into ``CASE_DIR/mach-q``, then writes ``CASE_DIR/dequantized``: the
source checkpoint, under its own tensor names, with every matrix that the conversion quantized
replaced by ``dequantize(quantize(w))`` at the bits and group size the converted config declares
(the case's ``case.json`` says which bits and group size to convert with).
transformers then runs on ``dequantized`` (tools/fidelity_sweep.py), so the quantized comparison
keeps the float32 tolerance: both sides compute with the same rounded weights, and what is left
is float arithmetic, not quantization error.

The quantized values are computed here from the float source, not read back from ``mach-q``, so a
conversion that stores wrong codes, scales or layouts shows up as a mismatch. Which source
element each engine-side element comes from is found by a probe: the checkpoint is read once
more with every element replaced by its own index, through the same adapter mapping.
One JSON line per case: ``quantized`` (tensor count) or ``failure``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mach.experts.sidecar import INDEX_FILE, SIDECAR_DIR
from mach.io.checkpoint import open_checkpoint
from mach.io.convert import convert
from mach.io.plan import read_model
from mach.registry import detect_arch

# float32 holds every integer below 2**24 exactly, so a probe index survives the adapter's
# renames, stacks, splits and transposes unchanged.
_EXACT = 2**24


def _source_tensors(path: Path) -> dict[str, dict[str, np.ndarray]]:
    files = {}
    for file in sorted(path.glob("*.safetensors")):
        files[file.name] = {k: np.array(v) for k, v in mx.load(str(file)).items()}
    return files


def _engine_weights(path: Path) -> dict[str, mx.array]:
    ckpt = open_checkpoint(path)
    _, _, weights, _ = read_model(ckpt, detect_arch(ckpt.config, ckpt.tensor_names))
    return weights


def _probe(case: Path, files: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """For each engine tensor, the flat source index of every element (-1: not a float copy)."""
    probe = case / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    skipped = shutil.ignore_patterns("*.safetensors", "*.npz", "mach-q", "dequantized", "probe")
    shutil.copytree(case, probe, ignore=skipped)
    offset = 0
    for name, tensors in files.items():
        indexed = {}
        for key, value in tensors.items():
            if value.dtype == np.float32:
                indexed[key] = mx.array(np.arange(offset, offset + value.size, dtype=np.float32)
                                        .reshape(value.shape))  # fmt: skip
                offset += value.size
            else:
                indexed[key] = mx.array(value)
        mx.save_safetensors(str(probe / name), indexed, metadata={"format": "pt"})
    if offset >= _EXACT:
        raise ValueError(f"{offset} source elements are too many for a float32 probe")
    try:
        weights = _engine_weights(probe)
        return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    finally:
        shutil.rmtree(probe)


def _settings(quantized: Path, bits: int, group: int) -> dict[str, tuple[int, int]]:
    """(group size, bits) of every engine tensor ``mach convert`` quantized: other matrices as
    the converted config declares them, routed experts at the requested setting."""
    config = json.loads((quantized / "config.json").read_text())
    block = config["quantization"]
    default = (block["group_size"], block["bits"])
    found = {}
    for key in mx.load(str(quantized / "model.safetensors")):
        if key.endswith(".scales"):
            module = key.removesuffix(".scales")
            own = block.get(module)
            found[f"{module}.weight"] = (own["group_size"], own["bits"]) if own else default
    index = json.loads((quantized / SIDECAR_DIR / INDEX_FILE).read_text())
    for prefix, layer in index["layers"].items():
        for part in layer["parts"]:
            if part["name"].endswith(".scales"):
                proj = part["name"].removesuffix(".scales")
                found[f"{prefix}.{proj}.weight"] = (group, bits)
    return found


def _rounded(weight: mx.array, group: int, bits: int) -> np.ndarray:
    q, scales, biases = mx.quantize(weight.astype(mx.float32), group_size=group, bits=bits)
    return np.array(mx.dequantize(q, scales, biases, group_size=group, bits=bits))


def prepare(case: Path, bits: int, group: int) -> dict[str, Any]:
    quantized = case / "mach-q"
    shutil.rmtree(quantized, ignore_errors=True)
    convert(case, quantized, bits=bits, group_size=group)
    files = _source_tensors(case)
    probe = _probe(case, files)
    weights = _engine_weights(case)
    flat = {name: {k: v.reshape(-1).copy() for k, v in t.items()} for name, t in files.items()}
    owner = []  # (start, file, key) of each float source tensor, in probe order
    start = 0
    for name, tensors in files.items():
        for key, value in tensors.items():
            if value.dtype == np.float32:
                owner.append((start, name, key))
                start += value.size
    starts = np.array([o[0] for o in owner])
    written: dict[int, float] = {}
    settings = _settings(quantized, bits, group)
    for engine_name, (g, b) in settings.items():
        index = probe[engine_name].reshape(-1)
        if not np.all(index == np.round(index)) or index.min() < 0:
            raise ValueError(f"{engine_name} is not a plain rearrangement of source elements")
        values = _rounded(weights[engine_name], g, b).reshape(-1)
        which = np.searchsorted(starts, index, side="right") - 1
        for i in np.unique(which):
            sel = which == i
            first, name, key = owner[i]
            flat[name][key][index[sel].astype(np.int64) - first] = values[sel]
        for k, v in zip(index.astype(np.int64).tolist(), values.tolist(), strict=True):
            if written.setdefault(k, v) != v:
                raise ValueError(f"{engine_name} and another tensor round one source element "
                                 "differently")  # fmt: skip
    out = case / "dequantized"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(case, out, ignore=shutil.ignore_patterns("*.safetensors", "*.npz", "mach-q",
                                                              "dequantized"))  # fmt: skip
    for name, tensors in files.items():
        rounded = {k: mx.array(flat[name][k].reshape(v.shape)) for k, v in tensors.items()}
        mx.save_safetensors(str(out / name), rounded, metadata={"format": "pt"})
    return {"quantized": len(settings)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    args = parser.parse_args()
    for case in args.cases:
        try:
            setting = json.loads((case / "case.json").read_text())["quantization"]
            result = prepare(case, setting["bits"], setting["group_size"])
        except Exception as exc:  # one broken case must not hide the others
            result = {"failure": traceback.format_exception_only(exc)[-1].strip()[:300]}
        print(json.dumps({"path": str(case), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
