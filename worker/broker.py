"""The broker side of round tasks: send them, check the broker, read a queue's depth.

Shared by the Celery task (follow-ups), the rescuer and the CLI; imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from orchestrator.settings import Settings, redact
from worker.errors import ServiceUnavailableError
from worker.messages import Message, RoundTask, chunks

if TYPE_CHECKING:
    from celery import Celery

ROUND_TASK = "difflabel.round"


def send_tasks(app: Celery, settings: Settings, queue: str, tasks: Sequence[RoundTask]) -> int:
    """Put round tasks on ``queue``. Returns tasks sent."""
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for t in tasks:
                args, kwargs = t.encode()
                app.send_task(ROUND_TASK, args=args, kwargs=kwargs or None, queue=queue, producer=producer)
                sent += 1
    except Exception as e:  # noqa: BLE001 - kombu raises many connection error types
        raise ServiceUnavailableError(f"broker {redact(settings.broker_url)} is unreachable: "
                                      f"{type(e).__name__}") from e
    return sent


def send_rounds(app: Celery, settings: Settings, job_id: int, messages: Sequence[Message],
                chunk: int | None = None, queue: str | None = None) -> int:
    """Enqueue messages as round tasks of ``settings.items_per_task`` items on ``queue``
    (default: the settings' queue). Returns tasks sent."""
    if not messages:
        return 0
    tasks = [RoundTask(job_id, group) for group in chunks(list(messages), chunk or settings.items_per_task)]
    return send_tasks(app, settings, queue or settings.queue, tasks)


def check_broker(app: Celery, settings: Settings) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as e:  # noqa: BLE001
        raise ServiceUnavailableError(f"broker {redact(settings.broker_url)} is unreachable: "
                                      f"{type(e).__name__}") from e


def queue_size(app, queue: str) -> int:
    """Messages waiting in ``queue`` on the Redis broker."""
    with app.connection_for_read() as conn:
        return int(conn.default_channel.client.llen(queue))
