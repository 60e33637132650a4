"""The ``difflabel`` entry point: loads the command modules onto the group and runs it."""

from __future__ import annotations

from orchestrator.group import (EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_TIMEOUT, EXIT_UNAVAILABLE,  # noqa: F401
                                EXIT_USAGE, cli)


def main() -> None:
    from orchestrator import job_commands, local_commands  # noqa: F401 - registers commands
    from orchestrator import serve_commands  # noqa: F401 - registers `serve`
    from orchestrator import review_commands  # noqa: F401 - registers `review`

    cli(prog_name="difflabel")


if __name__ == "__main__":  # pragma: no cover
    main()
