"""The worker's HTTP face: health, direct classification, Pub/Sub push delivery and metrics.

A Flask app (app.py) served by gunicorn (gunicorn_conf.py) in one worker process that holds the
one model; `python -m worker serve` starts it and, unless WORKER_PULL=false, pulls jobs in the
same process.
"""
