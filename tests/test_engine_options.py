"""Engine options: dtype, torch.compile, fused attention, and the out-of-memory batch back-off.

The back-off is tested with a wrapper around a tiny backend that raises
``torch.OutOfMemoryError`` for calls above a batch size, as a GPU would.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from worker.backends import load_backend, parse_compile, parse_dtype
from worker.batching import BatchSizer, run_in_batches
from worker.config import ScoringConfig
from worker.errors import UsageError
from worker.scoring import RoundRequest, score_round

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a bird"]


class OomAbove:
    """A Denoiser that runs out of memory on calls of more than ``max_rows`` rows."""

    def __init__(self, backend, max_rows: int, sizer: BatchSizer | None = None):
        self.backend, self.max_rows = backend, max_rows
        self.schedule = backend.schedule
        self.calls: list[int] = []
        self.ooms = 0
        if sizer is not None:
            self.batch_sizer = sizer

    def predict(self, x_t, t, cond):
        if x_t.shape[0] > self.max_rows:
            self.ooms += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory: {x_t.shape[0]} rows")
        self.calls.append(x_t.shape[0])
        return self.backend.predict(x_t, t, cond)


def _requests(backend, n_items: int = 4) -> list[RoundRequest]:
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8), "RGB") for _ in range(n_items)]
    x0 = backend.encode_images(images)
    return [RoundRequest(f"item{i}", x0[i], [0, 1, 2][: 1 + i % 3], i % 2, 4 + i) for i in range(n_items)]


# --------------------------------------------------------------------------- back-off


def test_oom_backoff_gives_the_unchunked_results_and_remembers_the_size(pixel_backend):
    cond = pixel_backend.encode_prompts(PROMPTS)
    reqs = _requests(pixel_backend)
    n_rows = sum(len(r.classes) * r.n_samples for r in reqs)
    config = ScoringConfig(batch_size=64)
    assert n_rows <= 64
    reference = score_round(pixel_backend, reqs, cond, config)  # one call, no limit

    sizer = BatchSizer()
    model = OomAbove(pixel_backend, max_rows=7, sizer=sizer)
    got = score_round(model, reqs, cond, config)
    for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    assert sizer.limit is not None and sizer.limit <= 7  # halved from 64 until it fit
    assert sum(model.calls) == n_rows and max(model.calls) <= 7  # every row scored once
    ooms_first = model.ooms

    # The next round starts at the remembered size: no further out-of-memory errors.
    again = score_round(model, reqs, cond, config)
    assert model.ooms == ooms_first
    for a, b in zip(again, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_backends_carry_a_sizer_so_the_limit_outlives_a_round(pixel_backend):
    assert isinstance(pixel_backend.batch_sizer, BatchSizer)


def test_a_single_row_that_does_not_fit_reraises(pixel_backend):
    cond = pixel_backend.encode_prompts(PROMPTS)
    model = OomAbove(pixel_backend, max_rows=0)
    with pytest.raises(torch.OutOfMemoryError):
        score_round(model, _requests(pixel_backend, 1), cond, ScoringConfig())


def test_run_in_batches_covers_every_row_once_under_backoff():
    seen: list[int] = []

    def step(sl: slice) -> None:
        if sl.stop - sl.start > 3:
            raise torch.OutOfMemoryError("too big")
        seen.extend(range(sl.start, sl.stop))

    sizer = BatchSizer()
    run_in_batches(23, 16, sizer, step)
    assert seen == list(range(23))
    assert sizer.limit == 2  # 16 -> 8 -> 4 -> 2


def test_max_batch_setting_caps_calls(pixel_backend, monkeypatch):
    from orchestrator.settings import Settings

    monkeypatch.setenv("DIFFLABEL_MAX_BATCH", "5")
    sizer = BatchSizer(Settings.from_env().max_batch)  # read once, passed as a value
    assert sizer.size(256) == 5 and sizer.size(3) == 3
    model = OomAbove(pixel_backend, max_rows=1000, sizer=sizer)
    cond = pixel_backend.encode_prompts(PROMPTS)
    score_round(model, _requests(pixel_backend), cond, ScoringConfig(batch_size=256))
    assert max(model.calls) == 5 and model.ooms == 0


# --------------------------------------------------------------------------- dtype, compile


@pytest.mark.parametrize("text, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp16", torch.float16), ("float32", torch.float32),
                                         ("torch.float16", torch.float16), ("auto", None), (None, None)])
def test_parse_dtype(text, dtype):
    assert parse_dtype(text) == dtype


@pytest.mark.parametrize("value, mode", [(True, "default"), ("1", "default"), ("on", "default"),
                                         ("reduce-overhead", "reduce-overhead"), (False, None),
                                         ("0", None), ("", None), (None, None)])
def test_parse_compile(value, mode):
    assert parse_compile(value) == mode


def test_bad_dtype_or_compile_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="dtype"):
        parse_dtype("int8")
    with pytest.raises(UsageError, match="compile"):
        parse_compile("fastest")


def test_bf16_backend_scores_close_to_float32(tiny_pixel_model, pixel_backend, monkeypatch):
    from orchestrator.settings import Settings

    monkeypatch.setenv("DIFFLABEL_DTYPE", "bf16")
    b16 = load_backend(str(tiny_pixel_model), device="cpu", dtype=Settings.from_env().dtype)
    assert b16.dtype == torch.bfloat16
    assert next(b16.unet.parameters()).dtype == torch.bfloat16
    reqs = _requests(pixel_backend, 2)
    (lo, _) = score_round(b16, reqs, b16.encode_prompts(PROMPTS), ScoringConfig())
    (hi, _) = score_round(pixel_backend, reqs, pixel_backend.encode_prompts(PROMPTS), ScoringConfig())
    assert lo.dtype == np.float32 and np.isfinite(lo).all()
    np.testing.assert_allclose(lo, hi, rtol=0.1, atol=1e-3)  # bf16 keeps ~3 significant digits


def test_engine_reads_no_environment(tiny_pixel_model, monkeypatch):
    """Settings are read once (orchestrator.settings) and passed in: the engine ignores the
    environment, so what a worker runs with is what its Settings say."""
    monkeypatch.setenv("DIFFLABEL_DTYPE", "bf16")
    monkeypatch.setenv("DIFFLABEL_MAX_BATCH", "3")
    b = load_backend(str(tiny_pixel_model), device="cpu")
    assert b.dtype == torch.float32 and b.batch_sizer.limit is None
    assert load_backend(str(tiny_pixel_model), device="cpu", max_batch=3).batch_sizer.limit == 3


@pytest.mark.parametrize("family", ["pixel", "latent"])
def test_attention_uses_pytorch_fused_sdpa(load_tiny, family):
    """diffusers picks AttnProcessor2_0 (F.scaled_dot_product_attention) by default."""
    procs = load_tiny(family, "epsilon").unet.attn_processors
    assert procs and {type(p).__name__ for p in procs.values()} == {"AttnProcessor2_0"}


def test_compile_option_wraps_the_unet(tiny_pixel_model, monkeypatch):
    """Wrapping is lazy (nothing compiles until the first call), so this is fast."""
    monkeypatch.delenv("DIFFLABEL_COMPILE", raising=False)
    eager = load_backend(str(tiny_pixel_model), device="cpu")
    assert not hasattr(eager.unet, "_orig_mod")
    compiled = load_backend(str(tiny_pixel_model), device="cpu", compile="1")
    assert hasattr(compiled.unet, "_orig_mod")
    assert compiled.unet.config.sample_size == eager.unet.config.sample_size
    assert not hasattr(load_backend(str(tiny_pixel_model), device="cpu", compile=False).unet, "_orig_mod")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIFFLABEL_TEST_COMPILE") != "1",
                    reason="compiling takes about a minute on 2 CPU cores; set DIFFLABEL_TEST_COMPILE=1")
def test_compiled_unet_scores_like_eager(tiny_pixel_model, pixel_backend):
    compiled = load_backend(str(tiny_pixel_model), device="cpu", compile=True)
    reqs = _requests(pixel_backend, 2)
    got = score_round(compiled, reqs, compiled.encode_prompts(PROMPTS), ScoringConfig())
    want = score_round(pixel_backend, reqs, pixel_backend.encode_prompts(PROMPTS), ScoringConfig())
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------- round growth


def test_rounds_grow_once_an_item_stays_undecided():
    config = ScoringConfig(rule="ttest")  # min 5, 2 per round, growth 1/8
    assert config.round_size(0, 0) == 5
    assert [config.round_size(1, n) for n in (5, 16, 23)] == [2, 2, 2]  # nearly every item ends here
    assert [config.round_size(9, n) for n in (24, 100, 1000)] == [3, 12, 125]
    assert config.round_size(40, 1990) == 10  # capped at max_scores
    scored, rounds = 0, 0
    while n := config.round_size(rounds, scored):
        scored, rounds = scored + n, rounds + 1
    assert scored == config.max_scores and rounds < 60  # instead of ~1,000 fixed rounds of 2
    fixed = ScoringConfig(rule="ttest", round_growth=0.0)
    assert fixed.round_size(9, 1000) == 2


def test_jobs_stored_without_round_growth_keep_fixed_rounds():
    stored = {k: v for k, v in ScoringConfig().to_dict().items() if k != "round_growth"}
    assert ScoringConfig.from_dict(stored).round_growth == 0.0
    assert ScoringConfig.from_dict(ScoringConfig().to_dict()) == ScoringConfig()
    with pytest.raises(UsageError, match="round_growth"):
        ScoringConfig(round_growth=-0.1)
