"""`make scaling-sim`: the worker instance group's autoscaler, simulated on four workloads.

A simulation, not a measurement: no VM is started. It reads the autoscaling settings from the
Terraform in infra/ (variables.tf defaults and the autoscaler in worker.tf, parsed with python-hcl2)
and takes the per-VM throughput and start-up time as parameters, whose defaults come from this
project's own measurements (README "Benchmarks"; `make bench`) or are stated with a source below.

What it models, second by second:
- the jobs subscription as one FIFO queue (a fluid: fractions of images are fine), drained by the
  VMs that have finished starting, each at `rate_per_vm` images/s;
- Cloud Monitoring's `pubsub.googleapis.com/subscription/num_undelivered_messages`: sampled every
  60 s, and a sample becomes visible only some time later ("Sampled every 60 seconds. After
  sampling, data is not visible for up to 120 seconds", Google Cloud metrics list,
  https://cloud.google.com/monitoring/api/metrics_gcp_p_z; 120-240 s is seen in practice:
  `--metric-delay`);
- the autoscaler (https://cloud.google.com/compute/docs/autoscaler/understanding-autoscaler-decisions):
  per signal a recommended size, the largest one wins: backlog / single_instance_assignment
  (messages_per_worker) and, for CPU, busy VMs / cpu_target, where VMs still in their
  initialization period (autoscaler_cooldown_s) are left out. Scale out at once; scale in only to
  the largest recommendation of the last 10 minutes (the stabilization period) and no faster than
  worker.tf's scale_in_control (1 VM per 300 s);
- a new VM serves only after `startup_s` (VM boot + image pull + worker start with model load) and
  is billed from its creation.

Upload -> row latency of an image = its wait in the queue + `base_latency_s` (upload -> row on an
idle pipeline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from localcloud.config import REPO_ROOT
from localcloud.prices import FIXED_COST_PER_MILLION, VM_PRICE_PER_HOUR

INFRA_DIR = REPO_ROOT / "infra"
DAY_S = 86_400


# Defaults of the measured inputs (override on the command line).
# Per-VM throughput: the pipeline drained 90 images/s with one worker on a shared 2-vCPU host (README
# cost section, `make bench`); the emulators took part of those cores, so a VM that runs only the
# worker does more (the worker alone drained 220 images/s f32 on a pre-filled backlog,
# `make bench-worker`). 90 is the conservative choice.
DEFAULT_RATE_PER_VM = 90.0
# Start-up: Container-Optimized OS boot to the container start, ~30 s, and the image pull of the
# OpenVINO worker image, ~30 s on a VM in the registry's region, are estimates, not measured here
# (no VM, no Docker engine on this machine). The worker's own start, `python -m worker run` from
# process start to its ready file (imports, model verify and load, warm-up), was measured here:
# 4.3 s on a quiet 2-vCPU machine, 11-14 s while it was busy (load average 11). Together 65-75 s,
# rounded up to 90.
DEFAULT_STARTUP_S = 90.0
# Upload -> row on an idle pipeline (notification, function, Pub/Sub, download, inference, sink);
# locally the bench's e2e p50 at low load is ~1 s.
DEFAULT_BASE_LATENCY_S = 1.0


class TerraformError(RuntimeError):
    """The Terraform in infra/ does not hold what the simulation needs: the message names it."""


@dataclass(frozen=True)
class AutoscalerPolicy:
    """The autoscaling settings, as Terraform deploys them."""

    min_workers: int = 1
    max_workers: int = 10
    messages_per_worker: float = 1000.0
    cpu_target: float = 0.75
    cooldown_s: float = 180.0  # initialization period: a new VM's CPU is not counted before this
    machine_type: str = "e2-standard-2"
    scale_in_max_vms: int = 1  # scale_in_control: at most this many VMs removed ...
    scale_in_window_s: float = 300.0  # ... per this many seconds
    stabilization_s: float = 600.0  # fixed by Compute Engine (10 minutes), not a Terraform setting


@dataclass(frozen=True)
class SimParams:
    policy: AutoscalerPolicy = field(default_factory=AutoscalerPolicy)
    rate_per_vm: float = DEFAULT_RATE_PER_VM
    startup_s: float = DEFAULT_STARTUP_S
    base_latency_s: float = DEFAULT_BASE_LATENCY_S
    metric_period_s: int = 60
    metric_delay_s: int = 120
    decision_period_s: int = 60  # how often the autoscaler recomputes (assumed: once per metric sample)
    warm_start: bool = True  # min_workers VMs are running and warm at t = 0
    vm_price_per_hour: float | None = None  # None: the machine type's price above

    @property
    def price_per_hour(self) -> float:
        if self.vm_price_per_hour is not None:
            return self.vm_price_per_hour
        try:
            return VM_PRICE_PER_HOUR[self.policy.machine_type]
        except KeyError:
            raise TerraformError(f"no price for machine type {self.policy.machine_type!r} (known: "
                                 f"{', '.join(VM_PRICE_PER_HOUR)}): pass --vm-price") from None


# --- Terraform -----------------------------------------------------------------------------

def _unquote(value):
    """python-hcl2 keeps the quotes of string literals ('"e2-standard-2"')."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _labelled(blocks: list[dict], *labels: str) -> dict:
    """The body of the block with these labels in python-hcl2's output (labels come quoted)."""
    for block in blocks:
        body = block
        for label in labels:
            body = body.get(f'"{label}"', body.get(label)) if isinstance(body, dict) else None
            if body is None:
                break
        if body is not None:
            return body
    raise KeyError(".".join(labels))


def variable_defaults(variables_tf: str) -> dict[str, object]:
    """Every variable's default from the text of a variables.tf (variables without one are left out)."""
    import hcl2

    parsed = hcl2.loads(variables_tf)
    defaults = {}
    for block in parsed.get("variable", []):
        for name, body in block.items():
            if "default" in body:
                defaults[_unquote(name)] = _unquote(body["default"])
    return defaults


def policy_from_terraform(variables_tf: str, worker_tf: str) -> AutoscalerPolicy:
    """The autoscaler as deployed with the variables' defaults: each setting is read from the
    resource (which variable it uses, and the scale-in control's literal values)."""
    import hcl2

    defaults = variable_defaults(variables_tf)
    resources = hcl2.loads(worker_tf).get("resource", [])
    try:
        autoscaler = _labelled(resources, "google_compute_region_autoscaler", "workers")
        template = _labelled(resources, "google_compute_instance_template", "worker")
    except KeyError as exc:
        raise TerraformError(f"infra/worker.tf has no resource {exc.args[0]}: the simulation models that "
                             "autoscaler; update localcloud/autoscale_sim.py with it") from None
    policy = autoscaler["autoscaling_policy"][0]

    def resolve(expression, what: str):
        value = _unquote(expression)
        if isinstance(value, str) and value.startswith("${var.") and value.endswith("}"):
            name = value[len("${var."):-1]
            if name not in defaults:
                raise TerraformError(f"infra/variables.tf: variable {name} ({what}) has no default")
            return defaults[name]
        if isinstance(value, str) and "${" in value:
            raise TerraformError(f"infra/worker.tf: {what} = {value} is not a variable or a literal")
        return value

    metric = next((m for m in policy.get("metric", [])
                   if "num_undelivered_messages" in _unquote(m.get("name", ""))), None)
    if metric is None:
        raise TerraformError("infra/worker.tf: the autoscaler has no num_undelivered_messages metric")
    scale_in = (policy.get("scale_in_control") or [{}])[0]
    fixed = (scale_in.get("max_scaled_in_replicas") or [{}])[0].get("fixed")
    return AutoscalerPolicy(
        min_workers=int(resolve(policy["min_replicas"], "min_replicas")),
        max_workers=int(resolve(policy["max_replicas"], "max_replicas")),
        messages_per_worker=float(resolve(metric["single_instance_assignment"], "single_instance_assignment")),
        cpu_target=float(resolve(policy["cpu_utilization"][0]["target"], "cpu_utilization.target")),
        cooldown_s=float(resolve(policy["cooldown_period"], "cooldown_period")),
        machine_type=str(resolve(template["machine_type"], "machine_type")),
        scale_in_max_vms=int(resolve(fixed, "max_scaled_in_replicas.fixed")) if fixed is not None else 10**9,
        scale_in_window_s=float(resolve(scale_in.get("time_window_sec", 0), "scale_in_control.time_window_sec")),
    )


def load_policy(infra_dir: Path = INFRA_DIR) -> AutoscalerPolicy:
    paths = {name: infra_dir / name for name in ("variables.tf", "worker.tf")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise TerraformError(f"{', '.join(missing)} not found: point --infra at the Terraform directory")
    return policy_from_terraform(paths["variables.tf"].read_text(), paths["worker.tf"].read_text())


# --- Workloads -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    name: str
    # Images arriving in second t (t = 0, 1, ...); the array's length is how long arrivals last.
    arrivals: np.ndarray

    @property
    def total(self) -> float:
        return float(self.arrivals.sum())


def burst(name: str, images: int, over_s: int = 1) -> Workload:
    """All images uploaded within over_s seconds (1: at once)."""
    return Workload(name, np.full(over_s, images / over_s))


def steady(name: str, per_s: float, duration_s: int) -> Workload:
    return Workload(name, np.full(duration_s, float(per_s)))


def day_shaped(name: str, per_day: float) -> Workload:
    """per_day images over 24 h, quiet at night and peaking at twice the mean mid-day (1 - cos)."""
    t = np.arange(DAY_S)
    shape = 1.0 - np.cos(2.0 * math.pi * t / DAY_S)
    return Workload(name, per_day / DAY_S * shape)


def issue_workloads() -> list[Workload]:
    return [
        burst("thesis burst: 16,000 images", 16_000),
        steady("steady 100 images/s for 1 h", 100.0, 3600),
        day_shaped("day-shaped 1,000,000 images/day", 1_000_000),
        burst("burst: 1,000,000 images", 1_000_000),
    ]


# --- Simulation ----------------------------------------------------------------------------

@dataclass
class SimResult:
    workload: str
    images: float
    drain_s: float  # first upload -> last row
    after_arrivals_s: float  # last upload -> last row
    p50_s: float
    p95_s: float
    p99_s: float
    peak_vms: int
    vm_hours: float
    vm_cost: float
    cost_per_million: float  # VMs + the fixed per-image costs
    timeline: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


def fifo_waits(arrived: np.ndarray, served: np.ndarray, points: int = 200_000) -> np.ndarray:
    """Waits of `points` images spread evenly over all of them, in a FIFO queue: image k arrives
    when the cumulative arrivals reach k and leaves when the cumulative service does (both curves
    sampled at whole seconds, linear in between: the fluid limit). Each point stands for the same
    number of images, so plain percentiles of the result are the images' percentiles."""
    k = (np.arange(points) + 0.5) / points * arrived[-1]
    times = np.arange(len(arrived), dtype=float)
    return np.maximum(0.0, np.interp(k, served, times) - np.interp(k, arrived, times))


def simulate(workload: Workload, params: SimParams, max_s: int = 10 * DAY_S,
             progress: Callable[[float], None] | None = None) -> SimResult:
    policy = params.policy
    arrivals = workload.arrivals
    # VMs: the second each was created; the autoscaler's target size and its history.
    born = -(params.startup_s + policy.cooldown_s) if params.warm_start else 0.0
    vms: list[float] = [born] * policy.min_workers
    target = policy.min_workers
    recommendations: list[tuple[float, int]] = []  # (time, recommended size) for the stabilization period
    removals: list[float] = []  # times of scale-in removals, for scale_in_control
    samples: list[tuple[float, float]] = []  # (sampled at, backlog) of the Monitoring metric
    backlog = 0.0
    cum_in, cum_out = [0.0], [0.0]
    vm_seconds, peak = 0.0, len(vms)
    busy_fraction = 0.0
    drained_at = None
    series = {"backlog": [], "vms": [], "serving": []}
    t = 0
    while t < max_s:
        arriving = float(arrivals[t]) if t < len(arrivals) else 0.0
        if t % params.metric_period_s == 0:
            samples.append((t, backlog))
        if t % params.decision_period_s == 0 and t > 0:
            visible = [value for at, value in samples if at + params.metric_delay_s <= t]
            backlog_metric = visible[-1] if visible else 0.0
            by_backlog = math.ceil(backlog_metric / policy.messages_per_worker - 1e-9)
            settled = [born for born in vms if t - born >= params.startup_s + policy.cooldown_s]
            # Settled VMs' average CPU; a drained queue leaves them idle. Busy VMs are at ~100 %
            # (the worker is CPU-bound: README benchmarks).
            by_cpu = math.ceil(len(settled) * busy_fraction / policy.cpu_target - 1e-9) if settled else 0
            recommended = max(policy.min_workers, min(policy.max_workers, max(by_backlog, by_cpu)))
            recommendations.append((t, recommended))
            recommendations = [(at, n) for at, n in recommendations if at > t - policy.stabilization_s]
            stabilized = max(n for _, n in recommendations)
            if stabilized > target:
                target = stabilized
            elif stabilized < target:
                removals = [at for at in removals if at > t - policy.scale_in_window_s]
                allowed = policy.scale_in_max_vms - len(removals)
                step = min(target - stabilized, max(0, allowed))
                target -= step
                removals += [t] * step
            while len(vms) < target:
                vms.append(float(t))
            if len(vms) > target:
                # The newest VMs go first (the ones not yet serving, if any).
                vms = sorted(vms)[:target]
        serving = sum(1 for born in vms if t - born >= params.startup_s)
        capacity = serving * params.rate_per_vm
        backlog += arriving
        done = min(backlog, capacity)
        backlog -= done
        busy_fraction = done / capacity if capacity else 0.0
        vm_seconds += len(vms)
        peak = max(peak, len(vms))
        cum_in.append(cum_in[-1] + arriving)
        cum_out.append(cum_out[-1] + done)
        series["backlog"].append(backlog)
        series["vms"].append(len(vms))
        series["serving"].append(serving)
        t += 1
        if progress and t % 3600 == 0:
            progress(3600)
        if t >= len(arrivals) and backlog <= 1e-6:
            drained_at = t if drained_at is None else drained_at
            # Go on until the group is back at its minimum: the stabilization period and the
            # scale-in control keep VMs (and their bill) after the queue is empty.
            if len(vms) <= policy.min_workers:
                break
    else:
        raise RuntimeError(f"{workload.name}: the queue did not drain within {max_s} s "
                           f"(max_workers={policy.max_workers} at {params.rate_per_vm}/s each)")
    arrived, served = np.array(cum_in), np.array(cum_out)
    # The second in which the last image was served (fluid: the fraction of it that was needed).
    last_row = float(np.interp(served[-1] * (1 - 1e-12), served[:drained_at + 1], np.arange(drained_at + 1, dtype=float)))
    waits = fifo_waits(arrived[:drained_at + 1], served[:drained_at + 1])
    p50, p95, p99 = (float(np.percentile(waits, q)) + params.base_latency_s for q in (50, 95, 99))
    first_in = float(np.argmax(arrived > 0)) - 1
    last_in = float(len(arrivals))
    hours = vm_seconds / 3600.0
    cost = hours * params.price_per_hour
    total = workload.total
    return SimResult(
        workload=workload.name, images=total, drain_s=last_row - max(0.0, first_in),
        after_arrivals_s=max(0.0, last_row - last_in),
        p50_s=p50, p95_s=p95, p99_s=p99,
        peak_vms=peak, vm_hours=hours, vm_cost=cost,
        cost_per_million=cost / total * 1e6 + FIXED_COST_PER_MILLION,
        timeline={name: np.array(values) for name, values in series.items()},
    )


# --- Output --------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def results_table(results: list[SimResult], params: SimParams) -> Table:
    p = params.policy
    table = Table(title=(
        f"SIMULATION of the instance group autoscaler ({p.min_workers}-{p.max_workers} x {p.machine_type}, "
        f"{p.messages_per_worker:.0f} messages per VM, CPU target {p.cpu_target:.2f}, init period "
        f"{p.cooldown_s:.0f} s; {params.rate_per_vm:.0f} images/s and {params.startup_s:.0f} s start-up per VM; "
        f"backlog metric every {params.metric_period_s} s, visible {params.metric_delay_s} s later)"))
    for column in ("workload", "images", "upload -> last row", "after last upload", "p50", "p95", "p99",
                   "peak VMs", "VM-hours", "VM cost", "$ per million (all)"):
        table.add_column(column, justify="left" if column == "workload" else "right")
    for r in results:
        table.add_row(r.workload, f"{r.images:,.0f}", _duration(r.drain_s), _duration(r.after_arrivals_s),
                      _duration(r.p50_s), _duration(r.p95_s), _duration(r.p99_s), str(r.peak_vms),
                      f"{r.vm_hours:.2f}", f"${r.vm_cost:.2f}", f"${r.cost_per_million:.2f}")
    return table


@click.command()
@click.option("--infra", "infra_dir", default=str(INFRA_DIR), show_default=True, type=click.Path(path_type=Path),
              help="Terraform directory whose variables.tf and worker.tf set the policy")
@click.option("--rate-per-vm", default=DEFAULT_RATE_PER_VM, show_default=True,
              help="images/s one worker VM drains (make bench / make bench-worker)")
@click.option("--startup", "startup_s", default=DEFAULT_STARTUP_S, show_default=True,
              help="s from VM creation to pulling: boot + image pull + worker start and model load")
@click.option("--base-latency", "base_latency_s", default=DEFAULT_BASE_LATENCY_S, show_default=True,
              help="upload -> row s on an idle pipeline")
@click.option("--metric-delay", "metric_delay_s", default=120, show_default=True,
              help="s before a backlog sample is visible to the autoscaler (Google: up to 120; 240 seen)")
@click.option("--min-workers", type=int, help="override the Terraform default")
@click.option("--max-workers", type=int, help="override the Terraform default")
@click.option("--messages-per-worker", type=float, help="override the Terraform default")
@click.option("--vm-price", type=float, help="$/h of one VM with its disk (default: the machine type's list price)")
def main(infra_dir, rate_per_vm, startup_s, base_latency_s, metric_delay_s, min_workers, max_workers,
         messages_per_worker, vm_price) -> None:
    """Replay the four workloads of issue 16 through the simulated autoscaler; print one table."""
    console = Console(width=200)
    try:
        policy = load_policy(infra_dir)
    except TerraformError as exc:
        raise SystemExit(f"scaling-sim: {exc}")
    overrides = {"min_workers": min_workers, "max_workers": max_workers, "messages_per_worker": messages_per_worker}
    policy = replace(policy, **{k: v for k, v in overrides.items() if v is not None})
    params = SimParams(policy=policy, rate_per_vm=rate_per_vm, startup_s=startup_s, base_latency_s=base_latency_s,
                       metric_delay_s=metric_delay_s, vm_price_per_hour=vm_price)
    from rich.progress import Progress

    results = []
    workloads = issue_workloads()
    with Progress(console=console, transient=True) as bar:
        for workload in workloads:
            task = bar.add_task(workload.name, total=None)
            results.append(simulate(workload, params, progress=lambda s: bar.advance(task, s)))
            bar.remove_task(task)
    console.print(results_table(results, params))
    console.print("A simulation of the autoscaler's rules with the inputs above, not a measurement on Google Cloud. "
                  "Latency = wait in the subscription + the idle pipeline's upload -> row. Cost: VM list price "
                  f"${params.price_per_hour}/h with disk; '$ per million (all)' adds ${FIXED_COST_PER_MILLION} of "
                  "uploads, logging, function, Pub/Sub and BigQuery per million images (README, What it costs).")


if __name__ == "__main__":
    main()
