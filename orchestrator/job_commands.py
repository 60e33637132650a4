"""Job commands: submit, status, list, results, export, cancel, retry, repair, worker, db.

Thin shells over orchestrator.jobs and the executors. Nothing here imports torch
except ``worker`` and the embedded executor, inside their commands.
"""

from __future__ import annotations

import json
import sys
import time
from itertools import chain

import click

from orchestrator import db, jobs, report
from orchestrator.cli import EXIT_FAILED, EXIT_PARTIAL, EXIT_TIMEOUT, cli
from orchestrator.local_commands import build_config, scoring_options
from orchestrator.results import export_rows, iter_results, write_rows
from orchestrator.schema import Job, JobStatus
from orchestrator.settings import Settings
from orchestrator.sources import SourceScan, in_background, normalise_source
from worker import config as C
from worker.errors import UsageError
from worker.labels import parse_labels, prompts, validate_template
from worker.model_files import DEMO_MODEL, demo_model_path, model_metadata

EXIT_BY_STATUS = {JobStatus.DONE.value: 0, JobStatus.PARTIAL.value: EXIT_PARTIAL,
                  JobStatus.FAILED.value: EXIT_FAILED, JobStatus.CANCELLED.value: EXIT_FAILED}


def _check_model(model: str) -> None:
    """Fail before queueing anything when a local model path is plainly missing."""
    from pathlib import Path

    if model == DEMO_MODEL:
        if not (demo_model_path() / "difflabel.json").is_file():
            raise UsageError(f"the demo model is missing at {demo_model_path()}: run `difflabel train-demo`")
    elif model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise UsageError(f"model path {model} does not exist: check the path")


def _celery(settings: Settings):
    from worker.celery_app import app_for, check_broker

    app = app_for(settings)
    check_broker(app, settings)
    return app


def _dispatch(settings: Settings, job_id: int, embedded: bool, device: str | None, progress: bool,
              msgs_total: int, new_job: bool = False) -> None:
    """Queue (or run here) every pending item of the job. Items of a job created just now
    have no message in any queue yet, so their tokens need no refresh."""
    if embedded:
        from worker.embedded import run_embedded

        with report.progress(msgs_total, "labelling", progress) as bar:
            run_embedded(settings, job_id, device=device, on_progress=bar.update, refresh_tokens=not new_job)
        return
    from worker.celery_app import send_rounds

    app = _celery(settings)
    with db.sessions(settings.database_url).begin() as s:
        jobs.get_job(s, job_id).queue = settings.queue  # where repairs send its rounds
        msgs = jobs.pending_messages(s, job_id, refresh_tokens=not new_job)
    n = send_rounds(app, settings, job_id, msgs)
    click.echo(f"queued {len(msgs)} items in {n} round tasks on {settings.queue}", err=True)


@cli.command()
@click.argument("source")
@click.option("--labels", "-l", "labels_text", metavar="A,B,C", help="Comma-separated labels.")
@click.option("--labels-file", type=click.Path(dir_okay=False), help="One label per line.")
@scoring_options
@click.option("--name", default=None, help="A name to find the job by in `difflabel list`.")
@click.option("--local", "force_local", is_flag=True,
              help="Run in this process even when a broker is configured.")
@click.option("--wait", is_flag=True, help="Wait until the job finishes; exit code tells how it ended.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds (exit 4).")
@click.option("--resume", "resume", type=int, default=None, metavar="JOB",
              help="Add SOURCE's new images to JOB and requeue its unfinished ones; finished items are kept.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.pass_obj
def submit(settings: Settings, source, labels_text, labels_file, name, force_local, wait, timeout, resume,
           progress, model, template, device, **kw):
    """Label every image under SOURCE: a local folder or s3://bucket/prefix.

    Creates a job in the database, then either queues its rounds for GPU workers
    (when a broker is configured) or runs it here (--local, or no broker). Non-image
    objects are skipped and counted; unreadable images fail alone, with a reason.
    The job id is printed alone on the last line of stdout.

    \b
    Examples:
      difflabel submit examples/digits --labels-file examples/digits/labels.txt --local
      JOB=$(difflabel submit s3://photos/2024/ --labels cat,dog -m ./sd-2-base | tail -1)
      difflabel submit s3://photos/2024/ --resume 12 --labels cat,dog
    """
    embedded = force_local or not settings.broker_url
    source = normalise_source(source)
    db.ensure_schema(settings.database_url)
    Session = db.sessions(settings.database_url)
    if resume is not None:
        with Session() as s:
            job = jobs.get_job(s, resume)
            if job.source != source:
                raise UsageError(f"job {resume} labels {job.source}, not {source}")
    else:
        labels = parse_labels(labels_text, labels_file)
        _check_model(model)
        template = validate_template(template or model_metadata(model).get("default_template")
                                     or C.DEFAULT_TEMPLATE)
        config = build_config(kw)
    if not embedded:
        _celery(settings)  # refuse early (exit 69) rather than leave a job nobody can run
    with report.progress(None, "listing", progress, unit="obj") as bar, Session.begin() as s:
        # Rows are inserted while the listing goes on (one transaction: all or nothing).
        scan = SourceScan(source, settings.s3_endpoint_url, progress=bar.update)
        if resume is None:
            job = jobs.create_job(s, source=source, model=model, template=template, labels=labels,
                                  prompts=prompts(template, labels), config=config, name=name)
        else:
            job = jobs.get_job(s, resume)
            job.status, job.finished_at = JobStatus.RUNNING.value, None
            jobs.requeue_cancelled(s, job.id)  # a cancelled job resumes where it stopped
        added = jobs.add_items(s, job, chain.from_iterable(in_background(scan)))
        if not added and resume is None:
            raise UsageError(f"no images found under {source} ({scan.skipped} other files)")
        job.n_skipped = scan.skipped
        job_id = job.id
    click.echo(f"job {job_id}: {added} new items, {scan.skipped} non-image objects skipped", err=True)
    with Session() as s:
        pending = jobs.counts(s, job_id).get("pending", {}).get("items", 0)
    _dispatch(settings, job_id, embedded, device, progress, pending, new_job=resume is None)
    with Session.begin() as s:
        status = jobs.refresh_job_status(s, job_id)
    code = 0
    if embedded or wait:
        status = _wait(settings, job_id, timeout, progress) if not embedded else status
        code = EXIT_BY_STATUS.get(status, EXIT_TIMEOUT)
        with Session() as s:
            report.print_status(jobs.status_summary(s, jobs.get_job(s, job_id)), stream=sys.stderr)
    click.echo(job_id)
    sys.exit(code)


def _wait(settings: Settings, job_id: int, timeout: float | None, progress: bool) -> str:
    Session = db.sessions(settings.database_url)
    start = time.monotonic()
    with report.progress(None, f"job {job_id}", progress) as bar:
        while True:
            with Session() as s:
                summary = jobs.status_summary(s, jobs.get_job(s, job_id))
            bar.total = summary["items"]
            bar.n = summary["finished"]
            bar.refresh()
            if summary["status"] != JobStatus.RUNNING.value:
                return summary["status"]
            if timeout is not None and time.monotonic() - start > timeout:
                click.echo(f"error: job {job_id} still running after {timeout:g} s", err=True)
                return "timeout"
            time.sleep(1.0)


@cli.command()
@click.argument("job_id", type=int, required=False)
@click.option("--watch", is_flag=True, help="Refresh every 2 s until the job finishes.")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def status(settings: Settings, job_id, watch, output):
    """Progress of JOB (default: the latest): items done/failed/remaining, surviving
    classes, evaluations spent, throughput and ETA."""
    db.ensure_schema(settings.database_url)
    Session = db.sessions(settings.database_url)
    while True:
        with Session() as s:
            job = jobs.get_job(s, job_id) if job_id is not None else jobs.latest_job(s)
            summary = jobs.status_summary(s, job)
        if output == "json":
            click.echo(json.dumps(summary, default=str))
        else:
            if watch and sys.stdout.isatty():
                click.clear()
            report.print_status(summary)
        if not watch or summary["status"] != JobStatus.RUNNING.value:
            break
        time.sleep(2.0)
    sys.exit(EXIT_BY_STATUS.get(summary["status"], 0) if summary["status"] != "running" else 0)


@cli.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def list_(settings: Settings, limit, output):
    """The most recent jobs."""
    from sqlalchemy import select

    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        rows = [jobs.status_summary(s, j, quick=True)
                for j in s.scalars(select(Job).order_by(Job.id.desc()).limit(limit))]
    if output == "json":
        click.echo(json.dumps(rows, default=str))
        return
    click.echo(report.table(["job", "name", "status", "items", "done", "failed", "created", "source"],
                            [[r["job"], r["name"] or "", r["status"], r["items"], r["done"], r["failed"],
                              str(r["created_at"])[:19], r["source"]] for r in rows]))


@cli.command()
@click.argument("job_id", type=int)
@click.option("--output", "-o", type=click.Choice(["jsonl", "csv", "json"]), default="jsonl", show_default=True)
@click.option("--min-confidence", type=float, default=None, help="Only items at least this confident.")
@click.option("--scores", "with_scores", is_flag=True, help="Add per-class mean scores and sample counts.")
@click.option("--failed", "only_failed", is_flag=True, help="Only failed items, with their reasons.")
@click.pass_obj
def results(settings: Settings, job_id, output, min_confidence, with_scores, only_failed):
    """Per-item results: uri, label, confidence, margin, n_evals, status (and error)."""
    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
        rows = iter_results(s, job_id, min_confidence=min_confidence, with_scores=with_scores,
                            only_failed=only_failed)
        write_rows(rows, output, sys.stdout)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--to", "dest", required=True, metavar="s3://BUCKET/KEY", help="Where to write the results.")
@click.option("--output", "-o", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Format (default: from the key's extension, else jsonl).")
@click.option("--scores", "with_scores", is_flag=True, help="Add per-class mean scores.")
@click.option("--tag", "tag_objects", is_flag=True,
              help="Also tag each labelled S3 object with difflabel-label and difflabel-confidence.")
@click.pass_obj
def export(settings: Settings, job_id, dest, output, with_scores, tag_objects):
    """Write JOB's results to S3 (and optionally tag the labelled objects)."""
    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
        n, tagged = export_rows(s, job_id, dest, output, with_scores, tag_objects, settings.s3_endpoint_url)
    click.echo(f"wrote {n} rows to {dest}" + (f"; tagged {tagged} objects" if tag_objects else ""), err=True)


@cli.command()
@click.argument("job_id", type=int)
@click.pass_obj
def cancel(settings: Settings, job_id):
    """Stop JOB: its unfinished items are cancelled; queued rounds are dropped when delivered."""
    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url).begin() as s:
        n = jobs.cancel(s, job_id)
    click.echo(f"job {job_id} cancelled ({n} unfinished items)")


@cli.command()
@click.argument("job_id", type=int)
@click.option("--failed", "failed", is_flag=True, required=True, help="Retry the failed items (required).")
@click.option("--local", "force_local", is_flag=True, help="Run here even when a broker is configured.")
@click.option("--device", default=None, help="With --local: cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=True)
@click.pass_obj
def retry(settings: Settings, job_id, failed, force_local, device, progress):
    """Run JOB's failed items again from scratch."""
    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url).begin() as s:
        n = jobs.reset_failed(s, job_id)
    click.echo(f"job {job_id}: {n} failed items requeued", err=True)
    if n:
        _dispatch(settings, job_id, force_local or not settings.broker_url, device, progress, n)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--stale-after", type=float, default=None,
              help="Requeue unfinished items untouched for this many seconds (default: DIFFLABEL_STALE_AFTER, 900).")
@click.pass_obj
def repair(settings: Settings, job_id, stale_after):
    """Requeue JOB's unfinished items whose round task was lost (e.g. Redis restarted).

    Each requeued item gets a new dispatch token, so a lost message that turns up later
    is dropped: nothing is scored twice.
    """
    from datetime import timedelta

    from orchestrator.schema import utcnow
    from worker.celery_app import send_rounds

    db.ensure_schema(settings.database_url)
    app = _celery(settings)
    age = settings.stale_after if stale_after is None else stale_after
    with db.sessions(settings.database_url).begin() as s:
        job = jobs.get_job(s, job_id)
        if job.status != JobStatus.RUNNING.value:
            click.echo(f"job {job_id} is {job.status}: nothing to repair")
            return
        msgs = jobs.pending_messages(s, job_id, stale_before=utcnow() - timedelta(seconds=age),
                                     refresh_tokens=True)
        settings = settings.replace(queue=job.queue)  # the queue its workers consume
    n = send_rounds(app, settings, job_id, msgs) if msgs else 0
    click.echo(f"job {job_id}: requeued {len(msgs)} items in {n} tasks")


@cli.command()
@click.option("--device", envvar="DIFFLABEL_DEVICE", default=None, help="cuda:N or cpu (default: cuda if available).")
@click.option("--queues", "-Q", default=None, help="Comma-separated queues (default: DIFFLABEL_QUEUE or difflabel).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker name, e.g. gpu0@%h.")
@click.pass_obj
def worker(settings: Settings, device, queues, loglevel, hostname):
    """Start a GPU worker: one process per GPU, one round at a time (solo pool).

    \b
    Example:
      DIFFLABEL_BROKER_URL=redis://redis:6379/0 DIFFLABEL_DATABASE_URL=postgresql://... \\
        difflabel worker --device cuda:0
    """
    import os

    if not settings.broker_url:
        raise UsageError("no broker configured: set DIFFLABEL_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    # The worker's runtime reads its settings from the environment: pass ours on.
    os.environ["DIFFLABEL_DATABASE_URL"] = settings.database_url
    os.environ["DIFFLABEL_BROKER_URL"] = settings.broker_url
    if settings.s3_endpoint_url:
        os.environ["DIFFLABEL_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if queues:
        os.environ["DIFFLABEL_QUEUE"] = queues.split(",")[0]
    if device:
        os.environ["DIFFLABEL_DEVICE"] = device
    db.ensure_schema(settings.database_url)
    from worker.celery_app import app_for
    from worker.torch_setup import configure

    configure()
    app = _celery(settings)
    argv = ["worker", "--pool=solo", "--concurrency=1", f"--loglevel={loglevel}", "--without-gossip",
            "--without-mingle", "-Q", queues or settings.queue]
    if hostname:
        argv += ["-n", hostname]
    app_for(settings)  # the task is registered on this app
    app.worker_main(argv)


@cli.group("db")
def db_group():
    """Database schema commands."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_obj
def db_upgrade(settings: Settings, revision):
    """Create or migrate the job store's tables (Alembic)."""
    from orchestrator.settings import redact

    rev = db.upgrade(settings.database_url, revision)
    click.echo(f"{redact(settings.database_url)} is at revision {rev}")

