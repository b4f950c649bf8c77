"""Run by ``mlx.launch``: rank 1 loads with another dtype (or, with ``parallel``, another
layout) than rank 0; both must stop with an error that names rank 1, before any step runs."""

from __future__ import annotations

import sys

import mlx.core as mx

from mach import load_moe
from mach.default_model import default_model_path
from mach.errors import MachError


def main() -> None:
    rank = mx.distributed.init().rank()
    differ = sys.argv[1] if len(sys.argv) > 1 else "dtype"
    odd = {"dtype": "float16"} if differ == "dtype" else {"parallel": "pipeline"}
    try:
        load_moe(default_model_path(), **({"dtype": "float32"} if rank == 0 else odd))
    except MachError as exc:
        print(f"rank {rank} saw: {exc}", flush=True)
        sys.exit(2)
    print(f"rank {rank} loaded", flush=True)


if __name__ == "__main__":
    main()
