"""The shapes generator (two coloured objects per image) and its training path."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from worker import shapes as S
from worker import training as T

TINY = T.PixelModelConfig(image_size=16, channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                          attention_head_dim=4, text_width=16, text_layers=1, max_tokens=16)


def test_generator_is_deterministic_and_seeded():
    a, sa = S.make_dataset(20, seed=0)
    b, sb = S.make_dataset(20, seed=0)
    c, sc = S.make_dataset(20, seed=1)
    assert a.shape == (20, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_two_objects_in_their_colours_one_per_half():
    images, scenes = S.make_dataset(50, seed=3)
    for img, sc in zip(images, scenes):
        assert sc.c1 != sc.c2 and sc.s1 != sc.s2
        for half, colour in ((img[:, :8], sc.c1), (img[:, 8:], sc.c2)):
            pixels = {tuple(p) for p in half.reshape(-1, 3)}
            assert pixels == {(0, 0, 0), S.COLOURS[colour]}, (sc, pixels)
            assert (half.any(axis=2)).sum() >= 9  # an object, not a stray pixel


def test_shapes_differ_in_pixels():
    """Same place, size and colour: square, circle and triangle cover different pixels."""
    masks = [S._object_mask(shape, 4.0, 8.0, 3.3) for shape in S.SHAPES]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (masks[i] != masks[j]).sum() >= 4


def test_captions_and_foils():
    sc = S.Scene("red", "square", "blue", "circle")
    assert sc.caption() == "a red square and a blue circle"
    assert sc.swapped().caption() == "a blue square and a red circle"
    assert sc.swapped() != sc and sc.swapped().swapped() == sc
    rng = np.random.default_rng(0)
    for _ in range(20):
        c, s = S.colour_foil(sc, rng), S.shape_foil(sc, rng)
        assert c.caption() != sc.caption() and s.caption() != sc.caption()
        assert {c.c1, c.c2} - {"red", "blue"} and (c.s1, c.s2) == (sc.s1, sc.s2)
        assert {s.s1, s.s2} == {"triangle", "circle"} or {s.s1, s.s2} == {"square", "triangle"}
    # both orders appear among the training phrasings
    texts = {sc.caption(t) for t in S.CAPTIONS}
    assert "a blue circle and a red square" in texts and len(texts) == len(S.CAPTIONS)


def test_vocabulary_covers_every_caption():
    tok = T.build_tokenizer(S.vocabulary(), TINY.max_tokens)
    unk = tok.convert_tokens_to_ids("[UNK]")
    sc = S.Scene("yellow", "triangle", "green", "square")
    for t in S.CAPTIONS:
        ids = tok(sc.caption(t)).input_ids
        assert unk not in ids and len(ids) <= TINY.max_tokens, t


def test_tiny_model_trains_saves_and_loads(tmp_path):
    from worker.backends import load_backend
    from worker.classifier import classify_images
    from worker.config import ScoringConfig

    meta = S.train_shapes(tmp_path / "m", T.TrainConfig(steps=2, batch_size=8), cfg=TINY, n_train=32)
    assert meta["training"]["steps"] == 2 and np.isfinite(meta["training"]["final_loss"])
    b = load_backend(str(tmp_path / "m"), device="cpu")
    assert (b.image_size, b.channels, b.default_template) == (16, 3, S.DEFAULT_TEMPLATE)
    images, scenes = S.make_dataset(2, seed=S.TEST_SEED)
    labels = [scenes[0].caption(), scenes[0].swapped().caption()]
    x0 = b.encode_images([Image.fromarray(images[0])])
    assert torch.allclose(x0[0], S.to_tensor(images[:1])[0])
    res = classify_images(b, [("img0", Image.fromarray(images[0]))], labels, labels,
                          ScoringConfig(prune=False, min_scores=2, max_scores=2))
    assert res[0].label in labels and res[0].n_evals == 4


def test_many_label_variant_has_over_a_thousand_distinct_captions_the_shipped_model_reads():
    from pathlib import Path

    from worker.model_files import load_tokenizer

    scenes = S.MANY.scenes()
    captions = [sc.caption(S.MANY.eval_caption) for sc in scenes]
    assert len(captions) == len(set(captions)) == 1120
    images, drawn = S.make_dataset(40, seed=2, variant=S.MANY)
    for img, sc in zip(images, drawn):
        assert sc in set(scenes)
        for half, colour in ((img[:, :8], sc.c1), (img[:, 8:], sc.c2)):
            assert {tuple(p) for p in half.reshape(-1, 3)} == {(0, 0, 0), S.MANY_COLOURS[colour]}
    tok = load_tokenizer(str(Path(__file__).resolve().parents[1] / "models" / "shapes-many"))
    ids = tok(captions, padding="max_length", max_length=16, truncation=True).input_ids
    unk = tok.convert_tokens_to_ids("[UNK]")
    assert all(unk not in row for row in ids) and len({tuple(r) for r in ids}) == 1120


def test_diamond_and_cross_differ_from_the_other_shapes():
    masks = [S._object_mask(shape, 4.0, 8.0, 3.3) for shape in S.MANY_SHAPES]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).sum() >= 4, (S.MANY_SHAPES[i], S.MANY_SHAPES[j])
