"""The scoring engine against independent computations on tiny random models.

Covers: the weighted x0-space error for epsilon / v / sample models (the scheduler's
own formulas as the reference), prediction-type conversion, batching invariance,
reproducible shared noise, stratified timesteps, and the in-process classifier.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from worker.backends.base import NoiseSchedule
from worker.classifier import classify_images
from worker.config import ScoringConfig
from worker.noise import draw
from worker.scoring import RoundRequest, score_round, to_x0_eps

FAMILIES = [("pixel", "epsilon"), ("pixel", "v_prediction"), ("latent", "epsilon"),
            ("latent", "v_prediction")]
LABELS = ["cat", "dog", "bird"]


def _images(n: int, size: int = 12, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8), "RGB")
            for _ in range(n)]


def _cond(backend, labels=LABELS) -> torch.Tensor:
    return backend.encode_prompts([f"a photo of a {w}" for w in labels])


# --------------------------------------------------------------------------- fixtures work


def test_tiny_pixel_model_loads_as_pixel_backend(tiny_pixel_model):
    from worker.backends import load_backend
    from worker.backends.pixel import PixelBackend

    b = load_backend(str(tiny_pixel_model), device="cpu")
    assert isinstance(b, PixelBackend)
    assert b.default_template == "a photo of a {}"
    assert b.schedule.prediction_type == "epsilon"
    assert b.schedule.num_timesteps == 1000
    cond = b.encode_prompts(["a photo of a cat", "a photo of a dog"])
    assert cond.shape == (2, 8, 16)
    assert not torch.allclose(cond[0], cond[1])  # the prompt reaches the embedding
    x0 = b.encode_images(_images(2))
    assert x0.shape == (2, 3, 8, 8) and x0.min() >= -1 and x0.max() <= 1
    out = b.predict(x0, torch.tensor([10, 900]), cond)
    assert out.shape == x0.shape and torch.isfinite(out).all()


def test_tiny_sd_model_loads_as_latent_backend(tiny_sd_model):
    from worker.backends import load_backend
    from worker.backends.latent import LatentBackend

    b = load_backend(str(tiny_sd_model), device="cpu")
    assert isinstance(b, LatentBackend)
    assert b.image_size == 32  # unet sample size 16 x vae downscale 2
    assert b.scaling_factor == pytest.approx(0.18215)
    assert b.schedule.prediction_type == "epsilon"
    assert b.tokenizer.model_max_length == 8
    cond = b.encode_prompts(["a photo of a cat", "a photo of a dog"])
    assert cond.shape == (2, 8, 16)
    assert not torch.allclose(cond[0], cond[1])
    x0 = b.encode_images(_images(3, size=40))
    assert x0.shape == (3, 4, 16, 16) and torch.isfinite(x0).all()
    out = b.predict(x0[:2], torch.tensor([10, 900]), cond)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_sd_v_prediction_variant_is_read(make_sd_model):
    from worker.backends import load_backend

    b = load_backend(str(make_sd_model("v_prediction")), device="cpu")
    assert b.schedule.prediction_type == "v_prediction"
    # Scaled-linear SD schedule: abar_0 ~ 1 - 0.00085, abar_999 ~ 0.0047.
    abar = b.schedule.alphas_cumprod
    assert abar[0].item() == pytest.approx(1 - 0.00085, rel=1e-4)
    assert abar[-1].item() == pytest.approx(0.0047, rel=0.05)


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_to_x0_eps_recovers_known_x0_and_eps(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    eps = torch.randn(6, 3, 4, 4, generator=g)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.05, 0.01]).view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * x0 + s * eps
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    x0_hat, eps_hat = to_x0_eps(out, x_t, abar, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=2e-4)


def test_to_x0_eps_rejects_unknown_type():
    z = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="flow"):
        to_x0_eps(z, z, torch.full((1, 1, 1, 1), 0.5), "flow")


def _reference_x0_error(backend, x0, cond_k, key, config, n, round_index=0):
    """The heuristic error computed without worker.scoring.

    x0_hat comes from diffusers' own DDPM step (pred_original_sample, no clipping); for
    an epsilon model it is also checked against (1 - abar)/abar * (eps - eps_hat)^2.
    """
    from diffusers import DDPMScheduler

    T = backend.schedule.num_timesteps
    t, eps = draw(config.seed, key, round_index, n, tuple(x0.shape), T)
    sched = DDPMScheduler.from_pretrained(backend.path, subfolder="scheduler", clip_sample=False,
                                          thresholding=False)
    abar = sched.alphas_cumprod.double()
    ref = []
    for j in range(n):
        tj = int(t[j])
        a = abar[tj]
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * eps[j].double()).float()
        out = backend.predict(x_t[None], t[j : j + 1], cond_k[None]).float()
        x0_hat = sched.step(out, tj, x_t[None]).pred_original_sample
        err_x0 = (x0[None] - x0_hat).pow(2).mean().item()
        if backend.schedule.prediction_type == "epsilon":
            err_eps = (eps[j] - out[0]).pow(2).mean().item() * float((1 - a) / a)
            assert err_x0 == pytest.approx(err_eps, rel=2e-3, abs=1e-6)
        ref.append(math.exp(-config.weight_coef * tj / T) * err_x0)
    return np.array(ref)


@pytest.mark.parametrize("family,prediction_type", FAMILIES)
def test_heuristic_error_matches_independent_computation(load_tiny, family, prediction_type):
    backend = load_tiny(family, prediction_type)
    cond = _cond(backend)
    x0 = backend.encode_images(_images(1, size=32))[0]
    config = ScoringConfig(weight_coef=6.0, seed=3, min_scores=2, max_scores=16)
    n = 8
    (got,) = score_round(backend, [RoundRequest("img-a", x0, [0, 2], 0, n)], cond, config)
    assert got.shape == (2, n) and got.dtype == np.float32  # the precision computed in and stored
    for row, k in enumerate([0, 2]):
        ref = _reference_x0_error(backend, x0, cond[k], "img-a", config, n)
        np.testing.assert_allclose(got[row], ref, rtol=2e-3, atol=1e-7)
    assert not np.allclose(got[0], got[1])  # the class prompt changes the error


def test_uniform_weighting_is_plain_epsilon_error(pixel_backend):
    cond = _cond(pixel_backend)
    x0 = pixel_backend.encode_images(_images(1))[0]
    config = ScoringConfig(weighting="uniform", seed=5, min_scores=2)
    n = 6
    (got,) = score_round(pixel_backend, [RoundRequest("k", x0, [1], 2, n)], cond, config)
    t, eps = draw(5, "k", 2, n, tuple(x0.shape), pixel_backend.schedule.num_timesteps)
    abar = pixel_backend.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_hat = pixel_backend.predict(x_t, t, cond[[1] * n])
    ref = (eps - eps_hat).pow(2).flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(got[0], ref, rtol=1e-4)


def test_sample_prediction_model_scores_x0_error():
    """A fake x0-predicting denoiser that always answers x0 + delta has error w * delta^2."""
    T = 100
    abar = torch.linspace(0.99, 0.01, T)

    class Fake:
        schedule = NoiseSchedule(abar, "sample")

        def predict(self, x_t, t, cond):
            return self.x0 + cond[:, 0, 0].view(-1, 1, 1, 1)

    fake = Fake()
    fake.x0 = torch.randn(1, 2, 3, 3)
    cond = torch.tensor([0.0, 0.5, -1.0]).view(3, 1, 1).expand(3, 2, 4).contiguous()
    config = ScoringConfig(weight_coef=7.0, min_scores=2)
    (got,) = score_round(fake, [RoundRequest("x", fake.x0[0], [0, 1, 2], 0, 5)], cond, config)
    t, _ = draw(config.seed, "x", 0, 5, (2, 3, 3), T)
    w = np.exp(-7.0 * t.numpy() / T)
    np.testing.assert_allclose(got[0], 0.0, atol=1e-10)
    np.testing.assert_allclose(got[1], w * 0.25, rtol=1e-5)
    np.testing.assert_allclose(got[2], w * 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- batching, noise


def _requests(backend, n_items=3):
    x0 = backend.encode_images(_images(n_items, size=32, seed=7))
    classes = [[0, 1, 2], [2, 0], [1]]
    return [RoundRequest(f"item{i}", x0[i], classes[i % 3], i % 2, 3 + i) for i in range(n_items)]


@pytest.mark.parametrize("family", ["pixel", "latent"])
def test_batched_and_unbatched_errors_agree(load_tiny, family):
    backend = load_tiny(family, "epsilon")
    cond = _cond(backend)
    reqs = _requests(backend)
    one = score_round(backend, reqs, cond, ScoringConfig(batch_size=1))
    odd = score_round(backend, reqs, cond, ScoringConfig(batch_size=5))
    big = score_round(backend, reqs, cond, ScoringConfig(batch_size=1024))
    assert [a.shape for a in big] == [(len(r.classes), r.n_samples) for r in reqs]
    for a, b, c in zip(one, odd, big):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-8)
    # Each item's rows match scoring that item alone (no leakage between items).
    for req, arr in zip(reqs, big):
        (alone,) = score_round(backend, [req], cond, ScoringConfig())
        np.testing.assert_allclose(alone, arr, rtol=1e-4, atol=1e-8)


def test_same_seed_same_scores_different_seed_different(pixel_backend):
    cond = _cond(pixel_backend)
    reqs = _requests(pixel_backend)
    a = score_round(pixel_backend, reqs, cond, ScoringConfig(seed=11))
    b = score_round(pixel_backend, reqs, cond, ScoringConfig(seed=11))
    c = score_round(pixel_backend, reqs, cond, ScoringConfig(seed=12))
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, z)


def test_noise_depends_on_seed_key_round_and_salt():
    shape = (3, 4, 4)
    t0, e0 = draw(0, "a.png", 0, 16, shape, 1000)
    t1, e1 = draw(0, "a.png", 0, 16, shape, 1000)
    assert torch.equal(t0, t1) and torch.equal(e0, e1)
    assert t0.dtype == torch.int64 and e0.dtype == torch.float32 and e0.shape == (16, *shape)
    for other in (draw(0, "b.png", 0, 16, shape, 1000), draw(1, "a.png", 0, 16, shape, 1000),
                  draw(0, "a.png", 1, 16, shape, 1000), draw(0, "a.png", 0, 16, shape, 1000, "c1")):
        assert not torch.allclose(other[1], e0)
        assert not torch.equal(other[0], t0)


def test_different_items_get_different_noise_in_score_round(pixel_backend):
    cond = _cond(pixel_backend)
    x0 = pixel_backend.encode_images(_images(1))[0]
    a, b = score_round(pixel_backend, [RoundRequest("one", x0, [0], 0, 6),
                                       RoundRequest("two", x0, [0], 0, 6)], cond, ScoringConfig())
    assert not np.allclose(a, b)  # same image, different key


def test_each_round_new_noise_and_any_round_recomputable(pixel_backend):
    cond = _cond(pixel_backend)
    x0 = pixel_backend.encode_images(_images(1))[0]
    config = ScoringConfig(seed=9)
    r0, r1 = score_round(pixel_backend, [RoundRequest("img", x0, [0, 1], 0, 6),
                                         RoundRequest("img", x0, [0, 1], 1, 6)], cond, config)
    assert not np.allclose(r0, r1)
    # Round 1 alone, later, for one surviving class: the same numbers (a redelivered task).
    (again,) = score_round(pixel_backend, [RoundRequest("img", x0, [1], 1, 6)], cond, config)
    np.testing.assert_allclose(again[0], r1[1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("n", [1, 4, 10, 50, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_timesteps_are_stratified(n, seed):
    T = 1000
    t, _ = draw(seed, f"k{n}", seed, n, (1,), T)
    assert t.min() >= 0 and t.max() < T
    strata = sorted((t * n // T).tolist())  # stratum of [0, T) each sample fell in
    assert strata == list(range(n))


def test_round_timesteps_are_shuffled_not_an_ordered_prefix():
    t, _ = draw(0, "k", 0, 50, (1,), 1000)
    assert not torch.equal(t, t.sort().values)
    # A prefix of the round already spans the t range.
    assert t[:10].max() - t[:10].min() > 300


def test_shared_noise_pairs_classes_and_unshared_does_not(pixel_backend):
    """Two classes with the same prompt score identically only under shared noise."""
    cond = _cond(pixel_backend, ["cat", "cat", "dog"])
    x0 = pixel_backend.encode_images(_images(1))[0]
    req = [RoundRequest("img", x0, [0, 1, 2], 0, 8)]
    (shared,) = score_round(pixel_backend, req, cond, ScoringConfig(shared_noise=True))
    (indep,) = score_round(pixel_backend, req, cond, ScoringConfig(shared_noise=False))
    np.testing.assert_allclose(shared[0], shared[1], rtol=1e-6, atol=1e-10)
    assert not np.allclose(shared[0], shared[2])
    assert not np.allclose(indep[0], indep[1])
    # Unshared noise is still reproducible.
    (again,) = score_round(pixel_backend, req, cond, ScoringConfig(shared_noise=False))
    np.testing.assert_array_equal(indep, again)


# --------------------------------------------------------------------------- classifier


def test_classify_images_end_to_end(pixel_backend):
    config = ScoringConfig(min_scores=4, max_scores=16, samples_per_round=4, p_cutoff=0.2,
                           batch_size=64, seed=1)
    items = [(f"img{i}.png", im) for i, im in enumerate(_images(4, size=10, seed=3))]
    prompts = [f"a photo of a {w}" for w in LABELS]
    first = classify_images(pixel_backend, items, prompts, LABELS, config)
    second = classify_images(pixel_backend, items, prompts, LABELS, config)
    chunked = classify_images(pixel_backend, items, prompts, LABELS, config, chunk=3)
    assert [r.key for r in first] == [k for k, _ in items]
    for r in first:
        assert r.error is None
        assert r.label in LABELS and LABELS[r.class_index] == r.label
        assert r.n_evals > 0
        assert r.n_evals == sum(r.counts.values())
        assert set(r.counts) == set(LABELS)
        assert all(config.min_scores <= c <= config.max_scores for c in r.counts.values())
        assert r.counts[r.label] == max(r.counts.values())
        assert r.rounds == len(r.survivors) >= 1
        for before, after in zip(r.survivors, r.survivors[1:]):
            assert set(after) <= set(before)
        assert r.survivors[-1] and r.label in r.survivors[-1]
        assert len(r.survivors[-1]) == 1 or r.counts[r.label] == config.max_scores
        assert 0.0 <= r.confidence <= 1.0 and math.isfinite(r.margin)
        assert r.scores[r.label] == min(r.scores[k] for k in r.survivors[-1])
    assert [r.to_dict() for r in first] == [r.to_dict() for r in second]
    # Other chunking packs other batches (float noise only): same decisions.
    for a, b in zip(first, chunked):
        assert (a.label, a.counts, a.survivors, a.n_evals) == (b.label, b.counts, b.survivors, b.n_evals)
        assert a.scores == pytest.approx(b.scores, rel=1e-4)


def test_classify_images_without_pruning_spends_full_budget(pixel_backend):
    config = ScoringConfig(min_scores=4, max_scores=8, prune=False, seed=2)
    items = [("a", _images(1)[0])]
    (r,) = classify_images(pixel_backend, items, [f"a photo of a {w}" for w in LABELS], LABELS,
                           config)
    assert r.counts == {w: 8 for w in LABELS}
    assert r.n_evals == 8 * len(LABELS)
    assert r.survivors == [LABELS]
