"""Round-task messages: one frozen type, encoded and decoded here only.

A round task asks a worker to run one round for some items of one job. Each item's share
is a ``Message``: run round ``round`` of ``item_id`` if the item still carries ``token``
(the store issues a new token at every transition, so an obsolete message changes nothing).
``handoff_from`` names a worker that gave its leased items back because it could not reach
the job store; only it may hand its live lease on (see ``orchestrator.lifecycle.claim``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One item's share of a round task."""

    item_id: int
    round: int
    token: str

    def to_list(self) -> list:
        return [self.item_id, self.round, self.token]

    @classmethod
    def from_list(cls, v: Sequence) -> "Message":
        return cls(int(v[0]), int(v[1]), str(v[2]))


@dataclass(frozen=True)
class RoundTask:
    """What one broker message carries: a job, its items' messages, an optional handoff."""

    job_id: int
    items: tuple[Message, ...]
    handoff_from: str | None = None

    def encode(self) -> tuple[list, dict]:
        """(args, kwargs) for the Celery task: JSON-safe lists, no pickling."""
        kwargs = {"handoff_from": self.handoff_from} if self.handoff_from else {}
        return [self.job_id, [m.to_list() for m in self.items]], kwargs

    @classmethod
    def decode(cls, job_id: int, messages: Sequence[Sequence], handoff_from: str | None = None,
               **_ignored) -> "RoundTask":
        # **_ignored: tasks queued by an older release carried ``reclaim``; it meant a handoff
        # without naming the worker, which leases no longer need.
        return cls(int(job_id), tuple(Message.from_list(m) for m in messages), handoff_from or None)


def chunks(seq: Sequence, size: int) -> list[tuple]:
    """``seq`` in groups of at most ``size``: messages one round task each, or ids and rows
    one bulk statement each."""
    size = max(1, size)
    return [tuple(seq[i : i + size]) for i in range(0, len(seq), size)]


def new_token() -> str:
    """A dispatch token: every transition that sends a message issues a new one."""
    return uuid.uuid4().hex
