"""The bundled demo: a digits diffusion model trained here, on real scans, offline.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans from UCI; values 0..16,
ink bright). Split: stratified, ``random_state=0``: 60% train / 40% held out (719
images). The held-out part is never used for training or tuning; a stratified 10% of
the training part is the validation slice used for tuning and calibration.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Caption phrasings drawn at random during training ({n}: name, {d}: numeral).
CAPTIONS = (
    "a photo of the digit {n}",
    "a handwritten digit {n}",
    "the number {d}",
    "an image of the numeral {d}",
    "a picture of a {n}",
    "a handwritten {d}",
    "the digit {d}",
    "{n}",
)
#: The template the shipped model is evaluated with.
DEFAULT_TEMPLATE = "a photo of the digit {}"
SPLIT_SEED = 0
TEST_FRACTION = 0.4
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class DigitsSplit:
    train_x: np.ndarray  # (N, 8, 8) uint8 in 0..16
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_split() -> DigitsSplit:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the digits demo needs scikit-learn: pip install 'difflabel[train]'") from e
    d = load_digits()
    x, y = d.images.astype(np.uint8), d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y,
                                              random_state=SPLIT_SEED)
    x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=VAL_FRACTION, stratify=y_tr,
                                              random_state=SPLIT_SEED)
    return DigitsSplit(x_tr, y_tr, x_va, y_va, x_te, y_te)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) 0..16 -> (N, 1, 8, 8) in [-1, 1], the same values a saved PNG decodes to."""
    u8 = np.rint(x.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    return torch.from_numpy(u8).float().unsqueeze(1) / 127.5 - 1.0


def vocabulary() -> list[str]:
    words = [".", ","] + [w for c in CAPTIONS for w in c.replace("{n}", "").replace("{d}", "").split()]
    words += list(DIGIT_NAMES) + [str(i) for i in range(10)] + DEFAULT_TEMPLATE.replace("{}", "").split()
    return list(dict.fromkeys(words))


def caption_sampler(labels: np.ndarray) -> Callable[[int, torch.Generator], str]:
    def caption(i: int, g: torch.Generator) -> str:
        c = CAPTIONS[int(torch.randint(0, len(CAPTIONS), (1,), generator=g))]
        y = int(labels[i])
        return c.format(n=DIGIT_NAMES[y], d=y)

    return caption


def export_folder(x: np.ndarray, y: np.ndarray, out: Path, prefix: str = "") -> int:
    """Write images as PNG files in one folder per class name; returns the count."""
    from PIL import Image

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    u8 = np.rint(x.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    for i, (img, label) in enumerate(zip(u8, y)):
        d = out / DIGIT_NAMES[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(d / f"{prefix}{i:04d}.png", optimize=True)
    (out / "labels.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    return len(y)


def train_digits(out_dir: Path, tcfg=None, cfg=None, progress=None) -> dict:
    """Train the demo model from scratch on the training part and save it to ``out_dir``."""
    from worker import training as T

    cfg = cfg or T.PixelModelConfig()
    tcfg = tcfg or T.TrainConfig(steps=3000, batch_size=128)
    split = load_split()
    tok = T.build_tokenizer(vocabulary(), cfg.max_tokens)
    torch.manual_seed(tcfg.seed)
    unet, text_encoder, scheduler = T.build_model(cfg, len(tok))
    result = T.train(to_tensor(split.train_x), caption_sampler(split.train_y), cfg, tcfg, tok, unet,
                     text_encoder, scheduler, progress)
    meta = {
        "default_template": DEFAULT_TEMPLATE,
        "labels": list(DIGIT_NAMES),
        "training": {
            "data": "sklearn.datasets.load_digits (UCI handwritten digits, 8x8, 0..16)",
            "split": f"stratified; test_size={TEST_FRACTION}, val {VAL_FRACTION} of train, "
                     f"random_state={SPLIT_SEED}",
            "n_train": int(len(split.train_y)), "n_val": int(len(split.val_y)),
            "n_test": int(len(split.test_y)),
            "captions": list(CAPTIONS),
            **T.training_facts(tcfg, result, unet, text_encoder),
        },
    }
    T.save(out_dir, cfg, tok, unet, text_encoder, scheduler, meta)
    return meta
