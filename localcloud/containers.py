"""The container engine and the project's images: which engine, which tags, build, run, inspect.

One place that knows how to talk to podman (or Docker) on this machine kind, used by the Makefile
(`make images`: ``python -m localcloud.containers build``), by tests/test_images.py and by any test
that runs an image (the training image, the compose stack).

Stable API (other code relies on it; keep it simple):

``engine() -> Engine``
    The engine in use: ``Engine.name`` ("podman" or "docker"), ``Engine.path`` (the executable),
    ``Engine.env`` (the environment to run it with: ``CONTAINERS_CONF`` points podman at
    docker/containers.conf, which this kernel needs) and ``Engine.argv(*args)``. Chosen by
    ``CONTAINER_ENGINE=podman|docker`` or else podman when installed, else a Docker whose daemon
    answers. Raises ``EngineError`` (saying to run ``make images``) when there is none.

``IMAGES`` / ``image_tag(name) -> str``
    The local tag of each image in docker/: ``inference-<name>:local``, e.g.
    ``image_tag("train") == "inference-train:local"``. Names: worker-openvino, worker-tensorflow,
    train, function, localcloud, local-bigquery, pubsub-emulator, fake-gcs-server.
    ``BASE_IMAGES``: the Debian bases ``make base-image`` builds (``inference-base:bookworm``,
    Python 3.11; ``inference-base:trixie``, Python 3.13 for local-bigquery).

``image_exists(tag) -> bool``
    Whether the engine holds that image.

``run(image, args=(), *, name=None, env=None, volumes=None, network_host=False, ports=None,
      user=None, entrypoint=None, workdir=None, timeout_s=600, check=True) -> CompletedProcess``
    Run a container in the foreground until it exits and remove it (``--rm``); stdout and stderr
    are captured as text. ``volumes`` maps host paths to container paths (append ``:ro`` to the
    container path for read-only); ``network_host=True`` shares the host's network, so
    127.0.0.1:PORT reaches the emulators a test started on the host. ``check=True`` raises
    ``ContainerError`` with the container's output when it exits non-zero.
    Example (the training image against the host's emulators)::

        from localcloud import containers
        containers.run(containers.image_tag("train"), ["train", "--help"], network_host=True,
                       env={"PUBSUB_EMULATOR_HOST": "127.0.0.1:8085"},
                       volumes={str(tmp_path): "/work"}, user=f"{os.getuid()}:{os.getgid()}")

``start(image, args=(), **same options, stop_timeout_s=30) -> Container``
    The same, detached: ``Container.logs()``, ``.exec(argv)``, ``.stop(timeout_s)`` (SIGTERM,
    then SIGKILL after the timeout; returns the exit code), ``.wait()``, ``.inspect()``,
    ``.remove()``; a context manager that removes the container on exit.

``compose("up" | "down", project=None, env=None) -> CompletedProcess``
    docker/docker-compose.yml with podman-compose (docker-compose with Docker): ``up`` starts the
    services outside any profile, detached; ``down`` removes containers, volumes and network.
    Host ports come from ``COMPOSE_*_PORT`` in env (``COMPOSE_PORTS`` lists them and the defaults).

``build(spec)`` / ``python -m localcloud.containers build [NAME...] [--no-cache]``
    What `make images` runs: each Dockerfile with ``--build-arg BASE_IMAGE=<local base>`` when no
    registry is reachable (``IMAGE_BASE=local|public|auto``), from the wheelhouse in build/wheelhouse.

Files written inside a container by a non-root image user land on the host owned by that user:
pass ``user=`` (for example the caller's uid) when a test mounts its tmp_path read-write.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from localcloud.config import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"
CONTAINERS_CONF = DOCKER_DIR / "containers.conf"
WHEELHOUSE = REPO_ROOT / "build" / "wheelhouse"


class EngineError(RuntimeError):
    """No usable container engine, or the engine failed: the message says what to do."""


class ContainerError(RuntimeError):
    """A container exited non-zero; carries its output."""

    def __init__(self, message: str, returncode: int, stdout: str, stderr: str):
        super().__init__(message)
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@dataclass(frozen=True)
class ImageSpec:
    """One image in docker/: its Dockerfile, its local tag and the base it builds on."""

    name: str
    dockerfile: str  # relative to the repository root
    base: str  # the local base image (make base-image) used when no registry is reachable
    wheelhouse: str = "cp311"  # build/wheelhouse/<this>: the wheels the image installs from
    in_cloud_build: bool = False  # built and pushed by cloudbuild.yaml as well
    # Builds run without network (every wheel comes from the wheelhouse) except where apt-get
    # installs a Debian package: Java for the Pub/Sub emulator.
    network: bool = False

    @property
    def tag(self) -> str:
        return f"inference-{self.name}:local"


BASE_BOOKWORM = "inference-base:bookworm"
BASE_TRIXIE = "inference-base:trixie"
BASE_IMAGES = {"bookworm": BASE_BOOKWORM, "trixie": BASE_TRIXIE}

IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec("worker-openvino", "docker/worker-openvino.Dockerfile", BASE_BOOKWORM, in_cloud_build=True),
        ImageSpec("worker-tensorflow", "docker/worker-tensorflow.Dockerfile", BASE_BOOKWORM, in_cloud_build=True),
        ImageSpec("train", "docker/train.Dockerfile", BASE_BOOKWORM, in_cloud_build=True),
        ImageSpec("function", "docker/function.Dockerfile", BASE_BOOKWORM),
        ImageSpec("localcloud", "docker/localcloud.Dockerfile", BASE_BOOKWORM),
        ImageSpec("local-bigquery", "docker/local-bigquery.Dockerfile", BASE_TRIXIE, wheelhouse="cp313"),
        ImageSpec("pubsub-emulator", "docker/pubsub-emulator.Dockerfile", BASE_BOOKWORM, network=True),
        ImageSpec("fake-gcs-server", "docker/fake-gcs-server.Dockerfile", BASE_BOOKWORM),
    )
}


def image_tag(name: str) -> str:
    """The local tag of an image in docker/ (``inference-<name>:local``)."""
    try:
        return IMAGES[name].tag
    except KeyError:
        raise KeyError(f"no image named {name!r} in docker/; known: {', '.join(IMAGES)}") from None


@dataclass(frozen=True)
class Engine:
    name: str  # "podman" or "docker"
    path: str
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        return [self.path, *args]

    def call(self, *args: str, timeout_s: float | None = 600, check: bool = True,
             capture: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(*args), env=dict(self.env), text=True, timeout=timeout_s,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.PIPE if capture else None)
        if check and result.returncode != 0:
            raise EngineError(f"`{self.name} {' '.join(args[:3])} ...` failed (exit {result.returncode}): "
                              f"{(result.stderr or '').strip()[-2000:]}")
        return result


def _engine_env(name: str, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    if name == "podman":
        # The kernel needs runc, cgroupfs and allowed ulimits (docker/containers.conf says why);
        # podman ignores HEALTHCHECK unless images are built in Docker's format.
        env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
        env.setdefault("BUILDAH_FORMAT", "docker")
    return env


def _docker_answers(path: str, env: Mapping[str, str]) -> bool:
    try:
        return subprocess.run([path, "info"], env=dict(env), capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def engine(env: Mapping[str, str] | None = None) -> Engine:
    """The container engine to use (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    wanted = env.get("CONTAINER_ENGINE", "").strip()
    if wanted and wanted not in ("podman", "docker"):
        raise EngineError(f"CONTAINER_ENGINE={wanted!r}: choose podman or docker")
    for name in ([wanted] if wanted else ["podman", "docker"]):
        # /usr/local/bin/docker here is a client without a daemon: a Docker counts only if it answers.
        path = shutil.which(name, path=env.get("PATH"))
        if not path:
            continue
        engine_env = _engine_env(name, env)
        if name == "docker" and not _docker_answers(path, engine_env):
            continue
        return Engine(name, path, engine_env)
    raise EngineError("no container engine: install podman (make images installs it from Debian) "
                      "or start a Docker daemon, or set CONTAINER_ENGINE")


def image_exists(tag: str, eng: Engine | None = None) -> bool:
    eng = eng or engine()
    if eng.name == "podman":
        return eng.call("image", "exists", tag, check=False).returncode == 0
    return eng.call("image", "inspect", tag, check=False).returncode == 0


def image_size_bytes(tag: str, eng: Engine | None = None) -> int:
    eng = eng or engine()
    return int(eng.call("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def _run_options(*, name: str | None, env: Mapping[str, str] | None, volumes: Mapping[str, str] | None,
                 network_host: bool, ports: Mapping[int, int] | None, user: str | None,
                 entrypoint: str | Sequence[str] | None, workdir: str | None,
                 extra: Iterable[str]) -> list[str]:
    options: list[str] = []
    if name:
        options += ["--name", name]
    for key, value in (env or {}).items():
        options += ["--env", f"{key}={value}"]
    for host, container in (volumes or {}).items():
        options += ["--volume", f"{host}:{container}"]
    if network_host:
        options += ["--network", "host"]
    for host_port, container_port in (ports or {}).items():
        options += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
    if user:
        options += ["--user", user]
    if entrypoint is not None:
        options += ["--entrypoint", entrypoint if isinstance(entrypoint, str) else json.dumps(list(entrypoint))]
    if workdir:
        options += ["--workdir", workdir]
    return options + list(extra)


def run(image: str, args: Sequence[str] = (), *, name: str | None = None, env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None, network_host: bool = False,
        ports: Mapping[int, int] | None = None, user: str | None = None,
        entrypoint: str | Sequence[str] | None = None, workdir: str | None = None,
        timeout_s: float | None = 600, check: bool = True, extra: Iterable[str] = (),
        eng: Engine | None = None) -> subprocess.CompletedProcess:
    """Run a container to completion (``--rm``), output captured; see the module docstring."""
    eng = eng or engine()
    options = _run_options(name=name, env=env, volumes=volumes, network_host=network_host, ports=ports,
                           user=user, entrypoint=entrypoint, workdir=workdir, extra=extra)
    result = eng.call("run", "--rm", *options, image, *args, timeout_s=timeout_s, check=False)
    if check and result.returncode != 0:
        raise ContainerError(f"container of {image} {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
                             result.returncode, result.stdout, result.stderr)
    return result


@dataclass
class Container:
    """A detached container (see ``start``)."""

    name: str
    image: str
    eng: Engine

    def inspect(self) -> dict:
        return json.loads(self.eng.call("container", "inspect", self.name).stdout)[0]

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        result = self.eng.call("logs", self.name, check=False)
        return (result.stdout or "") + (result.stderr or "")

    def exec(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        return self.eng.call("exec", self.name, *argv, check=check)

    def stop(self, timeout_s: int = 30) -> int:
        """SIGTERM (the image's STOPSIGNAL), SIGKILL after timeout_s; the exit code."""
        self.eng.call("stop", "--time", str(timeout_s), self.name, timeout_s=timeout_s + 60)
        return self.wait()

    def wait(self) -> int:
        return int(self.inspect()["State"]["ExitCode"])

    def remove(self) -> None:
        # --volumes: the anonymous volumes of the image's VOLUME directives go with it.
        self.eng.call("rm", "--force", "--volumes", self.name, check=False)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def start(image: str, args: Sequence[str] = (), *, name: str | None = None, env: Mapping[str, str] | None = None,
          volumes: Mapping[str, str] | None = None, network_host: bool = False,
          ports: Mapping[int, int] | None = None, user: str | None = None,
          entrypoint: str | Sequence[str] | None = None, workdir: str | None = None,
          stop_timeout_s: int = 30, extra: Iterable[str] = (), eng: Engine | None = None) -> Container:
    """Start a container detached (not removed on exit, so its exit code and logs stay readable)."""
    eng = eng or engine()
    name = name or f"inference-test-{uuid.uuid4().hex[:10]}"
    options = _run_options(name=name, env=env, volumes=volumes, network_host=network_host, ports=ports,
                           user=user, entrypoint=entrypoint, workdir=workdir, extra=extra)
    eng.call("run", "--detach", "--stop-timeout", str(stop_timeout_s), *options, image, *args)
    return Container(name, image, eng)


# --- Compose --------------------------------------------------------------------------------------

COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
# Host ports of the compose stack (docker-compose.yml's ${COMPOSE_*_PORT:-default}).
COMPOSE_PORTS = {"COMPOSE_PUBSUB_PORT": 8085, "COMPOSE_GCS_PORT": 4443, "COMPOSE_BIGQUERY_PORT": 9050,
                 "COMPOSE_BIGQUERY_GRPC_PORT": 9060, "COMPOSE_WORKER_PORT": 8081}


def compose_argv(project: str | None = None, eng: Engine | None = None) -> list[str]:
    """The compose command for docker/docker-compose.yml: podman-compose with podman, else
    docker-compose (v1; `docker compose` v2 is not installed here)."""
    eng = eng or engine()
    tool = "podman-compose" if eng.name == "podman" else "docker-compose"
    path = shutil.which(tool)
    if not path:
        raise EngineError(f"{tool} not found: run `make container-engine` (Debian package {tool})")
    return [path, *(["-p", project] if project else []), "-f", str(COMPOSE_FILE)]


def compose_default_services() -> list[str]:
    """The services outside any profile: podman-compose 1.0 ignores `profiles`, so `up` names them."""
    import yaml

    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return [name for name, spec in services.items() if not spec.get("profiles")]


def compose(action: str, project: str | None = None, env: Mapping[str, str] | None = None,
            eng: Engine | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """`up` (detached, the default services) or `down` (with volumes) of docker/docker-compose.yml."""
    import yaml

    eng = eng or engine()
    # The compose file's `name:` unless told otherwise (podman-compose 1.0 would take the directory's).
    project = project or yaml.safe_load(COMPOSE_FILE.read_text())["name"]
    argv = compose_argv(project, eng)
    argv += {"up": ["up", "-d", *compose_default_services()], "down": ["down", "-v"], "logs": ["logs"]}[action]
    result = subprocess.run(argv, env={**eng.env, **(env or {})}, capture_output=True, text=True, timeout=timeout_s)
    if action == "down" and eng.name == "podman":
        # podman-compose 1.0 leaves the project's network behind.
        eng.call("network", "rm", f"{project}_default", check=False)
    return result


# --- Building ------------------------------------------------------------------------------------

PUBLIC_REGISTRY = ("registry-1.docker.io", 443)


def registry_reachable(address: tuple[str, int] = PUBLIC_REGISTRY, timeout_s: float = 3.0) -> bool:
    """Whether the registry of the Dockerfiles' default bases answers (DNS fails here)."""
    import socket

    try:
        socket.create_connection(address, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def local_bases(env: Mapping[str, str] | None = None) -> bool:
    """Build on the local Debian bases (make base-image)? IMAGE_BASE=local|public|auto (default auto:
    local when the public registry cannot be reached)."""
    choice = (os.environ if env is None else env).get("IMAGE_BASE", "auto").strip() or "auto"
    if choice not in ("local", "public", "auto"):
        raise EngineError(f"IMAGE_BASE={choice!r}: choose local, public or auto")
    return choice == "local" or (choice == "auto" and not registry_reachable())


def build_args(spec: ImageSpec, base_image: str | None = None, local: bool = True) -> dict[str, str]:
    """The build arguments of an image: its base, a local one (make base-image) or else the
    Dockerfile's default (the public image pinned by digest). cloudbuild.yaml passes the same
    names (tests/test_cloudbuild.py)."""
    if base_image:
        return {"BASE_IMAGE": base_image}
    return {"BASE_IMAGE": spec.base} if local else {}


def ensure_base(suite: str, tarball: Path, eng: Engine | None = None) -> str:
    """Import the Debian root file system tarball (make base-image) as BASE_IMAGES[suite], once."""
    eng = eng or engine()
    tag = BASE_IMAGES[suite]
    if not image_exists(tag, eng):
        if not tarball.is_file():
            raise EngineError(f"{tarball} is missing: run `make base-image`")
        eng.call("import", "--change", 'CMD ["python3"]', str(tarball), tag)
    return tag


PUBSUB_STAGE = REPO_ROOT / "build" / "images" / "pubsub-emulator"


def stage_pubsub_emulator(stage: Path = PUBSUB_STAGE) -> Path:
    """Copy Google's Pub/Sub emulator jar (from this machine's Cloud SDK) and the project's compiled
    patch into the build context, where docker/pubsub-emulator.Dockerfile takes them from."""
    from localcloud import services

    jar = services.pubsub_emulator_jar()
    patch = services.pubsub_emulator_patch(jar)
    (stage / "lib").mkdir(parents=True, exist_ok=True)
    target = stage / "lib" / "cloud-pubsub-emulator.jar"
    if not target.is_file() or target.stat().st_size != jar.stat().st_size:
        shutil.copyfile(jar, target)
    shutil.copytree(patch, stage / "patch", dirs_exist_ok=True)
    (stage / "VERSION").write_text(jar.name + "\n")
    return stage


def build(spec: ImageSpec, eng: Engine | None = None, base_image: str | None = None, local: bool = True,
          no_cache: bool = False) -> float:
    """Build one image from the repository root; returns the seconds it took."""
    eng = eng or engine()
    if not (WHEELHOUSE / spec.wheelhouse).is_dir():
        raise EngineError(f"{WHEELHOUSE / spec.wheelhouse} is missing: run `make wheelhouse`")
    if spec.name == "pubsub-emulator":
        stage_pubsub_emulator()
    arguments = ["build", "--file", spec.dockerfile, "--tag", spec.tag] + (["--no-cache"] if no_cache else [])
    if eng.name == "podman":
        # HEALTHCHECK is kept only in Docker's image format; the wheelhouse is the only package source.
        arguments += ["--format", "docker"] + ([] if spec.network else ["--network", "none"])
    for key, value in build_args(spec, base_image, local).items():
        arguments += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    result = subprocess.run(eng.argv(*arguments, str(REPO_ROOT)), env=dict(eng.env), cwd=REPO_ROOT)
    if result.returncode != 0:
        raise EngineError(f"building {spec.tag} from {spec.dockerfile} failed (exit {result.returncode}); "
                          "the build log is above")
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m localcloud.containers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="build images in docker/ (all by default)")
    build_parser.add_argument("names", nargs="*", help=f"of: {', '.join(IMAGES)}")
    build_parser.add_argument("--base-image", help="override every image's BASE_IMAGE")
    build_parser.add_argument("--no-cache", action="store_true", help="build every layer afresh (a cold build)")
    sub.add_parser("engine", help="print the engine in use")
    base_parser = sub.add_parser("ensure-base", help="import a Debian rootfs tarball as the local base image")
    base_parser.add_argument("suite", choices=sorted(BASE_IMAGES))
    base_parser.add_argument("tarball", type=Path)
    sub.add_parser("sizes", help="print each built image's size")
    compose_parser = sub.add_parser("compose", help="docker/docker-compose.yml up (default services) or down")
    compose_parser.add_argument("action", choices=["up", "down"])
    options = parser.parse_args(argv)
    eng = engine()
    if options.command == "engine":
        print(f"{eng.name} {eng.path} CONTAINERS_CONF={eng.env.get('CONTAINERS_CONF', '')}")
        return 0
    if options.command == "ensure-base":
        print(ensure_base(options.suite, options.tarball, eng))
        return 0
    if options.command == "compose":
        result = compose(options.action, eng=eng)
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        return result.returncode
    if options.command == "sizes":
        for spec in IMAGES.values():
            if image_exists(spec.tag, eng):
                print(f"{spec.tag:40} {image_size_bytes(spec.tag, eng) / 1e6:8.0f} MB")
        return 0
    names = options.names or list(IMAGES)
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(IMAGES)}")
    local = local_bases()
    timings = {}
    for index, name in enumerate(names, 1):
        base = options.base_image or (IMAGES[name].base if local else "the Dockerfile's default")
        print(f"[{index}/{len(names)}] building {IMAGES[name].tag} on {base} ({eng.name})", file=sys.stderr, flush=True)
        timings[name] = build(IMAGES[name], eng, options.base_image, local, options.no_cache)
    for name, seconds in timings.items():
        tag = IMAGES[name].tag
        print(f"{tag:40} {seconds:7.1f} s {image_size_bytes(tag, eng) / 1e6:8.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
