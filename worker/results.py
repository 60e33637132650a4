"""What the classifier reports per image, built from an item's finished rounds (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker import calibration as calib
from worker.rounds import ItemRounds


@dataclass
class ItemResult:
    """What the classifier says about one image."""

    key: str
    label: str | None = None
    class_index: int | None = None
    confidence: float | None = None
    margin: float | None = None
    separation: float | None = None
    n_evals: int = 0
    rounds: int = 0
    scores: dict[str, float] = field(default_factory=dict)  # mean score per label
    counts: dict[str, int] = field(default_factory=dict)  # samples per label
    survivors: list[list[str]] = field(default_factory=list)  # after each round
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.key, "label": self.label, "confidence": self.confidence,
            "margin": self.margin, "n_evals": self.n_evals, "rounds": self.rounds,
            "status": "failed" if self.error else "done", "error": self.error,
            "scores": self.scores, "counts": self.counts, "survivors": self.survivors,
        }


def summarise(key: str, state: ItemRounds, labels: Sequence[str],
              calibration: dict[str, Any] | None) -> ItemResult:
    """Turn a finished item's rounds into its result."""
    b = state.winner()
    sep = state.separation()
    m = state.margin()
    if calibration:
        conf = calib.apply(calibration, state.n_evals, len(labels), sep, m)
    else:
        conf = sep
    return ItemResult(
        key=key, label=labels[b], class_index=b, confidence=round(conf, 6), margin=m,
        separation=sep, n_evals=state.n_evals, rounds=state.rounds_done,
        scores={labels[k]: v for k, v in state.mean_scores().items()},
        counts={labels[k]: int(len(v)) for k, v in state.scores.items()},
        survivors=[[labels[k] for k in h] for h in state.history],
    )
