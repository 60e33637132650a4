"""The flow-matching demo path: training objective, augmentation, loading and scoring.

A flow model folder (``train-demo --objective flow``) ships a FlowMatchEulerDiscreteScheduler
config; difflabel must score it on that scheduler's sigma grid and call the UNet with the
timestep it was trained on (sigma * 1000). The tiny models here use shift 3, so a wrong
convention (the grid index instead of sigma * 1000) changes the model's input visibly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from orchestrator import local_commands  # noqa: F401 - registers commands
from orchestrator.cli import cli
from worker import demo
from worker import training as T

TINY_FLOW = T.PixelModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                               text_width=16, text_layers=1, max_tokens=8, objective="flow", flow_shift=3.0)


def _halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) 0..16 images: label 0 has its ink in the left half, label 1 in the right."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.zeros((n, 8, 8), dtype=np.uint8)
    for i in range(n):
        cols = slice(0, 4) if y[i] == 0 else slice(4, 8)
        x[i, :, cols] = rng.integers(8, 17, size=(8, 4))
    return x, y


def _train_flow(steps: int, seed: int = 0, augment=None, n: int = 40, sampling: str = "uniform"):
    tok = T.build_tokenizer(demo.vocabulary(), TINY_FLOW.max_tokens)
    torch.manual_seed(seed)
    unet, te, sch = T.build_model(TINY_FLOW, len(tok))
    x, y = _halves(n)
    res = T.train(demo.to_tensor(x), demo.caption_sampler(y), TINY_FLOW,
                  T.TrainConfig(steps=steps, batch_size=16, seed=seed, lr=5e-3, sigma_sampling=sampling),
                  tok, unet, te, sch, augment=augment)
    return tok, unet, te, sch, res


def test_flow_training_is_seeded_and_differs_from_epsilon():
    _, u1, _, s1, r1 = _train_flow(3)
    _, u2, _, _, r2 = _train_flow(3)
    assert r1.losses == r2.losses and torch.equal(u1.conv_in.weight, u2.conv_in.weight)
    assert type(s1).__name__ == "FlowMatchEulerDiscreteScheduler" and s1.config.shift == 3.0
    _, _, _, _, r3 = _train_flow(3, sampling="logit-normal")
    assert r3.losses != r1.losses
    with pytest.raises(ValueError, match="sigma sampling"):
        _train_flow(1, sampling="beta")


def test_logit_normal_indices_concentrate_mid_grid():
    g = torch.Generator().manual_seed(0)
    uni = T.draw_sigma_index(20000, 1000, "uniform", g).float()
    ln = T.draw_sigma_index(20000, 1000, "logit-normal", g).float()
    assert 0 <= int(ln.min()) and int(ln.max()) <= 999
    assert abs(float(uni.mean()) - 499.5) < 10 and abs(float(ln.mean()) - 499.5) < 10
    # logit-normal(0, 1) puts ~68% of u in (0.27, 0.73); uniform puts 46% there
    mid = lambda v: float(((v >= 270) & (v < 730)).float().mean())  # noqa: E731
    assert mid(ln) > 0.62 and abs(mid(uni) - 0.46) < 0.02


def test_saved_flow_model_is_scored_on_its_sigma_grid(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from worker.backends import load_backend

    tok, unet, te, sch, _ = _train_flow(2)
    T.save(tmp_path / "m", TINY_FLOW, tok, unet, te, sch, {"default_template": demo.DEFAULT_TEMPLATE})
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    b = load_backend(str(tmp_path / "m"), device="cpu")
    assert b.schedule.is_flow and b.schedule.prediction_type == "flow"
    # the grid is the scheduler's own: sigma_i = i / T shifted by 3, ascending
    want = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)
    assert torch.allclose(b.schedule.sigmas, want, atol=1e-6)
    # predict calls the UNet with the timestep it was trained on: sigma * 1000
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet").eval()
    cond = b.encode_prompts(["a photo of the digit zero", "a photo of the digit one"])
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        expected = ref(x_t, b.schedule.sigmas[t] * 1000, encoder_hidden_states=cond).sample
        wrong = ref(x_t, t, encoder_hidden_states=cond).sample
    got = b.predict(x_t, t, cond)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_trained_flow_model_classifies_what_it_learned(tmp_path):
    """Train on two easy classes, save, load: the flow scorer gets the held-out halves right."""
    from worker.backends import load_backend
    from worker.classifier import classify_tensors
    from worker.config import ScoringConfig

    tok, unet, te, sch, res = _train_flow(150)
    assert res.final_loss(20) < res.losses[0]
    T.save(tmp_path / "m", TINY_FLOW, tok, unet, te, sch, {"default_template": demo.DEFAULT_TEMPLATE})
    b = load_backend(str(tmp_path / "m"), device="cpu")
    x, y = _halves(20, seed=7)
    cond = b.encode_prompts(["a photo of the digit zero", "a photo of the digit one"])
    out = classify_tensors(b, [f"i{i}" for i in range(20)], demo.to_tensor(x), cond, ["zero", "one"],
                           ScoringConfig(weighting="velocity", max_scores=64))
    acc = np.mean([r.class_index == t for r, t in zip(out, y)])
    assert acc >= 0.9, acc


# --------------------------------------------------------------------------- augmentation


def _levels(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x + 1) * 127.5 * 16 / 255)


def test_augmentation_stays_on_the_scan_grey_levels_and_keeps_half():
    split = demo.load_split()
    x = demo.to_tensor(split.train_x[:400])
    a = demo.augment_digits(x, torch.Generator().manual_seed(0))
    b = demo.augment_digits(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # every value is one a PNG of a 0..16 scan decodes to
    grey = (a + 1) * 127.5
    assert torch.allclose(grey, torch.round(grey), atol=1e-4)
    assert torch.equal(torch.round(_levels(a) * 255 / 16), torch.round(grey))
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    same = (a == x).flatten(1).all(1).float().mean()
    assert 0.4 < float(same) < 0.7  # half are left alone (and a few drawn changes are no-ops)


def test_augmentation_shift_moves_ink_one_pixel_with_zero_fill(monkeypatch):
    monkeypatch.setattr(demo, "AUGMENT_P", 1.0)
    monkeypatch.setattr(demo, "AUGMENT_SCALE", 0.0)
    monkeypatch.setattr(demo, "AUGMENT_STROKE", 0.0)
    split = demo.load_split()
    x = demo.to_tensor(split.train_x[:200])
    a = demo.augment_digits(x, torch.Generator().manual_seed(3))
    lx, la = _levels(x)[:, 0], _levels(a)[:, 0]
    seen = set()
    for img, out in zip(lx, la):
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                moved = torch.zeros_like(img)
                ys, xs = slice(max(dy, 0), 8 + min(dy, 0)), slice(max(dx, 0), 8 + min(dx, 0))
                yo, xo = slice(max(-dy, 0), 8 + min(-dy, 0)), slice(max(-dx, 0), 8 + min(-dx, 0))
                moved[ys, xs] = img[yo, xo]
                if torch.equal(moved, out):
                    matches.append((dy, dx))
        assert matches, "an augmented image is not a one-pixel shift of its scan"
        seen.add(matches[0] if len(matches) == 1 else None)
    assert len(seen - {None}) == 9  # all nine shifts occur


def test_stroke_change_thickens_or_thins_ink(monkeypatch):
    monkeypatch.setattr(demo, "AUGMENT_P", 1.0)
    monkeypatch.setattr(demo, "AUGMENT_SHIFT", 0)
    monkeypatch.setattr(demo, "AUGMENT_SCALE", 0.0)
    split = demo.load_split()
    x = demo.to_tensor(split.train_x[:300])
    a = demo.augment_digits(x, torch.Generator().manual_seed(5))
    ink_x, ink_a = _levels(x).sum((1, 2, 3)), _levels(a).sum((1, 2, 3))
    assert (ink_a > ink_x * 1.05).float().mean() > 0.25  # thicker
    assert (ink_a < ink_x * 0.95).float().mean() > 0.25  # thinner


# --------------------------------------------------------------------------- CLI


def test_train_demo_cli_refuses_flow_into_the_bundled_folder():
    r = CliRunner().invoke(cli, ["train-demo", "--objective", "flow", "--steps", "1"])
    assert r.exit_code == 2
    assert "--out" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["train-demo", "--help"])
    assert "--objective" in r.output and "--augment" in r.output and "--sigma-sampling" in r.output
