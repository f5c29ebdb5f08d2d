"""localcloud/containers.py without an engine: tags, build arguments, run options, engine choice."""

from __future__ import annotations

import pytest

from localcloud import containers
from localcloud.config import REPO_ROOT


def test_every_dockerfile_is_a_known_image_with_a_local_tag():
    dockerfiles = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docker").glob("*.Dockerfile")}
    assert {spec.dockerfile for spec in containers.IMAGES.values()} == dockerfiles
    assert containers.image_tag("worker-openvino") == "inference-worker-openvino:local"
    assert containers.image_tag("train") == "inference-train:local"
    with pytest.raises(KeyError, match="known: worker-openvino"):
        containers.image_tag("nope")


def test_build_args_name_the_local_base_or_leave_the_dockerfile_default():
    spec = containers.IMAGES["local-bigquery"]
    assert containers.build_args(spec) == {"BASE_IMAGE": "inference-base:trixie"}
    assert containers.build_args(spec, local=False) == {}
    assert containers.build_args(spec, base_image="x:1") == {"BASE_IMAGE": "x:1"}


def test_image_base_choice_from_the_environment(monkeypatch):
    assert containers.local_bases({"IMAGE_BASE": "local"}) is True
    assert containers.local_bases({"IMAGE_BASE": "public"}) is False
    monkeypatch.setattr(containers, "registry_reachable", lambda *a, **k: False)
    assert containers.local_bases({}) is True
    with pytest.raises(containers.EngineError, match="IMAGE_BASE='cloud'"):
        containers.local_bases({"IMAGE_BASE": "cloud"})


def test_run_options():
    options = containers._run_options(name="n", env={"A": "1"}, volumes={"/h": "/c:ro"}, network_host=True,
                                      ports={18080: 8080}, user="10:10", entrypoint=["python", "-m", "x"],
                                      workdir="/w", extra=["--init"])
    assert options == ["--name", "n", "--env", "A=1", "--volume", "/h:/c:ro", "--network", "host",
                       "--publish", "127.0.0.1:18080:8080", "--user", "10:10",
                       "--entrypoint", '["python", "-m", "x"]', "--workdir", "/w", "--init"]


def test_engine_choice(monkeypatch, tmp_path):
    podman = tmp_path / "podman"
    podman.write_text("#!/bin/sh\n")
    podman.chmod(0o755)
    chosen = containers.engine({"PATH": str(tmp_path)})
    assert chosen.name == "podman" and chosen.env["CONTAINERS_CONF"] == str(containers.CONTAINERS_CONF)
    assert chosen.env["BUILDAH_FORMAT"] == "docker"
    with pytest.raises(containers.EngineError, match="choose podman or docker"):
        containers.engine({"PATH": str(tmp_path), "CONTAINER_ENGINE": "lxc"})
    with pytest.raises(containers.EngineError, match="make images"):
        containers.engine({"PATH": str(tmp_path / "empty")})


def test_compose_default_services_leave_out_the_profiles():
    services = containers.compose_default_services()
    assert {"pubsub", "gcs", "bigquery", "init", "function", "eventarc", "worker"} == set(services)
