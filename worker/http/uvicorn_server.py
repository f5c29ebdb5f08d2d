"""`python -m worker serve` with WORKER_WEB_FRAMEWORK=fastapi: uvicorn in this process, with
worker/http/uvicorn_conf.py's settings. The exit code tells the supervisor what happened: 0 after
SIGTERM, 1 when the pull stream ended (start a fresh process), 3 when a start-up step failed."""

from __future__ import annotations

import logging
import os
import signal
import threading

from worker.http.wiring import WORKER_BOOT_ERROR

PULL_ENDED = 1


class _PlainRecords(logging.Filter):
    """uvicorn adds an ANSI-coloured copy of its messages to its records: not for JSON logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def run_uvicorn() -> int:
    import uvicorn

    from worker.http import uvicorn_conf
    from worker.http.asgi import create_app_from_env
    from worker.settings import HttpSettings

    pull_ended = threading.Event()

    def end_pull() -> None:
        # A graceful stop, as after SIGTERM (requests finish, queued messages are nacked), then exit 1.
        pull_ended.set()
        os.kill(os.getpid(), signal.SIGTERM)

    app = create_app_from_env(on_pull_ended=end_pull)  # exits 3 when a client cannot be made
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).addFilter(_PlainRecords())
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_conf.config_kwargs(HttpSettings.from_env())))
    # uvicorn handles SIGTERM and SIGINT while it runs, then raises the signal again for the handler
    # that was there before. With this one, a graceful stop ends in the exit code below rather than
    # in a kill by the default handler.
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, lambda *_: None)
    server.run()
    if not server.started:  # the lifespan failed (uvicorn logged why); a taken port exits 1 in uvicorn
        return WORKER_BOOT_ERROR
    return PULL_ENDED if pull_ended.is_set() else 0
