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
from orchestrator.group import EXIT_FAILED, EXIT_PARTIAL, EXIT_TIMEOUT, cli
from orchestrator.local_commands import build_config, scoring_options
from orchestrator.results import csv_columns, export_rows, iter_results, write_rows
from orchestrator.review_commands import image_url_options, image_urls
from orchestrator.schema import Job, JobStatus
from orchestrator.settings import Settings
from orchestrator.sources import SourceScan, in_background, normalise_source
from worker import config as C
from worker.errors import UsageError
from worker.labels import parse_labels, prompts, refuse_truncated_duplicates, validate_template
from worker.model_files import DEMO_MODEL, demo_model_path, model_metadata

EXIT_BY_STATUS = {JobStatus.DONE.value: 0, JobStatus.PARTIAL.value: EXIT_PARTIAL,
                  JobStatus.FAILED.value: EXIT_FAILED, JobStatus.CANCELLED.value: EXIT_FAILED}


def _check_model(model: str) -> None:
    """Fail before queueing anything when a local model path is plainly missing or is not a
    model: a worker that cannot load a job's model gives its items back and backs off, so a
    model no worker can load would only keep the job waiting."""
    from pathlib import Path

    if model == DEMO_MODEL:
        if not (demo_model_path() / "difflabel.json").is_file():
            raise UsageError(f"the demo model is missing at {demo_model_path()}: run `difflabel train-demo`")
    elif model.startswith((".", "/", "~")):
        path = Path(model).expanduser()
        if path.is_file() and path.suffix == ".safetensors":
            return  # a single-file checkpoint: the worker recognises its family
        if not path.is_dir():
            raise UsageError(f"model path {model} does not exist: check the path")
        if not ((path / "difflabel.json").is_file() or (path / "model_index.json").is_file()):
            raise UsageError(f"{model} is not a diffusers model directory (no model_index.json or "
                             "difflabel.json): pass the folder a pipeline was saved to")
        from worker.families import family_for_pipeline, pipeline_class_name

        name = pipeline_class_name(path)
        if name and not name.startswith("Difflabel"):
            family_for_pipeline(name, model)  # a family no worker scores with: refused now


def _celery(settings: Settings):
    from worker.celery_app import app_for, check_broker

    app = app_for(settings)
    check_broker(app, settings)
    return app


def _send(settings: Settings, app, job, queue: str, msgs, solo=()) -> int:
    """Queue ``job``'s messages (batched) and suspects (alone) on ``queue``; returns tasks sent."""
    from worker.broker import send_rounds

    job_id = job.id
    per_task = jobs.items_per_task(job, settings.items_per_task, settings.task_evals)
    return send_rounds(app, settings, job_id, list(msgs), chunk=per_task, queue=queue) + \
        send_rounds(app, settings, job_id, list(solo), chunk=1, queue=queue)


def _run_here(settings: Settings, job_id: int, msgs, progress: bool) -> None:
    """The embedded executor: run ``msgs`` and every later round in this process."""
    from worker.embedded import run_embedded

    with report.progress(len(msgs), "labelling", progress) as bar:
        run_embedded(settings, job_id, msgs, on_progress=bar.update)


def _resume_conflicts(ctx: click.Context, job: Job, labels_text, labels_file, model, template, kw) -> list[str]:
    """Options given on this command line that differ from what the job runs with."""
    from click.core import ParameterSource

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

    out = []
    if labels_text is not None or labels_file is not None:
        with db.sessions(ctx.obj.database_url)() as s:
            have = jobs.labels_of(s, job.id)
        want = parse_labels(labels_text, labels_file)
        if want != have:
            out.append(f"labels ({len(want)} given; the job has {len(have)}: {', '.join(have[:5])}"
                       f"{', ...' if len(have) > 5 else ''})")
    if given("model") and model != job.model:
        out.append(f"--model {model} (the job uses {job.model})")
    if given("template") and template is not None and template != job.template:
        out.append(f"--template {template!r} (the job uses {job.template!r})")
    params = job.params or {}
    for name in ("seed", "weighting", "weight_coef", "min_scores", "max_scores", "p_cutoff", "samples_per_round",
                 "batch_size", "rule", "screen_keep", "screen_min", "pool_df", "max_round_evals"):
        if given(name) and name in params and kw.get(name) != params[name]:
            out.append(f"--{name.replace('_', '-')} {kw.get(name)} (the job uses {params[name]})")
    if given("no_prune") and kw.get("no_prune") and params.get("prune", True):
        out.append("--no-prune (the job prunes)")
    return out


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
    from orchestrator import lifecycle

    embedded = force_local or not settings.broker_url
    if device:
        settings = settings.replace(device=device)
    source = normalise_source(source)
    db.ensure_schema(settings.database_url)
    Session = db.sessions(settings.database_url)
    if resume is not None:
        with Session() as s:
            job = jobs.get_job(s, resume)
        if job.source != source:
            raise UsageError(f"job {resume} labels {job.source}, not {source}")
        clash = _resume_conflicts(click.get_current_context(), job, labels_text, labels_file, model, template, kw)
        if clash:
            raise UsageError(f"job {resume} keeps the settings it was submitted with and these differ: "
                             f"{'; '.join(clash)}. Drop them, or submit a new job")
    else:
        labels = parse_labels(labels_text, labels_file)
        _check_model(model)
        template = validate_template(template or model_metadata(model).get("default_template")
                                     or C.DEFAULT_TEMPLATE)
        config = build_config(kw, len(labels))
        label_prompts = prompts(template, labels)
        # Labels the model's tokenizer reads as the same tokens could never be told apart.
        refuse_truncated_duplicates(model, labels, label_prompts)
    app = None if embedded else _celery(settings)  # refuse early (exit 69) rather than leave a job nobody can run
    with report.progress(None, "listing", progress, unit="obj") as bar, Session.begin() as s:
        # Rows are inserted while the listing goes on (one transaction: all or nothing). The
        # job row is not locked meanwhile: workers finish its other items as usual.
        scan = SourceScan(source, settings.s3_endpoint_url, progress=bar.update)
        if resume is None:
            job = jobs.create_job(s, source=source, model=model, template=template, labels=labels,
                                  prompts=label_prompts, config=config, name=name)
            job.queue = None if embedded else settings.queue  # where its rounds and repairs go
        else:
            job = jobs.get_job(s, resume)
        added = jobs.add_items(s, job, chain.from_iterable(in_background(scan)))
        if not added and resume is None:
            raise UsageError(f"no images found under {source} ({scan.skipped} other files)")
        job.n_skipped = scan.skipped
        job_id = job.id
    click.echo(f"job {job_id}: {added} new items, {scan.skipped} non-image objects skipped", err=True)
    with Session.begin() as s:
        if resume is None:
            todo = lifecycle.Requeued(jobs.pending_messages(s, job_id))  # no queue has seen these tokens
        else:
            # Under the job's lock: cancelled and unheld items get new messages, expired leases
            # are rescued, live ones stay with their workers, and the job runs again (or is
            # finished here when nothing is left). Messages go out before the commit: a broker
            # that fails now leaves everything as it was.
            todo = lifecycle.resume(s, job_id, max_attempts=settings.max_attempts)
            job = jobs.get_job(s, job_id)
            if not embedded:
                job.queue = settings.queue  # the queue this command's workers consume from now on
                _send(settings, app, job, job.queue, todo.msgs, todo.solo)
        queue = job.queue
    if resume is None and not embedded:
        _send(settings, app, job, queue, todo.msgs)
    if not embedded:
        click.echo(f"queued {len(todo)} items on {queue}", err=True)
    elif len(todo):
        _run_here(settings, job_id, todo.msgs + todo.solo, progress)
    code = 0
    with Session() as s:
        status = jobs.get_job(s, job_id).status
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
    """Per-item results: uri, label (the model's), confidence, margin, n_evals, status, error,
    and from `difflabel review`: reviewed_label, reviewed_by and decided_by (review when a
    reviewer's label stands, model otherwise)."""
    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
        rows = iter_results(s, job_id, min_confidence=min_confidence, with_scores=with_scores,
                            only_failed=only_failed)
        write_rows(rows, output, sys.stdout, columns=csv_columns(s, job_id, with_scores))


@cli.command()
@click.argument("job_id", type=int)
@click.option("--to", "dest", required=True, metavar="s3://BUCKET/KEY|PATH",
              help="Where to write the results: an S3 key or a local file.")
@click.option("--output", "-o", "--format", "-f", "output", type=click.Choice(["jsonl", "csv", "label-studio"]),
              default=None,
              help="jsonl, csv, or label-studio: a JSON list of Label Studio tasks, one per finished item, with "
                   "the model's label, confidence (score) and settings (model_version) as a prediction; import it "
                   "into a project whose config has <Choices name=\"label\" toName=\"image\"> over "
                   "<Image name=\"image\" value=\"$image\">. Default: from the extension, else jsonl.")
@click.option("--scores", "with_scores", is_flag=True, help="Add per-class mean scores (jsonl, csv).")
@click.option("--tag", "tag_objects", is_flag=True,
              help="Also tag each labelled S3 object with difflabel-label and difflabel-confidence.")
@image_url_options
@click.pass_obj
def export(settings: Settings, job_id, dest, output, with_scores, tag_objects, document_root, s3_urls, url_expiry):
    """Write JOB's results to S3 or a local file (and optionally tag the labelled objects).

    \b
    Examples:
      difflabel export 7 --to s3://bucket/labels.jsonl --tag
      difflabel export 7 --to labels.csv --scores
      difflabel export 7 -f label-studio --to tasks.json --document-root /data   # local images under /data
      difflabel export 7 -f label-studio --to s3://bucket/tasks.json              # presigned image URLs
    """
    from orchestrator.results import tag_labelled

    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
        if output == "label-studio":
            from orchestrator.label_studio import export_tasks

            if with_scores:
                raise UsageError("--scores goes with -o jsonl or csv: Label Studio tasks carry the label and "
                                 "confidence only")
            n = export_tasks(s, job_id, dest, image_urls(settings, document_root, s3_urls, url_expiry))
            tagged = tag_labelled(s, job_id, settings.s3_endpoint_url) if tag_objects else 0
        else:
            n, tagged = export_rows(s, job_id, dest, output, with_scores, tag_objects, settings.s3_endpoint_url)
    click.echo(f"wrote {n} {'tasks' if output == 'label-studio' else 'rows'} to {dest}"
               + (f"; tagged {tagged} objects" if tag_objects else ""), err=True)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--format", "-f", "fmt", type=click.Choice(["imagefolder", "parquet"]), required=True,
              help="imagefolder: DEST/<label>/<image>, as torchvision's ImageFolder and Hugging Face's "
                   "imagefolder loader read it. parquet: one row per labelled image, readable by pandas "
                   "and Hugging Face datasets.")
@click.option("--to", "dest", required=True, metavar="PATH|s3://BUCKET/PREFIX",
              help="A new or empty folder, a .parquet file, or an S3 prefix (imagefolder) or key (parquet).")
@click.option("--min-confidence", type=float, default=None,
              help="Only images at least this confident, or reviewed (`difflabel review`).")
@click.option("--copy", "copy_files", is_flag=True,
              help="imagefolder, local: copy the images instead of linking to them.")
@click.option("--images", "with_images", is_flag=True, help="parquet: add the image bytes as a column.")
@click.pass_obj
def dataset(settings: Settings, job_id, fmt, dest, min_confidence, copy_files, with_images):
    """Write JOB's labelled images as a training set (finished items only).

    An item a reviewer labelled (`difflabel review pull`) is filed under the reviewed label
    in an image folder; Parquet keeps the model's label in `label` and adds `reviewed_label`.

    \b
    Examples:
      difflabel dataset 7 -f imagefolder --to train/ --min-confidence 0.9
      difflabel dataset 7 -f parquet --to labels.parquet --images
      difflabel dataset 7 -f imagefolder --to s3://bucket/labelled/   # server-side copies
    """
    from orchestrator import dataset_export as D

    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url)() as s:
        jobs.get_job(s, job_id)
        if fmt == "imagefolder":
            missing: list[str] = []
            counts = D.export_imagefolder(s, job_id, dest, min_confidence=min_confidence, copy=copy_files,
                                          endpoint_url=settings.s3_endpoint_url, missing=missing)
            click.echo(f"wrote {sum(counts.values())} images in {len(counts)} label folders to {dest}", err=True)
            if missing:
                n = len(missing)
                click.echo(f"left out {n} image{'s' if n != 1 else ''} that no longer exist{'s' if n == 1 else ''}, "
                           f"e.g. {missing[0]}", err=True)
        else:
            n = D.export_parquet(s, job_id, dest, min_confidence=min_confidence, images=with_images,
                                 endpoint_url=settings.s3_endpoint_url)
            click.echo(f"wrote {n} rows to {dest}", err=True)


@cli.command()
@click.argument("job_id", type=int)
@click.pass_obj
def cancel(settings: Settings, job_id):
    """Stop JOB. Items waiting in the queue are cancelled now; an item a worker is scoring
    keeps its round, which is stored, and is cancelled when that round ends. `submit --resume`
    goes on from where each item stopped."""
    from orchestrator import lifecycle

    db.ensure_schema(settings.database_url)
    with db.sessions(settings.database_url).begin() as s:
        c = lifecycle.cancel(s, job_id)
    if c.was != JobStatus.RUNNING.value:
        click.echo(f"job {job_id} is already {c.was}: nothing to cancel", err=True)
        return
    click.echo(f"job {job_id} cancelled: {c.cancelled} items stopped"
               + (f", {c.in_flight} more when their current round ends" if c.in_flight else ""))


@cli.command()
@click.argument("job_id", type=int)
@click.option("--failed", "failed", is_flag=True, required=True, help="Retry the failed items (required).")
@click.option("--local", "force_local", is_flag=True, help="Run here even when a broker is configured.")
@click.option("--device", default=None, help="With --local: cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=True)
@click.pass_obj
def retry(settings: Settings, job_id, failed, force_local, device, progress):
    """Run JOB's failed items again from scratch (their scores are discarded).

    With a broker, the items are reset and their round tasks queued in one step: if the
    broker is down nothing changes (exit 69) and the command can simply be run again."""
    from orchestrator import lifecycle

    db.ensure_schema(settings.database_url)
    embedded = force_local or not settings.broker_url
    app = None if embedded else _celery(settings)
    with db.sessions(settings.database_url).begin() as s:
        msgs = lifecycle.retry_failed(s, job_id)
        job = jobs.get_job(s, job_id)
        if msgs and not embedded:
            job.queue = settings.queue
            _send(settings, app, job, job.queue, msgs)  # before the commit: all or nothing
    click.echo(f"job {job_id}: {len(msgs)} failed items requeued", err=True)
    if msgs and embedded:
        _run_here(settings.replace(device=device), job_id, msgs, progress)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--stale-after", type=float, default=None,
              help="Also requeue unfinished items nobody holds and nothing touched for this many seconds "
                   "(default: DIFFLABEL_STALE_AFTER, 900).")
@click.pass_obj
def repair(settings: Settings, job_id, stale_after):
    """Requeue JOB's items whose worker died (expired lease) or whose message was lost
    (e.g. Redis restarted). Items a live worker holds are left alone.

    Each requeued item gets a new dispatch token, so a lost message that turns up later
    is dropped: nothing is scored twice.
    """
    from datetime import timedelta

    from orchestrator import lifecycle
    from orchestrator.schema import utcnow

    db.ensure_schema(settings.database_url)
    app = _celery(settings)
    age = settings.stale_after if stale_after is None else stale_after
    with db.sessions(settings.database_url).begin() as s:
        job = jobs.get_job(s, job_id)
        if job.status != JobStatus.RUNNING.value:
            click.echo(f"job {job_id} is {job.status}: nothing to repair")
            return
        now = utcnow()
        r = lifecycle.rescue_expired(s, job_id, max_attempts=settings.max_attempts, now=now)
        r.msgs += lifecycle.requeue_lost(s, job_id, stale_before=now - timedelta(seconds=age), now=now)
        queue = job.queue or settings.queue
        n = _send(settings, app, job, queue, r.msgs, r.solo)  # before the commit: all or nothing
    click.echo(f"job {job_id}: requeued {len(r)} items in {n} tasks")


@cli.command()
@click.option("--device", envvar="DIFFLABEL_DEVICE", default=None, help="cuda:N or cpu (default: cuda if available).")
@click.option("--queues", "-Q", default=None,
              help="Comma-separated queues to consume (default: DIFFLABEL_QUEUE or difflabel). Each job's "
                   "follow-up rounds go back to the job's own queue.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker name, e.g. gpu0@%h.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="DIFFLABEL_METRICS_PORT", default=None,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (env DIFFLABEL_METRICS_PORT; 0: off). "
                   "Default: 9808 + N on cuda:N (9808 on CPU), so one machine's workers do not collide.")
@click.pass_obj
def worker(settings: Settings, device, queues, loglevel, hostname, metrics_port):
    """Start a GPU worker: one process per GPU, one round at a time (solo pool).

    The worker holds a lease on the items it scores and renews it every third of
    DIFFLABEL_LEASE_SECONDS (60); a dead worker's items are rescued once it runs out. If the
    worker cannot work (its model or device will not load, S3 or the database is out of
    reach) it gives its items back uncharged and backs off; after DIFFLABEL_MAX_WORKER_FAILURES
    (5) such failures in a row it exits with status 75 and one line saying why.

    Each worker serves Prometheus metrics (evaluations, rounds, items finished and failed,
    model load time, batch size, queue depth, CUDA memory) on --metrics-port, and sends
    Celery events, so Flower shows it and its round tasks.

    \b
    Example:
      DIFFLABEL_BROKER_URL=redis://redis:6379/0 DIFFLABEL_DATABASE_URL=postgresql://... \\
        difflabel worker --device cuda:0            # metrics on :9808
      difflabel worker --device cuda:1 -n gpu1@%h   # metrics on :9809
    """
    if not settings.broker_url:
        raise UsageError("no broker configured: set DIFFLABEL_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    names = [q.strip() for q in (queues or settings.queue).split(",") if q.strip()]
    if not names:
        raise UsageError("--queues is empty: give at least one queue name")
    settings = settings.replace(device=device, queue=names[0])
    from worker.backends import resolve_device

    dev = resolve_device(settings.device)  # a device this machine cannot use: refuse before taking any work
    db.ensure_schema(settings.database_url)
    from worker import celery_app
    from worker.torch_setup import configure

    configure()
    app = _celery(settings)
    celery_app.configure(settings, names)
    _serve_metrics(metrics_port, dev, settings, names)
    argv = ["worker", "--pool=solo", "--concurrency=1", f"--loglevel={loglevel}", "--without-gossip",
            "--without-mingle", "-Q", ",".join(names)]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv)


def _serve_metrics(port: int | None, device, settings: Settings, queues: list[str]) -> None:
    """Start the worker's metrics server. A port given and taken is refused; the default port
    taken (another CPU worker on this machine) leaves this worker without metrics, and says so."""
    from worker import metrics

    if port == 0:
        return
    chosen = metrics.default_port(device) if port is None else port
    try:
        metrics.serve(chosen, broker_url=settings.broker_url, queues=queues, device=device)
    except metrics.PortInUse as e:
        if port is not None:
            raise UsageError(f"{e}: give each worker its own --metrics-port (or 0 to turn metrics off)") from e
        click.echo(f"warning: {e}; this worker serves no metrics (give it --metrics-port)", err=True)


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

