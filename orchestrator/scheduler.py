"""After each round: store the scores, prune, then requeue the item or finish it.

Called by the round task (worker.round) in whichever executor runs it. Every decision
comes from ``worker.rounds.ItemRounds``, the same code the in-process classifier uses.

Exactly-once effects on top of at-least-once delivery: each unfinished item carries a
dispatch token; a round's results are committed only if the item, locked, still has
the round and token the message carried. A task delivered twice, or a message made
obsolete by ``repair``, therefore changes nothing. Score rows are unique on
(item, round, class) and inserted with ON CONFLICT DO NOTHING as a second guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.jobs import Message, item_scores, new_token
from orchestrator.schema import Item, ItemStatus, Score, utcnow
from worker.config import ScoringConfig
from worker.results import summarise
from worker.rounds import ItemRounds


def rebuild(n_classes: int, rows: Sequence[tuple[int, int, np.ndarray]], config: ScoringConfig) -> ItemRounds:
    """Replay stored rounds [(round, class, errors)] through ItemRounds: same pruning as live."""
    state = ItemRounds(n_classes)
    by_round: dict[int, list[tuple[int, np.ndarray]]] = {}
    for rnd, k, errs in rows:
        by_round.setdefault(rnd, []).append((k, errs))
    for rnd in sorted(by_round):
        part = sorted(by_round[rnd])
        state.record([k for k, _ in part], np.stack([e for _, e in part]), config)
    return state


def load_states(s: Session, item_ids: Sequence[int], n_classes: int, config: ScoringConfig
                ) -> dict[int, ItemRounds]:
    return {i: rebuild(n_classes, rows, config) for i, rows in item_scores(s, item_ids).items()}


def live(item: Item | None, msg: Message) -> bool:
    """Is ``msg`` the one outstanding message for ``item``?"""
    return (item is not None and item.status == ItemStatus.PENDING.value
            and item.round == msg.round and item.token == msg.token)


def insert_scores(s: Session, rows: list[dict[str, Any]]) -> None:
    """Score rows in one statement; a row already stored (a task run twice) is left as is."""
    if not rows:
        return
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    s.execute(insert(Score).on_conflict_do_nothing(), rows)


def lock_items(s: Session, item_ids: Sequence[int]) -> dict[int, Item]:
    """Lock the items for update in one statement, in id order (no deadlocks between workers)."""
    ids = sorted(set(item_ids))
    return {i.id: i for i in s.scalars(select(Item).where(Item.id.in_(ids)).order_by(Item.id)
                                       .with_for_update())}


def _locked(s: Session, msg: Message, locked: dict[int, Item] | None) -> Item | None:
    """``msg``'s item from the caller's ``lock_items``, or locked here on its own."""
    return locked.get(msg.item_id) if locked is not None else s.get(Item, msg.item_id, with_for_update=True)


def commit_round(s: Session, msg: Message, state: ItemRounds, classes: list[int], errors: np.ndarray,
                 config: ScoringConfig, labels: Sequence[str],
                 calibration: dict[str, Any] | None, keep_started: bool = False,
                 locked: dict[int, Item] | None = None, score_rows: list | None = None) -> Message | None:
    """Record one item's round. Returns the next round's message, or None when the item
    finished or the message was stale. The caller commits the session. ``keep_started``:
    the caller goes straight on to the next round, so the item stays marked as started.
    ``locked``: items the caller locked with ``lock_items``; ``score_rows``: collect the
    score rows there for one ``insert_scores`` (else each is locked and written here)."""
    item = _locked(s, msg, locked)
    if not live(item, msg):
        return None
    stored = np.asarray(errors, dtype="<f4")  # (K, n): what the database keeps
    rows = [{"item_id": msg.item_id, "round": msg.round, "class_idx": k, "errors": stored[row].tobytes()}
            for row, k in enumerate(classes)]
    if score_rows is not None:
        score_rows.extend(rows)
    else:
        insert_scores(s, rows)
    # Record exactly what is stored, so a state kept in memory equals one rebuilt from rows.
    state.record(classes, stored.astype(np.float64), config)
    now = utcnow()
    item.n_evals = state.n_evals
    item.survivors = list(state.survivors)
    item.n_survivors = len(state.survivors)
    item.round = msg.round + 1
    item.updated_at = now
    item.starts = 0
    if keep_started:
        item.starts, item.started_at = 1, now
    if state.finished(config):
        r = summarise(item.uri, state, labels, calibration)
        item.status = ItemStatus.DONE.value
        item.label, item.label_idx = r.label, r.class_index
        item.confidence, item.margin = r.confidence, r.margin
        item.token, item.finished_at = None, now
        return None
    item.token = new_token()
    return Message(item.id, item.round, item.token)


def fail(s: Session, msg: Message, reason: str, *, permanent: bool, max_attempts: int,
         locked: dict[int, Item] | None = None) -> Message | None:
    """Count a failed attempt. Permanent errors (a corrupt image) fail the item at once;
    others are retried with a new token until ``max_attempts``."""
    item = _locked(s, msg, locked)
    if not live(item, msg):
        return None
    item.attempts += 1
    item.starts = 0  # this start ended, and is counted in attempts
    item.updated_at = utcnow()
    item.error = reason[:2000]
    if permanent or item.attempts >= max_attempts:
        item.status = ItemStatus.FAILED.value
        item.token, item.finished_at = None, item.updated_at
        if not permanent:
            item.error = f"failed after {item.attempts} attempts: {reason}"[:2000]
        return None
    item.token = new_token()
    return Message(item.id, item.round, item.token)


@dataclass
class Claim:
    """What a delivered round task may do: ``items`` to process now, ``solo`` messages to
    send again one item per task, and whether any item failed here (``finished``)."""

    items: dict[int, Item] = field(default_factory=dict)
    solo: list[Message] = field(default_factory=list)
    finished: bool = False


def claim(s: Session, msgs: Sequence[Message], *, max_attempts: int, in_flight_for: float,
          reclaim: bool = False) -> Claim:
    """Mark the live items of a delivered task as started (locked, in id order).

    An item whose earlier start of this round never ended is either still running in another
    delivery (started less than ``in_flight_for`` seconds ago, e.g. the broker handed the
    task out twice: skipped here) or its worker died on it (out of memory, killed): the
    death counts as a failed attempt, the item fails once ``max_attempts`` are spent, and
    otherwise it is sent again in a task of its own, so an image that kills workers only
    ever takes down its own task. ``reclaim``: the task is running again after its own
    earlier start broke off (the database went away), so that start is neither of these."""
    out = Claim()
    locked = lock_items(s, [m.item_id for m in msgs])
    now = utcnow()
    for m in sorted(msgs, key=lambda m: m.item_id):
        item = locked.get(m.item_id)
        if not live(item, m) or item.id in out.items:
            continue
        if item.starts and not reclaim:
            started = item.started_at
            if started is not None and started.tzinfo is None:
                started = started.replace(tzinfo=now.tzinfo)
            if started is not None and (now - started).total_seconds() < in_flight_for:
                continue  # being processed elsewhere right now
            item.attempts += item.starts
            item.starts = 0
            item.error = f"a worker died while processing this item ({item.attempts}x): out of memory or killed"
            if item.attempts >= max_attempts:
                item.status, item.token = ItemStatus.FAILED.value, None
                item.finished_at = item.updated_at = now
                item.error = f"failed after {item.attempts} attempts: {item.error}"
                out.finished = True
                continue
            if len(msgs) > 1:
                item.updated_at = now
                out.solo.append(m)
                continue
        item.starts = 1 if reclaim else item.starts + 1
        item.started_at = item.updated_at = now
        out.items[item.id] = item
    return out


def live_items(s: Session, msgs: Sequence[Message]) -> dict[int, Item]:
    """The items that ``msgs`` may still process (unlocked read, rechecked at commit)."""
    ids = [m.item_id for m in msgs]
    items = {i.id: i for i in s.scalars(select(Item).where(Item.id.in_(ids)))}
    return {m.item_id: items[m.item_id] for m in msgs if live(items.get(m.item_id), m)}
