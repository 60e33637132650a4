"""The in-process executor: classify a list of images with the round loop.

Each loop iteration runs one round for every unfinished item in the current chunk,
all (item, class, sample) triples packed into full batches; ``ItemRounds`` prunes and
decides when an item is finished, exactly as the distributed scheduler does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from worker.backends.base import Backend
from worker.config import ScoringConfig
from worker.results import ItemResult, summarise
from worker.rounds import ItemRounds
from worker.step import Entry, run_step

#: Items whose rounds run together in-process. Large, so the few items that need many rounds
#: share them (and their model calls) instead of each dragging its own chunk along.
DEFAULT_CHUNK = 1024


def classify_tensors(backend: Backend, keys: Sequence[str], x0: torch.Tensor, cond: torch.Tensor,
                     labels: Sequence[str], config: ScoringConfig,
                     on_done: Callable[[ItemResult], None] | None = None,
                     noise_keys: Sequence[str] | None = None) -> list[ItemResult]:
    """Run rounds until every item is finished. x0 (N, C, H, W); cond (K, L, D).

    ``keys`` name the items in the results; ``noise_keys`` (default: ``keys``) seed their
    noise, normally ``worker.noise.content_key`` of the image bytes."""
    noise_keys = list(noise_keys) if noise_keys is not None else list(keys)
    states = [ItemRounds(len(labels)) for _ in keys]
    results: list[ItemResult | None] = [None] * len(keys)
    while True:
        idx = []
        for i, st in enumerate(states):
            if results[i] is not None:
                continue
            if st.plan(config) == 0:
                results[i] = summarise(keys[i], st, labels, backend.calibration)
                if on_done:
                    on_done(results[i])
                continue
            idx.append(i)
        if not idx:
            return results  # type: ignore[return-value]
        run_step(backend, cond, config, [Entry(noise_keys[i], x0[i], states[i]) for i in idx])


def classify_images(backend: Backend, items: Sequence[tuple[str, Image.Image]], prompts: Sequence[str],
                    labels: Sequence[str], config: ScoringConfig, *, chunk: int = DEFAULT_CHUNK,
                    cond: torch.Tensor | None = None,
                    on_done: Callable[[ItemResult], None] | None = None,
                    noise_keys: Sequence[str] | None = None) -> list[ItemResult]:
    """Classify decoded images; text embeddings once, each image encoded once.

    ``items`` are (key, image); ``noise_keys`` as in ``classify_tensors``."""
    if cond is None:
        cond = backend.encode_prompts(list(prompts))
    out: list[ItemResult] = []
    for s in range(0, len(items), chunk):
        part = items[s : s + chunk]
        x0 = backend.encode_images([im for _, im in part])
        nk = noise_keys[s : s + chunk] if noise_keys is not None else None
        out.extend(classify_tensors(backend, [k for k, _ in part], x0, cond, labels, config, on_done, nk))
    return out
