"""Confidence as probability: Platt scaling on the classifier's own signals.

Clark & Jaini (2023, section 5.3) found the number of model evaluations an image needed
to be a well-calibrated confidence signal once passed through Platt scaling. We fit a
logistic regression P(correct) = sigmoid(w . f + b) on a labelled folder with features

    f = [log(evals per class), logit(separation), margin / median margin]

and store it beside the model as ``calibration.json``. Pure numpy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("log_evals_per_class", "logit_separation", "rel_margin")


def expit(z):
    """The logistic function without overflow (and without importing scipy)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def features(n_evals: float, n_classes: int, separation: float, margin: float,
             margin_scale: float) -> np.ndarray:
    sep = float(np.clip(separation, 1e-6, 1 - 1e-6))
    return np.array([
        np.log(max(n_evals, 1) / max(n_classes, 1)),
        np.log(sep / (1 - sep)),
        margin / margin_scale if margin_scale > 0 else 0.0,
    ])


def fit(rows: Sequence[dict[str, float]], correct: Sequence[bool], l2: float = 1e-2,
        iters: int = 50) -> dict[str, Any]:
    """Fit on rows with keys n_evals, n_classes, separation, margin; Newton's method."""
    margins = np.array([r["margin"] for r in rows], dtype=np.float64)
    scale = float(np.median(np.abs(margins))) or 1.0
    X = np.stack([features(r["n_evals"], r["n_classes"], r["separation"], r["margin"], scale)
                  for r in rows])
    mu, sd = X.mean(0), X.std(0)
    sd[sd == 0] = 1.0
    Z = np.hstack([(X - mu) / sd, np.ones((len(X), 1))])
    y = np.asarray(correct, dtype=np.float64)
    w = np.zeros(Z.shape[1])
    for _ in range(iters):
        p = expit(Z @ w)
        grad = Z.T @ (p - y) + l2 * np.r_[w[:-1], 0]
        H = (Z * (p * (1 - p))[:, None]).T @ Z + l2 * np.eye(len(w))
        step = np.linalg.solve(H, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"method": "platt", "features": list(FEATURES), "mean": mu.tolist(), "std": sd.tolist(),
            "weights": w[:-1].tolist(), "bias": float(w[-1]), "margin_scale": scale,
            "n_fit": len(rows), "fit_accuracy": float(y.mean())}


def apply(cal: dict[str, Any], n_evals: float, n_classes: int, separation: float,
          margin: float) -> float:
    f = features(n_evals, n_classes, separation, margin, cal["margin_scale"])
    z = (f - np.array(cal["mean"])) / np.array(cal["std"])
    return float(expit(z @ np.array(cal["weights"]) + cal["bias"]))


def expected_calibration_error(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE with equal-width bins (Guo et al. 2017)."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(conf) == 0:
        return 0.0
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(ece)


def save(cal: dict[str, Any], model_dir: Path) -> Path:
    path = Path(model_dir) / "calibration.json"
    path.write_text(json.dumps(cal, indent=2) + "\n")
    return path
