"""One exception tree for difflabel.

``DifflabelError`` is the root. Its two branches say what a caller should do:
``PermanentError`` means retrying the same input cannot help (a corrupt image, a
missing model, a bad label list); ``RetryableError`` means the same call may succeed
later (a broker or database that is down). Every message is one line that names the
thing that failed and, where there is one, the fix.
"""

from __future__ import annotations


class DifflabelError(Exception):
    """Root of every error difflabel raises on purpose."""


class PermanentError(DifflabelError):
    """Retrying the same input will fail the same way."""


class RetryableError(DifflabelError):
    """The same call may succeed later (a service was unreachable)."""


class UsageError(PermanentError):
    """Bad arguments: an empty label list, a template without ``{}``..."""


class ModelNotFoundError(PermanentError):
    """A model id or path that cannot be loaded."""


class BadImageError(PermanentError):
    """An input that is not a readable image; fails that item only."""


class ServiceUnavailableError(RetryableError):
    """Redis, Postgres or S3 could not be reached."""


class WorkerSideError(DifflabelError):
    """This worker cannot do the work (its model or device will not load, S3 or the database
    is unreachable from here): the items go back uncharged for another worker."""


class WorkerBroken(WorkerSideError):
    """Too many worker-side failures in a row: the worker stops consuming and exits."""


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """The first line of an exception's message (its type when it has none), for one-line
    errors and logs."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:limit] if limit else line
