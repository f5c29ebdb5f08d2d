# The Cloud Function (functions/main.py) under functions-framework, for the compose stack only:
# in Google Cloud the function is deployed from source (infra/function.tf). Same requirements
# file as that deployment.
#   docker build -f docker/function.Dockerfile -t function .

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
COPY requirements.lock functions/requirements.txt ./
# Wheels only from the wheelhouse the host prepared (make wheelhouse), mounted for this step alone:
# the build needs no network and the wheels never land in a layer.
RUN --mount=type=bind,source=build/wheelhouse/cp311,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements.txt -c requirements.lock

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-function" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 function \
    && useradd --system --uid 10001 --gid function --no-create-home --shell /usr/sbin/nologin function
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY functions/main.py /app/main.py
COPY functions/storage_job.py /app/storage_job.py
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080
# Any HTTP answer means the server is up (a GET is not a CloudEvent, so it gets a 4xx).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), timeout=2).close()"]
ENTRYPOINT ["functions-framework", "--target", "on_object_finalized", "--source", "main.py", "--signature-type", "cloudevent", "--host", "0.0.0.0", "--port", "8080"]
