"""gunicorn settings of the worker's HTTP face. Used by `python -m worker serve` and by
`gunicorn -c worker/http/gunicorn_conf.py` (the app comes from wsgi_app below).

workers = 1. One process holds the one model. OpenVINO and TensorFlow each use every core for
one inference call already, so a second gunicorn worker would only hold a second copy of the
model and fight the first for the same cores. The seed's fault went further: each gunicorn
worker started its own TF model server on the same port. Concurrency comes from threads
(gthread). Request threads decode images in parallel (Pillow releases the GIL) and hand pixels
to one micro-batcher (worker/http/classify.py). To grow, add threads or VMs, not workers. With
workers = 1 the Prometheus registry needs no multiprocess mode either. (gunicorn's "dirty
workers" would keep the model out of the HTTP workers too, at the price of pickling every image
between processes.)

preload_app = False. The app, and with it the model, is built in the worker process after the
fork. OpenVINO's and TensorFlow's thread pools and gRPC channels (Pub/Sub pull, TF Serving) do
not survive fork(), so the model must not load in the master. The model then loads in a
background thread (worker/http/service.py), so /healthz answers during the load and /readyz
says "loading".

Settings come from WORKER_HTTP_* variables (worker/settings.py, HttpSettings).
"""

from __future__ import annotations

import os

from worker.settings import HttpSettings

_http = HttpSettings.from_env()

wsgi_app = "worker.http.app:create_app_from_env()"
bind = [f"{_http.host}:{_http.port}"]
workers = 1
worker_class = "gthread"
threads = _http.threads
# gthread: the time the worker's main loop may go silent before the master kills it (requests
# themselves run in threads and are not cut by it).
timeout = int(_http.timeout_s)
# After SIGTERM: finish requests, then stop pulling (queued messages are nacked) within this.
graceful_timeout = int(_http.graceful_timeout_s)
keepalive = int(_http.keepalive_s)
preload_app = False
max_requests = 0  # never recycle the worker: a recycle loads the model again
# The heartbeat file on tmpfs: on a disk-backed /tmp, gunicorn's fchmod can stall the worker.
worker_tmp_dir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
# gunicorn >= 25 opens a control socket under $HOME by default. Two servers on one host would
# share the path, and the image's home directory is not writable. We do not use the socket.
control_socket_disable = True
proc_name = "inference-worker"
# Errors on stderr; no access log: /metrics counts every request by endpoint and status.
errorlog = "-"
accesslog = None
loglevel = os.environ.get("WORKER_LOG_LEVEL", "info").lower()


def worker_exit(server, worker):
    """In the worker process, as it exits: stop pulling and finish the batches in flight."""
    from worker.http.app import EXTENSION

    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get(EXTENSION)
    if service is not None:
        service.stop(max(1.0, graceful_timeout - 5.0))
