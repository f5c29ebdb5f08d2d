# Training, export and conversion: `python -m modelkit ...` (TensorFlow, Keras, OpenVINO).
# The default command builds the demo dataset and model into /work (mount a volume there):
#   docker build -f docker/train.Dockerfile -t train .
#   docker run --rm -v "$PWD/build:/work" train
# writes /work/models/demo/1, the directory the worker images bake in.

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
COPY requirements.lock docker/requirements-worker.txt docker/requirements-train.txt ./
# Wheels only from the wheelhouse the host prepared (make wheelhouse), mounted for this step alone:
# the build needs no network and the wheels never land in a layer.
RUN --mount=type=bind,source=build/wheelhouse/cp311,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements-train.txt -c requirements.lock \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps tensorflow-serving-api==2.21.0

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-train" \
      org.opencontainers.image.description="Train, export and convert the image classifier (python -m modelkit)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 trainer \
    && useradd --system --uid 10001 --gid trainer --create-home --home-dir /home/trainer --shell /usr/sbin/nologin trainer \
    && mkdir -p /work \
    && chown 10001:10001 /work
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY worker/ /app/worker/
COPY modelkit/ /app/modelkit/
COPY modelspec/ /app/modelspec/
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2
USER 10001:10001
WORKDIR /work
# A batch job that exits when done: there is no long-running process whose health to probe.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "modelkit"]
CMD ["build-demo", "--dataset-dir", "/work/demo-dataset", "--models-root", "/work/models"]
