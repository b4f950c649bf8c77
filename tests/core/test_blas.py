"""On Linux, mach hands MLX's CPU backend the system OpenBLAS when there is one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import mach, mach._blas as blas
import mlx.core as mx
mx.random.seed(0)
a, b = mx.random.normal((8, 64)), mx.random.normal((64, 32))
maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''
print(json.dumps({'loaded': blas.loaded, 'mapped': 'openblas' in maps,
                  'product': (a @ b).tolist()}))
"""


def probe(**env: str) -> dict[str, object]:
    import json

    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_reference_blas_can_be_kept() -> None:
    assert probe(MACH_BLAS="reference")["loaded"] is None


@pytest.mark.skipif(sys.platform != "linux", reason="the Linux CPU wheel only")
def test_system_openblas_is_used_and_agrees() -> None:
    fast = probe()
    if fast["loaded"] is None:
        pytest.skip("no OpenBLAS on this machine (Debian: apt install libopenblas0-pthread)")
    assert fast["mapped"]
    slow = probe(MACH_BLAS="reference")
    import numpy as np

    np.testing.assert_allclose(fast["product"], slow["product"], rtol=1e-4, atol=1e-4)


def test_unloadable_choice_falls_back_to_the_bundled_blas() -> None:
    assert probe(MACH_BLAS="/nonexistent/libopenblas.so")["loaded"] is None
