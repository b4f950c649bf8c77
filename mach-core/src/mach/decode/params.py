"""What a caller asks of one generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mach.decode.grammar import Grammar


@dataclass
class SamplingParams:
    """Sampling and stopping settings for one sequence.

    ``temperature == 0`` is greedy. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` switch those
    filters off. ``repetition_penalty`` divides positive (multiplies negative) logits of tokens
    seen in the last ``repetition_context`` tokens of prompt and output. ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's, each in [-2, 2]) subtract from a token's logit once it has
    appeared in the output, and per appearance.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    """Report each token's log-probability and this many top alternatives (0-20)."""
    grammar: Grammar | None = None
    """Constrain the output to this grammar (``mach.decode.grammar``; needs the tokenizer)."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 0:
            problems.append(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def output_penalties(self) -> bool:
        """Whether presence or frequency penalties read the tokens generated so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0
