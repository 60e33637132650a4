"""The shipped demo model and the in-process CLI commands, end to end (no services)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import job_commands, local_commands  # noqa: F401 - registers commands
from orchestrator.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
LABELS = DIGITS / "labels.txt"


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """Three held-out scans per class, in a labelled folder."""
    out = tmp_path_factory.mktemp("digits")
    for d in sorted(p for p in DIGITS.iterdir() if p.is_dir()):
        (out / d.name).mkdir()
        for f in sorted(d.glob("*.png"))[:3]:
            shutil.copy(f, out / d.name / f.name)
    shutil.copy(LABELS, out / "labels.txt")
    return out


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_eval_on_demo_model_is_accurate_and_reports_json(small_digits):
    r = invoke("eval", str(small_digits), "-o", "json", "--no-progress")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n_images"] == 30
    assert summary["accuracy"] >= 0.9
    for key in ("mean_evals_per_image", "ece", "median_evals_per_image", "confusion"):
        assert key in summary
    # pruning: far fewer than the no-pruning budget of 10 classes x 2000 samples
    assert 10 * 5 <= summary["mean_evals_per_image"] < 10 * 100
    assert sum(map(sum, summary["confusion"])) == 30
    assert summary["labels"][:3] == ["zero", "one", "two"]  # labels.txt order


def test_classify_reports_bad_files_and_labels_the_rest(small_digits, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    seven = sorted((small_digits / "seven").glob("*.png"))[0]
    r = invoke("classify", str(seven), str(bad), "--labels-file", str(LABELS), "-o", "jsonl",
               "--no-progress")
    assert r.exit_code == 3  # partial success
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    by_uri = {row["uri"]: row for row in rows}
    assert by_uri[str(seven)]["label"] == "seven"
    assert by_uri[str(seven)]["status"] == "done"
    assert 0.0 <= by_uri[str(seven)]["confidence"] <= 1.0
    assert by_uri[str(bad)]["status"] == "failed"
    assert "broken.png" in by_uri[str(bad)]["error"]
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args, needle", [
    (["--labels", ""], "empty"),
    (["--labels", "cat"], "at least two"),
    (["--labels", "cat,Cat"], "duplicate"),
    (["--labels", "cat,dog", "--template", "a photo"], "{}"),
    (["--labels", "cat,dog", "--model", "/no/such/model"], "/no/such/model"),
])
def test_usage_errors_are_one_line(args, needle, small_digits):
    seven = sorted((small_digits / "seven").glob("*.png"))[0]
    r = CliRunner().invoke(cli, ["classify", str(seven), *args, "--no-progress"])
    assert r.exit_code in (1, 2), r.output
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr
    assert "Traceback" not in r.output


def test_calibrate_writes_mapping_used_by_eval(small_digits, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "digits", model)
    (model / "calibration.json").unlink(missing_ok=True)
    # Two samples per class: cheap and wrong often enough to have something to calibrate.
    budget = ["--min-scores", "2", "--max-scores", "2", "--no-progress"]
    r = invoke("calibrate", str(small_digits), "--model", str(model), *budget)
    assert r.exit_code == 0, r.output
    cal = json.loads((model / "calibration.json").read_text())
    assert cal["method"] == "platt" and cal["n_fit"] == 30
    assert 0 < cal["fit_accuracy"] < 1
    assert cal["ece_fit"] <= cal["ece_uncalibrated"]
    r = invoke("eval", str(small_digits), "--model", str(model), "-o", "json", *budget)
    assert json.loads(r.stdout.strip().splitlines()[-1])["calibrated"] is True


def test_calibrate_refuses_a_folder_with_no_mistakes(small_digits, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "digits", model)
    one_class = tmp_path / "easy"
    for label in ("zero", "one"):
        shutil.copytree(small_digits / label, one_class / label)
    r = CliRunner().invoke(cli, ["calibrate", str(one_class), "--model", str(model), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "right and wrong" in r.stderr
    assert not (model / "calibration.json").exists()
