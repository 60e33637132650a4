"""`difflabel serve`: the status page, served by the real command and read by a real browser
(Debian's chromium, driven by Playwright), over a real job in Postgres.

The job is labelled for real (`submit --local`, tiny model, real image files); reviewers'
labels are written into items.reviewed_label as a review would. The database URL carries a
password and the environment S3 credentials: neither may appear in anything served.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select as sql_select, update

from itsupport import FAST, LABELS, REPO, items_of
from orchestrator import jobs
from orchestrator.schema import Item
from worker.config import ScoringConfig

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "Pw-serve-0xC0FFEE"
S3_SECRET = "S3SECRET-serve-never-shown"
S3_TOKEN = "S3TOKEN-serve-never-shown"
ARTIFACTS = Path(os.environ.get("DIFFLABEL_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def with_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def env(service_env) -> dict[str, str]:
    """The user's environment, with a password in the database URL (trust auth ignores it)
    and S3 credentials that must never be shown."""
    return {**service_env, "DIFFLABEL_DATABASE_URL": with_password(service_env["DIFFLABEL_DATABASE_URL"]),
            "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_SESSION_TOKEN": S3_TOKEN}


@pytest.fixture(scope="module")
def labelled_job(difflabel, Session, model, tmp_path_factory, s3, token) -> dict:
    """A finished job over 10 real images (8 digit scans, 2 larger pictures), 6 of them
    reviewed (4 agreeing with the model), and a second job still waiting for workers, whose
    items are a scan, a text file and two S3 objects (one of them deleted since)."""
    from itsupport import digit_pngs

    folder = tmp_path_factory.mktemp("serve") / "photos"
    folder.mkdir()
    for i, src in enumerate(digit_pngs(8)):
        shutil.copyfile(src, folder / f"scan{i:02d}.png")
    for i, size in enumerate([(240, 160), (120, 300)]):
        im = Image.new("RGB", size)
        im.putdata([((x * 255) // size[0], (y * 255) // size[1], 128 + 60 * i)
                    for y in range(size[1]) for x in range(size[0])])
        im.save(folder / f"photo{i}.jpg", quality=90)
    r = difflabel("submit", str(folder), "--labels", ",".join(LABELS), "--model", model, *FAST,
                  "--no-progress", "--local", "--name", "serve-demo")
    assert r.code in (0, 3), r
    job_id = int(r.last_line)
    items = items_of(Session, job_id)
    done = sorted((it for it in items.values() if it.status == "done"), key=lambda it: it.id)
    assert len(done) >= 8, r
    reviews = {it.id: it.label for it in done[:4]}  # reviewers agree...
    reviews.update({it.id: next(x for x in LABELS if x != it.label) for it in done[4:6]})  # ...and not
    with Session.begin() as s:
        for item_id, lab in reviews.items():
            s.execute(update(Item).where(Item.id == item_id).values(reviewed_label=lab, reviewed_by="test:reviewer"))
    # a second job nobody works on: running, nothing finished
    not_image = folder.parent / "notes.png"
    not_image.write_text("not a picture\n")
    bucket = f"serve-{token}"
    s3.client().create_bucket(Bucket=bucket)
    png = io.BytesIO()
    Image.new("RGB", (200, 150), (30, 90, 200)).save(png, "PNG")
    s3.client().put_object(Bucket=bucket, Key="in/blue.png", Body=png.getvalue())
    in_s3 = f"s3://{bucket}/in/blue.png"
    with Session.begin() as s:
        other = jobs.create_job(s, source="/data/waiting", model=model, template="a photo of a {}",
                                labels=LABELS, prompts=[f"a photo of a {x}" for x in LABELS],
                                config=ScoringConfig(), name="waiting")
        jobs.add_items(s, other, [(str(folder / "scan00.png"), None, None), (str(not_image), None, None),
                                  (in_s3, None, None), (f"s3://{bucket}/gone.png", None, None)])
        other_id = other.id
    with Session() as s:
        other_items = dict(s.execute(sql_select(Item.uri, Item.id).where(Item.job_id == other_id)).all())
    return {"id": job_id, "done": {it.id: it for it in done}, "items": items, "reviews": reviews,
            "other": other_id, "other_item": other_items[str(folder / "scan00.png")],
            "not_image": other_items[str(not_image)], "in_s3": other_items[in_s3],
            "gone": other_items[f"s3://{bucket}/gone.png"], "folder": folder}


class Served:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def get(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url.split("#")[0] + path.lstrip("/"), method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, path: str):
        code, _, body = self.get(path)
        assert code == 200, (path, code, body[:500])
        return json.loads(body)


def start_serve(env: dict, *args: str, timeout: float = 60) -> tuple[subprocess.Popen, str, str]:
    """``difflabel serve ARGS`` in the background; returns it, the first stdout line and the
    stderr read so far (the URL is printed once the socket listens)."""
    proc = subprocess.Popen([str(BIN / "difflabel"), "serve", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    line = ""
    while not line:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError("serve printed no URL in time")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline().strip()
    err = b""  # written before the URL: there already
    while select.select([proc.stderr], [], [], 0.3)[0]:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        err += chunk
    return proc, line, err.decode()


@pytest.fixture(scope="module")
def served(env, labelled_job):
    proc, url, err = start_serve(env, "--port", "0", "--job", str(labelled_job["id"]))
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/#job={labelled_job['id']}", url), url
    assert PASSWORD not in err and ":***@" in err, err  # "serving postgresql://postgres:***@..."
    yield Served(proc, url)
    stop(proc)


def test_json_endpoints_read_the_job(served, labelled_job, Session):
    job_id, done = labelled_job["id"], labelled_job["done"]
    listing = served.json("/api/jobs")
    ids = [j["job"] for j in listing["jobs"]]
    assert ids[:2] == [labelled_job["other"], job_id] and listing["default_job"] == job_id
    assert listing["store"].startswith("postgresql://postgres:***@127.0.0.1:5432/")
    mine = listing["jobs"][1]
    assert mine["name"] == "serve-demo" and mine["progress"] == 1.0 and mine["finished"] == 10
    assert listing["jobs"][0]["status"] == "running" and listing["poll_s"] <= 5  # a job runs: poll often

    d = served.json(f"/api/jobs/{job_id}")
    s = d["summary"]
    assert (s["job"], s["items"], s["done"], s["labels"]) == (job_id, 10, len(done), LABELS)
    h = d["histogram"]
    assert h["items"] == len(done) == sum(h["counts"]) and len(h["counts"]) == 20
    start, step = round(h["lo"] * 1000), round((1 - h["lo"]) * 1000) // 20
    want = [0] * 20
    for it in done.values():  # each item in its bin
        assert it.confidence >= h["lo"]
        want[min((int(it.confidence * 1000) - start) // step, 19)] += 1
    assert h["counts"] == want
    t = d["throughput"]
    assert sum(t["done"]) + sum(t["failed"]) == 10 and t["width_s"] >= 1
    c = d["confusion"]
    assert (c["reviewed"], c["agree"], c["hidden"]) == (6, 4, 0)
    at = {lab: i for i, lab in enumerate(c["labels"])}
    for item_id, lab in labelled_job["reviews"].items():
        assert c["cells"][at[done[item_id].label]][at[lab]] > 0
    assert sum(map(sum, c["cells"])) == 6
    least = d["least_confident"]
    want = sorted(done.values(), key=lambda it: (it.confidence, it.id))
    assert [x["id"] for x in least] == [it.id for it in want]
    assert {x["id"]: x["reviewed_label"] for x in least if x["reviewed_label"]} == labelled_job["reviews"]

    other = served.json(f"/api/jobs/{labelled_job['other']}")
    assert other["confusion"]["reviewed"] == 0 and other["histogram"]["items"] == 0
    assert other["throughput"]["start"] is None and other["least_confident"] == []


def test_thumbnails_only_for_items_of_the_job(served, labelled_job):
    job_id = labelled_job["id"]
    by_name = {Path(it.uri).name: it for it in labelled_job["items"].values()}
    code, headers, body = served.get(f"/api/jobs/{job_id}/items/{by_name['photo0.jpg'].id}/thumb")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (96, 64)  # 240x160 shrunk to fit 96
    code, _, body = served.get(f"/api/jobs/{job_id}/items/{by_name['photo1.jpg'].id}/thumb")
    assert code == 200 and Image.open(io.BytesIO(body)).size == (38, 96)
    code, _, body = served.get(f"/api/jobs/{job_id}/items/{by_name['scan00.png'].id}/thumb")
    assert code == 200 and Image.open(io.BytesIO(body)).size == (8, 8)  # never enlarged
    # an item of another job, under this job's path: refused, whatever its file
    code, _, body = served.get(f"/api/jobs/{job_id}/items/{labelled_job['other_item']}/thumb")
    assert code == 404 and b"has no item" in body
    # a listed file that is not an image: a one-line reason
    code, _, body = served.get(f"/api/jobs/{labelled_job['other']}/items/{labelled_job['not_image']}/thumb")
    assert code == 404 and b"not an image" in body, body
    # S3 objects through the configured endpoint
    other = labelled_job["other"]
    code, _, body = served.get(f"/api/jobs/{other}/items/{labelled_job['in_s3']}/thumb")
    assert code == 200 and Image.open(io.BytesIO(body)).size == (96, 72)
    code, _, body = served.get(f"/api/jobs/{other}/items/{labelled_job['gone']}/thumb")
    assert code == 404 and b"no such object" in body, body
    assert served.get("/api/jobs/999999")[0] == 404
    assert served.get("/etc/passwd")[0] == 404
    assert served.get(f"/api/jobs/{job_id}/items/../../../etc/passwd/thumb")[0] == 404


def test_read_only_and_local_only(served):
    assert served.get("/api/jobs", method="POST")[0] == 405
    assert served.get("/api/jobs", method="DELETE")[0] == 405
    # a page on another site that rebinds its name to 127.0.0.1 gets nothing
    assert served.get("/api/jobs", headers={"Host": "attacker.example:8765"})[0] == 421
    code, headers, _ = served.get("/")
    assert code == 200 and "default-src 'none'" in headers["Content-Security-Policy"]


def until(page, js: str, timeout: float = 30.0):
    """Poll ``js`` (an expression) in the page until it is truthy. Not wait_for_function: its
    predicate is compiled with eval, which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while True:
        v = page.evaluate(js)
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {js}")
        time.sleep(0.1)


def test_page_in_a_real_browser(served, labelled_job, request):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: ./scripts/setup.sh installs Debian's chromium "
                    "(apt-get install -y --no-install-recommends chromium)", pytrace=False)
    from playwright.sync_api import sync_playwright

    job_id = labelled_job["id"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            outside: list[str] = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(served.url.split("#")[0]) else None)
            page.goto(served.url, wait_until="load")

            page.wait_for_selector("#job-title", state="visible")
            until(page, f"document.getElementById('job-title').textContent.startsWith('Job {job_id}')")
            assert page.inner_text("#job-title") == f"Job {job_id} · serve-demo"
            assert page.inner_text("#job-status") in ("done", "partial")
            assert page.inner_text("#stat-progress .v") == "100.0%"
            widths = page.eval_on_selector_all("#progress span", "els => els.map(e => e.style.width)")
            assert widths and widths[0].endswith("%")
            # Other tests' jobs share this database: the list holds at least this test's two.
            assert page.locator("#job-list tr").count() >= 2
            assert page.locator("#job-list").inner_text().count("serve-demo") >= 1
            assert page.locator("#throughput rect.bar").count() >= 1
            assert page.inner_text("#histogram-caption").startswith(f"{len(labelled_job['done'])} labelled items")
            h = served.json(f"/api/jobs/{job_id}")["histogram"]
            assert page.locator("#histogram rect.bar").count() == sum(1 for n in h["counts"] if n)

            table = page.locator("#confusion-table")
            assert table.is_visible()
            assert "6 items reviewed" in page.inner_text("#agreement") and "4 (66.7%)" in page.inner_text("#agreement")
            diag = page.eval_on_selector_all("#confusion-table td.diag", "els => els.map(e => e.textContent)")
            assert sum(int(x) for x in diag if x.isdigit()) == 4

            n = len(labelled_job["done"])
            until(page, f"document.querySelectorAll('#least img.thumb').length === {n} && "
                        "[...document.querySelectorAll('#least img.thumb')].every(i => i.complete)")
            natural = page.eval_on_selector_all("#least img.thumb", "els => els.map(i => i.naturalWidth)")
            assert len(natural) == n and all(w > 0 for w in natural), natural
            assert sorted(natural)[-1] == 96

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            html = page.content()
            # the other job, still running: chosen from the list, it says what it lacks
            page.click(f"#job-list tr[data-job='{labelled_job['other']}']")
            until(page, f"document.getElementById('job-title').textContent.startsWith('Job {labelled_job['other']}')")
            page.wait_for_selector("#no-reviews")
            assert page.inner_text("#no-reviews") == "no reviews yet"
            assert page.inner_text("#job-status") == "running"
            assert "refreshing every" in page.inner_text("#updated")
            assert not page.is_hidden("#least-empty")
            html += page.content()
            assert not errors, errors
            assert not outside, outside  # nothing but this server: no CDN, no fonts
        finally:
            browser.close()
    served_json = b"".join(served.get(p)[2] for p in ("/api/jobs", f"/api/jobs/{job_id}",
                                                       f"/api/jobs/{labelled_job['other']}", "/api/jobs/999999"))
    everything = html.encode() + served_json
    for secret in (PASSWORD, S3_SECRET, S3_TOKEN):
        assert secret.encode() not in everything
    assert b"postgres:***@" in everything


def test_bad_invocations_say_what_to_do(env, labelled_job, difflabel):
    r = difflabel("serve", "--job", "987654", env={"DIFFLABEL_DATABASE_URL": env["DIFFLABEL_DATABASE_URL"]})
    assert r.code == 2 and r.stderr.strip() == "error: no job 987654: `difflabel list` shows the jobs", r
    proc, url, _ = start_serve(env, "--port", "0")
    try:
        port = url.rsplit(":", 1)[1].strip("/")
        r = difflabel("serve", "--port", port, env={"DIFFLABEL_DATABASE_URL": env["DIFFLABEL_DATABASE_URL"]})
        assert r.code == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr, r
        assert "Traceback" not in r.stderr
    finally:
        stop(proc)
    proc, url, err = start_serve(env, "--host", "0.0.0.0", "--port", "0")
    try:
        warnings = [x for x in err.splitlines() if x.startswith("warning:")]
        assert len(warnings) == 1 and "not a loopback address" in warnings[0], err
        assert PASSWORD not in err
    finally:
        stop(proc)


def test_reviews_show_up_without_a_restart(served, labelled_job, Session):
    """A finished job's figures are cached, its reviews are not: a review written now shows
    in the confusion and on its item within a refresh."""
    from itsupport import wait_for

    job_id = labelled_job["id"]
    served.json(f"/api/jobs/{job_id}")  # cached
    item = next(i for i in labelled_job["done"] if i not in labelled_job["reviews"])
    with Session.begin() as s:
        s.execute(update(Item).where(Item.id == item).values(reviewed_label="bird"))
    try:
        d = wait_for(lambda: (lambda d: d if d["confusion"]["reviewed"] == 7 else None)(
            served.json(f"/api/jobs/{job_id}")), timeout=15, what="the new review on the page")
        assert {x["id"]: x["reviewed_label"] for x in d["least_confident"]}[item] == "bird"
    finally:
        with Session.begin() as s:
            s.execute(update(Item).where(Item.id == item).values(reviewed_label=None))
