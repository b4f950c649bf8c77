"""Ranks under ``mlx.launch`` agree on what they load before any weight is read."""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import numpy as np

from mach.cache.fingerprint import digest_files
from mach.errors import OptionsError
from mach.experts.parallel import Shard, collective_errors
from mach.io.checkpoint import Checkpoint
from mach.io.options import LoadOptions

# Options that change what a rank computes, or how many passes it takes (prewarm runs a forward
# pass, and so joins its exchanges): ranks that differ in them would exchange outputs of
# different models, or wait for each other. The others (residency, budgets, the slot pool) only
# change how a rank holds its own experts.
AGREED_OPTIONS = ("arch", "dtype", "gather_dispatch", "streaming_embedding", "draft_path",
                  "kv_bits", "kv_format", "prewarm", "parallel")  # fmt: skip


def check_ranks_agree(shard: Shard, checkpoint: Checkpoint, options: LoadOptions) -> None:
    """Raise on every rank, naming the odd ones, unless all ranks load the same checkpoint
    (config, tensor headers, file sizes and sampled bytes) with the same ``AGREED_OPTIONS``."""
    digest = hashlib.sha256()
    tensors = sorted((t.name, t.dtype, list(t.shape), t.start, t.end)
                     for t in checkpoint.tensors.values())  # fmt: skip
    agreed = {name: getattr(options, name) for name in AGREED_OPTIONS}
    identity = {"config": checkpoint.config, "tensors": tensors, "options": agreed}
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    digest_files(digest, checkpoint.files)
    mine = mx.array(np.frombuffer(digest.digest(), dtype=np.uint8))
    with collective_errors(shard):
        every = np.array(mx.distributed.all_gather(mine, group=shard.group)).reshape(shard.size, -1)
    odd = [r for r in range(shard.size) if not (every[r] == every[0]).all()]
    if odd:
        raise OptionsError(
            f"rank {shard.rank} of {shard.size}: rank(s) {', '.join(map(str, odd))} load a "
            f"different checkpoint or different options from rank 0 ({checkpoint.path}; "
            f"compared: the files and {', '.join(AGREED_OPTIONS)}); start every rank on the "
            "same checkpoint files with the same flags"
        )
