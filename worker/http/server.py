"""`python -m worker serve`: gunicorn, in this process, with worker/http/gunicorn_conf.py."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication


class _Server(BaseApplication):
    def __init__(self, settings: dict):
        self._settings = settings
        super().__init__(prog="python -m worker serve")

    def load_config(self) -> None:
        for name, value in self._settings.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self):
        # Runs in the worker process (preload_app is off): the model loads after the fork.
        from worker.http.app import create_app_from_env

        return create_app_from_env()


def run_gunicorn() -> int:
    from worker.http import gunicorn_conf

    _Server({name: value for name, value in vars(gunicorn_conf).items() if not name.startswith("_")}).run()
    return 0
