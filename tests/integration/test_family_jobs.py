"""Every pipeline family (SDXL, SD3, FLUX.1, PixArt, DeepFloyd IF) as a distributed job: real
Postgres, Redis and a Celery worker process, on tiny random pipelines saved as pipeline folders.

The worker loads the pipeline folder, encodes the class prompts once (several tensors per
class: token embeddings, pooled projections, attention masks), and scores rounds on shared
noise, DDPM or flow matching as the scheduler says; the job's labels, evaluations and rounds
must equal the in-process classifier's, and its stored scores too (to float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny_pipelines as tp
from itsupport import FAST, LABELS, items_of, job_of, scores_of
from worker.config import ScoringConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "pixart", "deepfloyd-if"])
def test_family_job_matches_in_process_classifier(family, worker, difflabel, Session, make_images, tmp_path):
    from worker.backends import load_backend
    from worker.classifier import classify_images
    from worker.images import decode
    from worker.noise import content_key

    model = str(tp.save(family, tmp_path / family).resolve())
    folder = tmp_path / "photos"
    good = make_images(folder, 3)
    r = difflabel("submit", str(folder), "--labels", ",".join(LABELS), "--model", model, *FAST, "--seed", "3",
                  "--no-progress", "--wait", "--timeout", "180", timeout=300)
    assert r.code == 0, r
    worker.alive()
    job = job_of(Session, int(r.last_line))
    assert job.status == "done"
    assert job.template == tp.TEMPLATE  # the model's own template, from difflabel.json
    items = items_of(Session, job.id)
    assert set(items) == {str(p) for p in good}

    backend = load_backend(model, device="cpu")
    assert backend.schedule.is_flow == (family in ("sd3", "flux"))
    prompts = [job.template.replace("{}", lab) for lab in LABELS]
    results = classify_images(backend, [(str(p), decode(p)) for p in good], prompts, LABELS,
                              ScoringConfig.from_dict(job.params),
                              noise_keys=[content_key(p.read_bytes()) for p in good])
    for res in results:
        it = items[res.key]
        assert it.status == "done", (it.uri, it.error)
        assert (res.label, res.n_evals, res.rounds) == (it.label, it.n_evals, it.round), res.key
        stored: dict[int, list[np.ndarray]] = {}
        for _, k, e in scores_of(Session, it.id):
            assert np.isfinite(e).all()
            stored.setdefault(k, []).append(e)
        want = {LABELS[k]: float(np.mean(np.concatenate(v).astype(np.float64))) for k, v in stored.items()}
        assert res.scores.keys() == want.keys()
        for label, score in want.items():
            # Within float32 rounding, not bit for bit: the worker packs rows into other batch
            # shapes than the in-process loop, and the transformers' CPU matmuls round by shape.
            assert res.scores[label] == pytest.approx(score, rel=1e-5), (res.key, label)
