"""Random JSON schemas for structured-output tests: nested, bounded, seeded."""

from __future__ import annotations

import random
from typing import Any

WORDS = ["id", "name", "city", "count", "tags", "ok", "score", "kind", "items", "note", "when"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A schema whose every valid value is finite: strings, arrays and numbers are bounded."""
    kinds = ["string", "integer", "number", "boolean", "enum", "null", "array", "any_of"]
    if depth < 2:
        kinds += ["object", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 12)}
        if rng.random() < 0.3:
            schema["minLength"] = 1
        return schema
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        # Digits are bounded too: an unbounded fraction lets a sampler write digits forever.
        return {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "maxItems": rng.randint(0, 3)}  # fmt: skip
    if kind == "any_of":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    names = rng.sample(WORDS, rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth + 1) for n in names},
        "required": [n for n in names if rng.random() < 0.7],
        "additionalProperties": False,
    }


def random_object_schema(rng: random.Random) -> dict[str, Any]:
    """A random schema whose top level is an object, as response formats and tools take."""
    while (schema := random_schema(rng)).get("type") != "object":
        pass
    return schema
