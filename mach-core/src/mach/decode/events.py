"""What decode engines stream back: token events, the finish reason and run statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    cached_tokens: int = 0
    """Prompt tokens restored from the prefix cache instead of prefilled."""
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_memory_bytes: int = 0
    draft_tokens: int = 0
    """Tokens a speculative drafter proposed (0 for target-only decoding)."""
    accepted_tokens: int = 0
    """Proposed tokens the target accepted."""
    verify_passes: int = 0
    """Target forward passes during speculative decoding (one per draft-verify cycle)."""
    target_passes: int = 0
    """Target forward passes that produced tokens: the one ending the prompt, then every decode
    step or draft-verify cycle (tokens per pass = generation_tokens / target_passes)."""
    compiled_passes: int = 0
    """Target passes that ran as a compiled graph (``mach.decode.compiled``)."""
    device_routed_steps: int = 0
    """Decode steps whose streamed experts were all looked up on the device and kept."""
    rerouted_steps: int = 0
    """Device-routed steps that met an expert the bank did not hold and ran again."""

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def acceptance_length(self) -> float:
        """Tokens produced per target pass while speculating (1.0 means no draft accepted)."""
        return (self.accepted_tokens + self.verify_passes) / self.verify_passes if (
            self.verify_passes) else 0.0  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
            "acceptance_length": self.acceptance_length,
        }


@dataclass
class TokenEvent:
    """One generated token and the text it completed; the last event carries the finish.

    The final event has ``token is None``, any text that was held back, ``finish_reason`` and
    ``stats``.
    """

    token: int | None
    text: str
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    logprob: float | None = None
    """Log-probability of ``token`` (when ``SamplingParams.logprobs`` is set)."""
    top_logprobs: list[tuple[int, float]] | None = None
    """The most likely tokens at this step and their log-probabilities, best first."""


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }
