"""Reasoning ("thinking") text apart from the answer: ``<think>...</think>`` and kin."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningTags:
    open: str = "<think>"
    close: str = "</think>"


def split_reasoning(text: str, tags: ReasoningTags, started: bool = False) -> tuple[str, str]:
    """``(reasoning, content)`` of a complete output.

    ``started`` says the prompt already opened the reasoning block (templates that end the
    generation prompt with the open tag), so the output begins inside it.
    """
    if not started:
        start = text.find(tags.open)
        if start < 0 or text[:start].strip():
            return "", text
        text = text[start + len(tags.open) :]
    end = text.find(tags.close)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(tags.close) :].lstrip()


class ReasoningSplitter:
    """Streams deltas into reasoning and content, holding back partial tags."""

    def __init__(self, tags: ReasoningTags, started: bool = False) -> None:
        self.tags = tags
        self.state = "reasoning" if started else "start"
        self.held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """``(reasoning, content)`` safe to emit for this delta."""
        text = self.held + delta
        self.held = ""
        reasoning = content = ""
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if not stripped:
                    self.held = text
                    return reasoning, content
                if stripped.startswith(self.tags.open):
                    text = stripped[len(self.tags.open) :]
                    self.state = "reasoning"
                    continue
                if self.tags.open.startswith(stripped):
                    self.held = text
                    return reasoning, content
                self.state = "content"
            if self.state == "content":
                return reasoning, content + text
            end = text.find(self.tags.close)
            if end >= 0:
                reasoning += text[:end]
                text = text[end + len(self.tags.close) :].lstrip()
                self.state = "content"
                continue
            keep = next((n for n in range(len(self.tags.close) - 1, 0, -1)
                         if text.endswith(self.tags.close[:n])), 0)  # fmt: skip
            self.held = text[len(text) - keep :] if keep else ""
            return reasoning + text[: len(text) - keep], content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.state == "reasoning" else ("", held)
