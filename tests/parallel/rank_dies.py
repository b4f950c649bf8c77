"""Run by ``mlx.launch``: rank 1 stops right after loading; rank 0 must learn it from a named
error, not wait forever. ``rank_dies.py [expert|pipeline]`` picks the layout."""

from __future__ import annotations

import os
import sys

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import default_model_path
from mach.experts.parallel import RankLostError, collective_errors


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "expert"
    loaded = load_moe(default_model_path(), dtype="float32", streaming=False, parallel=mode)
    assert loaded.shard is not None
    if loaded.shard.rank == 1:
        os._exit(3)
    engine = TargetEngine(loaded.model, None, loaded.cache.new)
    try:
        with collective_errors(loaded.shard):
            engine.generate([5, 9, 200, 17], SamplingParams(max_tokens=32))
    except RankLostError as exc:
        print(f"rank 0 saw: {exc}", flush=True)
        sys.exit(2)
    print("rank 0 finished alone", flush=True)


if __name__ == "__main__":
    main()
