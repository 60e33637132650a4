"""A second demo: two coloured shapes per image, for attribute binding (Clark & Jaini 2023, CLEVR).

Every image is 16x16 RGB on black with exactly two objects, one in each half. Each object
has a colour and a shape, and the two objects differ in both, so the question "is it a
red square and a blue circle, or a blue square and a red circle?" has a single answer
that neither the colours nor the shapes alone settle. Captions name the objects in
either order, so only binding colour to shape (not word order to position) explains them.

    python -m worker.shapes train models/shapes
    python -m worker.shapes train models/shapes-many --variant many --steps 2400

A second variant, ``MANY`` (8 colours x 5 shapes, one caption per scene naming the left
object first), has 1,120 distinct captions: the many-label model that large label sets are
measured on (bench/many_labels.py).

Generation is pure numpy (boolean masks, no anti-aliasing) and seeded: the same
``(n, seed)`` gives the same images on every machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Colour names and the RGB value they are drawn with.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
SHAPES = ("square", "circle", "triangle")
#: Image side in pixels; the left object lies in columns 0..7, the right one in 8..15.
IMAGE_SIZE = 16
#: Half-extent of an object in pixels, drawn uniformly from this range.
SIZE_RANGE = (3.0, 3.6)
#: Jitter of an object's centre in pixels: horizontal within its half, vertical around the middle.
JITTER_X = 0.3
JITTER_Y = 2.0
#: Sub-pixel grid used to decide which pixels an object covers.
SUPERSAMPLE = 4
#: Training captions. {c1} {s1}: the left object, {c2} {s2}: the right one. Each phrasing
#: comes in both orders, so the first-named object is on the left only half the time.
CAPTIONS = (
    "a {c1} {s1} and a {c2} {s2}",
    "a {c2} {s2} and a {c1} {s1}",
    "a {c1} {s1} on the left and a {c2} {s2} on the right",
    "a {c2} {s2} on the right and a {c1} {s1} on the left",
    "{c1} {s1}, {c2} {s2}",
    "{c2} {s2}, {c1} {s1}",
)
#: The phrasing the binding benchmark scores (labels are whole captions).
EVAL_CAPTION = CAPTIONS[0]
#: Labels are whole captions, so the template adds nothing.
DEFAULT_TEMPLATE = "{}"
TRAIN_SEED = 0
TEST_SEED = 1
N_TRAIN = 6000
#: The many-label variant: 8 colours x 5 shapes per object, 1,120 scenes, each with one
#: caption that names the left object first ("a red square and a blue circle" means the
#: red square is on the left), so every scene is its own label.
MANY_COLOURS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
MANY_SHAPES = SHAPES + ("diamond", "cross")
MANY_CAPTION = "a {c1} {s1} and a {c2} {s2}"


@dataclass(frozen=True)
class Scene:
    """The attributes of one image: (colour, shape) of the left and of the right object."""

    c1: str
    s1: str
    c2: str
    s2: str

    def caption(self, template: str = EVAL_CAPTION) -> str:
        return template.format(c1=self.c1, s1=self.s1, c2=self.c2, s2=self.s2)

    def swapped(self) -> Scene:
        """Colours exchanged between the objects: the binding foil."""
        return Scene(self.c2, self.s1, self.c1, self.s2)


@dataclass(frozen=True)
class Variant:
    """One data set of two-object scenes: its colours, shapes, captions and model."""

    name: str
    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    #: Training phrasings; ``eval_caption`` is the one labels are written in.
    captions: tuple[str, ...]
    eval_caption: str
    n_train: int
    model_dir: str

    def scenes(self) -> list[Scene]:
        """Every scene of the variant (the objects differ in colour and in shape), in a fixed order."""
        return [Scene(c1, s1, c2, s2) for c1 in self.colours for s1 in self.shapes
                for c2 in self.colours for s2 in self.shapes if c1 != c2 and s1 != s2]

    def vocabulary(self) -> list[str]:
        words = [",", "."] + [w for c in self.captions for w in c.replace(",", " ").split() if "{" not in w]
        return list(dict.fromkeys(words + list(self.colours) + list(self.shapes)))


def _object_mask(shape: str, cx: float, cy: float, s: float) -> np.ndarray:
    """(16, 16) bool mask of one object centred at (cx, cy) with half-extent s (pixel units).

    Squares are sampled at pixel centres (sharp corners); circles and triangles cover a pixel
    when at least half of it is inside (4x4 supersampling), which keeps small circles round
    instead of growing one-pixel nubs on their axes."""
    if shape == "square":  # sampled at pixel centres: clean edges, sharp corners
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
        h = 0.85 * s  # about the circle's area
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    ss = SUPERSAMPLE
    yy, xx = (np.mgrid[0 : IMAGE_SIZE * ss, 0 : IMAGE_SIZE * ss] + 0.5) / ss  # sub-pixel centres
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= s * s
    elif shape == "triangle":  # apex up (y grows downwards), base of width 2s at the bottom
        inside = (dy >= -s) & (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    elif shape == "diamond":  # a square on its corner, about the circle's area
        inside = np.abs(dx) + np.abs(dy) <= 1.15 * s
    elif shape == "cross":  # a plus sign, arms 0.8s wide
        ax, ay, arm = np.abs(dx), np.abs(dy), 0.4 * s
        inside = ((ax <= arm) & (ay <= s)) | ((ay <= arm) & (ax <= s))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(IMAGE_SIZE, ss, IMAGE_SIZE, ss).mean(axis=(1, 3)) >= 0.5


def draw_scene(scene: Scene, rng: np.random.Generator,
               colours: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """(16, 16, 3) uint8: the scene's two objects on black, jittered by ``rng``."""
    colours = colours or COLOURS
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    half = IMAGE_SIZE // 2
    for k, (colour, shape) in enumerate(((scene.c1, scene.s1), (scene.c2, scene.s2))):
        s = rng.uniform(*SIZE_RANGE)
        cx = half * k + half / 2 + rng.uniform(-JITTER_X, JITTER_X)
        cy = IMAGE_SIZE / 2 + rng.uniform(-JITTER_Y, JITTER_Y)
        mask = _object_mask(shape, cx, cy, s)
        mask[:, half * (1 - k) : half * (2 - k)] = False  # never spill into the other half
        img[mask] = colours[colour]
    return img


def random_scene(rng: np.random.Generator, colours: dict | None = None,
                 shapes: tuple[str, ...] = SHAPES) -> Scene:
    names = list(colours or COLOURS)
    c1, c2 = rng.choice(len(names), size=2, replace=False)
    s1, s2 = rng.choice(len(shapes), size=2, replace=False)
    return Scene(names[c1], shapes[s1], names[c2], shapes[s2])


def make_dataset(n: int, seed: int, variant: Variant | None = None) -> tuple[np.ndarray, list[Scene]]:
    """n images (n, 16, 16, 3) uint8 and their scenes, deterministic in (n, seed, variant)."""
    v = variant or BINDING
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, v.colours, v.shapes) for _ in range(n)]
    images = np.stack([draw_scene(sc, rng, v.colours) for sc in scenes]) if n else \
        np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, scenes


BINDING = Variant("binding", COLOURS, SHAPES, CAPTIONS, EVAL_CAPTION, N_TRAIN, "models/shapes")
MANY = Variant("many", MANY_COLOURS, MANY_SHAPES, (MANY_CAPTION,), MANY_CAPTION, 30000,
               "models/shapes-many")
VARIANTS = {v.name: v for v in (BINDING, MANY)}


def colour_foil(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object's colour replaced by a colour absent from the image."""
    absent = [c for c in COLOURS if c not in (scene.c1, scene.c2)]
    c = absent[int(rng.integers(len(absent)))]
    return Scene(c, scene.s1, scene.c2, scene.s2) if rng.integers(2) == 0 else \
        Scene(scene.c1, scene.s1, c, scene.s2)


def shape_foil(scene: Scene, rng: np.random.Generator) -> Scene:
    """One object's shape replaced by the shape absent from the image."""
    absent = [s for s in SHAPES if s not in (scene.s1, scene.s2)]
    s = absent[int(rng.integers(len(absent)))]
    return Scene(scene.c1, s, scene.c2, scene.s2) if rng.integers(2) == 0 else \
        Scene(scene.c1, scene.s1, scene.c2, s)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 16, 16, 3) uint8 -> (N, 3, 16, 16) in [-1, 1], as ``pil_to_tensor`` decodes a PNG."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vocabulary(variant: Variant | None = None) -> list[str]:
    return (variant or BINDING).vocabulary()


def caption_sampler(scenes: list[Scene], captions: tuple[str, ...] = CAPTIONS,
                    ) -> Callable[[int, torch.Generator], str]:
    def caption(i: int, g: torch.Generator) -> str:
        if len(captions) == 1:
            return scenes[i].caption(captions[0])
        return scenes[i].caption(captions[int(torch.randint(0, len(captions), (1,), generator=g))])

    return caption


def model_config():
    """The shipped model's shape: a ~1M-parameter UNet at 16x16 RGB, 16 text tokens."""
    from worker.training import PixelModelConfig

    # The longest caption is 13 words; 16 tokens leave room without truncation.
    return PixelModelConfig(image_size=IMAGE_SIZE, channels=3, block_out_channels=(32, 64),
                            max_tokens=16)


def default_train_config():
    """About 20 minutes on a shared 2-core CPU (~0.8 s/step at batch 64 on one thread)."""
    from worker.training import TrainConfig

    # One thread: on a contended 2-core machine two threads spin-wait on each other and
    # a step took 2-8 s instead of 0.8 s (measured while another benchmark ran).
    return TrainConfig(steps=1600, batch_size=64, threads=1)


def train_shapes(out_dir: Path, tcfg=None, cfg=None, progress=None, n_train: int | None = None,
                 variant: Variant | None = None) -> dict:
    """Train a shapes model from scratch on ``make_dataset(n_train, TRAIN_SEED, variant)``; save it."""
    from worker import training as T

    v = variant or BINDING
    n_train = v.n_train if n_train is None else n_train
    cfg = cfg or model_config()
    tcfg = tcfg or default_train_config()
    images, scenes = make_dataset(n_train, TRAIN_SEED, v)
    tok = T.build_tokenizer(v.vocabulary(), cfg.max_tokens)
    torch.manual_seed(tcfg.seed)
    unet, text_encoder, scheduler = T.build_model(cfg, len(tok))
    result = T.train(to_tensor(images), caption_sampler(scenes, v.captions), cfg, tcfg, tok, unet,
                     text_encoder, scheduler, progress)
    meta = {
        "default_template": DEFAULT_TEMPLATE,
        "training": {
            "data": f"worker.shapes.make_dataset({n_train}, seed={TRAIN_SEED}"
                    + ("" if v is BINDING else f", variant=worker.shapes.{v.name.upper()}")
                    + f"): 16x16 RGB, two objects (left/right half), colours {list(v.colours)}, "
                    f"shapes {list(v.shapes)}, differing in both ({len(v.scenes())} scenes)",
            "variant": v.name,
            "n_train": n_train,
            "held_out": f"make_dataset(n, seed={TEST_SEED})",
            "captions": list(v.captions),
            "eval_caption": v.eval_caption,
            **T.training_facts(tcfg, result, unet, text_encoder),
        },
    }
    T.save(out_dir, cfg, tok, unet, text_encoder, scheduler, meta)
    return meta


def _main(argv: list[str] | None = None) -> None:
    import argparse
    import dataclasses
    import json
    import sys

    from tqdm import tqdm

    ap = argparse.ArgumentParser(prog="python -m worker.shapes", description="Train the shapes demo model.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train from scratch and save to OUT_DIR")
    tr.add_argument("out_dir", type=Path)
    default = default_train_config()
    tr.add_argument("--steps", type=int, default=default.steps)
    tr.add_argument("--batch-size", type=int, default=default.batch_size)
    tr.add_argument("--threads", type=int, default=default.threads, help="0: torch's default")
    tr.add_argument("--variant", choices=sorted(VARIANTS), default=BINDING.name,
                    help="binding: 4 colours x 3 shapes (models/shapes); many: 8 x 5, 1,120 captions "
                         "(models/shapes-many)")
    tr.add_argument("--n-train", type=int, default=None, help="training images (default: the variant's)")
    tr.add_argument("--seed", type=int, default=default.seed)
    args = ap.parse_args(argv)
    tcfg = dataclasses.replace(default, steps=args.steps, batch_size=args.batch_size,
                               threads=args.threads, seed=args.seed)
    bar = tqdm(total=tcfg.steps, file=sys.stderr, unit="step")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    meta = train_shapes(args.out_dir, tcfg, progress=progress, n_train=args.n_train,
                        variant=VARIANTS[args.variant])
    bar.close()
    print(json.dumps(meta["training"], indent=2))


if __name__ == "__main__":
    _main()
