"""Serving across ranks: rank 0 tells the other ranks what to generate and when to stop.

Under ``mlx.launch`` every rank must run the same passes, since each pass exchanges expert
outputs. Rank 0 takes the requests (``FollowedEngine``); the other ranks wait in ``follow`` and
generate each request in lockstep. A request goes out as one exchange of its prompt and its
sampling parameters (with a concrete seed, so every rank draws the same tokens). Before each
next token the ranks exchange one number, rank 0's word on whether the consumer still wants it,
so a client that leaves stops every rank at the same token. Engine errors need no message:
the same input raises the same error on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import NoReturn

import mlx.core as mx

from mach.decode.engine import DecodeEngine
from mach.decode.events import TokenEvent
from mach.decode.grammar import Grammar
from mach.decode.params import SamplingParams
from mach.experts.parallel import Shard, collective_errors

logger = logging.getLogger("mach")

_JOB = 1


def _shared(shard: Shard, values: Sequence[int] | None, size: int) -> list[int]:
    """Rank 0's ``values`` (``size`` ints) on every rank; the others pass ``None``."""
    if size == 0:  # every rank knows the size already
        return []
    mine = mx.array(list(values) if values is not None else [0] * size, dtype=mx.int32)
    with collective_errors(shard):
        got: list[int] = mx.distributed.all_sum(mine, group=shard.group).tolist()  # type: ignore[assignment]
    return got


def _encode(params: SamplingParams) -> list[int]:
    return list(json.dumps(dataclasses.asdict(params)).encode())


def _decode(blob: list[int]) -> SamplingParams:
    fields = json.loads(bytes(blob).decode())
    if fields.get("grammar") is not None:
        fields["grammar"] = Grammar(**fields["grammar"])
    return SamplingParams(**fields)


class FollowedEngine(DecodeEngine):
    """Rank 0's engine: each request is sent to the followers before it runs here."""

    def __init__(self, engine: DecodeEngine, shard: Shard) -> None:
        self.engine, self.shard = engine, shard

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        if params.seed is None:
            params = dataclasses.replace(params, seed=secrets.randbelow(2**31))
        blob = _encode(params)
        _shared(self.shard, [_JOB, len(prompt), len(blob)], 3)
        _shared(self.shard, list(prompt), len(prompt))
        _shared(self.shard, blob, len(blob))
        events = self.engine.stream(prompt, params)
        waiting = False  # at a yield: the consumer may still leave
        try:
            while True:
                _shared(self.shard, [1], 1)
                try:
                    event = next(events)
                except StopIteration:
                    return
                # Past the last event the followers stop on their own; before it, a consumer
                # that leaves at this yield must tell them.
                waiting = event.finish_reason is None
                yield event
                waiting = False
                if event.finish_reason is not None:
                    return
        finally:
            if waiting:  # the consumer left before the end: the followers stop here too
                _shared(self.shard, [0], 1)
            close = getattr(events, "close", None)
            if close is not None:
                close()


def follow(engine: DecodeEngine, shard: Shard) -> NoReturn:
    """Generate what rank 0's ``FollowedEngine`` sends, for as long as the process runs.

    No message ends it: when rank 0 stops, ``mlx.launch`` stops the other ranks, and a rank 0
    left alone must not wait on followers that are gone.
    """
    while True:
        _, length, size = _shared(shard, None, 3)
        prompt = _shared(shard, None, length)
        params = _decode(_shared(shard, None, size))
        events = engine.stream(prompt, params)
        try:
            while _shared(shard, None, 1)[0]:
                event = next(events)
                if event.finish_reason is not None:
                    break
        except StopIteration:
            pass
        except Exception as exc:  # rank 0 met the same error and reports it to its client
            logger.info("rank %d: the request failed here as on rank 0: %s", shard.rank, exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
