"""The review module's pure parts: agreement figures, choosing a task's answer, refs, the
labelling config and image URLs (the round trip through a real Label Studio is in
tests/integration/test_label_studio.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from orchestrator.label_studio import ImageUrls, labelling_config
from orchestrator.review import agreement, latest_answer, make_ref, parse_ref
from worker.errors import UsageError


def test_agreement_matches_sklearn_and_counts_the_confusion():
    from sklearn.metrics import cohen_kappa_score

    model = ["cat", "cat", "dog", "dog", "bird", "cat", "dog", "bird"]
    review = ["cat", "dog", "dog", "dog", "cat", "cat", "bird", "bird"]
    a = agreement(list(zip(model, review)), ["cat", "dog", "bird", "fish"])
    assert (a["reviewed"], a["agree"], a["disagree"]) == (8, 5, 3)
    assert a["agreement"] == pytest.approx(5 / 8)
    assert a["kappa"] == pytest.approx(cohen_kappa_score(model, review))
    assert a["labels"] == ["cat", "dog", "bird"]  # fish never occurs: left out
    # rows: reviewer, columns: model
    assert a["confusion"] == [[2, 0, 1], [1, 2, 0], [0, 1, 1]]
    assert a["per_label"]["cat"] == {"reviewed": 3, "model": 3, "agree": 2, "precision": 2 / 3, "recall": 2 / 3}
    # a reviewer's label the job does not have still counts
    b = agreement([("cat", "lynx"), ("cat", "cat")], ["cat", "dog"])
    assert b["labels"] == ["cat", "lynx"] and b["agreement"] == 0.5


def test_agreement_edge_cases():
    empty = agreement([], ["cat"])
    assert (empty["reviewed"], empty["agreement"], empty["kappa"]) == (0, None, None)
    same = agreement([("cat", "cat"), ("cat", "cat")])
    assert same["agreement"] == 1.0 and same["kappa"] is None  # one label only: chance agreement is 1


def test_latest_answer_takes_the_last_submitted_one():
    def ann(i, label, when, cancelled=False, name="label"):
        return {"id": i, "completed_by": 10 + i, "was_cancelled": cancelled, "updated_at": when,
                "result": [] if label is None else [{"from_name": name, "to_name": "image", "type": "choices",
                                                     "value": {"choices": [label]}}]}

    anns = [ann(1, "cat", "2026-01-01T10:00:00Z"), ann(2, "dog", "2026-01-02T10:00:00.5Z"),
            ann(3, None, "2026-01-03T10:00:00Z", cancelled=True), ann(4, "fish", "2026-01-04T10:00:00Z", name="x")]
    label, user, when = latest_answer(anns, "label")
    assert (label, user, when.day) == ("dog", 12, 2)
    assert latest_answer([anns[2]], "label") is None and latest_answer(None, "label") is None


def test_refs_round_trip():
    ref = make_ref("http://ls.example:8080/sub", 3, 41)
    assert ref == "label-studio:http://ls.example:8080/sub#3/41"
    assert parse_ref(ref) == ("http://ls.example:8080/sub", 3, 41)
    assert parse_ref("elsewhere:x") is None and parse_ref("label-studio:http://x#a/b") is None


def test_labelling_config_escapes_labels():
    labels = ['a "quoted" label', "x<y & z", "plain"]
    root = ET.fromstring(labelling_config(labels))
    assert [c.get("value") for c in root.iter("Choice")] == labels
    assert root.find("Choices").get("toName") == root.find("Image").get("name") == "image"


def test_local_image_urls_are_relative_to_the_document_root(tmp_path):
    urls = ImageUrls(document_root=str(tmp_path))
    assert urls.url(str(tmp_path / "a b" / "c#1.png")) == "/data/local-files/?d=a%20b/c%231.png"
    assert ImageUrls().url("/srv/x.png") == "/data/local-files/?d=srv/x.png"
    with pytest.raises(UsageError, match="not under the Label Studio document root"):
        urls.url("/elsewhere/x.png")
    with pytest.raises(UsageError, match="--url-expiry"):
        ImageUrls(expires=8 * 24 * 3600)
