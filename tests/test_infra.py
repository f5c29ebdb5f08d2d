"""infra/ (Terraform) checked without a cloud account: formatting, checkov, and consistency with
the code it deploys (table schemas, views, worker and function settings, IAM, autoscaling).

`terraform validate` needs the google provider, which cannot be downloaded here; the reference
checks below (variables, locals, resources) cover part of what it would catch.
The linters come from requirements-ci.txt (installed into .venv-ci by `make ci-tools`); a test
whose tool is missing is skipped, or fails when REQUIRE_CI_TOOLS=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
CI_VENV_BIN = REPO / ".venv-ci" / "bin"


# --- Shared helpers (also used by test_docker.py and test_cloudbuild.py) ----------------------

def _missing_tool(message: str):
    if os.environ.get("REQUIRE_CI_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def ci_tool(name: str) -> str:
    """Path of a CI linter: CI_TOOLS_BIN, then .venv-ci/bin, then this interpreter's bin, then PATH."""
    for directory in (os.environ.get("CI_TOOLS_BIN"), CI_VENV_BIN, Path(sys.executable).parent):
        if directory and (Path(directory) / name).is_file():
            return str(Path(directory) / name)
    found = shutil.which(name)
    if found:
        return found
    _missing_tool(f"{name} is not installed: run `make ci-tools` "
                  "(python3.11 -m venv .venv-ci && .venv-ci/bin/pip install -r requirements-ci.txt)")


def terraform() -> str:
    found = shutil.which("terraform")
    if not found:
        _missing_tool("terraform is not on PATH (Terraform >= 1.5 is needed for `terraform fmt`)")
    return found


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, **kwargs)


def load_yaml(path: Path):
    """YAML -> Python. PyYAML in this interpreter if present, else the CI venv's (checkov brings it)."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(path.read_text())
    python = None
    for directory in (os.environ.get("CI_TOOLS_BIN"), CI_VENV_BIN):
        if directory and (Path(directory) / "python").is_file():
            python = str(Path(directory) / "python")
            break
    if python is None:
        _missing_tool("no YAML parser: install PyYAML here or the CI tools (`make ci-tools`)")
    code = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
    result = run([python, "-c", code, str(path)])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- A small HCL reader (enough for these files; no provider needed) ---------------------------

def tf_text() -> str:
    return "\n".join(p.read_text() for p in sorted(INFRA.glob("*.tf")))


def strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "//")))


def blocks(text: str, kind: str) -> dict[str, str]:
    """Bodies of top-level blocks: {"TYPE.NAME": body} for resource/data, {"NAME": body} otherwise."""
    found = {}
    labels = r'((?:\s+"[^"]+")+)'
    for match in re.finditer(rf'^{kind}{labels}\s*\{{', text, re.M):
        names = re.findall(r'"([^"]+)"', match.group(1))
        depth, index = 1, match.end()
        while depth:
            char = text[index]
            depth += {"{": 1, "}": -1}.get(char, 0)
            index += 1
        found[".".join(names)] = text[match.end():index - 1]
    return found


def attribute(body: str, name: str) -> str | None:
    match = re.search(rf'^\s*{name}\s*=\s*(.+)$', body, re.M)
    return match.group(1).strip() if match else None


def sub_block(body: str, name: str) -> str:
    match = re.search(rf'^\s*{name}\s*\{{', body, re.M)
    assert match, f"no {name} block"
    depth, index = 1, match.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(body[index], 0)
        index += 1
    return body[match.end():index - 1]


def map_keys(body: str, name: str) -> dict[str, str]:
    """Keys and raw values of a `name = { KEY = value ... }` map attribute."""
    match = re.search(rf'^\s*{name}\s*=\s*\{{', body, re.M)
    assert match, f"no {name} map"
    depth, index = 1, match.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(body[index], 0)
        index += 1
    inner = body[match.end():index - 1]
    return dict(re.findall(r'^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(.+?)\s*$', inner, re.M))


RESOURCES = None


def resources() -> dict[str, str]:
    global RESOURCES
    if RESOURCES is None:
        RESOURCES = blocks(strip_comments(tf_text()), "resource")
    return RESOURCES


# --- Linters ----------------------------------------------------------------------------------

def test_terraform_fmt_is_clean():
    result = run([terraform(), "fmt", "-check", "-recursive", "-diff", "infra"])
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}{result.stderr}"


def checkov_report(directory: str, framework: str) -> dict:
    result = run([ci_tool("checkov"), "--directory", directory, "--framework", framework,
                  "--output", "json", "--compact", "--skip-download"])
    assert result.stdout.strip(), f"checkov printed nothing: {result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.slow
def test_checkov_passes_on_infra():
    report = checkov_report("infra", "terraform")
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']}): {c['check_name']}"
              for c in report["results"]["failed_checks"]]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 50, "checkov evaluated suspiciously few checks: did it parse infra/?"


def test_every_checkov_skip_is_justified():
    skips = []
    for path in sorted(INFRA.rglob("*.tf")) + sorted((REPO / "docker").glob("*Dockerfile")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "checkov:skip" in line:
                match = re.search(r"#\s*checkov:skip=(CKV2?_[A-Z]+_\d+):(.+)", line)
                assert match, f"{path.name}:{number}: skip without the form #checkov:skip=CKV_...:reason"
                assert len(match.group(2).strip()) >= 30, f"{path.name}:{number}: give a real reason for {match.group(1)}"
                skips.append(match.group(1))
    assert skips, "expected the documented skips (CMEK, bucket access logs) to be present"


# --- The tables are the code's tables ---------------------------------------------------------

def test_table_schemas_are_the_files_the_code_loads():
    from localcloud import resources as local_resources

    for table, partition_field in (("results", "processed_at"), ("errors", "failed_at")):
        body = resources()[f"google_bigquery_table.{table}"]
        schema_expr = attribute(body, "schema")
        match = re.fullmatch(r'file\("\$\{path\.module\}/(.+)"\)', schema_expr or "")
        assert match, f"{table}: schema must be file(\"${{path.module}}/...\"), got {schema_expr}"
        tf_path = (INFRA / match.group(1)).resolve()
        code_path = (local_resources.SQL_DIR / f"{table}_schema.json").resolve()
        assert tf_path == code_path, f"{table}: Terraform reads {tf_path}, the code reads {code_path}"
        schema = json.loads(tf_path.read_text())
        assert schema == local_resources.table_schema(table)
        fields = {field["name"]: field for field in schema}
        partitioning = sub_block(body, "time_partitioning")
        assert attribute(partitioning, "type") == '"DAY"'
        assert attribute(partitioning, "field") == f'"{partition_field}"'
        assert fields[partition_field]["type"] == "TIMESTAMP"
        # The local stack partitions on the same column.
        assert f'"{partition_field}"' in Path(local_resources.__file__).read_text()
    clustering = attribute(resources()["google_bigquery_table.results"], "clustering")
    assert json.loads(clustering) == ["engine", "model_version"]
    results_fields = {f["name"] for f in json.loads((REPO / "sql/results_schema.json").read_text())}
    assert {"engine", "model_version"} <= results_fields


def render_templatefile(text: str, variables: dict[str, str]) -> str:
    """Terraform templatefile for templates that only interpolate plain variables."""
    assert "%{" not in text, "templatefile directives (%{) would be interpreted"
    unknown = set(re.findall(r"\$\{([^}]*)\}", text)) - set(variables)
    assert not unknown, f"templatefile would fail on ${{{', '.join(sorted(unknown))}}}"
    return re.sub(r"\$\{([^}]*)\}", lambda m: variables[m.group(1)], text)


def test_views_render_with_templatefile_like_the_local_stack():
    from localcloud.config import StackConfig
    from localcloud.resources import render_sql

    body = resources()["google_bigquery_table.views"]
    assert 'fileset("${path.module}/../sql/views", "*.sql")' in body
    passed = re.search(r"templatefile\([^,]+,\s*\{(.*?)\}\)", body, re.S).group(1)
    assert set(re.findall(r"^\s*(\w+)\s*=", passed, re.M)) == {"project", "dataset"}
    views = sorted((REPO / "sql" / "views").glob("*.sql"))
    assert views
    config = StackConfig()
    for view in views:
        text = view.read_text()
        rendered = render_templatefile(text, {"project": config.project, "dataset": config.dataset})
        assert rendered == render_sql(text, config), f"{view.name}: Terraform and the local stack differ"
        assert f"`{config.project}.{config.dataset}." in rendered


# --- References (a stand-in for terraform validate) --------------------------------------------

def test_variables_are_described_declared_and_used():
    text = strip_comments(tf_text())
    variables = blocks(text, "variable")
    for name, body in variables.items():
        assert attribute(body, "description"), f"variable {name} has no description"
        assert attribute(body, "type"), f"variable {name} has no type"
    used = set(re.findall(r"\bvar\.([a-z_0-9]+)", text))
    assert used - set(variables) == set(), f"undeclared variables: {used - set(variables)}"
    assert set(variables) - used == set(), f"unused variables: {set(variables) - used}"


def test_locals_resources_and_data_sources_referenced_exist():
    text = strip_comments(tf_text())
    local_names = set()
    for body in re.findall(r"^locals\s*\{(.*?)^\}", text, re.M | re.S):
        local_names |= set(re.findall(r"^  ([a-z_0-9]+)\s*=", body, re.M))
    used_locals = set(re.findall(r"\blocal\.([a-z_0-9]+)", text))
    assert used_locals <= local_names, f"undefined locals: {used_locals - local_names}"
    declared = set(resources()) | {f"data.{k}" for k in blocks(text, "data")}
    referenced = set(re.findall(r"(?<![\w.\"])((?:data\.)?google[a-z_0-9-]*\.[a-z_0-9]+)\.", text))
    referenced |= {f"data.{r}" for r in re.findall(r"\bdata\.(archive_file\.[a-z_0-9]+)", text)}
    missing = {r for r in referenced if r not in declared and not r.startswith("google-beta")}
    assert not missing, f"references to undeclared resources: {sorted(missing)}"


def test_tfvars_example_sets_declared_variables_and_every_required_one():
    variables = blocks(strip_comments(tf_text()), "variable")
    example = (INFRA / "terraform.tfvars.example").read_text()
    assigned = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", example, re.M))
    assert assigned <= set(variables), f"unknown variables in the example: {assigned - set(variables)}"
    required = {name for name, body in variables.items() if not re.search(r"^\s*default\s*=", body, re.M)}
    assert required == {"project_id", "worker_image_tag"}
    assert required <= {n for n in re.findall(r"^([a-z_0-9]+)\s*=", example, re.M)}


def test_outputs_are_described():
    for name, body in blocks(strip_comments(tf_text()), "output").items():
        assert attribute(body, "description"), f"output {name} has no description"


# --- Providers and autoscaling ------------------------------------------------------------------

def test_providers_are_pinned_and_the_autoscaler_uses_google_beta():
    versions = (INFRA / "versions.tf").read_text()
    pins = dict(re.findall(r'source\s*=\s*"hashicorp/([a-z-]+)"\s*\n\s*version\s*=\s*"([^"]+)"', versions))
    assert set(pins) >= {"google", "google-beta", "archive"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", version) for version in pins.values()), pins
    assert pins["google"] == pins["google-beta"]

    autoscaler = resources()["google_compute_region_autoscaler.workers"]
    assert attribute(autoscaler, "provider") == "google-beta"
    policy = sub_block(autoscaler, "autoscaling_policy")
    metric = sub_block(policy, "metric")
    assert attribute(metric, "name") == '"pubsub.googleapis.com/subscription/num_undelivered_messages"'
    assert attribute(metric, "single_instance_assignment") == "var.messages_per_worker"
    assert attribute(metric, "target") is None and attribute(metric, "type") is None
    # The filter names the worker subscription, quoted.
    assert (r'resource.labels.subscription_id = \"${google_pubsub_subscription.jobs.name}\"'
            in attribute(metric, "filter"))
    assert attribute(sub_block(policy, "cpu_utilization"), "target") == "var.cpu_target"


def test_pubsub_dead_letter_wiring():
    jobs = resources()["google_pubsub_subscription.jobs"]
    assert attribute(jobs, "ack_deadline_seconds") == "var.ack_deadline_seconds"
    dead_letter = sub_block(jobs, "dead_letter_policy")
    assert attribute(dead_letter, "dead_letter_topic") == "google_pubsub_topic.dead_letter.id"
    assert attribute(dead_letter, "max_delivery_attempts") == "var.max_delivery_attempts"
    assert attribute(sub_block(jobs, "retry_policy"), "minimum_backoff")
    hold = resources()["google_pubsub_subscription.dead_letter_hold"]
    assert attribute(hold, "topic") == "google_pubsub_topic.dead_letter.id"
    for subscription in (jobs, hold):
        assert attribute(sub_block(subscription, "expiration_policy"), "ttl") == '""'
    agent_grants = {(attribute(body, "role"), attribute(body, "member"))
                    for name, body in resources().items() if "iam_member" in name}
    assert ('"roles/pubsub.publisher"', "local.pubsub_service_agent") in agent_grants
    assert ('"roles/pubsub.subscriber"', "local.pubsub_service_agent") in agent_grants
    # Default ack deadline and attempts agree with the local stack.
    from localcloud.config import StackConfig

    variables = blocks(strip_comments(tf_text()), "variable")
    assert attribute(variables["ack_deadline_seconds"], "default") == str(StackConfig().jobs_ack_deadline_s)
    assert attribute(variables["max_delivery_attempts"], "default") == str(StackConfig().max_delivery_attempts)


# --- The worker VMs -----------------------------------------------------------------------------

def worker_env() -> dict[str, str]:
    locals_text = "\n".join(re.findall(r"^locals\s*\{(.*?)^\}", (INFRA / "worker.tf").read_text(), re.M | re.S))
    return map_keys(locals_text, "worker_env")


def test_worker_container_env_is_the_worker_settings():
    from dataclasses import MISSING, fields

    from worker.settings import WorkerSettings

    env = worker_env()
    settings = {f"WORKER_{f.name.upper()}": f for f in fields(WorkerSettings)}
    unknown = {name for name in env if name not in settings and name != "GOOGLE_CLOUD_PROJECT"}
    assert not unknown, f"the container sets variables the worker does not read: {unknown}"
    required = {name for name, f in settings.items() if f.default is MISSING and f.default_factory is MISSING}
    provided = set(env) | ({"WORKER_PROJECT"} if "GOOGLE_CLOUD_PROJECT" in env else set())
    assert required <= provided, f"required worker settings not set: {required - provided}"
    assert {"WORKER_SUBSCRIPTION", "WORKER_RESULTS_TABLE", "WORKER_ERRORS_TABLE", "WORKER_MODEL_DIR",
            "WORKER_ENGINE", "WORKER_PRECISION", "WORKER_BATCH_SIZE"} <= set(env)
    assert env["WORKER_SUBSCRIPTION"] == "google_pubsub_subscription.jobs.id"
    assert env["WORKER_MAX_DELIVERY_ATTEMPTS"] == "tostring(var.max_delivery_attempts)"
    variables = blocks(strip_comments(tf_text()), "variable")
    engine_default = attribute(variables["worker_engine"], "default").strip('"')
    precision_default = attribute(variables["worker_precision"], "default").strip('"')
    from worker.settings import ENGINES, PRECISIONS

    assert engine_default in ENGINES and precision_default in PRECISIONS
    # The model directory the image bakes in.
    model_dir = attribute(variables["worker_model_dir"], "default").strip('"')
    assert f"{model_dir}/" in (REPO / "docker" / "worker-openvino.Dockerfile").read_text()


def rendered_cloud_init(env: dict[str, str]) -> str:
    template = (INFRA / "templates" / "worker-cloud-init.yaml.tftpl").read_text()
    call = re.search(r'templatefile\("\$\{path\.module\}/templates/worker-cloud-init\.yaml\.tftpl",\s*\{(.*?)\}\)',
                     (INFRA / "worker.tf").read_text(), re.S)
    assert call, "worker.tf must render templates/worker-cloud-init.yaml.tftpl"
    passed = set(re.findall(r"^\s*(\w+)\s*=", call.group(1), re.M))
    used = {name for expr in re.findall(r"\$\{([^}]*)\}", template) for name in re.findall(r"[a-z_]+", expr)}
    used -= {"indent"}
    assert used <= passed, f"template variables not passed: {used - passed}"
    values = {
        "image": "us-central1-docker.pkg.dev/p/inference/worker-openvino:abc123",
        "registry_host": "us-central1-docker.pkg.dev",
        "env_file": "\n".join(f"{k}={v}" for k, v in sorted(env.items())),
        "stop_timeout_s": 30,
        "indent": lambda n, s: s.replace("\n", "\n" + " " * n),
    }
    return re.sub(r"\$\{([^}]*)\}", lambda m: str(eval(m.group(1), {"__builtins__": {}}, values)), template)


def test_cloud_init_runs_the_worker_container_without_konlet(tmp_path):
    env = {"GOOGLE_CLOUD_PROJECT": "p", "WORKER_SUBSCRIPTION": "projects/p/subscriptions/jobs-worker",
           "WORKER_BATCH_SIZE": "32"}
    text = rendered_cloud_init(env)
    assert text.startswith("#cloud-config\n")
    path = tmp_path / "user-data.yaml"
    path.write_text(text)
    config = load_yaml(path)
    files = {entry["path"]: entry["content"] for entry in config["write_files"]}
    assert files["/etc/worker/worker.env"].splitlines() == [f"{k}={v}" for k, v in sorted(env.items())]
    unit = files["/etc/systemd/system/worker.service"]
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1).split()
    assert exec_start[:3] == ["/usr/bin/docker", "run", "--rm"]
    assert exec_start[-1].endswith("/worker-openvino:abc123")
    assert "--env-file" in exec_start and "/etc/worker/worker.env" in exec_start
    assert "8080:8080" in exec_start
    assert "docker-credential-gcr configure-docker --registries us-central1-docker.pkg.dev" in unit
    assert "systemctl start worker.service" in config["runcmd"]

    template = resources()["google_compute_instance_template.worker"]
    metadata = map_keys(template, "metadata")
    assert metadata["user-data"] == "local.worker_cloud_init"
    assert "gce-container-declaration" not in tf_text(), "the konlet container declaration is deprecated"


def test_instance_template_is_private_shielded_and_uses_its_own_service_account():
    template = resources()["google_compute_instance_template.worker"]
    assert "access_config" not in template, "workers must not get a public IP"
    shielded = sub_block(template, "shielded_instance_config")
    assert all(attribute(shielded, key) == "true"
               for key in ("enable_secure_boot", "enable_vtpm", "enable_integrity_monitoring"))
    assert attribute(sub_block(template, "service_account"), "email") == "google_service_account.worker.email"
    cos = blocks(strip_comments(tf_text()), "data")["google_compute_image.cos"]
    assert attribute(cos, "project") == '"cos-cloud"'
    assert "compute@developer.gserviceaccount.com" not in tf_text()
    subnet = resources()["google_compute_subnetwork.workers"]
    assert attribute(subnet, "private_ip_google_access") == "true"


def test_health_check_rolling_updates_and_autohealing():
    check = sub_block(resources()["google_compute_health_check.worker"], "http_health_check")
    assert attribute(check, "port") == "8080"
    assert attribute(check, "request_path") == '"/healthz"'
    group = resources()["google_compute_region_instance_group_manager.workers"]
    policy = sub_block(group, "update_policy")
    assert attribute(policy, "type") == '"PROACTIVE"'
    assert attribute(policy, "max_unavailable_fixed") == "0"
    assert attribute(policy, "max_surge_fixed") == "length(local.worker_zones)"
    assert 'dynamic "auto_healing_policies"' in group
    assert "google_compute_health_check.worker.id" in group
    firewall = resources()["google_compute_firewall.health_checks"]
    assert "35.191.0.0/16" in firewall and "130.211.0.0/22" in firewall and '"8080"' in firewall


def test_iam_is_least_privilege():
    grants = []
    for name, body in resources().items():
        if name.split(".")[0].endswith("_iam_member"):
            roles = re.findall(r'"(roles/[^"]+)"', body) or [attribute(body, "role")]
            grants += [(name, role, attribute(body, "member")) for role in roles]
    assert grants
    assert not [g for g in grants if g[1] in ("roles/owner", "roles/editor", "roles/viewer")]
    worker = [g for g in grants if g[2] == "google_service_account.worker.member"]
    by_type = {(g[0].split(".")[0], g[1]) for g in worker}
    assert by_type == {
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer"),
        ("google_pubsub_subscription_iam_member", "roles/pubsub.subscriber"),
        ("google_bigquery_dataset_iam_member", "roles/bigquery.dataEditor"),
        ("google_artifact_registry_repository_iam_member", "roles/artifactregistry.reader"),
        ("google_project_iam_member", "roles/logging.logWriter"),
        ("google_project_iam_member", "roles/monitoring.metricWriter"),
    }
    buckets = {attribute(resources()[g[0]], "bucket") for g in worker if g[0].startswith("google_storage")}
    assert buckets == {"google_storage_bucket.uploads.name", "google_storage_bucket.models.name"}
    function_grants = {g[1] for g in grants if g[2] == "google_service_account.function.member"}
    assert function_grants == {"roles/pubsub.publisher"}


# --- The function -------------------------------------------------------------------------------

def test_function_deploys_functions_main_with_its_documented_settings():
    import ast

    main = (REPO / "functions" / "main.py").read_text()
    tree = ast.parse(main)
    documented = set(re.findall(r"^  ([A-Z][A-Z0-9_]+)\s{2,}", ast.get_docstring(tree), re.M))
    function = resources()["google_cloudfunctions2_function.on_upload"]
    env = map_keys(function, "environment_variables")
    assert set(env) <= documented, f"not read by functions/main.py: {set(env) - documented}"
    assert {"JOBS_TOPIC", "UPLOAD_BUCKET", "UPLOAD_PREFIX", "MAX_EVENT_AGE_S"} <= set(env)
    assert env["JOBS_TOPIC"] == "google_pubsub_topic.jobs.id"  # projects/P/topics/T, as main.py wants

    build = sub_block(function, "build_config")
    entry_point = attribute(build, "entry_point").strip('"')
    decorated = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                 and any("cloud_event" in ast.unparse(d) for d in node.decorator_list)}
    assert entry_point in decorated
    assert attribute(build, "runtime") == '"python311"'
    trigger = sub_block(function, "event_trigger")
    # main.py filters on the event type the job contract (functions/storage_job.py) names.
    contract = (REPO / "functions" / "storage_job.py").read_text()
    assert "from storage_job import FINALIZED_EVENT_TYPE" in main
    assert attribute(trigger, "event_type").strip('"') == re.search(r'FINALIZED_EVENT_TYPE = "([^"]+)"',
                                                                    contract).group(1)
    assert attribute(trigger, "retry_policy") == '"RETRY_POLICY_RETRY"'
    assert attribute(trigger, "trigger_region") == "var.region"
    assert attribute(sub_block(trigger, "event_filters"), "value") == "google_storage_bucket.uploads.name"

    archive = blocks(strip_comments(tf_text()), "data")["archive_file.function_source"]
    for source_file in re.findall(r'file\("\$\{path\.module\}/([^"]+)"\)', archive):
        assert (INFRA / source_file).resolve().is_file(), source_file
    assert set(re.findall(r'filename = "([^"]+)"', archive)) == {"main.py", "storage_job.py", "requirements.txt"}


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def test_function_requirements_match_the_lock():
    lock = lock_versions()
    for line in (REPO / "functions" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert lock.get(re.sub(r"[-_.]+", "-", name.lower())) == version, f"{line} differs from requirements.lock"
