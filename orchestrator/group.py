"""The ``difflabel`` Click group, its error handling and exit codes (commands register on it
from their own modules; ``orchestrator.cli`` is the entry point that loads them).

Exit codes (DESIGN.md section 3): 0 done, 1 failed, 2 usage error, 3 partial success,
4 ``--wait`` timed out, 69 broker or database unavailable.
"""

from __future__ import annotations

import sys

import click

from worker.errors import DifflabelError, RetryableError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 69


class DifflabelGroup(click.Group):
    """Turns difflabel's errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except RetryableError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_UNAVAILABLE)
        except DifflabelError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_FAILED)
        except Exception as e:
            from sqlalchemy.exc import OperationalError

            if isinstance(e, OperationalError):  # the database went away mid-command
                reason = str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__
                click.echo(f"error: database unavailable: {reason}", err=True)
                sys.exit(EXIT_UNAVAILABLE)
            raise


@click.group(cls=DifflabelGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
@click.version_option(package_name="difflabel")
@click.option("--database-url", envvar="DIFFLABEL_DATABASE_URL", default=None, metavar="URL",
              help="Job store: postgresql://user@host/db or sqlite:///path. "
                   "Env: DIFFLABEL_DATABASE_URL. Default: sqlite:///~/.difflabel/difflabel.db")
@click.option("--broker-url", envvar="DIFFLABEL_BROKER_URL", default=None, metavar="URL",
              help="Redis broker for GPU workers, e.g. redis://host:6379/0. Env: DIFFLABEL_BROKER_URL. "
                   "Without one, `submit` runs the job in this process.")
@click.option("--s3-endpoint-url", envvar="DIFFLABEL_S3_ENDPOINT_URL", default=None, metavar="URL",
              help="S3-compatible endpoint (MinIO, moto...). Env: DIFFLABEL_S3_ENDPOINT_URL or "
                   "AWS_ENDPOINT_URL. Credentials: the usual AWS environment and files.")
@click.pass_context
def cli(ctx: click.Context, database_url, broker_url, s3_endpoint_url) -> None:
    """Label images with a text-to-image diffusion model used as a zero-shot classifier.

    Each label becomes a prompt; the label whose prompt best denoises the image wins.

    \b
    Quick start (the bundled digits demo model, no services needed):
      difflabel classify examples/digits/seven --labels-file examples/digits/labels.txt
      difflabel eval examples/digits

    \b
    Large jobs (Redis + Postgres + GPU workers):
      difflabel db upgrade
      difflabel worker --device cuda:0            # on each GPU machine
      difflabel submit s3://bucket/photos/ --labels-file labels.txt --model DIR --wait
    """
    from orchestrator.settings import Settings

    ctx.obj = Settings.from_env(database_url=database_url, broker_url=broker_url,
                                s3_endpoint_url=s3_endpoint_url)
