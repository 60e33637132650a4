"""The round/prune/finish logic for one item, shared by both executors.

Pure numpy: the in-process classifier keeps ``ItemRounds`` objects in memory; the
distributed scheduler rebuilds them from the score rows in the database. Both call
``plan`` (how many samples the next round adds) and ``record`` (add a round's scores,
prune, decide whether the item is finished), so they make identical decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.config import ScoringConfig
from worker.pruning import best_class, margin, paired_p_value, prune, prune_pooled, screen


@dataclass
class ItemRounds:
    n_classes: int
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    history: list[list[int]] = field(default_factory=list)  # survivors after each round
    rounds_done: int = 0
    n_evals: int = 0
    #: Rounds completed. A round split over class ranges (``ScoringConfig.max_round_evals``)
    #: is stored as several rounds (``rounds_done``) but completes once; its parts all use
    #: the noise of round ``rounds_complete`` (the rounds completed before it), so a split
    #: round scores exactly what the whole round would.
    rounds_complete: int = 0
    #: The survivors a split round has still to score (empty between rounds), and the sample
    #: count it brings each class to.
    pending: list[int] = field(default_factory=list)
    target: int = 0

    def __post_init__(self) -> None:
        if not self.survivors:
            self.survivors = list(range(self.n_classes))
        for k in range(self.n_classes):
            self.scores.setdefault(k, np.zeros(0))

    @property
    def scored(self) -> int:
        """Samples every current survivor has."""
        return min(len(self.scores[k]) for k in self.survivors)

    def finished(self, config: ScoringConfig) -> bool:
        return len(self.survivors) <= 1 or self.scored >= config.max_scores

    def plan(self, config: ScoringConfig) -> int:
        """Samples to add to each class of the next stored round; 0 once finished."""
        if self.pending:
            return self.target - len(self.scores[self.pending[0]])
        if self.finished(config):
            return 0
        return config.round_size(self.rounds_complete, self.scored)

    def round_classes(self, config: ScoringConfig) -> list[int]:
        """The classes the next stored round scores: every survivor, or the next class range
        of a round too large for one (``config.max_round_evals``)."""
        todo = self.pending or self.survivors
        per = config.classes_per_round(self.plan(config))
        return list(todo if per is None else todo[:per])

    def next_noise_round(self) -> int:
        """The round index that seeds the next stored round's noise: shared by every part of a split round."""
        return self.rounds_complete

    def record(self, classes: list[int], errors: np.ndarray, config: ScoringConfig) -> None:
        """Add one stored round's (len(classes), n) errors; prune once the round is complete.

        Errors are taken at float32, the precision the job store keeps, so a state kept in
        memory, one rebuilt from stored rows and the in-process classifier's are bit-identical."""
        errors = np.asarray(errors, dtype=np.float32)
        if not self.pending:  # a new round: every survivor is due
            self.target = (len(self.scores[classes[0]]) if classes else 0) + errors.shape[-1]
            self.pending = list(self.survivors)
        for row, k in enumerate(classes):
            self.scores[k] = np.concatenate([self.scores[k], errors[row]])
        done = set(classes)
        self.pending = [k for k in self.pending if k not in done]
        self.n_evals += int(errors.size)
        self.rounds_done += 1
        if self.pending:  # more class ranges of this round to come: nothing to decide yet
            self.history.append(list(self.survivors))
            return
        self.rounds_complete += 1
        if config.prune and config.rule == "pooled":
            if self.rounds_complete == 1:  # the first round, complete: screen
                self.survivors = screen(self.scores, self.survivors, keep=config.screen_keep,
                                        keep_min=config.screen_min)
            self.survivors = prune_pooled(self.scores, self.survivors, min_scores=config.min_scores,
                                          p_cutoff=config.p_cutoff, prior_df=config.pool_df)
        elif config.prune:
            self.survivors = prune(self.scores, self.survivors,
                                   min_scores=config.min_scores, p_cutoff=config.p_cutoff)
        self.history.append(list(self.survivors))

    def winner(self) -> int:
        return best_class(self.scores, self.survivors)

    def margin(self) -> float:
        scored = [k for k in range(self.n_classes) if len(self.scores[k])]
        return margin(self.scores, scored)

    def separation(self) -> float:
        """1 - p of the paired t-test that the runner-up is no worse than the winner.

        A probability-like signal in [0, 1] that needs no calibration; the winner is
        measured against every other class on their shared samples and the weakest
        separation is kept.
        """
        b = self.winner()
        others = [k for k in range(self.n_classes) if k != b and len(self.scores[k]) >= 2]
        if not others:
            return 1.0
        return min(1.0 - paired_p_value(self.scores[k], self.scores[b]) for k in others)

    def mean_scores(self) -> dict[int, float]:
        return {k: float(np.mean(v)) for k, v in self.scores.items() if len(v)}
