# The worker with TensorFlow as well as OpenVINO: WORKER_ENGINE=tensorflow runs the SavedModel in
# process; WORKER_ENGINE=tfserving talks to a TensorFlow Serving sidecar (docker-compose.yml,
# profile "tensorflow"). The baked model directory is also a TF Serving version directory.
#
# Build from the repository root after `make model`:
#   docker build -f docker/worker-tensorflow.Dockerfile -t worker-tensorflow .

# The base: the public image, pinned by tag and by the digest of its multi-architecture index.
# Where no registry is reachable, `make images` passes --build-arg BASE_IMAGE=inference-base:bookworm,
# the same Debian bookworm with Python 3.11 built from Debian's archive (make base-image).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# checkov:skip=CKV_DOCKER_7:the base is the BASE_IMAGE argument, its default pinned by tag and digest (tests/test_docker.py)

FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY requirements.lock docker/requirements-worker.txt docker/requirements-worker-tensorflow.txt ./
# Wheels only from the wheelhouse the host prepared (make wheelhouse), mounted for this step alone:
# the build needs no network and the wheels never land in a layer.
RUN --mount=type=bind,source=build/wheelhouse/cp311,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements-worker-tensorflow.txt -c requirements.lock \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps tensorflow-serving-api==2.21.0

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-worker-tensorflow" \
      org.opencontainers.image.description="Pub/Sub -> TensorFlow / TF Serving / OpenVINO -> BigQuery image-inference worker" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --create-home --home-dir /home/worker --shell /usr/sbin/nologin worker
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY worker/ /app/worker/
# The job contract `python -m worker reconcile` republishes with; worker/job_contract.py loads it
# from ../functions/ (one source with the Cloud Function).
COPY functions/storage_job.py /app/functions/storage_job.py
COPY modelspec/ /app/modelspec/
COPY build/models/demo/1/ /models/demo/1/
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    WORKER_ENGINE=tensorflow \
    WORKER_MODEL_DIR=/models/demo/1 \
    WORKER_WEB_FRAMEWORK=flask
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORKER_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["python", "-m", "worker"]
# The HTTP face on 8080, pulling in the same process (WORKER_PULL=false: push only): Flask under
# gunicorn, or FastAPI under uvicorn with `-e WORKER_WEB_FRAMEWORK=fastapi` (worker/http/).
# `run` is the pull loop alone, without HTTP.
CMD ["serve"]
