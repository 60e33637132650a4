"""Everything a user hands the engine: image bytes, label lists, templates, model ids,
and the calibration data. Bad input must end in one typed, one-line error naming it."""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker import calibration as calib
from worker.errors import BadImageError, ModelNotFoundError, PermanentError, UsageError
from worker.images import decode, to_rgb
from worker.labels import parse_labels, prompts, validate_labels, validate_template


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_rgb(size=(24, 20), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _assert_one_line_naming(err: BaseException, name: str) -> None:
    msg = str(err)
    assert "\n" not in msg and name in msg, msg
    assert isinstance(err, PermanentError)


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_bad_image(fmt, tmp_path):
    data = _encode(_noise_rgb((64, 64)), fmt)
    for cut in (len(data) // 2, 40, 4):
        with pytest.raises(BadImageError) as e:
            decode(data[:cut], f"cut.{fmt.lower()}")
        _assert_one_line_naming(e.value, f"cut.{fmt.lower()}")
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError) as e:
        decode(path)
    _assert_one_line_naming(e.value, str(path))


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\nsecond line\n")
    with pytest.raises(BadImageError) as e:
        decode(path)
    _assert_one_line_naming(e.value, str(path))
    with pytest.raises(BadImageError) as e:
        decode(path.read_bytes(), "notes.png")
    _assert_one_line_naming(e.value, "notes.png")


def test_zero_bytes(tmp_path):
    with pytest.raises(BadImageError) as e:
        decode(b"", "empty.jpg")
    _assert_one_line_naming(e.value, "empty.jpg")
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadImageError) as e:
        decode(path)
    _assert_one_line_naming(e.value, str(path))


def test_missing_file_is_bad_image(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(BadImageError) as e:
        decode(path)
    _assert_one_line_naming(e.value, str(path))


def test_rgb_roundtrip_is_unchanged():
    im = _noise_rgb()
    out = decode(_encode(im, "PNG"), "ok.png")
    assert out.mode == "RGB" and out.size == im.size
    assert np.array_equal(np.asarray(out), np.asarray(im))


def test_cmyk_jpeg_to_rgb():
    im = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: white
    im.paste((0, 255, 255, 0), (0, 0, 8, 8))  # magenta + yellow: red
    out = decode(_encode(im, "JPEG", quality=95), "cmyk.jpg")
    assert out.mode == "RGB" and out.size == (16, 8)
    a = np.asarray(out).astype(int)
    assert np.all(a[4, 12] > 240)  # white
    assert a[4, 3, 0] > 200 and a[4, 3, 1] < 60 and a[4, 3, 2] < 60  # red


def test_16_bit_png_to_rgb():
    a = np.zeros((4, 4), dtype=np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 65535, 32768, 256
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = decode(_encode(im, "PNG"), "deep.png")
    assert out.mode == "RGB"
    px = np.asarray(out).astype(int)
    assert tuple(px[0, 0]) == (255, 255, 255)
    assert abs(px[0, 1, 0] - 128) <= 1 and px[0, 1, 0] == px[0, 1, 1] == px[0, 1, 2]
    assert px[0, 2, 0] <= 1 and px[1, 1, 0] == 0  # scaled, not clipped to white


def test_palette_png_to_rgb():
    im = _noise_rgb().quantize(colors=8)
    assert im.mode == "P"
    out = decode(_encode(im, "PNG"), "pal.png")
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(im.convert("RGB")))


def test_palette_with_transparency_and_rgba_composite_on_black():
    rgba = Image.new("RGBA", (4, 2), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))  # fully transparent
    rgba.putpixel((1, 0), (200, 100, 50, 128))  # half
    out = decode(_encode(rgba, "PNG"), "alpha.png")
    assert out.mode == "RGB"
    px = np.asarray(out).astype(int)
    assert tuple(px[0, 0]) == (0, 0, 0)
    assert tuple(px[1, 1]) == (200, 100, 50)
    assert abs(px[0, 1, 0] - 100) <= 2
    la = to_rgb(Image.new("LA", (2, 2), (90, 255)))
    assert la.mode == "RGB" and la.getpixel((0, 0)) == (90, 90, 90)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = decode(_encode(pal, "PNG"), "palt.png")
    assert out.mode == "RGB" and out.getpixel((1, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["L", "1", "I", "F", "YCbCr", "LAB", "HSV"])
def test_every_mode_becomes_rgb(mode):
    assert to_rgb(Image.new(mode, (3, 3))).mode == "RGB"


def test_pixel_limit_from_settings(monkeypatch):
    from orchestrator.settings import Settings

    data = _encode(_noise_rgb((20, 20)), "PNG")
    monkeypatch.setenv("DIFFLABEL_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(BadImageError) as e:
        decode(data, "big.png", max_pixels=Settings.from_env().max_image_pixels)
    _assert_one_line_naming(e.value, "big.png")
    assert "DIFFLABEL_MAX_IMAGE_PIXELS" in str(e.value)
    monkeypatch.setenv("DIFFLABEL_MAX_IMAGE_PIXELS", "400")
    assert decode(data, "big.png", max_pixels=Settings.from_env().max_image_pixels).size == (20, 20)


def test_pixel_limit_raised_above_pillows_own(monkeypatch):
    # Simulate a 100M-pixel image under DIFFLABEL_MAX_IMAGE_PIXELS=200M by shrinking
    # Pillow's limit instead of allocating one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    assert decode(_encode(_noise_rgb((20, 20)), "PNG"), "ok.png", max_pixels=10000).size == (20, 20)


def test_jpeg_draft_keeps_small_images_at_full_size():
    out = decode(_encode(_noise_rgb((300, 200)), "JPEG"), "small.jpg")
    assert out.size == (300, 200)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("raw", [[], [""], ["  ", "\t"]])
def test_empty_label_list(raw):
    with pytest.raises(UsageError) as e:
        validate_labels(raw)
    assert "\n" not in str(e.value) and "empty" in str(e.value)


def test_one_label():
    with pytest.raises(UsageError) as e:
        validate_labels(["cat"])
    assert "\n" not in str(e.value) and "cat" in str(e.value)


@pytest.mark.parametrize("raw", [["cat", "dog", "Cat"], ["cat", "DOG", "dog"], ["a  b", "A b"]])
def test_duplicate_labels_case_insensitive(raw):
    with pytest.raises(UsageError) as e:
        validate_labels(raw)
    assert "\n" not in str(e.value) and "duplicate" in str(e.value)


def test_labels_whitespace_normalised_and_order_kept():
    assert validate_labels([" golden  retriever ", "cat", "", "tabby\tcat"]) == [
        "golden retriever", "cat", "tabby cat"]


def test_parse_labels_text_and_file(tmp_path):
    assert parse_labels("cat, dog ,bird") == ["cat", "dog", "bird"]
    f = tmp_path / "labels.txt"
    f.write_text("# animals\ncat\n\ndog, with comma\n", encoding="utf-8")
    assert parse_labels(file=f) == ["cat", "dog, with comma"]
    for kwargs in ({}, {"text": "a,b", "file": f}, {"file": tmp_path / "missing.txt"}):
        with pytest.raises(UsageError) as e:
            parse_labels(**kwargs)
        assert "\n" not in str(e.value)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\ndog\n".encode("latin-1"))
    with pytest.raises(UsageError, match="UTF-8"):
        parse_labels(file=bad)


@pytest.mark.parametrize("template", [
    "a photo", "a {} and a {}", "{} {{}}", "a {0}", "a {label}", "a {} }", "a { {}", "{}}",
])
def test_bad_templates(template):
    with pytest.raises(UsageError) as e:
        validate_template(template)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError):
        prompts(template, ["cat", "dog"])


def test_good_templates():
    assert validate_template("{}") == "{}"
    assert validate_template("a photo of a {}.") == "a photo of a {}."


def test_labels_with_quotes_and_braces_survive_prompts():
    labels = validate_labels(['say "cheese"', "it's {x}", "{}", "100% {0} \\n"])
    out = prompts("a photo of a {}.", labels)
    assert out == [f"a photo of a {s}." for s in labels]
    assert out[2] == "a photo of a {}."


# --------------------------------------------------------------------------- models


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a socket or resolve a name; record the attempts."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a unit test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_nonexistent_path(no_network, tmp_path):
    from worker.backends import load_backend

    for spec in (str(tmp_path / "no" / "such" / "model"), "./no-such-model", "~/no-such-model-xyz"):
        with pytest.raises(ModelNotFoundError) as e:
            load_backend(spec, device="cpu")
        _assert_one_line_naming(e.value, spec)
    assert not no_network


def test_existing_dir_that_is_not_a_model(no_network, tmp_path):
    from worker.backends import load_backend

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(empty), device="cpu")
    _assert_one_line_naming(e.value, str(empty))
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(a_file), device="cpu")
    _assert_one_line_naming(e.value, str(a_file))
    half = tmp_path / "half-downloaded"  # model_index.json but no components
    half.mkdir()
    (half / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(half), device="cpu")
    _assert_one_line_naming(e.value, str(half))
    assert not no_network


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 both in the environment and in huggingface_hub's import-time
    constant, with an empty cache, so no lookup can reach the network or a real cache."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_HUB_CACHE", str(cache), raising=False)
    return cache


def test_hub_id_offline_not_cached(no_network, offline_hub):
    from worker.backends import load_backend

    spec = "nonexistent-org/nonexistent-model"
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(spec, device="cpu")
    _assert_one_line_naming(e.value, spec)
    assert "HF_HUB_OFFLINE" in str(e.value)
    assert not no_network


def test_hub_id_download_failure_is_model_not_found(no_network, offline_hub, monkeypatch):
    """Online mode with the network down: the hub error becomes a ModelNotFoundError."""
    import huggingface_hub

    from worker.backends import load_backend

    def fail(repo_id, **kwargs):
        raise OSError(f"cannot reach the hub for {repo_id}")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    spec = "nonexistent-org/nonexistent-model"
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(spec, device="cpu")
    _assert_one_line_naming(e.value, spec)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_unet_weights(tiny_pixel_model, tmp_path):
    from worker.backends import load_backend

    d = _copy_model(tiny_pixel_model, tmp_path / "m")
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(d), device="cpu")
    _assert_one_line_naming(e.value, str(d))


def test_corrupt_text_encoder_weights(tiny_pixel_model, tmp_path):
    from worker.backends import load_backend

    d = _copy_model(tiny_pixel_model, tmp_path / "m")
    w = d / "text_encoder" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(d), device="cpu")
    _assert_one_line_naming(e.value, str(d))


def test_corrupt_difflabel_json(tiny_pixel_model, tmp_path):
    from worker.backends import load_backend

    d = _copy_model(tiny_pixel_model, tmp_path / "m")
    (d / "difflabel.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(d), device="cpu")
    _assert_one_line_naming(e.value, str(d))


def test_flow_matching_latent_unet_is_refused(tiny_pixel_model, tmp_path):
    """A flow-matching pixel UNet loads (tests/test_flow_demo.py); a latent one is refused."""
    from worker.backends import load_backend

    d = _copy_model(tiny_pixel_model, tmp_path / "m")
    (d / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))
    meta = json.loads((d / "difflabel.json").read_text())
    (d / "difflabel.json").write_text(json.dumps({**meta, "family": "latent"}))
    with pytest.raises(UsageError, match="flow-matching"):
        load_backend(str(d), device="cpu")


# --------------------------------------------------------------------------- calibration


def _synthetic_runs(rng: np.random.Generator, n: int, n_classes: int = 10):
    """Items whose chance of being right falls with n_evals, while the raw separation
    signal stays near 1 for all of them (overconfident, as an uncalibrated signal is)."""
    evals_per_class = rng.uniform(2.0, 60.0, n)
    p_true = 1.0 / (1.0 + np.exp(0.12 * (evals_per_class - 25.0)))
    correct = rng.random(n) < p_true
    rows = [{"n_evals": float(e * n_classes), "n_classes": n_classes,
             "separation": float(rng.uniform(0.95, 0.999)),
             "margin": float(rng.gamma(2.0, 0.01))} for e in evals_per_class]
    return rows, correct, p_true


def test_calibration_beats_raw_signal_on_held_out_data():
    rng = np.random.default_rng(0)
    train_rows, train_y, _ = _synthetic_runs(rng, 600)
    test_rows, test_y, p_true = _synthetic_runs(rng, 600)
    cal = calib.fit(train_rows, train_y)
    conf = np.array([calib.apply(cal, r["n_evals"], r["n_classes"], r["separation"], r["margin"])
                     for r in test_rows])
    raw = np.array([r["separation"] for r in test_rows])
    assert np.all((conf >= 0.0) & (conf <= 1.0))
    ece_cal = calib.expected_calibration_error(conf, test_y)
    ece_raw = calib.expected_calibration_error(raw, test_y)
    assert ece_cal < 0.08 < 0.2 < ece_raw, (ece_cal, ece_raw)
    # More evaluations -> lower confidence, as the data says.
    assert np.corrcoef([r["n_evals"] for r in test_rows], conf)[0, 1] < -0.8
    assert np.mean(np.abs(conf - p_true)) < 0.08
    json.dumps(cal)  # stored beside the model as JSON


# calibration.apply uses 1 / (1 + exp(-z)), which overflows (harmlessly, to 0) at the extremes.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_calibration_apply_stays_in_unit_interval_at_extremes():
    rng = np.random.default_rng(1)
    rows, y, _ = _synthetic_runs(rng, 200)
    cal = calib.fit(rows, y)
    for n_evals, sep, m in [(0, 0.0, -5.0), (1e9, 1.0, 1e6), (10, 0.5, 0.0), (1, 1.0, -1e6)]:
        p = calib.apply(cal, n_evals, 10, sep, m)
        assert 0.0 <= p <= 1.0 and np.isfinite(p)


def test_calibration_fit_degenerate_inputs():
    rows = [{"n_evals": 40.0, "n_classes": 2, "separation": 0.9, "margin": 0.0}] * 5
    cal = calib.fit(rows, [True] * 5)  # constant features, one outcome
    p = calib.apply(cal, 40.0, 2, 0.9, 0.0)
    assert 0.5 < p <= 1.0


def test_expected_calibration_error_known_values():
    assert calib.expected_calibration_error([], []) == 0.0
    assert calib.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert calib.expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == \
        pytest.approx(0.4)
