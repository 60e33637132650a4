"""`difflabel serve`: the read-only status page (orchestrator.serve) as a command."""

from __future__ import annotations

import click

from orchestrator import db, jobs
from orchestrator.group import cli
from orchestrator.serve import DEFAULT_HOST, DEFAULT_PORT, make_server, masked_url, serve_forever, url_of
from orchestrator.settings import Settings


@cli.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, metavar="ADDRESS",
              help="Address to listen on. The default keeps the page on this machine; e.g. --host 0.0.0.0 "
                   "shows it to the whole network (the page has no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on, e.g. --port 9000; 0 picks a free one.")
@click.option("--job", "job_id", type=int, default=None, metavar="ID",
              help="Open the page on job ID, e.g. --job 12 (default: the latest job).")
@click.pass_obj
def serve(settings: Settings, host, port, job_id):
    """A status page for people: jobs and their progress, throughput over time, the
    confidence histogram, how reviewers' labels compare with the model's, and the least
    confident items with thumbnails. Read-only; it refreshes itself while jobs run.

    Prints the page's address, then serves until Ctrl-C.

    \b
    Examples:
      difflabel serve                       # http://127.0.0.1:8765/
      difflabel serve --job 12 --port 9000
      ssh -L 8765:127.0.0.1:8765 gpu-box    # then open http://127.0.0.1:8765/ here
    """
    db.ensure_schema(settings.database_url)
    if job_id is not None:
        with db.sessions(settings.database_url)() as s:
            jobs.get_job(s, job_id)  # no such job: a one-line error naming `difflabel list`
    server = make_server(settings, host, port, job_id)
    if not server.loopback_only:
        click.echo(f"warning: {host} is not a loopback address: anyone who can reach this machine can read "
                   "the page (it has no login); --host 127.0.0.1 keeps it local", err=True)
    click.echo(f"serving {masked_url(settings.database_url)} read-only; Ctrl-C stops", err=True)
    url = url_of(server, host)
    click.echo(url + (f"#job={job_id}" if job_id is not None else ""))
    serve_forever(server)
