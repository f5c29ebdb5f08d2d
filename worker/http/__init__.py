"""The worker's HTTP face: health, direct classification, Pub/Sub push delivery and metrics.

The endpoints are written once (endpoints.py, over the service in service.py) and served either
by a Flask app (app.py) under gunicorn (gunicorn_conf.py) or by a FastAPI app (asgi.py) under
uvicorn (uvicorn_conf.py), as WORKER_WEB_FRAMEWORK says. Either way one process holds the one
model; `python -m worker serve` starts it and, unless WORKER_PULL=false, pulls jobs in the same
process.
"""
