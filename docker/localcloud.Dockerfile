# Helper image of the compose stack: the Eventarc stand-in (GCS notification on Pub/Sub -> CloudEvent
# POSTed to the function, python -m localcloud.eventarc) and the one-shot init that creates topics,
# subscriptions, the bucket, dataset, tables and views (docker/compose_init.py).
#   docker build -f docker/localcloud.Dockerfile -t localcloud .

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
COPY requirements.lock docker/requirements-localcloud.txt ./
# Wheels only from the wheelhouse the host prepared (make wheelhouse), mounted for this step alone:
# the build needs no network and the wheels never land in a layer.
RUN --mount=type=bind,source=build/wheelhouse/cp311,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements-localcloud.txt -c requirements.lock

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-localcloud" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 localcloud \
    && useradd --system --uid 10001 --gid localcloud --no-create-home --shell /usr/sbin/nologin localcloud
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
# localcloud finds sql/ next to its package (REPO_ROOT / "sql").
COPY localcloud/ /app/localcloud/
COPY worker/ /app/worker/
COPY modelspec/ /app/modelspec/
COPY sql/ /app/sql/
COPY docker/compose_init.py /app/compose_init.py
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# The Eventarc stand-in writes this file once its stream is open.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["test", "-f", "/tmp/eventarc.ready"]
ENTRYPOINT ["python"]
CMD ["-m", "localcloud.eventarc", "--help"]
