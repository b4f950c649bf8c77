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

    def record(self, batch: int, tokens: int, nbytes: int) -> None:
        """One decode step of ``batch`` rows that read ``nbytes`` and handed out ``tokens``
        (fewer than ``batch`` when a row's sequence had already ended)."""
        if batch < 1 or not 0 <= tokens <= batch or nbytes < 0:
            raise ValueError(
                "a decode step needs batch >= 1, 0 <= tokens <= batch and bytes >= 0, got "
                f"batch {batch}, tokens {tokens}, bytes {nbytes}"
            )
        tally = self.by_batch.setdefault(batch, _Tally())
        tally.steps += 1
        tally.tokens += tokens
        tally.bytes_read += nbytes

    def report(self) -> dict[str, dict[str, Any]]:
        """``{batch: {steps, tokens, bytes_read, bytes_per_token}}``, smallest batch first."""
        return {
            str(b): {"steps": t.steps, "tokens": t.tokens, "bytes_read": t.bytes_read,
                     "bytes_per_token": t.bytes_read / t.tokens if t.tokens else 0.0}
            for b, t in sorted(self.by_batch.items())
        }  # fmt: skip
