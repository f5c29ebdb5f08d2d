# BigQuery emulator of the compose stack: local-bigquery (needs Python 3.13) with the DuckDB
# extensions from PyPI placed where DuckDB looks, so it never downloads them at run time (the
# same setup as localcloud/services.py uses outside Docker).
#   docker build -f docker/local-bigquery.Dockerfile -t local-bigquery .

# The base: the public image, pinned by tag and by the digest of its multi-architecture index.
# Where no registry is reachable, `make images` passes --build-arg BASE_IMAGE=inference-base:trixie,
# Debian trixie with its Python 3.13 built from Debian's archive (make base-image; bookworm has no 3.13).
ARG BASE_IMAGE=python:3.13.9-slim-bookworm@sha256:b685a4fa58bb19d1814d78a1ec0f0208f351452724f78b20212c984d6e124a34
# checkov:skip=CKV_DOCKER_7:the base is the BASE_IMAGE argument, its default pinned by tag and digest (tests/test_docker.py)

FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY localcloud/bigquery-requirements.txt ./
# --no-deps: the file pins the whole tree (local-bigquery declares a DuckDB it does not need).
# Wheels only from the wheelhouse the host prepared (make wheelhouse), mounted for this step alone:
# the build needs no network and the wheels never land in a layer.
RUN --mount=type=bind,source=build/wheelhouse/cp313,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps -r bigquery-requirements.txt

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="local-bigquery" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bigquery \
    && useradd --system --uid 10001 --gid bigquery --create-home --home-dir /home/bigquery --shell /usr/sbin/nologin bigquery \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=deps /opt/venv /opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DuckDB loads extensions from $HOME/.duckdb/extensions/VERSION/linux_amd64/.
RUN for ext in /opt/venv/lib/python3.13/site-packages/duckdb_extension_*/extensions/*/*.duckdb_extension; do \
        target="/home/bigquery/.duckdb/extensions/$(basename "$(dirname "$ext")")/linux_amd64"; \
        mkdir -p "$target" && cp "$ext" "$target/"; \
    done \
    && chown -R 10001:10001 /home/bigquery/.duckdb
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/home/bigquery \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9050 9060
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=20 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9050/bigquery/v2/projects/local-project/datasets', timeout=2)"]
ENTRYPOINT ["local-bigquery", "serve", "--host", "0.0.0.0", "--port", "9050", "--grpc-port", "9060", "--data-dir", "/data"]
CMD ["--project", "local-project"]
