"""The bundled demo: a digits diffusion model trained here, on real scans, offline.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans from UCI; values 0..16,
ink bright). Split: stratified, ``random_state=0``: 60% train / 40% held out (719
images). The held-out part is never used for training or tuning; a stratified 10% of
the training part is the validation slice used for tuning and calibration.
"""

from __future__ import annotations

import dataclasses
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


#: Augmentation (``augment_digits``): the chance an image is changed at all, then the ranges
#: of its shift (pixels per axis), scale and stroke change.
AUGMENT_P = 0.5
AUGMENT_SHIFT = 1
AUGMENT_SCALE = 0.1
AUGMENT_STROKE = 0.3
AUGMENT_TEXT = (f"each drawn image with probability {AUGMENT_P}: shift by -{AUGMENT_SHIFT}..+{AUGMENT_SHIFT} "
                f"px per axis (zero fill), scale by 1 +- {AUGMENT_SCALE} about the centre (bilinear), "
                f"stroke width: blend toward the 4-neighbour dilation (thicker) or erosion (thinner) "
                f"by up to {AUGMENT_STROKE}; then rounded back to the 17 grey levels 0..16")


def _cross_max(v: torch.Tensor) -> torch.Tensor:
    """Max over each pixel and its 4 neighbours (outside the image counts as 0): (N, 1, H, W)."""
    p = torch.nn.functional.pad(v, (1, 1, 1, 1))
    h, w = v.shape[-2:]
    return torch.stack([p[..., 1:h + 1, 1:w + 1], p[..., :h, 1:w + 1], p[..., 2:, 1:w + 1],
                        p[..., 1:h + 1, :w], p[..., 1:h + 1, 2:]]).amax(0)


def augment_digits(x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomly shift, scale and thicken or thin the digits of a batch (N, 1, 8, 8) in [-1, 1].

    Works on the scan's own grid of grey levels 0..16 (ink bright, background 0, so the
    shift's and scale's fill is background) and rounds back to those levels: an augmented
    image holds the same values a saved PNG of a scan does. Every draw comes from ``g``."""
    import torch.nn.functional as F

    n = x0.shape[0]
    levels = (x0 + 1.0) * 127.5 * 16.0 / 255.0  # 0..16
    change = torch.rand(n, generator=g) < AUGMENT_P
    shift = torch.randint(-AUGMENT_SHIFT, AUGMENT_SHIFT + 1, (n, 2), generator=g).float()
    scale = 1.0 + (2 * torch.rand(n, generator=g) - 1) * AUGMENT_SCALE
    stroke = (2 * torch.rand(n, generator=g) - 1) * AUGMENT_STROKE
    h, w = x0.shape[-2:]
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of d pixels is 2d / size.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2] = -2.0 * shift[:, 0] / w
    theta[:, 1, 2] = -2.0 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(x0.shape), align_corners=False)
    moved = F.grid_sample(levels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thick, thin = _cross_max(moved), -_cross_max(-moved)
    s = stroke.view(-1, 1, 1, 1)
    out = torch.where(s > 0, moved + s * (thick - moved), moved - s * (thin - moved))
    u8 = torch.round(out.clamp(0, 16).round() * 255.0 / 16.0)  # as to_tensor: the PNG grey level
    return torch.where(change.view(-1, 1, 1, 1), u8 / 127.5 - 1.0, x0)


def train_digits(out_dir: Path, tcfg=None, cfg=None, progress=None, subset=None, augment: bool = False) -> dict:
    """Train the demo model from scratch on the training part and save it to ``out_dir``.

    ``subset``: indices into the training part to train on instead of all of it (the folds of
    ``bench/cv_defaults.py``). ``augment``: transform each drawn batch with ``augment_digits``.
    ``cfg.objective`` chooses epsilon prediction (the shipped ``models/digits``) or flow
    matching (``models/digits-flow``)."""
    from worker import training as T

    cfg = cfg or T.PixelModelConfig()
    tcfg = tcfg or T.TrainConfig(steps=3000, batch_size=128)
    split = load_split()
    if subset is not None:
        split = dataclasses.replace(split, train_x=split.train_x[subset], train_y=split.train_y[subset])
    tok = T.build_tokenizer(vocabulary(), cfg.max_tokens)
    torch.manual_seed(tcfg.seed)
    unet, text_encoder, scheduler = T.build_model(cfg, len(tok))
    result = T.train(to_tensor(split.train_x), caption_sampler(split.train_y), cfg, tcfg, tok, unet,
                     text_encoder, scheduler, progress, augment=augment_digits if augment else None)
    objective = ({"objective": "flow matching: x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0",
                  "schedule": f"FlowMatchEulerDiscreteScheduler, {cfg.num_train_timesteps} steps, "
                              f"shift {cfg.flow_shift:g}; sigma drawn {tcfg.sigma_sampling} on its grid"}
                 if cfg.objective == "flow" else
                 {"objective": "epsilon prediction",
                  "schedule": f"DDPM {cfg.beta_schedule} betas, {cfg.num_train_timesteps} steps"})
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
            **objective,
            "augmentation": AUGMENT_TEXT if augment else "none",
            **T.training_facts(tcfg, result, unet, text_encoder),
        },
    }
    T.save(out_dir, cfg, tok, unet, text_encoder, scheduler, meta)
    return meta
