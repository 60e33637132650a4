"""The demo-model training path: seeded, reproducible, and loadable by the classifier."""

from __future__ import annotations

import numpy as np
import torch

from worker import demo
from worker import training as T

TINY = T.PixelModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                          text_width=16, text_layers=1, max_tokens=8)


def _train(seed: int, steps: int = 3):
    tok = T.build_tokenizer(demo.vocabulary(), TINY.max_tokens)
    torch.manual_seed(seed)
    unet, te, sch = T.build_model(TINY, len(tok))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(20, 8, 8))
    y = rng.integers(0, 10, size=20)
    res = T.train(demo.to_tensor(x), demo.caption_sampler(y), TINY,
                  T.TrainConfig(steps=steps, batch_size=8, seed=seed), tok, unet, te, sch)
    return tok, unet, te, sch, res


def test_same_seed_same_weights_and_losses():
    _, u1, t1, _, r1 = _train(0)
    _, u2, t2, _, r2 = _train(0)
    assert r1.losses == r2.losses
    for a, b in zip(list(u1.state_dict().values()) + list(t1.state_dict().values()),
                    list(u2.state_dict().values()) + list(t2.state_dict().values())):
        assert torch.equal(a, b)


def test_different_seed_different_weights():
    _, u1, _, _, r1 = _train(0)
    _, u2, _, _, r2 = _train(1)
    assert r1.losses != r2.losses
    assert not torch.equal(u1.conv_in.weight, u2.conv_in.weight)


def test_word_tokenizer_knows_every_caption_word():
    tok = T.build_tokenizer(demo.vocabulary(), 12)
    unk = tok.convert_tokens_to_ids("[UNK]")
    for c in demo.CAPTIONS:
        for name, d in zip(demo.DIGIT_NAMES, range(10)):
            ids = tok(c.format(n=name, d=d)).input_ids
            assert unk not in ids, c
    assert unk in tok("a photo of a zebra").input_ids


def test_saved_model_loads_and_scores(tmp_path):
    from worker.backends import load_backend

    tok, unet, te, sch, _ = _train(0, steps=1)
    T.save(tmp_path / "m", TINY, tok, unet, te, sch, {"default_template": demo.DEFAULT_TEMPLATE})
    b = load_backend(str(tmp_path / "m"), device="cpu")
    assert b.default_template == demo.DEFAULT_TEMPLATE
    assert (b.image_size, b.channels) == (8, 1)
    cond = b.encode_prompts(["a photo of the digit seven", "a photo of the digit one"])
    assert cond.shape == (2, TINY.max_tokens, TINY.text_width)
    assert not torch.equal(cond[0], cond[1])


def test_split_is_fixed_and_disjoint():
    a, b = demo.load_split(), demo.load_split()
    assert len(a.test_y) == 719 and np.array_equal(a.test_x, b.test_x)
    train = {x.tobytes() for x in a.train_x}
    # sklearn's digits has a few exact duplicate scans; the split itself never reuses an index.
    overlap = sum(x.tobytes() in train for x in a.test_x)
    assert overlap < 5
    assert np.bincount(a.test_y).min() >= 70  # stratified: every class ~72
