"""DeepSeek-V4's own load path: ``plan_v4_flash`` (the adapter's ``load_path``), ``load_v4_flash``.

It accepts the release layout (FP8 matrices, FP4 experts, ``mtp.0.*``, no ``model.`` prefix)
and both transformers layouts, and checks what the generic pipeline cannot know about the
release's packing before any tensor data is read: every FP8/FP4 tensor has its scale, and each
scale has the shape its format implies. Then it runs mach's generic pipeline, so experts are
bound to the chosen store (resident, or streamed from the sidecar like every other family).
``mach check`` runs the same planner, so it refuses what loading refuses.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from mach.adapter import MoeArchAdapter
from mach.errors import CheckpointError
from mach.io.checkpoint import Checkpoint
from mach.io.load import LoadedModel, load_moe
from mach.io.options import LoadOptions
from mach.io.plan import LoadPlan, plan_checkpoint

_PACKED = ("F8_E4M3", "I8", "U8")


def check_release_packing(ckpt: Checkpoint) -> None:
    """Every packed weight has its ``.scale`` with the shape FP8 blocks or FP4 groups imply."""
    qc = ckpt.config.get("quantization_config") or {}
    block = list(qc.get("weight_block_size") or (128, 128))
    for name, info in ckpt.tensors.items():
        if not name.endswith(".weight") or info.dtype not in _PACKED:
            continue
        scale_name = name.removesuffix(".weight") + ".scale"
        scale = ckpt.tensors.get(scale_name)
        if scale is None:
            raise CheckpointError(
                f"{ckpt.path}: {name} is stored packed ({info.dtype}) but {scale_name} is missing; "
                "the release ships one scale tensor per packed weight, so a shard is incomplete"
            )
        out_dim, in_dim = info.shape[-2], info.shape[-1]
        if info.dtype == "I8":
            want = [out_dim, in_dim * 2 // 32]
            what = "FP4 weights take one scale per 32 inputs"
        else:
            want = [-(-out_dim // block[0]), -(-in_dim // block[1])]
            what = f"FP8 weights take one scale per {block[0]}x{block[1]} block"
        if list(scale.shape[-2:]) != want:
            raise CheckpointError(
                f"{ckpt.path}: {scale_name} has shape {list(scale.shape)} but {name} "
                f"{list(info.shape)} needs {want} ({what})"
            )


def plan_v4_flash(ckpt: Checkpoint, adapter: MoeArchAdapter, options: LoadOptions) -> LoadPlan:
    """The adapter's ``load_path``: the release's packing checks, then the generic planner.

    ``mach check`` and ``load_moe`` both run it, so a release with a missing or misshapen
    scale fails the same way in each, before any tensor data is read.
    """
    check_release_packing(ckpt)
    return plan_checkpoint(ckpt, adapter, options)


def load_v4_flash(
    checkpoint: Checkpoint | str | os.PathLike[str],
    options: LoadOptions | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load a DeepSeek-V4 checkpoint; unpacks as ``(model, tokenizer, store, cache)``.

    Options are ``load_moe``'s (``dtype``, ``expert_budget``, ``streaming`` ...). FP8 matrices
    are dequantized to the checkpoint's float dtype; FP4 experts stay packed and run in MLX's
    ``mxfp4`` kernels. The MTP module is left for the drafter (``make_mtp_drafter``).
    """
    options = options or LoadOptions.from_kwargs(**kwargs)
    return load_moe(checkpoint, options=replace(options, arch="deepseek_v4"))
