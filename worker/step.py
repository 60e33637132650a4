"""One round for a set of items: the loop body every executor shares.

Plan each item's next samples (``ItemRounds.plan``), score all (item, class, sample) rows on
shared noise in packed model calls (``score_round``), then record the float32 errors and
prune (``ItemRounds.record``). The in-process classifier calls it until every item is
finished; the job executors call it once per round and commit what it decided. Pure engine:
no database, no broker, no environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.backends.base import Denoiser
from worker.config import ScoringConfig
from worker.rounds import ItemRounds
from worker.scoring import RoundRequest, score_round


@dataclass
class Entry:
    """One item in a round: its noise key, x0 (C, H, W) on the device, and its state."""

    noise_key: str
    x0: torch.Tensor
    state: ItemRounds


Outcome = tuple[tuple[int, ...], np.ndarray]  # (classes scored, (K, n) float32 errors)


def run_step(model: Denoiser, cond: torch.Tensor, config: ScoringConfig, entries: Sequence[Entry], *,
             isolate: bool = False) -> list[Outcome | BaseException]:
    """Run one round for every entry whose state still plans samples; record and prune.

    Returns per entry its (classes, errors), or ``((), empty)`` for a finished one. With
    ``isolate``, a model call that raises is retried item by item, so one item that breaks
    the batch gets its exception back and the others their scores."""
    reqs: list[tuple[int, RoundRequest]] = []
    out: list[Outcome | BaseException] = [((), np.zeros((0, 0), np.float32))] * len(entries)
    for i, e in enumerate(entries):
        n = e.state.plan(config)
        if n > 0:
            reqs.append((i, RoundRequest(e.noise_key, e.x0, e.state.round_classes(config),
                                         e.state.next_noise_round(), n)))
    planned = dict(reqs)
    for i, res in _score(model, reqs, cond, config, isolate):
        if isinstance(res, BaseException):
            out[i] = res
            continue
        classes = tuple(planned[i].classes)
        entries[i].state.record(list(classes), res, config)
        out[i] = (classes, res)
    return out


def _score(model, reqs, cond, config, isolate: bool):
    if not reqs:
        return []
    try:
        return list(zip([i for i, _ in reqs], score_round(model, [r for _, r in reqs], cond, config)))
    except Exception as e:  # noqa: BLE001 - isolate the item that breaks the batch
        if not isolate:
            raise
        if len(reqs) == 1:
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return [(reqs[0][0], e)]
        out = []
        for one in reqs:
            out += _score(model, [one], cond, config, isolate)
        return out
