"""Human review in Label Studio: send a job's least confident items to a project, bring the
reviewers' answers back into the job, and measure how often they agree with the model.

* ``push``: the job's finished, not yet reviewed items below a confidence (or the N least
  confident) become tasks of a Label Studio project, with the model's answer as a
  prediction (``orchestrator.label_studio``). Each item records its task in
  ``items.review_ref`` (``label-studio:URL#PROJECT/TASK``). Tasks carry the job and item ids,
  so pushing again sends only what the project does not hold yet, even after a push that
  was interrupted between Label Studio and the job store.
* ``pull``: each pushed item takes the latest submitted (not skipped) answer of its task:
  ``reviewed_label``, ``reviewed_by`` (``label-studio:EMAIL``), ``reviewed_at``. An item whose
  task has no answer any more loses them again: the job mirrors the project.
* ``agreement`` / ``stats``: model against reviewers on the reviewed items (agreement rate,
  Cohen's kappa, confusion, per-label precision and recall).

The model's own answer stays in ``items.label``; ``record`` is the one writer of the review
columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from orchestrator import jobs, s3
from orchestrator.label_studio import ImageUrls, Names, labelling_config, model_version, task
from orchestrator.schema import Item, ItemStatus
from worker.errors import PermanentError, ServiceUnavailableError, UsageError, first_line

#: ``items.review_ref`` of an item sent to Label Studio: ``label-studio:URL#PROJECT/TASK``.
REF_PREFIX = "label-studio:"
#: Tasks per import request (Label Studio takes up to 250,000 or 200 MB in one).
IMPORT_CHUNK = 1_000
#: Tasks per page when listing a project's tasks.
TASK_PAGE = 500
#: Seconds one Label Studio request may take.
DEFAULT_TIMEOUT = 60.0
KEY_FIX = ("give a valid --api-key (env DIFFLABEL_LABEL_STUDIO_API_KEY): a personal access token from "
           "Label Studio's Account & Settings page")

T = TypeVar("T")


# --------------------------------------------------------------------------- the job store


@dataclass(frozen=True)
class Review:
    """One reviewer's answer for one item."""

    label: str
    by: str
    at: datetime | None


def record(s: Session, answers: dict[int, Review | None]) -> int:
    """Write items' reviews (None clears one), one executemany; returns how many."""
    if answers:
        s.execute(update(Item), [{"id": item_id, "reviewed_label": r.label if r else None,
                                  "reviewed_by": r.by if r else None, "reviewed_at": r.at if r else None}
                                 for item_id, r in answers.items()])
    return len(answers)


def set_refs(s: Session, refs: dict[int, str]) -> None:
    """Remember where items were sent for review."""
    if refs:
        s.execute(update(Item), [{"id": item_id, "review_ref": ref} for item_id, ref in refs.items()])


def make_ref(url: str, project: int, task_id: int) -> str:
    return f"{REF_PREFIX}{url}#{project}/{task_id}"


def parse_ref(ref: str) -> tuple[str, int, int] | None:
    """(url, project, task) of a Label Studio ref, else None."""
    if not ref or not ref.startswith(REF_PREFIX):
        return None
    url, _, rest = ref[len(REF_PREFIX):].rpartition("#")
    project, _, task_id = rest.partition("/")
    try:
        return url, int(project), int(task_id)
    except ValueError:
        return None


def _done_count(s: Session, job_id: int) -> int:
    return s.scalar(select(func.count()).select_from(Item).where(
        Item.job_id == job_id, Item.status == ItemStatus.DONE.value)) or 0


def candidates(s: Session, job_id: int, *, below: float | None, least: int | None) -> list[Any]:
    """Finished items nobody reviewed yet, least confident first: those under ``below``,
    or the ``least`` least confident."""
    q = (select(Item.id, Item.uri, Item.label, Item.confidence, Item.review_ref)
         .where(Item.job_id == job_id, Item.status == ItemStatus.DONE.value, Item.reviewed_label.is_(None))
         .order_by(Item.confidence.asc(), Item.id.asc()))
    if below is not None:
        q = q.where(Item.confidence < below)
    if least is not None:
        q = q.limit(least)
    return list(s.execute(q).all())


# --------------------------------------------------------------------------- Label Studio


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    names: Names
    choices: list[str]


class Connection:
    """A Label Studio server reached through label-studio-sdk. Every failure becomes a
    one-line difflabel error that names the fix: unreachable (exit 69), a refused key, an
    unknown project (usage errors)."""

    def __init__(self, url: str | None, api_key: str | None, timeout: float = DEFAULT_TIMEOUT):
        if not url:
            raise UsageError("no Label Studio URL: give --url (env DIFFLABEL_LABEL_STUDIO_URL), "
                             "e.g. http://localhost:8080")
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--url {url!r} is not an http(s) URL: give e.g. http://localhost:8080")
        if not api_key:
            raise UsageError(f"no Label Studio API key: {KEY_FIX}")
        # The SDK's plain client: `label_studio_sdk.LabelStudio` adds helpers that import pandas
        # and the config parser (3 to 4 s of start-up on 2 cores) for nothing used here.
        try:
            from label_studio_sdk.base_client import LabelStudioBase as LabelStudio
        except ImportError as e:
            raise UsageError("review needs Label Studio's client: pip install 'difflabel[review]'") from e

        self.url = url.rstrip("/")
        self.client = self.call(lambda: LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout),
                                "use the API key")
        me = self.call(self.client.users.whoami, "check the API key")
        self.user = getattr(me, "email", None) or getattr(me, "username", None) or "?"
        self._emails: dict[int, str] = {}

    def call(self, fn: Callable[[], T], doing: str, project: int | None = None) -> T:
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            return fn()
        except ApiError as e:
            detail = _detail(e.body)
            if e.status_code == 401:
                raise UsageError(f"Label Studio at {self.url} refused the API key ({detail}): {KEY_FIX}") from e
            if e.status_code == 404 and project is not None:
                raise UsageError(f"Label Studio at {self.url} has no project {project}: check --project "
                                 "(the number in the project's URL), or create one with --new-project TITLE") from e
            if e.status_code == 403:
                raise UsageError(f"Label Studio at {self.url} does not let {getattr(self, 'user', 'this user')} "
                                 f"{doing} ({detail}): use an API key of a member of the project's "
                                 "organization") from e
            raise PermanentError(f"Label Studio at {self.url} could not {doing}: {detail}") from e
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(
                f"Label Studio at {self.url} is unreachable ({first_line(e, 160)}): check --url "
                "(env DIFFLABEL_LABEL_STUDIO_URL) and that the server is running") from e
        except ValueError as e:  # a 2xx answer that is not Label Studio's JSON
            raise PermanentError(f"{self.url} does not answer as a Label Studio server could "
                                 f"({first_line(e, 160)}): check --url") from e

    # -- projects

    def project(self, project_id: int) -> Project:
        p = self.call(lambda: self.client.projects.get(id=project_id), "read the project", project=project_id)
        return _project(p)

    def create_project(self, title: str, labels: list[str]) -> Project:
        p = self.call(lambda: self.client.projects.create(title=title, label_config=labelling_config(labels)),
                      f"create project {title!r}")
        return self.project(p.id)

    def job_tasks(self, project: int, job_id: int, *, answers: bool = False) -> dict[int, Any]:
        """The project's tasks of ``job_id``: item id -> task (with its annotations if ``answers``)."""
        def read():
            out = {}
            for t in self._tasks(project, "all" if answers else "task_only"):
                data = t.data or {}
                if data.get("difflabel_job") == job_id and isinstance(data.get("difflabel_item"), int):
                    out[data["difflabel_item"]] = t
            return out

        return self.call(read, "list the project's tasks", project=project)

    def _tasks(self, project: int, fields: str) -> Iterator[Any]:
        """Every task of the project, a page at a time (Label Studio answers 404 past the last)."""
        from label_studio_sdk.core.api_error import ApiError

        page = 1
        while True:
            try:
                items = self.client.tasks.list(project=project, fields=fields, page=page, page_size=TASK_PAGE).items
            except ApiError as e:
                if e.status_code == 404 and page > 1:
                    return
                raise
            yield from items or []
            if len(items or []) < TASK_PAGE:
                return
            page += 1

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        n = 0
        for i in range(0, len(tasks), IMPORT_CHUNK):
            chunk = tasks[i:i + IMPORT_CHUNK]
            r = self.call(lambda: self.client.projects.import_tasks(id=project, request=chunk),
                          "import tasks", project=project)
            n += getattr(r, "task_count", None) or 0
        return n

    def ensure_local_storage(self, project: int, folders: Iterable[str]) -> list[str]:
        """Connect a local-files storage for each folder the project's storages do not cover
        yet (Label Studio serves ``/data/local-files/`` only under one); returns those added."""
        have = [st.path.rstrip("/") for st in self.call(
            lambda: self.client.import_storage.local.list(project=project), "list the project's storages",
            project=project) if st.path]
        added = []
        for folder in sorted(set(folders)):
            if any(folder == p or folder.startswith(p + "/") for p in have):
                continue
            try:
                self.call(lambda: self.client.import_storage.local.create(
                    project=project, path=folder, title=f"difflabel {os.path.basename(folder) or folder}"[:250],
                    use_blob_urls=False), f"connect local-files storage {folder}", project=project)
            except PermanentError as e:
                raise UsageError(f"{e}. Start Label Studio with LOCAL_FILES_SERVING_ENABLED=true and "
                                 "LOCAL_FILES_DOCUMENT_ROOT set to a folder above the images, on the machine "
                                 "that holds them, and give the same folder as --document-root") from e
            have.append(folder)
            added.append(folder)
        return added

    def email(self, user_id: Any) -> str:
        if isinstance(user_id, dict):  # some endpoints expand the user
            return user_id.get("email") or str(user_id.get("id"))
        if user_id not in self._emails:
            try:
                u = self.call(lambda: self.client.users.get(id=user_id), "read a reviewer")
                self._emails[user_id] = u.email or u.username or f"user {user_id}"
            except PermanentError:
                self._emails[user_id] = f"user {user_id}"
        return self._emails[user_id]


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body.get("detail") or "")]
        for k, v in (body.get("validation_errors") or {}).items():
            parts.append(f"{k}: {'; '.join(map(str, v)) if isinstance(v, list) else v}")
        text = ": ".join(p for p in parts if p)
    else:
        text = str(body)
    text = " ".join(text.split())
    return (text[:240] + "...") if len(text) > 240 else (text or "no detail")


def _project(p: Any) -> Project:
    parsed = p.parsed_label_config or {}
    for name, control in parsed.items():
        if not isinstance(control, dict) or control.get("type") != "Choices":
            continue
        images = [i for i in control.get("inputs") or [] if i.get("type") == "Image"]
        if images and control.get("to_name"):
            return Project(p.id, p.title or "", Names(name, control["to_name"][0], images[0]["value"]),
                           list(control.get("labels") or []))
    raise UsageError(f"project {p.id} has no Choices over an Image in its labelling config: "
                     "create a project for the job with --new-project TITLE")


# --------------------------------------------------------------------------- push and pull


@dataclass
class Pushed:
    project: Project | None  # None: nothing to send, no project created
    selected: int = 0  # items chosen by --below / --least and not reviewed yet
    sent: int = 0  # new tasks
    already: int = 0  # already in the project
    elsewhere: int = 0  # left out of a new project: already sent to another one on this server
    storages: list[str] = field(default_factory=list)


def choose_project(s: Session, job_id: int, conn: Connection, project_id: int | None,
                   new_title: str | None) -> int | None:
    """``--project``, else the one project of this server the job was pushed to before."""
    if project_id is not None or new_title is not None:
        return project_id
    seen = {r[1] for ref in s.scalars(select(Item.review_ref).where(Item.job_id == job_id,
                                                                    Item.review_ref.is_not(None)).distinct())
            if (r := parse_ref(ref)) and r[0] == conn.url}
    if len(seen) == 1:
        return seen.pop()
    raise UsageError("give --project ID (an existing project) or --new-project TITLE" +
                     (f"; job {job_id} went to projects {', '.join(map(str, sorted(seen)))} here" if seen else ""))


def local_folders(uris: Iterable[str], urls: ImageUrls) -> list[str]:
    """The folders a project needs local-files storages for so that Label Studio serves these
    images: their common folder, or each image's own when that is the document root itself
    (which Label Studio refuses as a storage). Refuses images it cannot serve, before anything
    is created."""
    local = [os.path.abspath(u) for u in uris if not s3.is_s3(u)]
    if not local:
        return []
    root = os.path.abspath(os.path.expanduser(urls.document_root))
    for uri in local:
        urls.relative(uri)  # refuses an image outside the document root
    folders = {os.path.dirname(u) for u in local}
    if root in folders:
        raise UsageError(f"{local[0]} lies directly in the document root {root}, which Label Studio will not "
                         "serve: give --document-root (and the server's LOCAL_FILES_DOCUMENT_ROOT) a folder "
                         "above the images' folder")
    common = os.path.commonpath(sorted(folders))
    return [common] if common != root else sorted(folders)


def push(s: Session, job_id: int, conn: Connection, *, project_id: int | None = None,
         new_title: str | None = None, below: float | None = None, least: int | None = None,
         urls: ImageUrls = ImageUrls()) -> Pushed:
    """Send the chosen items (``candidates``) to the project (``project_id``, or a new one
    titled ``new_title``) and record their tasks in ``items.review_ref``."""
    job = jobs.get_job(s, job_id)
    labels = jobs.labels_of(s, job_id)
    if not _done_count(s, job_id):
        raise UsageError(f"job {job_id} has no finished items to review: wait for it (`difflabel status {job_id}`)")
    project_id = choose_project(s, job_id, conn, project_id, new_title)
    rows = candidates(s, job_id, below=below, least=least)
    elsewhere = 0
    if project_id is None:  # running the same `--new-project` twice must not copy the tasks
        kept = [r for r in rows if not ((p := parse_ref(r.review_ref or "")) and p[0] == conn.url)]
        elsewhere, rows = len(rows) - len(kept), kept
    local_folders((r.uri for r in rows), urls)  # images Label Studio could not show: refused before any change
    if project_id is not None:
        project = conn.project(project_id)
        missing = [lab for lab in labels if lab not in project.choices]
        if missing:
            raise UsageError(f"project {project_id} has no choice for the job's label(s) {', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}: add them to its labelling config, or "
                             "create a project for the job with --new-project TITLE")
    elif not rows:
        return Pushed(None, elsewhere=elsewhere)  # nothing to send: no empty project
    else:
        project = conn.create_project(new_title, labels)
    out = Pushed(project, selected=len(rows), elsewhere=elsewhere)
    there = conn.job_tasks(project.id, job_id)
    new = [r for r in rows if r.id not in there]
    out.already = len(rows) - len(new)
    if new:
        out.storages = conn.ensure_local_storage(project.id, local_folders((r.uri for r in new), urls))
        version = model_version(job)
        out.sent = conn.import_tasks(project.id, [task(r, job_id, urls, version, project.names) for r in new])
        there = conn.job_tasks(project.id, job_id)
    set_refs(s, {r.id: make_ref(conn.url, project.id, there[r.id].id) for r in rows if r.id in there})
    return out


@dataclass
class Pulled:
    reviewed: int = 0  # items with an answer now
    changed: int = 0  # items whose review this pull wrote or cleared
    waiting: int = 0  # pushed, no answer yet
    missing: int = 0  # their task is gone from the project
    projects: list[int] = field(default_factory=list)


def latest_answer(annotations: Sequence[dict[str, Any]] | None,
                  from_name: str) -> tuple[str, Any, datetime | None] | None:
    """(label, user, when) of the latest submitted answer to ``from_name``; skipped ones do not count."""
    best, best_key = None, None
    for a in annotations or []:
        if a.get("was_cancelled"):
            continue
        choice = next((r["value"]["choices"][0] for r in a.get("result") or []
                       if r.get("type") == "choices" and r.get("from_name") == from_name
                       and (r.get("value") or {}).get("choices")), None)
        if choice is None:
            continue
        when = _when(a.get("updated_at") or a.get("created_at"))
        key = (_utc(when) or datetime.min, a.get("id") or 0)
        if best_key is None or key > best_key:
            best, best_key = (choice, a.get("completed_by"), when), key
    return best


def _when(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _utc(v: datetime | None) -> datetime | None:
    """Naive UTC: SQLite gives back the naive datetimes Postgres keeps with their zone."""
    return v.astimezone(timezone.utc).replace(tzinfo=None) if v is not None and v.tzinfo else v


def pull(s: Session, job_id: int, conn: Connection) -> Pulled:
    jobs.get_job(s, job_id)
    rows = s.execute(select(Item.id, Item.review_ref, Item.reviewed_label, Item.reviewed_by, Item.reviewed_at)
                     .where(Item.job_id == job_id, Item.review_ref.is_not(None))).all()
    mine = [(r, p) for r in rows if (p := parse_ref(r.review_ref)) and p[0] == conn.url]
    if not mine:
        elsewhere = sorted({p[0] for r in rows if (p := parse_ref(r.review_ref))})
        raise UsageError(f"no item of job {job_id} was sent to Label Studio at {conn.url}: run "
                         f"`difflabel review push {job_id}` first"
                         + (f" (its items went to {', '.join(elsewhere)})" if elsewhere else ""))
    out = Pulled()
    answers: dict[int, Review | None] = {}
    by_project: dict[int, list] = {}
    for r, (_, project, task_id) in mine:
        by_project.setdefault(project, []).append((r, task_id))
    for project_id, items in sorted(by_project.items()):
        project = conn.project(project_id)
        tasks = {t.id: t for t in conn.job_tasks(project_id, job_id, answers=True).values()}
        out.projects.append(project_id)
        for r, task_id in items:
            t = tasks.get(task_id)
            if t is None:
                out.missing += 1
                continue
            a = latest_answer(t.annotations, project.names.from_name)
            review = Review(a[0], f"{REF_PREFIX}{conn.email(a[1])}", a[2]) if a else None
            if review:
                out.reviewed += 1
            else:
                out.waiting += 1
            old = (r.reviewed_label, r.reviewed_by, _utc(r.reviewed_at))
            if old != ((review.label, review.by, _utc(review.at)) if review else (None, None, None)):
                answers[r.id] = review
    out.changed = record(s, answers)
    return out


# --------------------------------------------------------------------------- agreement


def agreement(pairs: Sequence[tuple[str, str]], labels: Sequence[str] = ()) -> dict[str, Any]:
    """Model against reviewer on (model label, reviewed label) pairs: counts, agreement rate,
    Cohen's kappa, the confusion (rows: reviewer, columns: model) and per-label precision
    (of the model's answers for a label, the share reviewers kept) and recall, over the labels
    that occur in ``pairs`` (in the order of ``labels``)."""
    seen = {x for p in pairs for x in p}  # only these: a 1,000-label job reviews a few of them
    order = [lab for lab in labels if lab in seen] + sorted(seen - set(labels))
    index = {lab: i for i, lab in enumerate(order)}
    k, n = len(order), len(pairs)
    confusion = [[0] * k for _ in range(k)]
    for model, reviewer in pairs:
        confusion[index[reviewer]][index[model]] += 1
    agree = sum(confusion[i][i] for i in range(k))
    model_counts = [sum(confusion[r][c] for r in range(k)) for c in range(k)]
    review_counts = [sum(row) for row in confusion]
    # Cohen (1960): kappa = (p_o - p_e) / (1 - p_e), p_e from the two raters' label frequencies.
    p_o = agree / n if n else None
    p_e = sum(model_counts[i] * review_counts[i] for i in range(k)) / (n * n) if n else None
    kappa = None if not n or p_e == 1 else (p_o - p_e) / (1 - p_e)
    per_label = {lab: {"reviewed": review_counts[i], "model": model_counts[i], "agree": confusion[i][i],
                       "precision": confusion[i][i] / model_counts[i] if model_counts[i] else None,
                       "recall": confusion[i][i] / review_counts[i] if review_counts[i] else None}
                 for i, lab in enumerate(order)}
    return {"reviewed": n, "agree": agree, "disagree": n - agree, "agreement": p_o, "kappa": kappa,
            "labels": order, "confusion": confusion, "per_label": per_label}


def stats(s: Session, job_id: int) -> dict[str, Any]:
    """A job's review figures (no Label Studio needed: read from the job store)."""
    jobs.get_job(s, job_id)
    labels = jobs.labels_of(s, job_id)
    done = _done_count(s, job_id)
    pushed = s.scalar(select(func.count()).select_from(Item).where(
        Item.job_id == job_id, Item.review_ref.is_not(None))) or 0
    pairs = s.execute(select(Item.label, Item.reviewed_label, Item.reviewed_by).where(
        Item.job_id == job_id, Item.status == ItemStatus.DONE.value, Item.reviewed_label.is_not(None))).all()
    reviewers: dict[str, int] = {}
    for p in pairs:
        reviewers[p.reviewed_by or "?"] = reviewers.get(p.reviewed_by or "?", 0) + 1
    return {"job": job_id, "finished": done, "sent": pushed,
            "awaiting": s.scalar(select(func.count()).select_from(Item).where(
                Item.job_id == job_id, Item.review_ref.is_not(None), Item.reviewed_label.is_(None))) or 0,
            "reviewers": reviewers, **agreement([(p.label, p.reviewed_label) for p in pairs], labels)}
