"""`make bench-models`: the bare engines on the seeds' networks (modelkit.zoo), engines x
precisions x batch sizes, and the worker on the local stack next to them.

How it measures (the seeds' faults, not repeated):
- every engine configuration runs in a subprocess of its own, started and loaded before any timing:
  its load/compile time and its peak RSS are its own, not what an earlier engine left behind;
- all configurations of a network are alive at once and timed interleaved: repeat r times every
  (batch size, configuration) in a shuffled order, so drift and other jobs on the machine hit every
  configuration alike; each call is warmed up first and each repeat times several calls;
- every configuration gets the same inputs (held-out demo images through the model's spec), and
  the speed-up against TensorFlow f32 is taken within each repeat (same inputs, same minute);
- figures carry their spread over the repeats (median, min, max of the per-repeat values);
- fidelity: the held-out images through every configuration against TensorFlow f32: top-1
  agreement, max |d score| (softmax scores), and held-out accuracy when the network was trained;
- the machine facts include the CPU's ISA flags: INT8 and bf16 speed depends on them.

The stack part (--stack-models) reuses `localcloud.bench --worker-only` (one stack per engine) on
the same model version, and sets the worker's images/s next to the bare engine's at the same batch
size, with the cost per million images the README's cost table gives for that throughput.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from localcloud.prices import VM_PRICE_PER_HOUR, cost_per_million

console = Console(width=None if sys.stdout.isatty() else 200)

DEFAULT_CONFIGS = ("tensorflow:f32", "openvino:f32", "openvino:bf16", "openvino:f16", "openvino:int8",
                   "onnxruntime:f32", "onnxruntime:int8")
# onnxruntime:int8 is not a worker precision: it is the ONNX Runtime engine (f32 setting) on the zoo's
# ONNX Runtime-quantized model (QDQ), a model version of its own.
EXTRA_CONFIGS = {"onnxruntime:int8"}
REFERENCE = "tensorflow:f32"
# The machines the cost per million is given for (prices: localcloud/prices.py, the README's table).
COST_MACHINES = ("e2-standard-2", "e2-standard-4")


@dataclass(frozen=True)
class EngineConfig:
    engine: str
    precision: str

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.precision}"

    @property
    def model_version(self) -> str:
        """Which import of the network the configuration runs ("keras", "onnx" or "onnx_int8")."""
        if self.engine == "onnxruntime":
            return "onnx_int8" if self.precision == "int8" else "onnx"
        return "keras"

    @property
    def engine_precision(self) -> str:
        """The precision setting the engine gets (the model version carries the INT8 of onnx_int8)."""
        return "f32" if self.key in EXTRA_CONFIGS else self.precision


def parse_configs(text: str, with_reference: bool = True) -> list[EngineConfig]:
    """"tensorflow:f32,openvino:int8" -> configs; with_reference: the reference (tensorflow:f32) first,
    added when missing (speed-up and fidelity are taken against it)."""
    from worker.engines import ENGINE_PRECISIONS

    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        engine, _, precision = item.partition(":")
        precision = precision or "f32"
        if precision not in ENGINE_PRECISIONS.get(engine, ()) and f"{engine}:{precision}" not in EXTRA_CONFIGS:
            raise click.BadParameter(f"{item!r}: engine {engine!r} with precision {precision!r} is not one the worker "
                                     f"runs (engines and precisions: {ENGINE_PRECISIONS})", param_hint="--engines")
        configs.append(EngineConfig(engine, precision))
    if not with_reference:
        return configs
    reference = EngineConfig("tensorflow", "f32")
    return [reference] + [c for c in configs if c != reference]


def spread(values: list[float]) -> dict[str, float | None]:
    """Median and range over the repeats."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def call_stats(call_ms: list[float], batch_size: int, cpu_ms: list[float] | None = None) -> dict[str, float]:
    """One repeat's calls -> latency percentiles per call and images/s; with the engine process's
    CPU time per call, CPU ms per image (other jobs on a shared machine stretch wall time, much
    less the CPU time the engine spends; spinning worker threads count in it too)."""
    values = np.asarray(call_ms, dtype=np.float64)
    stats = {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
             "p99_ms": float(np.percentile(values, 99)),
             "images_per_s": float(batch_size * len(values) / (values.sum() / 1000.0))}
    if cpu_ms:
        stats["cpu_ms_per_image"] = float(np.median(cpu_ms)) / batch_size
    return stats


def fidelity(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, output_spec) -> dict[str, Any]:
    """Top-1 agreement and max |d score| against the reference; accuracy when labels are given."""
    from modelspec.outputs import class_scores

    ours, theirs = class_scores(outputs, output_spec), class_scores(reference, output_spec)
    row = {"top1_agreement": float(np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1))),
           "max_abs_score_diff": float(np.abs(ours - theirs).max()),
           "max_abs_output_diff": float(np.abs(outputs.astype(np.float64) - reference.astype(np.float64)).max()),
           "images": int(len(outputs))}
    row["accuracy"] = float(np.mean(ours.argmax(axis=1) == labels)) if labels is not None else None
    return row


def machine_facts() -> dict[str, Any]:
    import platform

    from worker.sysinfo import cpu_isa_flags, machine_facts as facts

    row = facts().as_row()
    row.pop("worker_pid", None)
    row["cpu_flags"] = cpu_isa_flags()
    row["load_avg_at_start"] = list(os.getloadavg())
    row["platform"] = platform.platform()
    return row


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("tensorflow-cpu", "keras", "openvino", "nncf", "onnxruntime", "tf2onnx", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --- The engine subprocess -------------------------------------------------------------------------

def serve(model_dir: Path, engine: str, precision: str, inputs_file: Path, threads: int) -> None:
    """Child: load one engine, then answer JSON commands on stdin, one a line, on stdout."""
    import io

    from worker.engines import create_engine

    out = sys.stdout
    sys.stdout = io.StringIO()  # libraries' prints must not break the protocol
    manifest = json.loads((model_dir / "manifest.json").read_text())
    inputs = np.load(inputs_file)
    started = time.perf_counter()
    instance = create_engine(engine, precision, model_dir, manifest, threads=threads)
    instance.load()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    instance.warmup()
    info = instance.describe()

    def reply(payload: dict) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    reply({"ready": True, "load_s": load_s, "warmup_s": time.perf_counter() - started,
           "rss_after_load_bytes": _peak_rss(), "engine": info.name, "version": info.version,
           "effective_precision": info.precision, "device": info.device, "form": info.model_form})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "time":
            batch = inputs[:command["batch"]]
            if len(batch) < command["batch"]:
                batch = np.resize(inputs, (command["batch"], *inputs.shape[1:]))
            for _ in range(command.get("warmup", 1)):
                instance.infer(batch)
            calls, cpu = [], []
            for _ in range(command["calls"]):
                c0, t0 = time.process_time(), time.perf_counter()
                instance.infer(batch)
                calls.append((time.perf_counter() - t0) * 1000.0)
                cpu.append((time.process_time() - c0) * 1000.0)  # every thread of this process
            reply({"calls_ms": calls, "cpu_ms": cpu})
        elif command["op"] == "eval":
            outputs = np.concatenate([instance.infer(inputs[i:i + 16]) for i in range(0, len(inputs), 16)])
            np.save(command["out"], outputs)
            reply({"saved": command["out"]})
        elif command["op"] == "quit":
            reply({"peak_rss_bytes": _peak_rss()})
            return


def _peak_rss() -> int:
    """This process's peak RSS: VmHWM, per address space. Not getrusage's ru_maxrss, which Linux
    carries across execve from the forking parent (a bench process grown by a zoo build would set
    every engine's floor)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EngineProcess:
    def __init__(self, config: EngineConfig, model_dir: Path, inputs_file: Path, threads: int):
        self.config = config
        self.started = time.perf_counter()
        # stderr to a file, not a pipe nobody reads while timing: a full pipe would block the engine.
        self.log_file = inputs_file.with_name(f"{inputs_file.stem}-{config.key.replace(':', '-')}.log")
        with self.log_file.open("w") as log:
            self.process = self._start(config, model_dir, inputs_file, threads, log)
        self.hello: dict | None = None

    @staticmethod
    def _start(config: EngineConfig, model_dir: Path, inputs_file: Path, threads: int, log) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "localcloud.bench_models", "serve", "--model-dir", str(model_dir), "--engine",
             config.engine, "--precision", config.engine_precision, "--inputs", str(inputs_file), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            error = self.log_file.read_text()[-2000:]
            raise RuntimeError(f"engine process {self.config.key} ended (exit {self.process.wait()}; its log "
                               f"{self.log_file}): {error}")
        return json.loads(line)

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def wait_ready(self) -> dict:
        self.hello = self.read()
        self.hello["process_start_to_ready_s"] = time.perf_counter() - self.started
        return self.hello

    def close(self) -> dict:
        try:
            result = self.ask({"op": "quit"})
        finally:
            self.process.wait(timeout=60)
        return result


def _dir_size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def form_size_bytes(model_dir: Path, manifest: dict, config: EngineConfig) -> int:
    """The bytes the engine reads: the IR (xml + bin), the SavedModel (without the IRs in it), the ONNX file."""
    from worker.engines import ENGINE_FORMS
    from worker.engines.openvino_engine import PRECISIONS

    form = PRECISIONS[config.precision][0] if config.engine == "openvino" else ENGINE_FORMS[config.engine]
    relative = manifest["forms"][form]
    if config.engine == "openvino":
        xml = model_dir / relative
        return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    if config.key in EXTRA_CONFIGS:
        return _dir_size(model_dir / manifest["forms"]["onnx"])
    if relative == ".":
        return sum(_dir_size(model_dir / part) for part in ("saved_model.pb", "variables") if (model_dir / part).exists())
    return _dir_size(model_dir / relative)


def bench_network(name: str, record: dict, dirs: dict[str, Path], configs: list[EngineConfig], batch_sizes: list[int],
                  repeats: int, min_repeat_s: float, max_calls: int, threads: int, work_dir: Path, seed: int,
                  progress: Progress, dataset_dir: Path) -> dict[str, Any]:
    from modelkit import zoo
    from modelspec.preprocess import preprocess_image
    from modelspec.spec import spec_from_manifest

    manifests = {kind: json.loads((path / "manifest.json").read_text()) for kind, path in dirs.items()}
    spec = spec_from_manifest(manifests["keras"])
    held_out = record["held_out"]
    inputs = np.stack([preprocess_image((dataset_dir / rel).read_bytes(), spec) for rel, _ in held_out])
    labels = np.asarray([label for _, label in held_out]) if record.get("trained") else None
    work_dir.mkdir(parents=True, exist_ok=True)
    inputs_file = work_dir / f"{name}-inputs.npy"
    np.save(inputs_file, inputs)

    task = progress.add_task(f"{name}: loading {len(configs)} engines", total=None)
    processes: dict[str, EngineProcess] = {}
    rows: dict[str, dict] = {}
    left_out = {c.key: record.get(f"{c.model_version}_skipped") or "no such model version" for c in configs
                if c.model_version not in dirs}
    configs = [c for c in configs if c.model_version in dirs]
    try:
        # Loaded one after the other (not at once): load times are not inflated by each other.
        for config in configs:
            proc = EngineProcess(config, dirs[config.model_version], inputs_file, threads)
            processes[config.key] = proc
            hello = proc.wait_ready()
            manifest = manifests[config.model_version]
            rows[config.key] = {
                "network": name, "engine": config.engine, "precision": config.precision,
                "effective_precision": ("int8 (QDQ)" if config.key in EXTRA_CONFIGS else hello["effective_precision"]),
                "engine_version": hello["version"],
                "model_name": manifest["name"], "model_version": manifest["version"], "form": hello["form"],
                "model_size_bytes": form_size_bytes(dirs[config.model_version], manifest, config),
                "load_s": hello["load_s"], "warmup_s": hello["warmup_s"],
                "process_start_to_ready_s": hello["process_start_to_ready_s"],
                "rss_after_load_bytes": hello["rss_after_load_bytes"], "batches": {}}
        # Fidelity: the held-out images through every configuration.
        progress.update(task, description=f"{name}: fidelity on {len(inputs)} held-out images")
        outputs = {}
        for key, proc in processes.items():
            out_file = work_dir / f"{name}-{key.replace(':', '-')}-outputs.npy"
            proc.ask({"op": "eval", "out": str(out_file)})
            outputs[key] = np.load(out_file)
        for key in processes:
            rows[key]["fidelity"] = fidelity(outputs[key], outputs[REFERENCE], labels, spec.output)
        # Calls per repeat: enough for min_repeat_s of the slowest configuration, from one probe call.
        calls: dict[tuple[str, int], int] = {}
        for batch in batch_sizes:
            for key, proc in processes.items():
                probe = proc.ask({"op": "time", "batch": batch, "calls": 1, "warmup": 1})["calls_ms"][0]
                calls[(key, batch)] = int(max(3, min(max_calls, round(min_repeat_s * 1000.0 / max(probe, 1e-3)))))
        order = [(batch, key) for batch in batch_sizes for key in processes]
        progress.update(task, description=f"{name}: timing", total=repeats * len(order), completed=0)
        load_before = os.getloadavg()
        per_repeat: dict[tuple[str, int], list[dict]] = {(key, batch): [] for batch, key in order}
        shuffler = random.Random(seed)
        for _ in range(repeats):
            shuffler.shuffle(order)
            for batch, key in order:
                reply = processes[key].ask({"op": "time", "batch": batch, "calls": calls[(key, batch)], "warmup": 1})
                per_repeat[(key, batch)].append(call_stats(reply["calls_ms"], batch, reply.get("cpu_ms")))
                progress.advance(task)
        load_after = os.getloadavg()
        for key in processes:
            rows[key]["peak_rss_bytes"] = processes[key].close()["peak_rss_bytes"]
    finally:
        for proc in processes.values():
            if proc.process.poll() is None:
                proc.process.kill()
        progress.remove_task(task)
    for batch in batch_sizes:
        reference = per_repeat[(REFERENCE, batch)]
        for key in rows:
            repeats_here = per_repeat[(key, batch)]
            speedups = [mine["images_per_s"] / ref["images_per_s"] for mine, ref in zip(repeats_here, reference)]
            latency_cut = [1.0 - mine["p50_ms"] / ref["p50_ms"] for mine, ref in zip(repeats_here, reference)]
            cpu_speedups = [ref["cpu_ms_per_image"] / mine["cpu_ms_per_image"] for mine, ref in zip(repeats_here, reference)
                            if mine.get("cpu_ms_per_image") and ref.get("cpu_ms_per_image")]
            rows[key]["batches"][str(batch)] = {
                "calls_per_repeat": calls[(key, batch)],
                **{field: spread([r[field] for r in repeats_here]) for field in ("p50_ms", "p95_ms", "p99_ms",
                                                                                 "images_per_s")},
                "speedup_vs_tensorflow_f32": spread(speedups),
                "latency_reduction_vs_tensorflow_f32": spread(latency_cut),
                "cpu_ms_per_image": spread([r["cpu_ms_per_image"] for r in repeats_here if "cpu_ms_per_image" in r]),
                "cpu_speedup_vs_tensorflow_f32": spread(cpu_speedups),
            }
    return {"network": name, "keras_application": record["keras_application"], "input_size": record["input_size"],
            "parameters": record["parameters"], "trained": record["trained"], "training": record.get("training"),
            "not_trained_why": record.get("not_trained_why"), "keras_held_out_accuracy": record["keras_held_out_accuracy"],
            "training_mode": record.get("training_mode", "full" if record["trained"] else "none"),
            "weights": zoo.describe_weights(record),
            "held_out_images": len(inputs), "configs": list(rows.values()), "left_out": left_out,
            # 1-minute load averages around the timing: above the core count, other jobs shared the CPU.
            "load_avg_1m": {"before_timing": load_before[0], "after_timing": load_after[0]}}


# --- The worker on the local stack --------------------------------------------------------------------

def stack_run(model_dir: Path, config: EngineConfig, batch_size: int, images: int, out_dir: Path,
              pipelines: int) -> dict:
    """`python -m localcloud.bench --worker-only` on model_dir for one configuration; its JSON row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("worker-only-*.json"))
    command = [sys.executable, "-m", "localcloud.bench", "--worker-only", "--images", str(images), "--engines",
               config.engine, "--precisions", config.precision, "--batch-sizes", str(batch_size), "--pipelines",
               str(pipelines), "--out", str(out_dir)]
    done = subprocess.run(command, env={**os.environ, "LOCAL_MODEL_DIR": str(Path(model_dir).resolve())},
                          capture_output=True, text=True)
    written = sorted(set(out_dir.glob("worker-only-*.json")) - before)
    if not written:
        raise RuntimeError(f"`{' '.join(command)}` wrote no JSON (exit {done.returncode}): {done.stderr[-2000:]}")
    (row,) = json.loads(written[-1].read_text())
    row["command"] = f"LOCAL_MODEL_DIR={model_dir} " + " ".join(command)
    row["exit_code"] = done.returncode
    return row


def stack_summary(row: dict, bare: dict | None) -> dict[str, Any]:
    """Worker images/s next to the bare engine at the same batch size; cost per million images."""
    worker_ips = float(row["images_per_s"])
    bench_bare_ips = 1000.0 / row["bare_ms"] if row.get("bare_ms") else None
    summary = {
        "engine": row["config"]["engine"], "precision": row["config"]["precision"],
        "batch_size": row["config"]["batch_size"], "pipelines": row["config"]["pipelines"],
        "run_id": row["run_id"], "images": row["images"], "errors": row["errors"],
        "worker_images_per_s": worker_ips,
        "worker_inference_ms_per_image": row.get("inference_ms"),
        "worker_inference_p50_ms_per_image": row.get("inference_p50_ms"),
        "mean_batch": row.get("mean_batch"),
        "bare_ms_per_image_same_process": row.get("bare_ms"),
        "bare_images_per_s_same_process": bench_bare_ips,
        "worker_vs_bare_ab_ratio": (row.get("overhead") or {}).get("ratio"),
        "cpu_percent": row.get("cpu"),
        "cost_per_million_usd": {vm: round(cost_per_million(worker_ips, VM_PRICE_PER_HOUR[vm]), 3)
                                 for vm in COST_MACHINES} if worker_ips else None,
    }
    cpu_per_image = row.get("cpu_ms_per_image") or {}
    summary["worker_cpu_ms_per_image"] = cpu_per_image.get("worker")
    # What the local stand-ins for Google's services burnt per image on the same cores; in the cloud
    # that CPU is Google's, not the worker VM's.
    summary["emulators_cpu_ms_per_image"] = sum(v for k, v in cpu_per_image.items() if k not in ("worker", "bench"))
    if bare is not None:
        summary["bare_images_per_s_matrix"] = bare["images_per_s"]["median"]
        summary["worker_vs_bare_throughput"] = worker_ips / bare["images_per_s"]["median"]
        bare_cpu = (bare.get("cpu_ms_per_image") or {}).get("median")
        if bare_cpu and summary["worker_cpu_ms_per_image"]:
            # The bare engine's CPU per image over the worker's (all its threads: download, decode, engine,
            # sink, Pub/Sub): the throughput ratio a CPU-bound worker reaches on cores of its own.
            summary["bare_cpu_ms_per_image_matrix"] = bare_cpu
            summary["worker_vs_bare_cpu"] = bare_cpu / summary["worker_cpu_ms_per_image"]
    if bench_bare_ips:
        summary["worker_vs_bare_throughput_same_run"] = worker_ips / bench_bare_ips
    return summary


# --- Tables ------------------------------------------------------------------------------------------

def _range(s: dict, digits: int = 1, scale: float = 1.0) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def network_table(result: dict, batch_sizes: list[int]) -> Table:
    trained = result.get("weights") or "random weights: fidelity only"
    table = Table(title=f"{result['network']} ({result['input_size']}px, {result['parameters'] / 1e6:.1f} M params, "
                        f"{trained}); median (min-max) over repeats")
    for column in ("engine", "prec", "runs as", "batch", "p50 ms", "p95 ms", "p99 ms", "img/s", "x TF f32",
                   "CPU ms/img", "x TF f32 (CPU)", "top-1 agree", "max |d score|", "acc", "MB", "load s", "peak RSS MB"):
        table.add_column(column, justify="right")
    for row in result["configs"]:
        for batch in batch_sizes:
            b = row["batches"][str(batch)]
            f = row["fidelity"]
            table.add_row(row["engine"], row["precision"], row["effective_precision"], str(batch),
                          _range(b["p50_ms"]), _range(b["p95_ms"]), _range(b["p99_ms"]), _range(b["images_per_s"], 0),
                          _range(b["speedup_vs_tensorflow_f32"], 2), _range(b["cpu_ms_per_image"], 2),
                          _range(b["cpu_speedup_vs_tensorflow_f32"], 2), f"{f['top1_agreement']:.3f}",
                          f"{f['max_abs_score_diff']:.2g}", "-" if f["accuracy"] is None else f"{f['accuracy']:.3f}",
                          f"{row['model_size_bytes'] / 1e6:.1f}", f"{row['load_s']:.1f}",
                          f"{row['peak_rss_bytes'] / 1e6:.0f}")
    return table


def stack_table(rows: list[dict]) -> Table:
    table = Table(title="The worker on the local stack (worker-only: pre-filled backlog) next to the bare engine")
    for column in ("network", "engine", "prec", "batch", "worker img/s", "bare img/s (matrix)", "worker/bare",
                   "worker CPU ms/img", "bare CPU ms/img", "worker/bare (CPU)", "emulators CPU ms/img",
                   "infer ms/img", "A/B ratio", "$/M e2-std-2", "$/M e2-std-4"):
        table.add_column(column, justify="right")

    def fmt(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        cost = row.get("cost_per_million_usd") or {}
        table.add_row(row["network"], row["engine"], row["precision"], str(row["batch_size"]),
                      f"{row['worker_images_per_s']:.1f}",
                      f"{row['bare_images_per_s_matrix']:.1f}" if row.get("bare_images_per_s_matrix") else "-",
                      f"{row['worker_vs_bare_throughput']:.2f}" if row.get("worker_vs_bare_throughput") else "-",
                      fmt(row.get("worker_cpu_ms_per_image"), 1), fmt(row.get("bare_cpu_ms_per_image_matrix"), 1),
                      fmt(row.get("worker_vs_bare_cpu"), 2), fmt(row.get("emulators_cpu_ms_per_image"), 1),
                      f"{row['worker_inference_ms_per_image']:.2f}" if row.get("worker_inference_ms_per_image") else "-",
                      f"{row['worker_vs_bare_ab_ratio']:.2f}" if row.get("worker_vs_bare_ab_ratio") else "-",
                      f"{cost.get('e2-standard-2', 0):.2f}", f"{cost.get('e2-standard-4', 0):.2f}")
    return table


# --- Command line ----------------------------------------------------------------------------------

@click.group(invoke_without_command=True)
@click.pass_context
@click.option("--models", default="mobilenetv2,resnet50,vgg16,xception,inceptionv3,efficientnetb0,resnet152", show_default=True,
              help="networks of modelkit.zoo (built and imported first when missing; cached under --zoo-root)")
@click.option("--engines", default=",".join(DEFAULT_CONFIGS), show_default=True,
              help="engine:precision list; tensorflow:f32 (the reference) is always included")
@click.option("--batch-sizes", default="1,8,32", show_default=True)
@click.option("--repeats", default=5, show_default=True, help="timed rounds over every configuration")
@click.option("--min-repeat-s", default=1.0, show_default=True, help="seconds of calls per configuration and repeat")
@click.option("--max-calls", default=50, show_default=True, help="calls per configuration and repeat, at most")
@click.option("--threads", default=0, show_default=True, help="engine threads (0: the engine's choice)")
@click.option("--stack-models", default="", help="networks to run through the worker on the local stack, e.g. "
              "mobilenetv2,resnet50 (empty: none)")
@click.option("--stack-engines", default="tensorflow:f32,openvino:f32,openvino:int8", show_default=True)
@click.option("--stack-batch-size", default=8, show_default=True)
@click.option("--stack-images", default=300, show_default=True)
@click.option("--stack-pipelines", default=2, show_default=True)
@click.option("--zoo-root", default=Path("build/zoo"), type=click.Path(path_type=Path), show_default=True)
@click.option("--dataset-dir", default=Path("build/demo-dataset"), type=click.Path(path_type=Path), show_default=True)
@click.option("--out", "out_dir", default=Path("build/bench-models"), type=click.Path(path_type=Path), show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(ctx, models, engines, batch_sizes, repeats, min_repeat_s, max_calls, threads, stack_models, stack_engines,
         stack_batch_size, stack_images, stack_pipelines, zoo_root, dataset_dir, out_dir, seed) -> None:
    """Bare engines x precisions x batch sizes on the zoo's networks (and the worker, with --stack-models)."""
    if ctx.invoked_subcommand is not None:
        return
    from modelkit import zoo

    configs = parse_configs(engines)
    sizes = [int(b) for b in batch_sizes.split(",")]
    names = [m for m in models.split(",") if m]
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = machine_facts()
    console.print(f"CPU {machine['cpu_model']}, {machine['logical_cores']} logical cores, flags "
                  f"{','.join(machine['cpu_flags'])}; load average {machine['load_avg_at_start'][0]:.2f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_file = out_dir / f"bench-models-{stamp}.json"
    result: dict[str, Any] = {
        "started_at": started_at, "machine": machine, "libraries": library_versions(),
        "options": {"models": names, "engines": [c.key for c in configs], "batch_sizes": sizes, "repeats": repeats,
                    "min_repeat_s": min_repeat_s, "max_calls": max_calls, "threads": threads,
                    "stack_models": [m for m in stack_models.split(",") if m], "stack_engines": stack_engines,
                    "stack_batch_size": stack_batch_size, "stack_images": stack_images, "seed": seed},
        "method": __doc__.split("How it measures")[1].split("The stack part")[0].strip(),
        "networks": [], "stack": []}
    stack_names = [m for m in stack_models.split(",") if m]

    def run_stack(name: str, net: dict | None) -> None:
        zoo.build_network(name, zoo_root, dataset_dir, seed, log=console.print)
        for config in parse_configs(stack_engines, with_reference=False):
            console.print(f"[bold]stack[/bold] {name} {config.key} batch {stack_batch_size} ({stack_images} images)")
            row = stack_run(zoo.model_dirs(zoo_root, name)[config.model_version], config, stack_batch_size,
                            stack_images, out_dir / "stack", stack_pipelines)
            bare = None
            if net is not None:
                match = next((c for c in net["configs"] if c["engine"] == config.engine
                              and c["precision"] == config.precision), None)
                bare = (match or {}).get("batches", {}).get(str(stack_batch_size))
            result["stack"].append({"network": name, **stack_summary(row, bare), "raw": row})
            _write(out_file, result)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("networks", total=len(names))
        for name in names:
            progress.update(overall, description=f"networks ({name}: zoo build/cache)")
            try:
                record = zoo.build_network(name, zoo_root, dataset_dir, seed, log=progress.console.print)
            except zoo.ZooError as exc:  # one network that cannot be built does not end the run
                result.setdefault("networks_failed", {})[name] = " ".join(str(exc).split())[-800:]
                progress.console.print(f"[red]{name}: not built[/red]: {result['networks_failed'][name][-300:]}")
                _write(out_file, result)
                progress.advance(overall)
                continue
            net = bench_network(name, record, zoo.model_dirs(zoo_root, name), configs, sizes, repeats, min_repeat_s,
                                max_calls, threads, out_dir / "work", seed, progress, dataset_dir)
            result["networks"].append(net)
            _write(out_file, result)  # after every network: a long run that stops keeps what it measured
            progress.console.print(network_table(net, sizes))
            if name in stack_names:  # right after its matrix: the same machine state, and kept if a long run stops
                progress.update(overall, description=f"networks ({name}: the worker on the local stack)")
                run_stack(name, net)
            progress.advance(overall)
    # Networks benched but not asked for in --models (the stack needs the bare figures beside it).
    for name in (m for m in stack_names if m not in names):
        run_stack(name, None)
    if result["stack"]:
        console.print(stack_table(result["stack"]))
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["load_avg_at_end"] = list(os.getloadavg())
    _write(out_file, result)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    console.print(f"written {out_file} (and {out_dir / 'latest.json'}); make report REPORT_ARGS='--bench-models "
                  f"{out_file}' draws it")


def _write(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=2, default=str))


@main.command("markdown")
@click.argument("result_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                default=Path("build/bench-models/latest.json"))
def markdown_command(result_file: Path) -> None:
    """One run's tables as Markdown (the README and docs/bench-models.md quote them)."""
    from localcloud.bench_models_markdown import render

    click.echo(render(json.loads(result_file.read_text()), str(result_file)), nl=False)


@main.command("serve", hidden=True)
@click.option("--model-dir", type=click.Path(path_type=Path), required=True)
@click.option("--engine", required=True)
@click.option("--precision", required=True)
@click.option("--inputs", "inputs_file", type=click.Path(path_type=Path), required=True)
@click.option("--threads", default=0)
def serve_command(model_dir, engine, precision, inputs_file, threads) -> None:
    serve(model_dir, engine, precision, inputs_file, threads)


if __name__ == "__main__":
    main()
