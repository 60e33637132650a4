"""The ``difflabel`` command line: one Click group; commands live in their own modules.

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


@click.group(cls=DifflabelGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
@click.version_option(package_name="difflabel")
def cli() -> None:
    """Label images with a text-to-image diffusion model used as a zero-shot classifier.

    Each label becomes a prompt; the label whose prompt best denoises the image wins.

    \b
    Quick start (the bundled digits demo model, no services needed):
      difflabel classify examples/digits/seven --labels-file examples/digits/labels.txt
      difflabel eval examples/digits
    """


def main() -> None:
    from orchestrator import local_commands  # noqa: F401 - registers commands

    cli(prog_name="difflabel")


if __name__ == "__main__":  # pragma: no cover
    main()
