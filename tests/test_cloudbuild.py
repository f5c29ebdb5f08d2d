"""cloudbuild.yaml checked against Cloud Build's build config schema and against the repository.

Google publishes no machine-readable schema for build configs, so BUILD_CONFIG_SCHEMA below is
written from the documented fields (https://cloud.google.com/build/docs/build-config-file-schema
and .../configuring-builds/substitute-variable-values): unknown fields are errors, steps need a
name, user substitutions are _UPPER_CASE, durations are "<seconds>s". SchemaStore's community
schema (vendored by check-jsonschema) is checked as well. Then the semantics Cloud Build enforces
at submit time: every $VAR is a built-in or a declared substitution, every declared one is used.
"""

from __future__ import annotations

import json
import re

from tests.test_infra import INFRA, REPO, blocks, ci_tool, load_yaml, run, strip_comments, tf_text

CLOUDBUILD = REPO / "cloudbuild.yaml"

DURATION = {"type": "string", "pattern": r"^\d+(\.\d{1,9})?s$"}
STRINGS = {"type": "array", "items": {"type": "string"}}
VOLUMES = {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                      "required": ["name", "path"],
                                      "properties": {"name": {"type": "string"}, "path": {"type": "string"}}}}

BUILD_CONFIG_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Cloud Build build config (documented fields)",
    "type": "object",
    "additionalProperties": False,
    "required": ["steps"],
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "maxItems": 300,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "args": STRINGS,
                    "env": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*="}},
                    "allowFailure": {"type": "boolean"},
                    "allowExitCodes": {"type": "array", "items": {"type": ["integer", "string"]}},
                    "dir": {"type": "string"},
                    "id": {"type": "string", "minLength": 1},
                    "waitFor": STRINGS,
                    "entrypoint": {"type": "string"},
                    "secretEnv": STRINGS,
                    "volumes": VOLUMES,
                    "timeout": DURATION,
                    "script": {"type": "string"},
                    "automapSubstitutions": {"type": "boolean"},
                },
                "not": {"required": ["script", "args"]},
            },
        },
        "timeout": DURATION,
        "queueTtl": DURATION,
        "logsBucket": {"type": "string", "pattern": "^gs://"},
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "env": STRINGS,
                "secretEnv": STRINGS,
                "volumes": VOLUMES,
                "sourceProvenanceHash": {"type": "array", "items": {"enum": ["NONE", "SHA256", "MD5", "SHA512"]}},
                "machineType": {"enum": ["UNSPECIFIED", "N1_HIGHCPU_8", "N1_HIGHCPU_32", "E2_HIGHCPU_8",
                                         "E2_HIGHCPU_32", "E2_MEDIUM"]},
                "diskSizeGb": {"type": ["integer", "string"]},
                "substitutionOption": {"enum": ["MUST_MATCH", "ALLOW_LOOSE"]},
                "dynamicSubstitutions": {"type": "boolean"},
                "automapSubstitutions": {"type": "boolean"},
                "logStreamingOption": {"enum": ["STREAM_DEFAULT", "STREAM_ON", "STREAM_OFF"]},
                "logging": {"enum": ["LOGGING_UNSPECIFIED", "LEGACY", "GCS_ONLY", "STACKDRIVER_ONLY",
                                     "CLOUD_LOGGING_ONLY", "NONE"]},
                "defaultLogsBucketBehavior": {"enum": ["DEFAULT_LOGS_BUCKET_BEHAVIOR_UNSPECIFIED",
                                                       "REGIONAL_USER_OWNED_BUCKET"]},
                "pool": {"type": "object", "properties": {"name": {"type": "string"}}},
                "pubsubTopic": {"type": "string"},
                "requestedVerifyOption": {"enum": ["NOT_VERIFIED", "VERIFIED"]},
            },
        },
        "substitutions": {
            "type": "object",
            "maxProperties": 200,
            "propertyNames": {"pattern": "^_[A-Z0-9_]+$", "maxLength": 100},
            "additionalProperties": {"type": "string", "maxLength": 4000},
        },
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[\\w][\\w.-]{0,127}$"}},
        "serviceAccount": {"type": "string", "pattern": "^projects/[^/]+/serviceAccounts/[^/]+$"},
        "secrets": {"type": "array"},
        "availableSecrets": {"type": "object"},
        "artifacts": {"type": "object"},
        "images": {"type": "array", "items": {"type": "string"}},
    },
}

BUILT_IN = {
    # All builds.
    "PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION",
    # Triggered builds (empty otherwise).
    "TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID", "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME",
    "TAG_NAME", "REF_NAME", "TRIGGER_BUILD_CONFIG_PATH", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT",
}


def config() -> dict:
    return load_yaml(CLOUDBUILD)


def validate(instance, schema) -> list[str]:
    """Errors of a JSON Schema validation: jsonschema here if installed, else check-jsonschema."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        schema_file, instance_file = Path(tmp) / "schema.json", Path(tmp) / "instance.json"
        schema_file.write_text(json.dumps(schema))
        instance_file.write_text(json.dumps(instance))
        result = run([ci_tool("check-jsonschema"), "--schemafile", str(schema_file), str(instance_file)])
        return [] if result.returncode == 0 else [result.stdout + result.stderr]


def test_cloudbuild_matches_the_documented_build_config_schema():
    errors = validate(config(), BUILD_CONFIG_SCHEMA)
    assert not errors, "\n".join(errors)


def test_the_schema_rejects_what_cloud_build_rejects():
    good = {"steps": [{"name": "gcr.io/cloud-builders/docker", "args": ["version"]}]}
    assert validate(good, BUILD_CONFIG_SCHEMA) == []
    for bad in (
        {"steps": [{"args": ["version"]}]},                                         # step without name
        {"steps": [{"name": "x", "arg": ["typo"]}]},                                # unknown step field
        {"steps": [{"name": "x"}], "substitutions": {"_region": "x"}},              # lower-case key
        {"steps": [{"name": "x"}], "substitutions": {"REGION": "x"}},               # no underscore
        {"steps": [{"name": "x"}], "timeout": "1h"},                                # not seconds
        {"steps": [{"name": "x"}], "options": {"machineType": "E2_HUGE"}},          # unknown enum
        {"steps": [{"name": "x"}], "timeouts": "60s"},                              # unknown top field
    ):
        assert validate(bad, BUILD_CONFIG_SCHEMA), f"schema accepted {bad}"


def test_cloudbuild_matches_the_schemastore_schema():
    result = run([ci_tool("check-jsonschema"), "--builtin-schema", "vendor.cloudbuild", str(CLOUDBUILD)])
    assert result.returncode == 0, result.stdout + result.stderr


def substitution_references(value: str) -> set[str]:
    value = value.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)) | \
        set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", value))


def strings_in(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in strings_in(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    return []


def test_every_substitution_is_built_in_or_declared_and_every_declared_one_is_used():
    build = config()
    declared = set(build.get("substitutions", {}))
    assert (build.get("options") or {}).get("substitutionOption", "MUST_MATCH") == "MUST_MATCH"
    referenced = set()
    for key, value in build.items():
        if key != "substitutions":
            for text in strings_in(value):
                referenced |= substitution_references(text)
    unknown = {name for name in referenced if name not in BUILT_IN and name not in declared}
    assert not unknown, f"undeclared substitutions (write $$VAR for a shell variable): {sorted(unknown)}"
    assert declared - referenced == set(), f"declared but unused (Cloud Build fails the build): {declared - referenced}"
    header = CLOUDBUILD.read_text().split("substitutions:")[0]
    for name in declared:
        assert f"#   {name} " in header, f"document {name} in the header comment"


def test_steps_form_a_valid_graph_and_use_pinned_builders():
    steps = config()["steps"]
    ids = [step.get("id") for step in steps]
    assert all(ids) and len(set(ids)) == len(ids), "give every step a unique id"
    for index, step in enumerate(steps):
        for dependency in step.get("waitFor", []):
            assert dependency == "-" or dependency in ids[:index], f"{step['id']} waits for unknown {dependency}"
        name = step["name"]
        assert re.search(r"@sha256:[0-9a-f]{64}$", name) or re.search(r":\d+(\.\d+)+[\w.-]*$", name), \
            f"{step['id']}: pin {name} by digest or exact version"


def docker_builds() -> dict[str, str]:
    """Image tag -> Dockerfile of each `docker build` step."""
    builds = {}
    for step in config()["steps"]:
        args = step.get("args", [])
        if args[:1] == ["build"]:
            options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
            builds[options["--tag"]] = options["--file"]
            assert args[-1] == ".", "build context is the repository root"
    return builds


def test_images_are_built_from_existing_dockerfiles_tagged_with_the_commit_and_pushed():
    builds = docker_builds()
    assert builds
    for tag, dockerfile in builds.items():
        assert (REPO / dockerfile).is_file(), dockerfile
        assert tag.endswith(":$COMMIT_SHA")
        assert tag.startswith("${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/")
    deployable = {"docker/worker-openvino.Dockerfile", "docker/worker-tensorflow.Dockerfile", "docker/train.Dockerfile"}
    assert deployable <= set(builds.values())
    assert set(config()["images"]) == set(builds)
    push = next(step for step in config()["steps"] if step["id"] == "push-images")
    script = push["args"][-1]
    pushed = re.search(r"for image in ([\w\s-]+);", script).group(1).split()
    assert {tag.split("/")[-1].split(":")[0] for tag in builds} == set(pushed)
    assert "docker push" in script


def test_tests_run_before_anything_is_built():
    steps = {step["id"]: step for step in config()["steps"]}
    tests = steps["unit-tests"]
    script = tests["args"][-1]
    assert "python -m pytest" in script and "-r requirements.lock" in script
    assert "python -m modelkit build-demo" in script and "--models-root build/models" in script
    for step in steps.values():
        if step.get("args", [])[:1] == ["build"]:
            assert "unit-tests" in step["waitFor"]
    # The marker expression names markers pyproject.toml declares.
    markers_expression = config()["substitutions"]["_PYTEST_MARKERS"]
    declared = set(re.findall(r'^\s*"(\w+):', (REPO / "pyproject.toml").read_text(), re.M))
    assert set(re.findall(r"\w+", markers_expression)) - {"not", "and", "or"} <= declared


def test_deploy_steps_match_terraform():
    steps = {step["id"]: step for step in config()["steps"]}
    substitutions = config()["substitutions"]
    text = strip_comments(tf_text())
    variables = blocks(text, "variable")
    outputs = blocks(text, "output")

    apply = steps["terraform-apply"]
    assert apply["dir"] == "infra" and (REPO / apply["dir"] / "versions.tf").is_file()
    assert apply["waitFor"] == ["push-images"]
    script = apply["args"][-1]
    assert 'backend "gcs"' in (INFRA / "versions.tf").read_text() and "-backend-config=" in script
    passed = dict(re.findall(r'-var="([a-z_0-9]+)=([^"]*)"', script))
    assert set(passed) <= set(variables), f"unknown Terraform variables: {set(passed) - set(variables)}"
    assert passed["worker_image_tag"] == "$COMMIT_SHA"
    assert passed["project_id"] == "$PROJECT_ID"
    for output in re.findall(r"terraform output -raw ([a-z_0-9]+)", script):
        assert output in outputs, f"no Terraform output {output}"
    # Defaults agree, so a trigger with no overrides deploys what `terraform apply` would.
    assert f'"{substitutions["_REGION"]}"' == re.search(r'default\s*=\s*(".*")', variables["region"]).group(1)
    assert f'"{substitutions["_REPOSITORY"]}"' == re.search(
        r'default\s*=\s*(".*")', variables["artifact_repository_id"]).group(1)
    assert substitutions["_WORKER_IMAGE"] in {tag.split("/")[-1].split(":")[0] for tag in docker_builds()}

    roll = steps["roll-workers"]
    assert roll["waitFor"] == ["terraform-apply"]
    script = roll["args"][-1]
    assert "gcloud compute instance-groups managed rolling-action start-update" in script
    assert "--max-unavailable=0" in script and "--type=proactive" in script
    assert "wait-until" in script and "--version-target-reached" in script
    for written in re.findall(r"> (/workspace/[\w.]+)", steps["terraform-apply"]["args"][-1]):
        assert written in script, f"{written} is written but never read"


def dockerfile_arg_defaults(path) -> dict[str, str]:
    """ARG NAME=default lines before the first FROM: the build arguments a Dockerfile's bases take."""
    head = path.read_text().split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, re.M))


def test_cloud_build_builds_what_make_images_builds_with_the_same_build_arguments():
    from localcloud import containers

    substitutions = config()["substitutions"]
    built = {}
    for step in config()["steps"]:
        args = step.get("args", [])
        if args[:1] != ["build"]:
            continue
        options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
        name = options["--tag"].split("/")[-1].split(":")[0]
        build_args = dict(a.split("=", 1)[1].split("=", 1) for a in args if a.startswith("--build-arg="))
        built[name] = (options["--file"], build_args)
        # The Dockerfiles mount the wheelhouse (RUN --mount): BuildKit, after the wheelhouse step.
        assert "DOCKER_BUILDKIT=1" in step.get("env", []), step["id"]
        assert "wheelhouse" in step["waitFor"], step["id"]
    cloud = {name: spec for name, spec in containers.IMAGES.items() if spec.in_cloud_build}
    assert set(built) == set(cloud)
    for name, (dockerfile, build_args) in built.items():
        spec = cloud[name]
        assert dockerfile == spec.dockerfile
        # The same build arguments as `make images` (localcloud/containers.py) passes, each one
        # declared by the Dockerfile, with the Dockerfile's own default as Cloud Build's value.
        assert set(build_args) == set(containers.build_args(spec)), name
        defaults = dockerfile_arg_defaults(REPO / dockerfile)
        assert set(build_args) == set(defaults), f"{dockerfile} declares {set(defaults)}"
        for arg, value in build_args.items():
            substitution = re.fullmatch(r"\$\{(_\w+)\}", value)
            resolved = substitutions[substitution.group(1)] if substitution else value
            assert resolved == defaults[arg], f"{name}: Cloud Build's {arg} {resolved} != {dockerfile}'s {defaults[arg]}"
    wheelhouse = next(step for step in config()["steps"] if step["id"] == "wheelhouse")
    assert wheelhouse["args"][0] == "docker/wheelhouse.sh"
    assert "docker/wheelhouse.sh" in (REPO / "Makefile").read_text(), "make wheelhouse runs the same script"
