"""Edits that damage a copy of a real checkpoint the way bad downloads and tools do."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

Header = dict[str, Any]


def rewrite_header(path: Path, edit: Callable[[Header], None]) -> None:
    """Replace a safetensors file's header with an edited copy; the tensor data stays as it was."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
