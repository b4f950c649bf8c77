"""Expert bytes read by decode steps, by how many sequences each step decoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Tally:
    steps: int = 0
    tokens: int = 0
    bytes_read: int = 0


@dataclass
class DecodeReads:
    """A streaming store's decode reads per batch size.

    A batch of ``B`` sequences routes each of its MoE layers to the union of their experts and
    reads every missing one once, so the bytes read per generated token fall as ``B`` grows.
    """

    by_batch: dict[int, _Tally] = field(default_factory=dict)

    def record(self, batch: int, nbytes: int) -> None:
        """One decode step of ``batch`` sequences (one token each) that read ``nbytes``."""
        if batch < 1 or nbytes < 0:
            raise ValueError(
                f"a decode step needs batch >= 1 and bytes >= 0, got {batch}, {nbytes}"
            )
        tally = self.by_batch.setdefault(batch, _Tally())
        tally.steps += 1
        tally.tokens += batch
        tally.bytes_read += nbytes

    def report(self) -> dict[str, dict[str, Any]]:
        """``{batch: {steps, tokens, bytes_read, bytes_per_token}}``, smallest batch first."""
        return {
            str(b): {"steps": t.steps, "tokens": t.tokens, "bytes_read": t.bytes_read,
                     "bytes_per_token": t.bytes_read / t.tokens}
            for b, t in sorted(self.by_batch.items())
        }  # fmt: skip
