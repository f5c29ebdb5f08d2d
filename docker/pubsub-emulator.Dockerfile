# Pub/Sub emulator of the compose stack: Google's own emulator (the Cloud SDK component
# google-cloud-cli-pubsub-emulator, a Java program) on Java 17 from Debian, started with the
# project's stream-cleanup patch ahead of the jar on the classpath, as `make up` starts it
# (localcloud/services.py). The emulator image gcr.io/google.com/cloudsdktool/google-cloud-cli:*-emulators
# cannot be pulled where no registry is reachable; this one is built from the base image.
# `make images` stages the jar from this machine's Cloud SDK and the compiled patch into
# build/images/pubsub-emulator/ first (python -m localcloud.containers stage).
#   docker build -f docker/pubsub-emulator.Dockerfile -t pubsub-emulator .

# The base: the public image, pinned by tag and by the digest of its multi-architecture index.
# Where no registry is reachable, `make images` passes --build-arg BASE_IMAGE=inference-base:bookworm,
# the same Debian bookworm with Python 3.11 built from Debian's archive (make base-image).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# checkov:skip=CKV_DOCKER_7:the base is the BASE_IMAGE argument, its default pinned by tag and digest (tests/test_docker.py)

FROM ${BASE_IMAGE} AS emulator
WORKDIR /emulator
COPY build/images/pubsub-emulator/ /emulator/

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inference-pubsub-emulator" \
      org.opencontainers.image.description="Google's Cloud Pub/Sub emulator on Debian's Java 17, with the project's patch"
# Java from Debian's archive over plain http (the only network this build needs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless=17.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pubsub \
    && useradd --system --uid 10001 --gid pubsub --no-create-home --shell /usr/sbin/nologin pubsub
COPY --from=emulator /emulator/ /opt/pubsub-emulator/
USER 10001:10001
EXPOSE 8085
# Any HTTP answer on / means the emulator serves (it answers "Ok").
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=20 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8085/', timeout=2)"]
ENTRYPOINT ["java", "-cp", "/opt/pubsub-emulator/patch:/opt/pubsub-emulator/lib/cloud-pubsub-emulator.jar", "com.google.cloud.pubsub.testing.v1.Main"]
CMD ["--host=0.0.0.0", "--port=8085"]
