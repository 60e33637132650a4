"""Review in a real Label Studio: `difflabel export -f label-studio` imported as a stock user
does it, `difflabel review push / pull / stats`, and the reviewed labels in `results` and
`dataset`.

The server is the `label-studio` package from its own virtual environment
(scripts/label_studio.sh, which also keeps a migrated empty SQLite database to start from),
started once for this module on a free port with a temporary data dir and local-files serving
on. Its admin signs up on the command line and takes a personal access token through the web
login, as a user does; a reviewer signs up through the web form and answers through the API
with their browser session, as Label Studio's own page does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from itsupport import _die_with_parent, free_port, stop, unavailable, FAST, LABELS, REPO, items_of

pytestmark = [pytest.mark.integration,
              # label-studio-sdk's own token refresh, when the client runs in this process
              pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")]

ADMIN, ADMIN_PASSWORD = "admin@example.com", "admin-pass-1234"
REVIEWER, REVIEWER_PASSWORD = "reviewer@example.com", "reviewer-pass-1234"
START_TIMEOUT = 240  # a fresh server on a busy 2-core machine: about 20 s, more under load










@dataclass
class LabelStudio:
    url: str
    docroot: Path
    token: str  # the admin's personal access token (a JWT refresh token)
    log: Path

    def access(self) -> dict[str, str]:
        """An Authorization header from the personal access token, as Label Studio documents."""
        import requests

        r = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=30)
        r.raise_for_status()
        return {"Authorization": f"Bearer {r.json()['access']}"}

    def api(self, method: str, path: str, **kw):
        import requests

        r = requests.request(method, f"{self.url}{path}", headers=self.access(), timeout=60, **kw)
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else None

    def tasks(self, project: int) -> list[dict]:
        return self.api("GET", f"/api/tasks?project={project}&fields=all&page_size=1000")["tasks"]


def web_session(url: str, email: str, password: str, signup: bool = False):
    """A browser-like session: sign up (or log in) through Label Studio's web form."""
    import requests

    s = requests.Session()
    page = "/user/signup/" if signup else "/user/login/"
    s.get(url + page, timeout=30)
    r = s.post(url + page, data={"email": email, "password": password,
                                 "csrfmiddlewaretoken": s.cookies["csrftoken"]},
               headers={"Referer": url + page}, allow_redirects=False, timeout=30)
    assert r.status_code == 302, f"{page}: {r.status_code} {r.text[:300]}"
    s.headers.update({"X-CSRFToken": s.cookies["csrftoken"], "Referer": url + "/"})
    return s


@dataclass
class Booting:
    proc: subprocess.Popen
    docroot: Path
    log: Path
    started: float


@pytest.fixture(scope="module")
def booting(tmp_path_factory) -> Iterator[Booting]:
    """The server process, started; `label_studio` waits for it (the job runs meanwhile)."""
    r = subprocess.run([str(REPO / "scripts" / "label_studio.sh")], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        unavailable("Label Studio (./scripts/label_studio.sh could not create .venv-label-studio)",
                    (r.stderr.strip().splitlines() or ["no output"])[-1])
    exe = REPO / r.stdout.strip().splitlines()[-1]
    base = tmp_path_factory.mktemp("label-studio")
    data, docroot, log = base / "data", base / "docroot", base / "server.log"
    shutil.copytree(exe.parents[1] / "template", data)  # migrated once by the script
    docroot.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFLABEL_", "LABEL_STUDIO_"))}
    env.update({"LABEL_STUDIO_BASE_DATA_DIR": str(data), "LOCAL_FILES_SERVING_ENABLED": "true",
                "LOCAL_FILES_DOCUMENT_ROOT": str(docroot), "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false"})
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                 "--port", str(free_port()), "--data-dir", str(data),
                                 "--username", ADMIN, "--password", ADMIN_PASSWORD],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        yield Booting(proc, docroot, log, time.monotonic())
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def label_studio(booting, job) -> LabelStudio:
    """The server, up, with the admin's personal access token."""
    import requests

    proc, log, start = booting.proc, booting.log, booting.started
    url = None
    while True:
        text = log.read_text(errors="replace")
        if url is None and (m := re.search(r"Starting development server at (http://[\d.]+:\d+)/", text)):
            url = m.group(1)  # Label Studio moves to the next port if ours was taken meanwhile
        if url:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
        if proc.poll() is not None:
            pytest.fail(f"Label Studio exited with {proc.returncode}:\n{text[-3000:]}")
        if time.monotonic() - start > START_TIMEOUT:
            pytest.fail(f"Label Studio not up after {START_TIMEOUT} s:\n{text[-3000:]}")
        time.sleep(0.5)
    print(f"Label Studio up {time.monotonic() - start:.1f} s after its start, at {url}")
    admin = web_session(url, ADMIN, ADMIN_PASSWORD)
    token = admin.post(f"{url}/api/token/", timeout=30)
    assert token.status_code == 201, token.text
    return LabelStudio(url, booting.docroot, token.json()["token"], log)


@pytest.fixture(scope="module")
def job(booting, difflabel, model) -> int:
    """A finished local job of 8 images under the server's document root (labelled while the
    server starts)."""
    folder = booting.docroot / "photos"
    folder.mkdir()
    from itsupport import digit_pngs

    for i, src in enumerate(digit_pngs(8)):
        shutil.copyfile(src, folder / f"img{i:02d}.png")
    r = difflabel("submit", str(folder), "--labels", ",".join(LABELS), "--model", model, *FAST,
                  "--no-progress", "--local")
    assert r.code == 0, r
    return int(r.last_line)


def ls_env(label_studio: LabelStudio) -> dict[str, str]:
    return {"DIFFLABEL_LABEL_STUDIO_URL": label_studio.url, "DIFFLABEL_LABEL_STUDIO_API_KEY": label_studio.token,
            "DIFFLABEL_LABEL_STUDIO_DOCUMENT_ROOT": str(label_studio.docroot)}


def choice(result: list[dict]) -> str:
    (r,) = result
    assert r["type"] == "choices"
    (label,) = r["value"]["choices"]
    return label


def test_exported_tasks_import_into_a_stock_project(label_studio, difflabel, Session, job, model, tmp_path):
    ls = label_studio
    done = {it.id: it for it in items_of(Session, job).values() if it.status == "done"}
    out = tmp_path / "tasks.json"
    r = difflabel("export", job, "--format", "label-studio", "--to", out, "--document-root", ls.docroot)
    assert r.code == 0 and f"wrote {len(done)} tasks to {out}" in r.stderr, r

    # What a user does with the file: a project with the config `export --help` names, a
    # local-files storage for the images' folder, then the import endpoint.
    config = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
              + "".join(f'<Choice value="{lab}"/>' for lab in LABELS) + "</Choices></View>")
    project = ls.api("POST", "/api/projects", json={"title": "Imported export", "label_config": config})["id"]
    ls.api("POST", "/api/storages/localfiles", json={"project": project, "path": str(ls.docroot / "photos"),
                                                     "title": "photos", "use_blob_urls": False})
    import requests

    resp = requests.post(f"{ls.url}/api/projects/{project}/import", data=out.read_bytes(),
                         headers={**ls.access(), "Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == 201, resp.text
    imported = resp.json()
    assert imported["task_count"] == len(done) and imported["prediction_count"] == len(done), imported

    tasks = ls.tasks(project)
    assert len(tasks) == len(done)
    for t in tasks:
        it = done[t["data"]["difflabel_item"]]
        assert t["data"]["uri"] == it.uri and t["data"]["difflabel_job"] == job
        (pred,) = t["predictions"]
        assert choice(pred["result"]) == it.label
        assert pred["score"] == pytest.approx(it.confidence)
        assert pred["model_version"].startswith(f"{model} (") and "seed=0" in pred["model_version"]
        # the image, as the labelling page loads it
        img = requests.get(ls.url + t["data"]["image"], headers=ls.access(), timeout=30)
        assert img.status_code == 200 and img.content == Path(it.uri).read_bytes()


def test_presigned_s3_urls_fetch_the_image(s3, token, monkeypatch):
    """S3 images become presigned URLs that anyone holding them (a reviewer's browser) can read."""
    import requests

    from orchestrator.label_studio import ImageUrls

    c = s3.client()
    bucket = f"review-{token}"
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="a/b c.png", Body=b"\x89PNG fake")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    url = ImageUrls(endpoint_url=s3.endpoint_url, expires=600).url(f"s3://{bucket}/a/b c.png")
    assert "Expires=" in url
    assert requests.get(url, timeout=30).content == b"\x89PNG fake"
    assert ImageUrls(s3_urls="s3").url(f"s3://{bucket}/a/b c.png") == f"s3://{bucket}/a/b c.png"


def test_review_push_pull_stats_and_exports(label_studio, difflabel, Session, job, tmp_path, monkeypatch):
    import pandas as pd
    import requests
    from sklearn.metrics import cohen_kappa_score

    from orchestrator import review

    ls, env = label_studio, ls_env(label_studio)
    items = {it.id: it for it in items_of(Session, job).values()}
    least = sorted((it for it in items.values() if it.status == "done"), key=lambda it: (it.confidence, it.id))[:5]

    r = difflabel("review", "push", job, "--new-project", "difflabel review", "--least", "5", env=env)
    assert r.code == 0, r
    project = int(r.last_line)
    assert f"sent 5 to project {project}" in r.stderr and "connected local-files storage" in r.stderr, r
    again = difflabel("review", "push", job, "--least", "5", env=env)  # the job's project is remembered
    assert again.code == 0 and "sent 0" in again.stderr and "5 already there" in again.stderr, again
    n_projects = ls.api("GET", "/api/projects")["count"]
    rerun = difflabel("review", "push", job, "--new-project", "difflabel review", "--least", "5", env=env)
    assert rerun.code == 0 and "nothing sent, no project created" in rerun.stderr, rerun
    assert ls.api("GET", "/api/projects")["count"] == n_projects

    tasks = {t["data"]["difflabel_item"]: t for t in ls.tasks(project)}
    assert set(tasks) == {it.id for it in least}  # no duplicates, the least confident ones
    for page in (2, 5):  # the listing push and pull rely on: a short last page, a full one then none
        monkeypatch.setattr(review, "TASK_PAGE", page)
        assert {i: t.id for i, t in review.Connection(ls.url, ls.token).job_tasks(project, job).items()} == \
            {i: t["id"] for i, t in tasks.items()}
    refs = {it.id: it.review_ref for it in items_of(Session, job).values() if it.review_ref}
    assert refs == {i: f"label-studio:{ls.url}#{project}/{tasks[i]['id']}" for i in tasks}
    for it in least:
        (pred,) = tasks[it.id]["predictions"]
        assert choice(pred["result"]) == it.label and pred["score"] == pytest.approx(it.confidence)
    img = requests.get(ls.url + tasks[least[0].id]["data"]["image"], headers=ls.access(), timeout=30)
    assert img.status_code == 200 and img.content == Path(least[0].uri).read_bytes()

    # A reviewer signs up and answers in the browser: two agree, two do not, one is skipped.
    reviewer = web_session(ls.url, REVIEWER, REVIEWER_PASSWORD, signup=True)
    other = {it.id: next(lab for lab in LABELS if lab != it.label) for it in least}
    answers = {least[0].id: least[0].label, least[1].id: least[1].label,
               least[2].id: other[least[2].id], least[3].id: other[least[3].id]}
    ids = {}
    for item_id, label in answers.items():
        a = reviewer.post(f"{ls.url}/api/tasks/{tasks[item_id]['id']}/annotations/", timeout=30, json={
            "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                        "value": {"choices": [label]}}]})
        assert a.status_code == 201, a.text
        ids[item_id] = a.json()["id"]
    skip = reviewer.post(f"{ls.url}/api/tasks/{tasks[least[4].id]['id']}/annotations/", timeout=30,
                         json={"result": [], "was_cancelled": True})
    assert skip.status_code == 201, skip.text

    r = difflabel("review", "pull", job, env=env)
    assert r.code == 0 and "4 reviewed (4 changed by this pull), 1 awaiting review" in r.stderr, r
    reader = csv.DictReader(io.StringIO(difflabel("results", job, "-o", "csv").stdout))
    assert reader.fieldnames[-3:] == ["reviewed_label", "reviewed_by", "decided_by"]
    rows = {row["uri"]: row for row in reader}
    for it in items.values():
        row = rows[it.uri]
        if it.id in answers:
            assert (row["label"], row["reviewed_label"], row["reviewed_by"], row["decided_by"]) == \
                (it.label, answers[it.id], f"label-studio:{REVIEWER}", "review")
        else:
            assert (row["label"], row["reviewed_label"], row["reviewed_by"], row["decided_by"]) == \
                (it.label, "", "", "model")

    def check_stats(answers):
        st = json.loads(difflabel("review", "stats", job, "-o", "json").stdout)
        model = [items[i].label for i in answers]
        review = list(answers.values())
        agree = sum(m == v for m, v in zip(model, review))
        assert (st["finished"], st["sent"], st["awaiting"], st["reviewed"], st["agree"]) == \
            (len(items), 5, 1, 4, agree)
        assert st["agreement"] == pytest.approx(agree / 4)
        assert st["kappa"] == pytest.approx(cohen_kappa_score(model, review))
        assert st["reviewers"] == {f"label-studio:{REVIEWER}": 4}
        for m, v in zip(model, review):
            assert st["confusion"][st["labels"].index(v)][st["labels"].index(m)] >= 1
        assert sum(map(sum, st["confusion"])) == 4
        return st


    # The reviewer changes their mind on one: pull again mirrors it, and nothing else changes.
    changed = reviewer.patch(f"{ls.url}/api/annotations/{ids[least[3].id]}/", timeout=30, json={
        "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                    "value": {"choices": [least[3].label]}}]})
    assert changed.status_code == 200, changed.text
    answers[least[3].id] = least[3].label
    r = difflabel("review", "pull", job, env=env)
    assert r.code == 0 and "4 reviewed (1 changed by this pull)" in r.stderr, r
    st = check_stats(answers)
    assert st["agree"] == 3
    table = difflabel("review", "stats", job)
    assert table.code == 0 and "agreement        75.0%  (3 of 4; 1 changed by reviewers)" in table.stdout, table
    assert "Cohen's kappa" in table.stdout and "confusion (rows: reviewer, columns: model)" in table.stdout

    # Training sets carry the reviewed labels.
    pq = tmp_path / "labels.parquet"
    assert difflabel("dataset", job, "-f", "parquet", "--to", pq).code == 0
    df = pd.read_parquet(pq)
    assert {u: (v if isinstance(v, str) else None) for u, v in zip(df.uri, df.reviewed_label)} == \
        {it.uri: answers.get(it.id) for it in items.values() if it.status == "done"}
    assert dict(zip(df.uri, df.label)) == {it.uri: it.label for it in items.values() if it.status == "done"}
    tree = tmp_path / "train"
    assert difflabel("dataset", job, "-f", "imagefolder", "--to", tree).code == 0
    filed = {str(Path(os.readlink(p))): p.parent.name for p in tree.rglob("*.png")}
    assert filed == {it.uri: answers.get(it.id, it.label) for it in items.values() if it.status == "done"}


def test_bad_input_gets_one_line_naming_the_fix(label_studio, difflabel, job, model, make_images, tmp_path,
                                                idle_queue):
    env = ls_env(label_studio)

    def one_line(r, code, *words):
        assert r.code == code, r
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r
        for w in words:
            assert w in r.stderr, r

    nobody = f"http://127.0.0.1:{free_port()}"
    one_line(difflabel("review", "push", job, "--project", "1", env={**env, "DIFFLABEL_LABEL_STUDIO_URL": nobody}),
             69, f"Label Studio at {nobody} is unreachable", "--url")
    one_line(difflabel("review", "pull", job, "--api-key", "not-a-key", env=env), 2,
             "refused the API key", "--api-key")
    one_line(difflabel("review", "push", job, "--project", "9999", env=env), 2,
             "has no project 9999", "--new-project")

    folder = tmp_path / "queued"
    make_images(folder, 2)
    queued = difflabel("submit", folder, "--labels", ",".join(LABELS), "--model", model, *FAST,
                       "--no-progress", env={"DIFFLABEL_QUEUE": idle_queue})
    assert queued.code == 0, queued
    pending = int(queued.last_line)
    one_line(difflabel("review", "push", pending, "--new-project", "never made", env=env), 2,
             f"job {pending} has no finished items", "difflabel status")
    one_line(difflabel("review", "pull", pending, env=env), 2, "run `difflabel review push")
    one_line(difflabel("export", pending, "-f", "label-studio", "--to", tmp_path / "t.json"), 2,
             "no finished items")
