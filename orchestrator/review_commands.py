"""`difflabel review push | pull | stats`: human review of a job's least confident items in
Label Studio (thin shells over orchestrator.review)."""

from __future__ import annotations

import json

import click

from orchestrator import db, jobs, report
from orchestrator.group import cli
from orchestrator.label_studio import MAX_PRESIGN_SECONDS, S3_URL_MODES, ImageUrls
from orchestrator.settings import Settings
from worker.errors import UsageError

#: What `review push` sends when neither --below nor --least is given.
DEFAULT_BELOW = 0.8


def image_url_options(f):
    """How images become URLs Label Studio shows (shared by `export -f label-studio`)."""
    f = click.option("--url-expiry", type=int, default=MAX_PRESIGN_SECONDS, show_default=True, metavar="SECONDS",
                     help="Lifetime of presigned S3 URLs (at most 7 days).")(f)
    f = click.option("--s3-urls", type=click.Choice(S3_URL_MODES), default="presign", show_default=True,
                     help="S3 images: presigned https URLs, or s3:// URIs as they are, for a project with "
                          "Label Studio's own S3 storage connected (it signs them).")(f)
    f = click.option("--document-root", default="/", show_default=True, metavar="DIR",
                     envvar=["DIFFLABEL_LABEL_STUDIO_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"],
                     help="Local images: the Label Studio server's LOCAL_FILES_DOCUMENT_ROOT (it must run with "
                          "LOCAL_FILES_SERVING_ENABLED=true); images become /data/local-files/?d=PATH "
                          "URLs relative to it. Env: DIFFLABEL_LABEL_STUDIO_DOCUMENT_ROOT or "
                          "LOCAL_FILES_DOCUMENT_ROOT.")(f)
    return f


def image_urls(settings: Settings, document_root: str, s3_urls: str, url_expiry: int) -> ImageUrls:
    return ImageUrls(document_root=document_root, s3_urls=s3_urls, expires=url_expiry,
                     endpoint_url=settings.s3_endpoint_url)


def server_options(f):
    f = click.option("--api-key", envvar=["DIFFLABEL_LABEL_STUDIO_API_KEY", "LABEL_STUDIO_API_KEY"], metavar="KEY",
                     help="A Label Studio personal access token (Account & Settings), or a legacy token. "
                          "Env: DIFFLABEL_LABEL_STUDIO_API_KEY.")(f)
    f = click.option("--url", envvar=["DIFFLABEL_LABEL_STUDIO_URL", "LABEL_STUDIO_URL"], metavar="URL",
                     help="The Label Studio server, e.g. http://localhost:8080. Env: DIFFLABEL_LABEL_STUDIO_URL.")(f)
    return f


def _connect(url, api_key):
    from orchestrator.review import Connection

    return Connection(url, api_key)


@cli.group("review")
def review_group():
    """Human review in Label Studio: send the least confident items to a project, bring the
    reviewers' answers back into the job, and see how often they agree with the model.

    \b
    Example:
      export DIFFLABEL_LABEL_STUDIO_URL=http://localhost:8080 DIFFLABEL_LABEL_STUDIO_API_KEY=...
      difflabel review push 7 --new-project "Photos, low confidence" --below 0.8
      difflabel review pull 7            # after reviewing in Label Studio
      difflabel review stats 7
      difflabel results 7 -o csv         # reviewed_label, reviewed_by, decided_by columns
    """


@review_group.command("push")
@click.argument("job_id", type=int)
@server_options
@click.option("--project", "project_id", type=int, default=None, metavar="ID",
              help="An existing project (the number in its URL); its labelling config needs a Choices over "
                   "an Image with every label of the job. Default: the one project this job was pushed to.")
@click.option("--new-project", "new_title", default=None, metavar="TITLE",
              help="Create a project (3 to 50 characters) with a single-choice config over the job's labels.")
@click.option("--below", type=click.FloatRange(0, 1), default=None, metavar="CONFIDENCE",
              help=f"Send the items less confident than this (default {DEFAULT_BELOW} without --least).")
@click.option("--least", type=click.IntRange(min=1), default=None, metavar="N",
              help="Send the N least confident items not reviewed yet instead.")
@image_url_options
@click.pass_obj
def push(settings: Settings, job_id, url, api_key, project_id, new_title, below, least, document_root, s3_urls,
         url_expiry):
    """Send JOB's least confident finished items to a Label Studio project, each with the
    model's answer and confidence as a prediction.

    Items already reviewed, or already in the project, are not sent again: pushing twice
    creates no duplicate tasks. Local images are served through Label Studio's local-files
    storage (connected here for their folder); S3 images through presigned URLs. Prints
    the project id on stdout.

    \b
    Examples:
      difflabel review push 7 --new-project "Photos review" --below 0.8
      difflabel review push 7 --project 3 --least 200
      difflabel review push 7 --project 3 --document-root /data   # server: LOCAL_FILES_DOCUMENT_ROOT=/data
    """
    from orchestrator import review

    if project_id is not None and new_title is not None:
        raise UsageError("give either --project ID or --new-project TITLE, not both")
    if below is not None and least is not None:
        raise UsageError("give either --below CONFIDENCE or --least N, not both")
    if new_title is not None and not 3 <= len(new_title.strip()) <= 50:
        raise UsageError(f"--new-project {new_title!r}: Label Studio wants a title of 3 to 50 characters")
    if below is None and least is None:
        below = DEFAULT_BELOW
    urls = image_urls(settings, document_root, s3_urls, url_expiry)
    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
    conn = _connect(url, api_key)
    with db.sessions(settings.database_url).begin() as s:
        out = review.push(s, job_id, conn, project_id=project_id, new_title=new_title and new_title.strip(),
                          below=below, least=least, urls=urls)
    what = f"below confidence {below:g}" if least is None else "least confident"
    if out.project is None:
        click.echo(f"job {job_id}: no unreviewed item {what}" +
                   (f" that is not in a project of {conn.url} already ({out.elsewhere}: push to that project "
                    "with --project ID)" if out.elsewhere else "") + ": nothing sent, no project created", err=True)
        return
    for folder in out.storages:
        click.echo(f"connected local-files storage {folder} to project {out.project.id}", err=True)
    chosen = f"unreviewed items {what}" if least is None else f"{what} unreviewed items"
    click.echo(f"job {job_id}: {out.selected} {chosen}; sent {out.sent} to project {out.project.id} "
               f"{out.project.title!r} ({conn.url}/projects/{out.project.id}/data)"
               + (f", {out.already} already there" if out.already else "")
               + (f"; {out.elsewhere} left out, already in another project here" if out.elsewhere else ""),
               err=True)
    click.echo(out.project.id)


@review_group.command("pull")
@click.argument("job_id", type=int)
@server_options
@click.pass_obj
def pull(settings: Settings, job_id, url, api_key):
    """Bring the reviewers' answers for JOB back from Label Studio.

    Each pushed item takes its task's latest submitted answer (skipped tasks do not count):
    reviewed_label, reviewed_by (label-studio:EMAIL) and reviewed_at. An answer deleted in
    Label Studio is cleared here too. The model's own label is kept.

    \b
    Example:
      difflabel review pull 7 --url http://localhost:8080 --api-key $TOKEN
    """
    from orchestrator import review

    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
    conn = _connect(url, api_key)
    with db.sessions(settings.database_url).begin() as s:
        out = review.pull(s, job_id, conn)
    click.echo(f"job {job_id}: {out.reviewed} reviewed ({out.changed} changed by this pull), "
               f"{out.waiting} awaiting review" + (f", {out.missing} whose task was deleted" if out.missing else "")
               + f" (project{'s' if len(out.projects) > 1 else ''} {', '.join(map(str, out.projects))})", err=True)


@review_group.command("stats")
@click.argument("job_id", type=int)
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def stats(settings: Settings, job_id, output):
    """How often reviewers agreed with the model on JOB's reviewed items: agreement rate,
    Cohen's kappa, confusion (rows: reviewer, columns: model), per-label precision and recall.

    The items sent for review were chosen for low confidence, so these figures describe the
    model where it was least sure, not its accuracy over the job. Reads the job store only
    (run `review pull` first).
    """
    from orchestrator import review

    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        st = review.stats(s, job_id)
    if output == "json":
        click.echo(json.dumps(st))
        return
    click.echo(f"finished items   {st['finished']}")
    click.echo(f"sent for review  {st['sent']}  (awaiting an answer: {st['awaiting']})")
    click.echo(f"reviewed         {st['reviewed']}  (" + ", ".join(f"{who}: {n}" for who, n in
                                                       sorted(st["reviewers"].items())) + ")")
    if not st["reviewed"]:
        click.echo("no reviewed items yet: `difflabel review pull` brings the answers in")
        return
    kappa = "-" if st["kappa"] is None else f"{st['kappa']:.3f}"
    click.echo(f"agreement        {st['agreement'] * 100:.1f}%  ({st['agree']} of {st['reviewed']}; "
               f"{st['disagree']} changed by reviewers)")
    click.echo(f"Cohen's kappa    {kappa}")
    labels = st["labels"]
    click.echo("confusion (rows: reviewer, columns: model)")
    click.echo(report.table(["reviewer"] + labels, [[lab] + row for lab, row in zip(labels, st["confusion"])]))
    click.echo(report.table(["label", "reviewed", "model", "agree", "precision", "recall"],
                            [[lab, p["reviewed"], p["model"], p["agree"], p["precision"], p["recall"]]
                             for lab, p in st["per_label"].items()]))
